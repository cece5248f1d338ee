"""Scoring horizons with the trainer's own evaluation (``RelexCallback(evaluate_horizons=True)``, ``horizons="auto"``,
``keep_best``, and :func:`evaluate_horizons` after training).

At tcut the extrapolated weights of each horizon are put into the LIVE model, ``trainer.evaluate()`` runs on the
trainer's ``eval_dataset`` (GRPO: it generates completions for the eval prompts and scores them with its reward
functions: ``eval_reward``, ``eval_rewards/<func>/mean``; other trainers: ``eval_loss``), and the live weights are
restored bit for bit afterwards (an exact copy is kept; restored also when evaluation raises). Each process puts its
own pieces: one process every tensor; DDP / ZeRO-1/2 the owner of each tensor computes it and broadcasts it to the
other replicas (ZeRO-1/2 with mixed precision: each process its flat fragment, broadcast to the others); ZeRO-3 each
process its flat partition (parameters DeepSpeed keeps gathered, the "persistent" small ones, are gathered again from
the partitions). The weights are put into the parameters a forward pass uses (16-bit under mixed precision, cast
as the written checkpoints are), never into the optimizer's fp32 master weights. FSDP2 is not supported yet (its
unsharded parameter cache).

What a scoring run leaves alone (the training run continues as if nothing happened; see :func:`isolated`):

* ``state.log_history``: the entries ``trainer.evaluate()`` appends for the extrapolated models are removed, so they
  are never mistaken for evaluations of the model being trained (``load_best_model_at_end``, plots of
  ``eval_reward`` over steps); the scores go to ``report.json["horizon_eval"]`` and, on the tcut step's log entry, to
  ``relex/eval/<step>/<metric>``.
* the other callbacks: none of them (``EarlyStoppingCallback``, W&B, TensorBoard, the progress bar, ``RelexCallback``
  itself) sees the evaluations' ``on_evaluate`` / ``on_log``: they are detached from the trainer's handler meanwhile.
* the random number generators (Python, NumPy, torch CPU and CUDA): saved and restored, so sampling during training
  goes on as without scoring. Each evaluation is seeded with ``args.seed`` (per process, as GRPO seeds itself):
  the tcut model and every horizon are scored on the same sampling noise (common random numbers: their differences
  are less noisy than independent runs), and a score can be reproduced by ``set_seed(args.seed,
  device_specific=True); trainer.evaluate()`` on the ``step-H`` checkpoint.
* ``model.training``, ``trainer.control``, GRPO's metric accumulators and completion log buffer; with vLLM, the weights are synced to the
  engine before each evaluation and again for the next training step.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import shutil
import time
from contextlib import contextmanager
from typing import Callable, Optional, Sequence

import torch

from ..errors import RelexInputError

logger = logging.getLogger("relex_callback")

PLOT_NAME = "horizons.png"
PLOT_SOURCE = "relex_callback"  # a tEXt entry of horizons.png: fs.foreign_output tells it from a user's picture
# Bookkeeping of an evaluation, not a property of the model scored: left out of horizon_eval.
_BOOKKEEPING = ("runtime", "samples_per_second", "steps_per_second", "model_preparation_time", "num_tokens", "epoch")


# ------------------------------------------------------------------------------------------------ the live weights
class LiveWeights:
    """This process's pieces of the tracked parameters of the live model: put other values in, restore the exact
    originals.

    Args:
        tracked (`list[TrackedTensor]`): what this process records (``t.read()`` is a flat view of its live piece).
        topology (`Topology`): the run's layout; in the replicated mode (DDP, ZeRO-1/2) every replica must hold every
            tensor, so ``model`` is needed to reach the tensors other processes own.
        model (`torch.nn.Module`, *optional*): the model (replicated mode).
    """

    def __init__(self, tracked, topology, model=None):
        self.tracked, self.topo = list(tracked), topology
        self.mode = topology.mode if topology is not None else "single"
        if self.mode == "fsdp2":
            raise RelexInputError("scoring horizons during an FSDP2 run is not supported; score them after training "
                                  "on one process with relex_callback.evaluate_horizons")
        if self.mode in ("replicated", "zero12"):  # every replica holds (and must get) every tensor, whole
            params = dict(model.named_parameters())
            self.replica = {n: params[n] for n in topology.names}
        self.saved = None

    def _readers(self):
        if self.mode in ("replicated", "zero12"):
            return {n: (lambda p=p: p.data.reshape(-1)) for n, p in self.replica.items()}
        return {t.spec.name: t.live_view for t in self.tracked}  # the live parameter's piece, not an fp32 master

    def _views(self):
        return {n: read() for n, read in self._readers().items()}

    @torch.no_grad()
    def save(self):
        """An exact copy of every piece this process will change."""
        self.saved = {n: v.clone() for n, v in self._views().items()}

    @torch.no_grad()
    def put(self, value_of: Callable[[int], torch.Tensor], specs):
        """Write ``value_of(i)`` (the flat piece of ``specs[i]``, this process's) into the live model."""
        readers = self._readers()

        def piece(name, spec):  # ZeRO-1/2 fragments: this process's flat range of the whole replica
            v = readers[name]()
            return v[spec.flat_start : spec.flat_start + spec.local_numel] if self.mode == "zero12" else v

        for i, spec in enumerate(specs):
            v = piece(spec.name, spec)
            if v.numel() and piece(spec.name, spec).data_ptr() != v.data_ptr():  # pragma: no cover (a copying reader)
                raise RuntimeError(f"relex: the reader of {spec.name} does not return a view of the live parameter")
            v.copy_(value_of(i).to(device=v.device, dtype=v.dtype).reshape(-1))
        self._sync()

    @torch.no_grad()
    def restore(self):
        views = self._views()
        for n, v in self.saved.items():
            views[n].copy_(v)
        self._sync(restoring=True)

    def _sync(self, restoring: bool = False):
        import torch.distributed as dist

        if self.mode == "replicated" and not restoring:  # every replica gets every tensor from its owner
            for n in self.topo.names:
                p = self.replica[n]
                buf = p.data if p.device == self.topo.comm_device() else p.data.to(self.topo.comm_device())
                dist.broadcast(buf, src=self.topo.owner[n])
                if buf is not p.data:
                    p.data.copy_(buf)
        elif self.mode == "zero12" and not restoring:  # every replica gets every fragment from the process holding it
            dev = self.topo.comm_device()
            for n in self.topo.names:
                flat = self.replica[n].data.reshape(-1)
                for r, (start, k) in enumerate(self.topo.ranges[n]):
                    if not k:
                        continue
                    view = flat[start : start + k]
                    buf = view if view.device == dev else view.to(dev)
                    dist.broadcast(buf, src=r)
                    if buf is not view:
                        view.copy_(buf)
        elif self.mode == "zero3":
            self._regather_zero3()

    def _regather_zero3(self):
        """DeepSpeed keeps small ("persistent") parameters gathered between steps and gathers them again from the
        partitions after each optimizer step; do the same after changing the partitions."""
        import torch.distributed as dist

        dev = self.topo.comm_device()
        for t in self.tracked:
            p = t.param
            if p is None or not hasattr(p, "ds_tensor") or p.data.numel() != p.ds_numel:
                continue  # partitioned only: ZeRO-3 gathers it from the partitions at each forward
            part = p.ds_tensor.data.reshape(-1).to(dev)
            parts = [torch.empty_like(part) for _ in range(self.topo.world)]
            dist.all_gather(parts, part)
            p.data.copy_(torch.cat(parts)[: p.ds_numel].view(p.data.shape).to(p.data.device))


# ------------------------------------------------------------------------------------------ one quiet evaluation
def _rng_state():
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def isolated(trainer):
    """Run evaluations of other weights inside a training run without leaving a trace: the RNG states,
    ``state.log_history`` (entries appended meanwhile are removed), the callbacks (detached meanwhile),
    ``trainer.control``, ``model.training`` and GRPO's completion log are as they were afterwards."""
    handler = trainer.callback_handler
    callbacks = list(handler.callbacks)
    history_len = len(trainer.state.log_history)
    control = copy.copy(trainer.control.__dict__) if getattr(trainer, "control", None) is not None else None
    model = trainer.model
    was_training = model.training
    rng = _rng_state()
    grpo_logs = copy.deepcopy(trainer._logs) if hasattr(trainer, "_logs") else None
    grpo_metrics = copy.deepcopy(trainer._metrics) if hasattr(trainer, "_metrics") else None
    handler.callbacks[:] = []
    try:
        yield
    finally:
        handler.callbacks[:] = callbacks
        del trainer.state.log_history[history_len:]
        if control is not None:
            trainer.control.__dict__.update(control)
        model.train(was_training)
        _set_rng_state(rng)
        if grpo_logs is not None:
            trainer._logs = grpo_logs
        if grpo_metrics is not None:
            trainer._metrics = grpo_metrics
        if hasattr(trainer, "_last_loaded_step"):
            trainer._last_loaded_step = -1  # vLLM: sync the restored weights before the next generation


def metric_name(key: str, prefix: str = "eval_") -> str:
    return key[len(prefix):] if key.startswith(prefix) else key


def clean_metrics(metrics: dict) -> dict:
    """The evaluation's metrics about the model (``eval_`` prefix dropped): numbers only, bookkeeping and memory
    metrics left out; a NaN becomes ``None``."""
    out = {}
    for k, v in metrics.items():
        name = metric_name(k)
        if name in _BOOKKEEPING or "_mem_" in name or isinstance(v, bool):
            continue
        if v is None:
            out[name] = None
        elif isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1):
            v = float(v)
            out[name] = v if math.isfinite(v) else None
    return out


def seeded_evaluate(trainer, seed: Optional[int] = None) -> dict:
    """``trainer.evaluate()`` with the RNGs seeded as ``set_seed(seed, device_specific=True)`` (default
    ``args.seed``), cleaned (:func:`clean_metrics`), with the standard error of each score as ``<metric>_stderr``
    (:func:`standard_errors`)."""
    from accelerate.utils import set_seed

    set_seed(trainer.args.seed if seed is None else seed, device_specific=True)
    if hasattr(trainer, "_last_loaded_step"):
        trainer._last_loaded_step = -1  # vLLM: sync the weights just put in before generating
    from ..compat import evaluate_with_logged_metrics

    with _completion_log(trainer) as samples:
        metrics = clean_metrics(evaluate_with_logged_metrics(trainer))  # TRL < 1.5 logs GRPO's eval metrics
    metrics.update(standard_errors(metrics, samples, _eval_size(trainer)))
    return metrics


# ------------------------------------------------------------------------------------------ a score's noise
STDERR = "_stderr"  # suffix of a score's standard error in horizon_eval ("reward_stderr")
NOISE_SE = 2.0  # a horizon beats the tcut model only when its score is better by more than this many standard errors


def _unbounded(x):
    """A copy of GRPO's completion log structure whose deques keep everything (the log keeps one generation batch)."""
    from collections import defaultdict, deque

    if isinstance(x, deque):
        return deque()
    if isinstance(x, defaultdict):
        return defaultdict(deque)
    if isinstance(x, dict):
        return {k: _unbounded(v) for k, v in x.items()}
    return x


@contextmanager
def _completion_log(trainer):
    """GRPO keeps the prompts and every reward function's reward of the last generated completions (gathered over
    processes) in ``trainer._logs``; during one evaluation it keeps all of them here: ``samples`` is filled with
    ``{"prompt": [...], "rewards": {func: [...]}}`` afterwards (empty for other trainers). The log is put back."""
    samples: dict = {}
    logs = getattr(trainer, "_logs", None)
    if not isinstance(logs, dict) or "prompt" not in logs or "rewards" not in logs:
        yield samples
        return
    trainer._logs = _unbounded(logs)
    try:
        yield samples
        samples["prompt"] = list(trainer._logs["prompt"])
        samples["rewards"] = {k: list(v) for k, v in trainer._logs["rewards"].items()}
        weights = getattr(trainer, "reward_weights", None)
        names = getattr(trainer, "reward_func_names", None)
        if weights is not None and names is not None and len(names) == len(weights):
            samples["weights"] = {n: float(w) for n, w in zip(names, weights)}
    finally:
        trainer._logs = logs


def _eval_size(trainer) -> Optional[int]:
    try:
        return len(trainer.eval_dataset)
    except TypeError:
        return None


def _prompt_key(p) -> str:
    import json

    try:
        return json.dumps(p, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return repr(p)


def _clustered_se(keys: list, values: list) -> Optional[float]:
    """Standard error of the mean of ``values`` with the prompt as the sampling unit: the spread of the per-prompt
    means over sqrt(number of prompts) (completions of one prompt are not independent draws). ``None`` below two
    prompts or without finite values."""
    groups: dict = {}
    for k, v in zip(keys, values):
        if v is not None and math.isfinite(v):
            groups.setdefault(k, []).append(v)
    means = [sum(g) / len(g) for g in groups.values()]
    n = len(means)
    if n < 2:
        return None
    m = sum(means) / n
    return math.sqrt(sum((x - m) ** 2 for x in means) / (n - 1) / n)


def standard_errors(metrics: dict, samples: dict, n_eval: Optional[int] = None) -> dict:
    """``{"<metric>_stderr": se}`` for the scores whose noise can be measured:

    * GRPO's ``reward`` and ``rewards/<func>/mean``: from the per-prompt spread of the eval rewards
      (:func:`_clustered_se`; ``reward`` is the weighted sum of the functions, as GRPO computes it);
    * a score named like an accuracy (a fraction in ``[0, 1]``) without per-sample data: binomial,
      ``sqrt(p (1 - p) / n)`` over the ``n`` eval examples.

    Others (``loss``) get none."""
    out = {}
    prompts, rewards = samples.get("prompt") or [], samples.get("rewards") or {}
    keys = [_prompt_key(p) for p in prompts]
    usable = {f: r for f, r in rewards.items() if len(r) == len(keys)}
    if keys and usable:
        for f, r in usable.items():
            if f"rewards/{f}/mean" in metrics:
                se = _clustered_se(keys, [float("nan") if v is None else float(v) for v in r])
                if se is not None:
                    out[f"rewards/{f}/mean{STDERR}"] = se
        weights = samples.get("weights") or {f: 1.0 for f in rewards}
        if "reward" in metrics and len(usable) == len(rewards) and set(weights) == set(rewards):
            total = []
            for j in range(len(keys)):
                vals = [(weights[f], rewards[f][j]) for f in rewards]
                ok = [(w, float(v)) for w, v in vals if v is not None and math.isfinite(float(v))]
                total.append(sum(w * v for w, v in ok) if ok else float("nan"))
            se = _clustered_se(keys, total)
            if se is not None:
                out["reward" + STDERR] = se
    for k, v in metrics.items():
        if (k + STDERR not in out and "accuracy" in k and not k.endswith(STDERR) and v is not None and 0 <= v <= 1
                and n_eval):
            out[k + STDERR] = math.sqrt(v * (1 - v) / n_eval)
    return out


# --------------------------------------------------------------------------------------------- the best horizon
def choose_metric(scores: dict, reward_metric: Optional[str] = None) -> tuple[Optional[str], str]:
    """Which metric ranks the horizons, and whether higher is better: ``reward_metric`` when given and present,
    else ``reward``, else the first metric named like a reward (``rewards/<func>/mean``; never a ``*_std``), all
    highest best; else ``loss``, lowest best. ``(None, "max")`` when there is none."""
    names = []
    for m in scores.values():
        names += [k for k in m if k not in names]
    if reward_metric:
        want = metric_name(reward_metric)
        if want in names:
            return want, "min" if "loss" in want else "max"
    if "reward" in names:
        return "reward", "max"
    rewards = [n for n in names if "reward" in n and "std" not in n and "zero" not in n]
    if rewards:
        return rewards[0], "max"
    if "loss" in names:
        return "loss", "min"
    return None, "max"


def rank_steps(scores: dict, metric: str, goal: str, steps: Sequence[int]) -> list[int]:
    """``steps`` best first by ``scores[str(step)][metric]``; missing or ``None`` scores last; ties: the earlier
    step first (less extrapolation)."""
    def key(s):
        v = scores.get(str(s), {}).get(metric)
        if v is None:
            return (1, 0.0, s)
        return (0, -v if goal == "max" else v, s)

    return sorted(steps, key=key)


def summarize(scores: dict, tcut: int, horizons: Sequence[int], reward_metric: Optional[str] = None) -> dict:
    """``best_horizon`` (the best-scored horizon) and ``horizon_eval_summary``: the metric, its goal, the tcut and
    best values with their standard errors, the difference and its standard error (``sqrt(se_tcut^2 +
    se_best^2)``: conservative, the two are scored on the same prompts and seeds), and the verdict.
    ``best_beats_tcut`` is true only when the best horizon is better by more than :data:`NOISE_SE` standard errors
    of the difference; otherwise the verdict says "within noise" (or "worse than the tcut model", or that the noise
    is unknown: no standard error, e.g. ``eval_loss``) and ``pick`` stays ``"tcut"``."""
    metric, goal = choose_metric(scores, reward_metric)
    if metric is None:
        return {"best_horizon": None, "horizon_eval_summary": {"metric": None}}
    order = rank_steps(scores, metric, goal, list(horizons))
    best = order[0] if order and scores.get(str(order[0]), {}).get(metric) is not None else None
    at_tcut = scores.get(str(tcut), {}).get(metric)
    best_value = scores[str(best)][metric] if best is not None else None
    se_t = scores.get(str(tcut), {}).get(metric + STDERR)
    se_b = scores.get(str(best), {}).get(metric + STDERR) if best is not None else None
    beats = diff = se_d = None
    verdict = "not scored"
    if best_value is not None and at_tcut is not None:
        diff = best_value - at_tcut if goal == "max" else at_tcut - best_value  # > 0: the horizon is better
        if se_t is None or se_b is None:
            verdict = "noise unknown (no standard error for this metric): the tcut model stays the pick"
        else:
            se_d = math.sqrt(se_t ** 2 + se_b ** 2)
            beats = diff > NOISE_SE * se_d
            verdict = ("beats the tcut model" if beats else "within noise: the tcut model stays the pick"
                       if diff >= -NOISE_SE * se_d else "worse than the tcut model: the tcut model stays the pick")
    return {"best_horizon": best, "horizon_eval_summary": {
        "metric": metric, "goal": goal, "tcut": int(tcut), "tcut_value": at_tcut, "tcut_stderr": se_t,
        "best_value": best_value, "best_stderr": se_b, "difference": diff, "difference_stderr": se_d,
        "best_beats_tcut": bool(beats) if beats is not None else None, "verdict": verdict,
        "pick": best if beats else "tcut", "ranking": order}}


# --------------------------------------------------------------------------------------- scoring inside a run
def score_in_run(trainer, result, theta0_of, tracked, topology, *, tcut: int, horizons: Sequence[int], model=None,
                 seed: Optional[int] = None) -> dict:
    """Score the live (tcut) model and each horizon with ``trainer.evaluate()``; every process calls it (evaluation
    is collective). ``result`` is the window's solution over this process's pieces, ``theta0_of(i)`` the flat
    theta_0 of ``result.specs[i]``. Returns ``{"horizon_eval": {"<step>": {metric: value, ..., "seconds": s}},
    "seconds": {"<step>": s}}``; the live weights are restored bit for bit, also when evaluation raises."""
    live = LiveWeights(tracked, topology, model)
    scores, seconds = {}, {}
    live.save()
    with isolated(trainer):
        t0 = time.perf_counter()
        scores[str(tcut)] = seeded_evaluate(trainer, seed)
        seconds[str(tcut)] = time.perf_counter() - t0
        try:
            for h in horizons:
                t0 = time.perf_counter()
                live.put(lambda i: result.extrapolate(i, h, theta0_of(i)), result.specs)
                scores[str(h)] = seeded_evaluate(trainer, seed)
                seconds[str(h)] = time.perf_counter() - t0
                logger.info("relex: scored step %d in %.2fs", h, seconds[str(h)])
        finally:
            live.restore()
    return {"horizon_eval": scores, "seconds": seconds}


def remove_all_but_best(out_dir: str, ranking: Sequence[int], k: int, run_id: Optional[str] = None,
                        tcut: Optional[int] = None) -> dict:
    """Delete the ``step-H/`` (and ``step-H-merged/``) directories of every horizon after the best ``k`` of
    ``ranking``: only those whose relex marker names this run (``run_id``), this horizon and ``tcut``; any other
    directory of that name (a user's, another run's) is left and said why. Returns ``{"k", "kept", "removed",
    "failed", "left"}``."""
    from ..files.fs import MERGED_SUFFIX, horizon_dir, not_ours

    kept, removed, failed, left = list(ranking[:k]), [], {}, {}
    for h in ranking[k:]:
        for d in (horizon_dir(out_dir, h), horizon_dir(out_dir, h) + MERGED_SUFFIX):
            if not os.path.lexists(d):
                continue
            why = not_ours(d, run_id, h, tcut)
            if why:
                left[os.path.basename(d)] = why
                logger.warning("relex: keep_best left %s: it %s", d, why)
                continue
            try:
                shutil.rmtree(d)
                removed.append(os.path.basename(d))
            except OSError as e:
                failed[os.path.basename(d)] = str(e)
                logger.warning("relex: keep_best could not remove %s: %s", d, e)
    return {"k": int(k), "kept": [int(h) for h in kept], "removed": removed, "failed": failed, "left": left}


def plot_horizons(scores: dict, summary: dict, tcut: int, path: str) -> Optional[str]:
    """``horizons.png``: the ranking metric against the step, the tcut model marked. ``None`` (and a log line)
    without matplotlib."""
    metric = summary.get("horizon_eval_summary", {}).get("metric")
    if metric is None:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("relex: matplotlib is not installed: no %s (pip install 'relex_callback[plot]')", PLOT_NAME)
        return None
    pts = sorted((int(s), m.get(metric)) for s, m in scores.items() if m.get(metric) is not None)
    if not pts:
        return None
    from ..files.fs import atomic_file

    fig, ax = plt.subplots(figsize=(6, 4))
    se = [scores[str(s)].get(metric + STDERR) for s, _ in pts]
    if any(e is not None for e in se):  # error bars: +- NOISE_SE standard errors (the band a winner must clear)
        ax.errorbar([s for s, _ in pts], [v for _, v in pts], yerr=[NOISE_SE * (e or 0.0) for e in se], fmt="o-",
                    capsize=3, label=f"eval {metric} +- {NOISE_SE:g} s.e.")
    else:
        ax.plot([s for s, _ in pts], [v for _, v in pts], "o-", label=f"eval {metric} (no standard error)")
    at_tcut = scores.get(str(tcut), {}).get(metric)
    if at_tcut is not None:
        ax.plot([tcut], [at_tcut], "s", color="black", ms=8, label=f"tcut model (step {tcut})")
        se_t = scores[str(tcut)].get(metric + STDERR)
        if se_t:
            ax.axhspan(at_tcut - NOISE_SE * se_t, at_tcut + NOISE_SE * se_t, color="grey", alpha=0.15,
                       label=f"tcut +- {NOISE_SE:g} s.e.")
    ax.axvline(tcut, color="grey", ls=":", lw=1)
    best = summary.get("best_horizon")
    hs = summary.get("horizon_eval_summary", {})
    if best is not None and hs.get("best_beats_tcut"):
        ax.plot([best], [scores[str(best)][metric]], "*", color="red", ms=12, label=f"best horizon {best}")
    elif best is not None:
        ax.plot([best], [scores[str(best)][metric]], "*", mfc="none", mec="grey", ms=12,
                label=f"best-scored {best}: {hs.get('verdict', '').split(':')[0]}")
    ax.set_xscale("log", base=2)
    ax.set_xticks([s for s, _ in pts], [str(s) for s, _ in pts])
    ax.minorticks_off()
    ax.set_xlabel("step (extrapolated beyond tcut)")
    ax.set_ylabel(f"eval {metric}")
    ax.set_title("RELEX horizons scored by the trainer's evaluation")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png", metadata={"Source": PLOT_SOURCE})  # what overwrite may replace
    plt.close(fig)
    return path


def apply_scores(report: dict, run: dict, *, tcut: int, horizons: Sequence[int], out_dir: str,
                 keep_best: Optional[int], reward_metric: Optional[str], coordinator: bool,
                 run_id: Optional[str] = None) -> dict:
    """Add the scores, the best horizon and (with ``keep_best``) the removals to ``report``; on the coordinator
    also remove the directories and draw the plot. Returns the report."""
    scores = run["horizon_eval"]
    for s, secs in run.get("seconds", {}).items():
        if s in scores:
            scores[s]["seconds"] = round(secs, 3)
    report["horizon_eval"] = {**report.get("horizon_eval", {}), **scores}
    summary = summarize(report["horizon_eval"], tcut, horizons, reward_metric)
    report.update(summary)
    if keep_best is not None and summary["best_horizon"] is not None:
        ranking = summary["horizon_eval_summary"]["ranking"]
        if not summary["horizon_eval_summary"]["best_beats_tcut"]:  # the tcut model stays the pick: keep them all
            report["keep_best"] = {"k": int(keep_best), "kept": list(ranking), "removed": [],
                                   "skipped": f"no horizon beats the tcut model ("
                                              f"{summary['horizon_eval_summary']['verdict']}); nothing removed"}
            ranking = None
        if ranking is None:
            pass
        elif coordinator:
            report["keep_best"] = remove_all_but_best(out_dir, ranking, keep_best, run_id, tcut)
        else:
            report["keep_best"] = {"k": int(keep_best), "kept": ranking[:keep_best]}
    if coordinator:
        try:
            plot = plot_horizons(report["horizon_eval"], summary, tcut, os.path.join(out_dir, PLOT_NAME))
        except Exception as e:  # a plot is not worth failing the run for
            logger.warning("relex: could not draw %s: %s", PLOT_NAME, e)
            plot = None
        if plot:
            report["horizon_plot"] = PLOT_NAME
    return report


def score_at_tcut(callback, trainer, sol, store, model, out_dir: str, control) -> Optional[dict]:
    """What ``RelexCallback._finish`` runs right after the pipeline (before the store is released): score, update
    and rewrite ``report.json`` (process 0), remove all but the best ``keep_best`` horizons, log
    ``relex/eval/<step>/<metric>``. Returns the scores, or ``None`` when scoring is off or impossible (said in the
    log)."""
    from ..files.report import REPORT_NAME, write_report

    s = callback.settings
    if not s.evaluate_horizons:
        return None
    what = "the ladder of horizons is written unscored" if s.auto_horizons else "the horizons are not scored"
    if trainer is None:
        logger.warning("relex: evaluate_horizons: the Trainer running the callback was not found; %s", what)
        return None
    if getattr(trainer, "eval_dataset", None) is None:
        logger.warning("relex: evaluate_horizons needs an eval_dataset on the trainer (pass eval_dataset=...); %s%s",
                       what, "; keep_best removes nothing" if s.keep_best is not None else "")
        return None
    topo = callback.topology
    if topo is not None and topo.mode == "fsdp2":
        logger.warning("relex: scoring horizons during an FSDP2 run is not supported; %s (score them after training "
                       "with relex_callback.evaluate_horizons)", what)
        return None
    callback._scoring = True
    t0 = time.perf_counter()
    try:
        run = score_in_run(trainer, sol, lambda i: store.theta0_of(sol.specs[i]), callback.tracked, topo,
                           tcut=s.tcut, horizons=s.horizons, model=model)
    except Exception as e:
        logger.error("relex: scoring the horizons with trainer.evaluate() failed (%s: %s); the state file, the horizons "
                     "and report.json are written and the live weights were restored; score them after training with "
                     "relex_callback.evaluate_horizons(trainer, %r, base=...)", type(e).__name__, e, out_dir)
        raise
    finally:
        callback._scoring = False
    total = time.perf_counter() - t0
    coordinator = topo is None or topo.process_rank == 0
    report = apply_scores(callback.report, run, tcut=s.tcut, horizons=s.horizons, out_dir=out_dir,
                          keep_best=s.keep_best, reward_metric=s.reward_metric, coordinator=coordinator,
                          run_id=store.run_id)
    report["horizon_eval_seconds"] = round(total, 3)
    if coordinator:
        write_report(os.path.join(out_dir, REPORT_NAME), report)
    if topo is not None and topo.is_distributed:
        topo.barrier()
    callback.report = report
    per = [run["seconds"][str(h)] for h in s.horizons]
    logger.info("relex: scored the tcut model and %d horizon(s) with trainer.evaluate() in %.2fs (%.2fs per horizon); "
                "best horizon by eval %s: %s", len(per), total, sum(per) / max(len(per), 1),
                report["horizon_eval_summary"].get("metric"), report.get("best_horizon"))
    metric = report["horizon_eval_summary"].get("metric")
    logged = lambda k: k == metric or k == "loss" or k == "reward" or (k.startswith("rewards/") and k.endswith("/mean"))  # noqa: E731
    logs = {f"relex/eval/{step}/{k}": v for step, m in run["horizon_eval"].items() for k, v in m.items()
            if logged(k) and v is not None}  # the ranking metric, rewards and loss; every metric is in report.json
    logs["relex/eval_seconds"] = total
    if report.get("best_horizon") is not None:
        logs["relex/best_horizon"] = report["best_horizon"]
    callback._emit(logs, control)
    return run


# ------------------------------------------------------------------------------------------- after training
def evaluate_horizons(trainer, relex_dir: str, base: Optional[str] = None, horizons: Optional[Sequence[int]] = None, *,
                      tcut_model: Optional[str] = None, seed: Optional[int] = None, keep_best: Optional[int] = None,
                      reward_metric: Optional[str] = None, write: bool = True) -> dict:
    r"""Score horizons of a finished window with ``trainer.evaluate()``, after training (one process).

    Each horizon's weights are put into ``trainer.model`` in turn and the model's own weights are restored bit for bit
    afterwards (also when evaluation raises). The weights of horizon ``H`` are those of ``<relex_dir>/step-H`` when
    that directory exists (what the run wrote), else what ``relex materialize`` would write: the state file's
    extrapolation from theta_0 read from ``base`` (checked against the state's fingerprints of theta_0), every
    untracked tensor from ``base``. After training the live model is not theta_0, so horizons without a directory
    need ``base``. With a PEFT model, each ``step-H/`` adapter directory is loaded with PEFT's
    ``set_peft_model_state_dict`` (only the directories written can be scored). Evaluations are seeded and isolated as
    in the callback (see :mod:`relex_callback.trainer.scoring`).

    Args:
        trainer (`transformers.Trainer`): a trainer with an ``eval_dataset``, whose model has the run's architecture
            (the scores are those of its ``evaluate()``: GRPO's rewards on the eval prompts, or ``eval_loss``).
        relex_dir (`str`): the directory the callback (or ``relex extrapolate``) wrote: ``relex_state.safetensors``,
            ``report.json``, ``step-H/``.
        base (`str`, *optional*): the checkpoint training started from (theta_0); needed for horizons without a
            ``step-H/`` directory.
        horizons (`list[int]` or `str`, *optional*): steps to score (any beyond tcut). Default: the ``step-H/``
            directories present.
        tcut_model (`str`, *optional*): a checkpoint of the model at tcut (e.g. ``<output_dir>/checkpoint-75``),
            scored as the reference ``"<tcut>"`` entry. Without it there is no tcut entry (the state holds no weights
            of the tcut model).
        seed (`int`, *optional*): the evaluation seed (default ``trainer.args.seed``).
        keep_best (`int`, *optional*): afterwards remove all but the best ``keep_best`` ``step-H/`` directories.
        reward_metric (`str`, *optional*): the metric that ranks the horizons (default: ``reward``, else the first
            reward metric, else ``loss``).
        write (`bool`, *optional*, defaults to `True`): merge the results into ``<relex_dir>/report.json`` (atomic
            rewrite) and draw ``horizons.png``.

    Returns:
        `dict`: ``{"horizon_eval": {"<step>": {metric: value, "seconds": s}}, "best_horizon": H,
        "horizon_eval_summary": {...}}`` (and ``keep_best`` when given).
    """
    st, peft = _open_state_for_scoring(trainer, relex_dir, write)
    hs, missing = _horizons_to_score(relex_dir, st, horizons, peft, base)
    if peft:
        return _evaluate_adapters(trainer, relex_dir, st, hs, tcut_model, seed, keep_best, reward_metric, write)
    from ..files.checkpoints import checkpoint_keys

    model = trainer.model
    sd = model.state_dict(keep_vars=True)
    keys = checkpoint_keys(model, sd)
    plan = _weights_plan(keys, st, relex_dir, hs, missing, base, tcut_model)
    scores, seconds = _score_plan(trainer, sd, keys, plan, seed)
    return _record(relex_dir, {"horizon_eval": scores, "seconds": seconds}, st.tcut, hs, keep_best, reward_metric, write,
                   st.run_id)


def _open_state_for_scoring(trainer, relex_dir, write):
    """One process, an eval_dataset, a relex directory with a state file (and a valid report); return (state, peft)."""
    import torch.distributed as dist

    from ..files.fs import STATE_INDEX_NAME, STATE_NAME
    from ..params import is_peft_model
    from ..files.state import load_state

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise RelexInputError("evaluate_horizons runs in one process; call it from a single-process script")
    if getattr(trainer, "eval_dataset", None) is None:
        raise RelexInputError("evaluate_horizons needs a trainer with an eval_dataset (pass eval_dataset=...)")
    model = trainer.model
    peft = is_peft_model(model)
    if not os.path.isdir(relex_dir):
        raise RelexInputError(f"{relex_dir} is not a directory; pass the relex output directory of the run")
    if not (os.path.isfile(os.path.join(relex_dir, STATE_NAME)) or os.path.isfile(os.path.join(relex_dir, STATE_INDEX_NAME))):
        raise RelexInputError(f"{relex_dir} holds no {STATE_NAME}; pass the relex output directory of the run")
    st = load_state(relex_dir)
    from ..files.report import REPORT_NAME, load_report
    from ..files.schema import check_report

    if write and os.path.isfile(os.path.join(relex_dir, REPORT_NAME)):  # read back after scoring: checked before it
        check_report(load_report(os.path.join(relex_dir, REPORT_NAME)), os.path.join(relex_dir, REPORT_NAME))
    return st, peft


def _horizons_to_score(relex_dir, st, horizons, peft, base):
    """The horizons to score (default: this run's step-H/ directories) and those without a directory of this run,
    refused when they cannot be rebuilt; return (horizons, missing)."""
    from ..config import parse_horizons
    from ..files.fs import horizon_dir, not_ours

    named = sorted(int(d[len("step-"):]) for d in os.listdir(relex_dir)
                   if d.startswith("step-") and d[len("step-"):].isdigit() and os.path.isdir(os.path.join(relex_dir, d)))
    # a step-H/ counts as this state's only when its marker names the state's run and tcut: an earlier run's (or
    # another tool's) directory of that name is never scored, kept or removed as this run's
    foreign = {h: why for h in named for why in [not_ours(horizon_dir(relex_dir, h), st.run_id, h, st.tcut)] if why}
    for h, why in foreign.items():
        logger.warning("relex: evaluate_horizons leaves %s alone: it %s", horizon_dir(relex_dir, h), why)
    present = [h for h in named if h not in foreign]

    def why_not(hs_):  # " (step-H/ <why it is not this run's>; ...)" for the directories that exist
        said = [f"step-{h}/ {foreign[h]}" for h in hs_ if h in foreign]
        return f" ({'; '.join(said)})" if said else ""

    hs = sorted(parse_horizons(horizons)) if horizons is not None else present
    if not hs:
        raise RelexInputError(f"{relex_dir} has no step-H/ directory of this state's run"
                              + (f" ({', '.join(f'step-{h}/ {w}' for h, w in foreign.items())})" if foreign else "")
                              + "; pass horizons=[...] and base=...")
    bad = [h for h in hs if h <= st.tcut]
    if bad:
        raise RelexInputError(f"horizons {bad} are not beyond the state's tcut {st.tcut}; use horizons > {st.tcut}")
    missing = [h for h in hs if h not in present]
    if missing and peft:
        raise RelexInputError(f"horizons {missing} have no step-H/ adapter directory of this state's run in {relex_dir}"
                              f"{why_not(missing)}; with a PEFT model only the adapter directories the run wrote can "
                              "be scored: write them first with `relex materialize --state "
                              f"{relex_dir} --base <the base model> --horizons {','.join(map(str, missing))}`")
    if missing and base is None:
        raise RelexInputError(
            f"horizons {missing} have no step-H/ directory of this state's run in {relex_dir}{why_not(missing)}"
            ": pass base=<the checkpoint training started from> (theta_0): after training the live model is no longer "
            "theta_0")
    return hs, missing


def _weights_plan(keys, st, relex_dir, hs, missing, base, tcut_model):
    """Where each scored step's weights come from (a directory, or the state's extrapolation from the checked base);
    return [(step, key -> tensor)]."""
    from ..files.checkpoints import DirectorySource
    from ..files.fs import horizon_dir

    def weights_from_dir(path):
        src = DirectorySource(path)
        lost = [k for k in keys if k not in src.meta]
        if lost:
            raise RelexInputError(f"{path} has no tensor {lost[0]} of the trainer's model: it is not this model's checkpoint")
        return lambda k: src.get(k)

    def weights_from_state(h):
        index = {s.name: i for i, s in enumerate(st.specs)}
        return lambda k: (st.extrapolate(index[k], h, thetas[k]).reshape(st.specs[index[k]].shape)
                          if k in index else src_base.get(k))

    if missing:
        src_base = DirectorySource(base)
        lost = [s.name for s in st.specs if s.name not in src_base.meta]
        if lost:
            raise RelexInputError(f"the base {base} has no tensor {lost[0]}: pass the base the state was computed from")
        from ..offline.api import base_theta0

        thetas = base_theta0(src_base, base, st.specs, lambda spec: st.info[spec.name]["theta0"], "the state's",
                             "pass the checkpoint training started from")
        from ..files.untracked import UntrackedSource

        src_base = UntrackedSource(src_base, st)  # untracked tensors as the run wrote them (relex materialize's)
        src_base.check(base)
    plan = []  # (step, key -> tensor)
    if tcut_model is not None:
        plan.append((st.tcut, weights_from_dir(tcut_model)))
    for h in hs:
        plan.append((h, weights_from_dir(horizon_dir(relex_dir, h)) if h not in missing else weights_from_state(h)))
    return plan


def _score_plan(trainer, sd, keys, plan, seed):
    """Load each step's weights into the model and evaluate it, restoring the model's own weights bit for bit after
    (also on an error); return (scores, seconds) by step."""
    saved = {k: sd[k].detach().clone() for k in keys}
    scores, seconds = {}, {}
    with isolated(trainer):
        try:
            for step, get in plan:
                t0 = time.perf_counter()
                with torch.no_grad():
                    for k in keys:
                        t = sd[k]
                        t.data.copy_(get(k).to(device=t.device, dtype=t.dtype).reshape(t.shape))
                scores[str(step)] = seeded_evaluate(trainer, seed)
                seconds[str(step)] = time.perf_counter() - t0
                logger.info("relex: scored step %d in %.2fs", step, seconds[str(step)])
        finally:
            with torch.no_grad():
                for k in keys:
                    sd[k].data.copy_(saved[k])
    return scores, seconds


def _evaluate_adapters(trainer, relex_dir, st, hs, tcut_model, seed, keep_best, reward_metric, write):
    """:func:`evaluate_horizons` for a PEFT model: each ``step-H/`` adapter loaded with PEFT's own
    ``set_peft_model_state_dict``; the adapter parameters restored bit for bit afterwards."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from ..files.fs import horizon_dir

    model = trainer.model
    plan = ([(st.tcut, tcut_model)] if tcut_model is not None else []) + [(h, horizon_dir(relex_dir, h)) for h in hs]
    for _, d in plan:
        if not os.path.isfile(os.path.join(d, "adapter_model.safetensors")):
            raise RelexInputError(f"{d} has no adapter_model.safetensors: pass adapter directories written with "
                                  "save_pretrained (what the run wrote for a PEFT model)")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad or "lora_" in n}
    saved = {n: p.detach().clone() for n, p in params.items()}
    scores, seconds = {}, {}
    with isolated(trainer):
        try:
            for step, d in plan:
                t0 = time.perf_counter()
                result = set_peft_model_state_dict(model, load_file(os.path.join(d, "adapter_model.safetensors")))
                unexpected = list(getattr(result, "unexpected_keys", []) or [])
                if unexpected:
                    raise RelexInputError(f"{d} holds adapter tensors the trainer's model does not have "
                                          f"({unexpected[:3]}): it is not this model's adapter")
                scores[str(step)] = seeded_evaluate(trainer, seed)
                seconds[str(step)] = time.perf_counter() - t0
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(saved[n])
    return _record(relex_dir, {"horizon_eval": scores, "seconds": seconds}, st.tcut, hs, keep_best, reward_metric, write,
                   st.run_id)


def _record(relex_dir, run, tcut, hs, keep_best, reward_metric, write, run_id=None) -> dict:
    """The result of :func:`evaluate_horizons`; with ``write`` merged into ``report.json`` (and keep_best applied)."""
    from ..files.report import REPORT_NAME, load_report, write_report

    scores = run["horizon_eval"]
    report_file = os.path.join(relex_dir, REPORT_NAME)
    report = load_report(report_file) if os.path.isfile(report_file) else {}
    if write:
        report = apply_scores(report, run, tcut=tcut, horizons=hs, out_dir=relex_dir, keep_best=keep_best,
                              reward_metric=reward_metric, coordinator=True, run_id=run_id)
        write_report(report_file, report)
    else:
        report = apply_scores({}, run, tcut=tcut, horizons=hs, out_dir=relex_dir, keep_best=None,
                              reward_metric=reward_metric, coordinator=False)
        report.pop("keep_best", None)
    out = {"horizon_eval": {s: report["horizon_eval"][s] for s in scores}, "best_horizon": report.get("best_horizon"),
           "horizon_eval_summary": report.get("horizon_eval_summary")}
    if "keep_best" in report and keep_best is not None:
        out["keep_best"] = report["keep_best"]
    return out

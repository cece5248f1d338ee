"""Horizons scored by the trainer's own evaluation (``RelexCallback(evaluate_horizons=True)``, ``horizons="auto"``,
``keep_best``, and :func:`evaluate_horizons` after training), and the best horizon chosen from the scores.

At tcut (:func:`score_at_tcut`) the extrapolated weights of each horizon are put into the LIVE model
(:class:`.live_weights.LiveWeights`), ``trainer.evaluate()`` runs on the trainer's ``eval_dataset`` (GRPO: it
generates completions for the eval prompts and scores them with its reward functions: ``eval_reward``,
``eval_rewards/<func>/mean``; other trainers: ``eval_loss``) inside :func:`.evaluation.isolated` (the training run
goes on as if nothing happened), and the live weights are restored bit for bit afterwards (an exact copy is kept;
restored also when evaluation raises). The scores go to ``report.json["horizon_eval"]`` and, on the tcut step's log
entry, to ``relex/eval/<step>/<metric>``; :func:`summarize` says whether the best horizon beats the tcut model by
more than the noise; ``keep_best`` removes the others (:mod:`relex_callback.files.prune`) and ``horizons.png`` is
drawn (:mod:`relex_callback.files.plot`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Optional, Sequence

import torch.distributed as dist
from safetensors.torch import load_file

from ..config import parse_horizons
from ..errors import RelexInputError
from ..files.checkpoints import DirectorySource, checkpoint_keys
from ..files.fs import STATE_INDEX_NAME, STATE_NAME, horizon_dir, not_ours
from ..files.plot import PLOT_NAME, plot_horizons
from ..files.prune import remove_all_but_best
from ..files.report import REPORT_NAME, load_report, write_report
from ..files.schema import check_report
from ..files.state import load_state
from ..files.untracked import UntrackedSource
from ..offline.api import base_theta0
from ..params import is_peft_model
from .evaluation import STDERR, isolated, metric_name, seeded_evaluate
from .live_weights import ExactCopy, LiveWeights

logger = logging.getLogger("relex_callback")

NOISE_SE = 2.0  # a horizon beats the tcut model only when its score is better by more than this many standard errors


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


def prompts_needed(gain: Optional[float], se_diff: Optional[float], prompts: Optional[float],
                   z: float = NOISE_SE) -> Optional[int]:
    """The eval prompts a call on a difference ``gain`` at ``z`` standard errors needs, ``n = (z sd / gain)^2``, where
    ``sd = se_diff sqrt(prompts)`` is the per-prompt spread of the difference measured on ``prompts`` prompts (the
    call needs ``z se_diff(n) < |gain|`` with ``se_diff(n) = sd / sqrt(n)``). ``None`` without a gain or a spread."""
    if gain is None or se_diff is None or not prompts or gain == 0 or not math.isfinite(gain):
        return None
    sd = se_diff * math.sqrt(prompts)
    return max(1, math.ceil(round((z * sd / abs(gain)) ** 2, 9)))  # (rounded: 4.000000001 is 4 prompts)


def horizon_calls(scores: dict, tcut: int, horizons: Sequence[int], metric: str, goal: str,
                  rollouts_per_step: Optional[int] = None) -> dict:
    """Per horizon, its score against the tcut model's: ``difference`` (positive: the horizon is better),
    ``difference_stderr`` (``sqrt(se_tcut^2 + se_h^2)``, as :func:`summarize`), ``call`` ("better" / "worse" beyond
    :data:`NOISE_SE` of them, else "within noise"; "noise unknown" without standard errors), and, from the spread
    measured on the ``scored_prompts`` of the evaluation, ``prompts_needed`` (:func:`prompts_needed`) for a call on
    this difference, ``completions_needed`` (the tcut model and the horizon each scored on them, at the evaluation's
    completions per prompt) and ``rollouts_steps``: those completions in training steps' rollouts
    (``rollouts_per_step``: completions one optimizer step generates)."""
    at_tcut = scores.get(str(tcut)) or {}
    out = {}
    for h in horizons:
        m = scores.get(str(h)) or {}
        v, v_t = m.get(metric), at_tcut.get(metric)
        if v is None or v_t is None:
            continue
        diff = v - v_t if goal == "max" else v_t - v
        se_t, se_h = at_tcut.get(metric + STDERR), m.get(metric + STDERR)
        rec = {"difference": diff, "difference_stderr": None, "call": "noise unknown", "prompts_needed": None}
        if se_t is not None and se_h is not None:
            se = math.sqrt(se_t ** 2 + se_h ** 2)
            rec["difference_stderr"] = se
            rec["call"] = ("better" if diff > NOISE_SE * se else "worse" if diff < -NOISE_SE * se
                           else "within noise")
            prompts, completions = at_tcut.get("scored_prompts"), at_tcut.get("scored_completions")
            n = prompts_needed(diff, se, prompts)
            rec["prompts_needed"] = n
            if n is not None and prompts and completions:
                rec["completions_needed"] = 2 * n * completions / prompts
                if rollouts_per_step:
                    rec["rollouts_steps"] = rec["completions_needed"] / rollouts_per_step
        out[str(h)] = rec
    return out


def rollouts_per_step(trainer) -> Optional[int]:
    """Completions one optimizer step of a GRPO trainer generates (``per_device_train_batch_size`` counts completions:
    times the accumulation steps and the processes); ``None`` when the trainer has no such arguments."""
    a = getattr(trainer, "args", None)
    try:
        return int(a.per_device_train_batch_size * a.gradient_accumulation_steps * a.world_size)
    except (AttributeError, TypeError):
        return None


def summarize(scores: dict, tcut: int, horizons: Sequence[int], reward_metric: Optional[str] = None,
              rollouts: Optional[int] = None) -> dict:
    """``best_horizon`` (the best-scored horizon) and ``horizon_eval_summary``: the metric, its goal, the tcut and
    best values with their standard errors, the difference and its standard error (``sqrt(se_tcut^2 +
    se_best^2)``: conservative, the two are scored on the same prompts and seeds), and the verdict.
    ``best_beats_tcut`` is true only when the best horizon is better by more than :data:`NOISE_SE` standard errors
    of the difference; otherwise the verdict says "within noise" (or "worse than the tcut model", or that the noise
    is unknown: no standard error, e.g. ``eval_loss``) and ``pick`` stays ``"tcut"``. ``horizon_calls``: every
    horizon against the tcut model (:func:`horizon_calls`; ``rollouts``: completions per training step)."""
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
        "pick": best if beats else "tcut", "ranking": order},
        "horizon_calls": horizon_calls(scores, tcut, horizons, metric, goal, rollouts)}


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
    return {"horizon_eval": scores, "seconds": seconds, "rollouts_per_step": rollouts_per_step(trainer)}


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
    summary = summarize(report["horizon_eval"], tcut, horizons, reward_metric, run.get("rollouts_per_step"))
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
            plot = plot_horizons(report["horizon_eval"], summary, tcut, os.path.join(out_dir, PLOT_NAME),
                                 noise_se=NOISE_SE, stderr_suffix=STDERR)
        except Exception as e:  # a plot is not worth failing the run for
            logger.warning("relex: could not draw %s: %s", PLOT_NAME, e)
            plot = None
        if plot:
            report["horizon_plot"] = PLOT_NAME
    return report


def score_at_tcut(s, trainer, sol, store, tracked, topology, report: dict, model, out_dir: str) -> Optional[tuple]:
    """What the window runs at tcut right after the pipeline (before the store is released): score the tcut model
    and every horizon of settings ``s``, add the scores to ``report`` (process 0 also removes all but the best
    ``keep_best`` horizons and draws the plot). Returns ``(report, the relex/eval/<step>/<metric> metrics to log)``,
    or ``None`` when scoring is impossible (said in the log)."""
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
    topo = topology
    if topo is not None and topo.mode == "fsdp2":
        logger.warning("relex: scoring horizons during an FSDP2 run is not supported; %s (score them after training "
                       "with relex_callback.evaluate_horizons)", what)
        return None
    t0 = time.perf_counter()
    try:
        run = score_in_run(trainer, sol, lambda i: store.theta0_of(sol.specs[i]), tracked, topo,
                           tcut=s.tcut, horizons=s.horizons, model=model)
    except Exception as e:
        logger.error(
            "relex: scoring the horizons with trainer.evaluate() failed (%s: %s); the state file, the "
            "horizons and report.json are written and the live weights were restored; score them after "
            "training with relex_callback.evaluate_horizons(trainer, %r, base=...)",
            type(e).__name__,
            e,
            out_dir,
        )
        raise
    total = time.perf_counter() - t0
    coordinator = topo is None or topo.process_rank == 0
    report = apply_scores(report, run, tcut=s.tcut, horizons=s.horizons, out_dir=out_dir,
                          keep_best=s.keep_best, reward_metric=s.reward_metric, coordinator=coordinator,
                          run_id=store.run_id)
    report["horizon_eval_seconds"] = round(total, 3)
    per = [run["seconds"][str(h)] for h in s.horizons]
    logger.info("relex: scored the tcut model and %d horizon(s) with trainer.evaluate() in %.2fs (%.2fs per horizon); "
                "best horizon by eval %s: %s", len(per), total, sum(per) / max(len(per), 1),
                report["horizon_eval_summary"].get("metric"), report.get("best_horizon"))
    metric = report["horizon_eval_summary"].get("metric")

    def logged(k):
        return k == metric or k == "loss" or k == "reward" or (k.startswith("rewards/") and k.endswith("/mean"))

    logs = {f"relex/eval/{step}/{k}": v for step, m in run["horizon_eval"].items() for k, v in m.items()
            if logged(k) and v is not None}  # the ranking metric, rewards and loss; every metric is in report.json
    logs["relex/eval_seconds"] = total
    if report.get("best_horizon") is not None:
        logs["relex/best_horizon"] = report["best_horizon"]
    return report, logs


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
    model = trainer.model
    sd = model.state_dict(keep_vars=True)
    keys = checkpoint_keys(model, sd)
    plan = _weights_plan(keys, st, relex_dir, hs, missing, base, tcut_model)
    scores, seconds = _score_plan(trainer, sd, keys, plan, seed)
    run = {"horizon_eval": scores, "seconds": seconds, "rollouts_per_step": rollouts_per_step(trainer)}
    return _record(relex_dir, run, st.tcut, hs, keep_best, reward_metric, write, st.run_id)


def _open_state_for_scoring(trainer, relex_dir, write):
    """One process, an eval_dataset, a relex directory with a state file (and a valid report); return (state, peft)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise RelexInputError("evaluate_horizons runs in one process; call it from a single-process script")
    if getattr(trainer, "eval_dataset", None) is None:
        raise RelexInputError("evaluate_horizons needs a trainer with an eval_dataset (pass eval_dataset=...)")
    model = trainer.model
    peft = is_peft_model(model)
    if not os.path.isdir(relex_dir):
        raise RelexInputError(f"{relex_dir} is not a directory; pass the relex output directory of the run")
    if not any(os.path.isfile(os.path.join(relex_dir, n)) for n in (STATE_NAME, STATE_INDEX_NAME)):
        raise RelexInputError(f"{relex_dir} holds no {STATE_NAME}; pass the relex output directory of the run")
    st = load_state(relex_dir)
    if write and os.path.isfile(os.path.join(relex_dir, REPORT_NAME)):  # read back after scoring: checked before it
        check_report(load_report(os.path.join(relex_dir, REPORT_NAME)), os.path.join(relex_dir, REPORT_NAME))
    return st, peft


def _horizons_to_score(relex_dir, st, horizons, peft, base):
    """The horizons to score (default: this run's step-H/ directories) and those without a directory of this run,
    refused when they cannot be rebuilt; return (horizons, missing)."""
    named = sorted(int(d[len("step-"):]) for d in os.listdir(relex_dir)
                   if d.startswith("step-") and d[len("step-"):].isdigit()
                   and os.path.isdir(os.path.join(relex_dir, d)))
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
    def weights_from_dir(path):
        src = DirectorySource(path)
        lost = [k for k in keys if k not in src.meta]
        if lost:
            raise RelexInputError(f"{path} has no tensor {lost[0]} of the trainer's model: it is not this model's "
                                  "checkpoint")
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
        thetas = base_theta0(src_base, base, st.specs, lambda spec: st.info[spec.name]["theta0"], "the state's",
                             "pass the checkpoint training started from")
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
    weights = ExactCopy({k: sd[k] for k in keys})
    scores, seconds = {}, {}
    with isolated(trainer):
        try:
            for step, get in plan:
                t0 = time.perf_counter()
                weights.put(get)
                scores[str(step)] = seeded_evaluate(trainer, seed)
                seconds[str(step)] = time.perf_counter() - t0
                logger.info("relex: scored step %d in %.2fs", step, seconds[str(step)])
        finally:
            weights.restore()
    return scores, seconds


def _evaluate_adapters(trainer, relex_dir, st, hs, tcut_model, seed, keep_best, reward_metric, write):
    """:func:`evaluate_horizons` for a PEFT model: each ``step-H/`` adapter loaded with PEFT's own
    ``set_peft_model_state_dict``; the adapter parameters restored bit for bit afterwards."""
    from peft import set_peft_model_state_dict  # peft is optional: only a PEFT model gets here

    model = trainer.model
    plan = ([(st.tcut, tcut_model)] if tcut_model is not None else []) + [(h, horizon_dir(relex_dir, h)) for h in hs]
    for _, d in plan:
        if not os.path.isfile(os.path.join(d, "adapter_model.safetensors")):
            raise RelexInputError(f"{d} has no adapter_model.safetensors: pass adapter directories written with "
                                  "save_pretrained (what the run wrote for a PEFT model)")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad or "lora_" in n}
    weights = ExactCopy(params)
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
            weights.restore()
    run = {"horizon_eval": scores, "seconds": seconds, "rollouts_per_step": rollouts_per_step(trainer)}
    return _record(relex_dir, run, st.tcut, hs, keep_best, reward_metric, write, st.run_id)


def _record(relex_dir, run, tcut, hs, keep_best, reward_metric, write, run_id=None) -> dict:
    """The result of :func:`evaluate_horizons`; with ``write`` merged into ``report.json`` (and keep_best applied)."""
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
           "horizon_eval_summary": report.get("horizon_eval_summary"), "horizon_calls": report.get("horizon_calls")}
    if "keep_best" in report and keep_best is not None:
        out["keep_best"] = report["keep_best"]
    return out

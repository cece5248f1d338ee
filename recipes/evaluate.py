"""Evaluate checkpoints (base, tcut, extrapolated ``step-H``, real ones) on a math dataset with the recipe's verifier.

Greedy decoding; accuracy = share of problems whose last ``\\boxed{}`` equals the reference under ``math-verify``.
vLLM when it is installed (and ``--backend`` allows), transformers ``generate`` otherwise. One table out:
``<output>.md`` (markdown) and ``<output>.json``.

    python recipes/evaluate.py \\
        --checkpoints base=Qwen/Qwen2.5-Math-1.5B runs/qwen2.5-math-1.5b/relex/step-500 \\
        --dataset HuggingFaceH4/MATH-500 --split test --output runs/qwen2.5-math-1.5b/eval
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from grpo_relex import DEFAULT_TEMPLATE, load_problems  # noqa: E402
from rewards import completion_text, is_correct, require_math_verify  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer
import torch


def parse_checkpoints(items: list[str]) -> list[tuple[str, str]]:
    """``label=path`` or ``path`` (label: ``parent/name`` of the path, e.g. ``relex/step-500``)."""
    out = []
    for item in items:
        if "=" in item and not os.path.exists(item):
            label, path = item.split("=", 1)
        else:
            path = item
            norm = os.path.normpath(path)
            label = (
                os.path.join(os.path.basename(os.path.dirname(norm)), os.path.basename(norm))
                if os.sep in norm
                else norm
            )
        out.append((label, path))
    labels = [label for label, _ in out]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"two checkpoints share a label ({labels}); name them with label=path")
    return out


def generate_transformers(path: str, prompts: list[str], max_new_tokens: int, batch_size: int, dtype: str) -> list[str]:
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = (
        AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype) if dtype != "auto" else "auto")
        .to(device)
        .eval()
    )
    outs = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            enc = tok(prompts[i : i + batch_size], return_tensors="pt", padding=True).to(device)
            gen = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                temperature=None, top_p=None, top_k=None,
            )
            outs += tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    del model
    return outs


def generate_vllm(path: str, prompts: list[str], max_new_tokens: int, dtype: str) -> list[str]:
    from vllm import LLM, SamplingParams

    llm = LLM(model=path, dtype=dtype)
    res = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_new_tokens))
    out = [r.outputs[0].text for r in res]
    del llm
    return out


def markdown_table(rows: list[dict]) -> str:
    lines = ["| checkpoint | accuracy | correct | n | mean completion chars |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['checkpoint']} | {r['accuracy']:.4f} | {r['correct']} | {r['n']} | {r['mean_chars']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", nargs="+", required=True, help="label=path or path (hub names work too)")
    p.add_argument(
        "--dataset", required=True, help="hub dataset name, a .jsonl/.json/.parquet file or a dataset directory"
    )
    p.add_argument("--dataset_config", default=None)
    p.add_argument("--split", default="test")
    p.add_argument("--problem_column", default="problem")
    p.add_argument("--solution_column", default="solution")
    p.add_argument("--prompt_template", default=DEFAULT_TEMPLATE)
    p.add_argument("--require_boxed", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    p.add_argument("--max_samples", type=int, default=None)
    p.add_argument("--max_new_tokens", type=int, default=3000)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--dtype", default="auto", help="bfloat16, float32 or auto (the checkpoint's)")
    p.add_argument("--backend", choices=["auto", "vllm", "transformers"], default="auto")
    p.add_argument("--output", default="eval", help="output prefix: writes <output>.md and <output>.json")
    a = p.parse_args(argv)

    require_math_verify()
    ckpts = parse_checkpoints(a.checkpoints)
    missing = [path for _, path in ckpts if os.path.sep in path and not os.path.exists(path)]
    if missing:
        raise SystemExit(f"checkpoint(s) not found: {missing}")
    backend = a.backend
    if backend == "auto":
        backend = "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"
    ds = load_problems(a.dataset, a.dataset_config, a.split)
    for col in (a.problem_column, a.solution_column):
        if col not in ds.column_names:
            raise SystemExit(f"the dataset has no column {col!r} (columns: {ds.column_names})")
    if a.max_samples:
        ds = ds.select(range(min(a.max_samples, len(ds))))
    prompts = [a.prompt_template.format(problem=x) for x in ds[a.problem_column]]
    solutions = list(ds[a.solution_column])

    rows = []
    for label, path in ckpts:
        t0 = time.perf_counter()
        if backend == "vllm":
            outs = generate_vllm(path, prompts, a.max_new_tokens, a.dtype)
        else:
            outs = generate_transformers(path, prompts, a.max_new_tokens, a.batch_size, a.dtype)
        correct = sum(is_correct(completion_text(o), s, require_boxed=a.require_boxed) for o, s in zip(outs, solutions))
        rows.append({
            "checkpoint": label, "path": path, "n": len(prompts), "correct": int(correct),
            "accuracy": correct / max(1, len(prompts)), "mean_chars": sum(map(len, outs)) / max(1, len(outs)),
            "seconds": round(time.perf_counter() - t0, 3),
        })
        print(f"{label}: accuracy {rows[-1]['accuracy']:.4f} ({correct}/{len(prompts)})", flush=True)

    result = {"dataset": a.dataset, "split": a.split, "backend": backend, "require_boxed": a.require_boxed,
              "max_new_tokens": a.max_new_tokens, "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)
    with open(a.output + ".json", "w") as f:
        json.dump(result, f, indent=2)
    table = markdown_table(rows)
    with open(a.output + ".md", "w") as f:
        f.write(f"Dataset `{a.dataset}` ({a.split}), greedy, {backend}, verifier math-verify\n\n" + table)
    print(table)
    return result


if __name__ == "__main__":
    main()

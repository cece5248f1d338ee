"""Digest of every file the package writes on a fixed set of small jobs: the check that a refactor changed no byte.

Runs, on the tiny local model (nothing downloaded), real GRPO windows with ``RelexCallback`` under the options that
change what is written (buffer dtype, rank, fit family, stride, folded ring, exclude, validation mode), then the
``relex`` command on the saved checkpoints (streamed and buffered extrapolate, materialize, report), and prints one
line per output file: its path under the job directory and the SHA-256 of its bytes. ``report.json`` and the
validation JSON are hashed without their timing fields (seconds, dates), which differ on every run; the run id is
replaced by a placeholder (a fresh uuid per window). Everything else is hashed as written.

    PYTHONPATH=. python bench/output_digest.py > before.txt      # on the old commit
    PYTHONPATH=. python bench/output_digest.py > after.txt       # on the new one
    diff before.txt after.txt                                      # empty: no output changed

Takes about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import torch
from relex_callback import RelexCallback
from relex_callback.examples.toy import arithmetic_problems, build_model, build_tokenizer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# the JSON keys whose values are wall-clock measurements or dates (differ on every run)
VOLATILE = re.compile(
    r"(seconds|_s$|^time|timing|elapsed|date|created|written_at|wall|duration|throughput|per_s|bytes_per)"
)
TCUT, HORIZONS = 4, (8, 12)

JOBS = {
    "default": dict(),
    "f32_rank2_power": dict(dtype="float32", rank=2, fit="power"),
    "stride2_fitstart": dict(dtype="float32", stride=2, tcut=6, fit_start=2),
    "folded": dict(dtype="float32", tcut=6, buffer_slots=2, fold_rank=2),
    "exclude": dict(dtype="float32", exclude=[r"embed_tokens"]),
    "validation": dict(dtype="float32", stop_training=False),
    "auto_fit": dict(dtype="float32", tcut=6, fit="auto"),
}


def _scrub(obj, run_ids, timing=False):
    if isinstance(obj, dict):
        return {k: ("<t>" if (timing or VOLATILE.search(k)) and isinstance(v, (int, float))
                    else _scrub(v, run_ids, timing or bool(VOLATILE.search(k)))) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_scrub(v, run_ids, timing) for v in obj]
    if isinstance(obj, str):
        for r in run_ids:
            obj = obj.replace(r, "<run>")
        return obj.replace(ROOT[0], "<root>") if ROOT else obj
    return obj


ROOT: list = []


def _safetensors(data: bytes, run_ids) -> bytes:
    """The header as canonical JSON (safetensors writes the metadata keys in no fixed order) + the tensor bytes."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    meta = header.get("__metadata__") or {}
    for k, v in meta.items():
        try:
            meta[k] = _scrub(json.loads(v), run_ids)
        except ValueError:
            meta[k] = _scrub(v, run_ids)
    return json.dumps(header, sort_keys=True).encode() + data[8 + n:]


def _digest(path, run_ids) -> str:
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".safetensors"):
        data = _safetensors(data, run_ids)
    elif path.endswith(".json"):
        try:
            obj = _scrub(json.loads(data), run_ids)
            data = json.dumps(obj, sort_keys=True).encode()
        except ValueError:
            pass
    elif path.endswith((".md", ".txt")):
        text = data.decode(errors="replace")
        for r in run_ids:
            text = text.replace(r, "<run>")
        data = re.sub(r"\d+\.\d+ ?s\b", "<t>", text).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def digit_reward(completions, **kwargs) -> list[float]:
    """The fraction of a completion's characters that are digits: separates an untrained model's completions, so
    GRPO moves the weights from step 1 (the test suite's shaping reward)."""
    out = []
    for c in completions:
        text = (c if isinstance(c, str) else c[0]["content"]).strip()
        out.append(sum(ch.isdigit() for ch in text) / len(text) if text else 0.0)
    return out


def run_job(root, name, kw):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    d = os.path.join(root, f"job-{name}")
    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_model(tok)
    model.save_pretrained(os.path.join(d, "base"))
    tok.save_pretrained(os.path.join(d, "base"))
    kw = dict(kw)
    tcut = kw.pop("tcut", TCUT)
    horizons = [2 * tcut, 3 * tcut]
    steps = horizons[-1] if kw.get("stop_training") is False else tcut
    cb = RelexCallback(tcut=tcut, horizons=horizons, **kw)
    args = GRPOConfig(output_dir=os.path.join(d, "run"), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=4, learning_rate=1e-3, lr_scheduler_type="constant", warmup_steps=0,
                      max_steps=steps, logging_steps=1, save_strategy="steps", save_steps=1, report_to=[],
                      use_cpu=True, bf16=False, seed=0, disable_tqdm=True)
    ds = Dataset.from_list(arithmetic_problems(64, seed=1))
    GRPOTrainer(model=model, reward_funcs=digit_reward, args=args, train_dataset=ds, processing_class=tok,
                callbacks=[cb]).train()
    return d, tcut, horizons


def relex(*argv):
    exe = os.path.join(os.path.dirname(sys.executable), "relex")
    r = subprocess.run([exe, *argv], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")})
    return r.returncode, r.stdout


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keep", default=None, help="write the jobs here and keep them (default: a temporary directory)")
    p.add_argument("--only", default=None, help="comma-separated job names")
    a = p.parse_args(argv)
    root = os.path.abspath(a.keep or tempfile.mkdtemp(prefix="relex-digest-"))
    ROOT.append(root)
    names = a.only.split(",") if a.only else list(JOBS)
    lines = []
    for name in names:
        with contextlib.redirect_stdout(sys.stderr):  # the trainer prints its logs: keep stdout for the digests
            d, tcut, horizons = run_job(root, name, JOBS[name])
        ckpts = sorted(glob.glob(os.path.join(d, "run", "checkpoint-*")), key=lambda s: int(s.rsplit("-", 1)[1]))
        ckpts = [c for c in ckpts if int(c.rsplit("-", 1)[1]) <= tcut]
        hz = ",".join(str(h) for h in horizons)
        if name in ("default", "f32_rank2_power", "stride2_fitstart"):
            opts = {"default": [], "f32_rank2_power": ["--dtype", "float32", "--rank", "2", "--fit", "power"],
                    "stride2_fitstart": ["--dtype", "float32", "--stride", "2", "--fit-start", "2"]}[name]
            for form in ("--streaming", "--no-streaming"):
                rc, _ = relex(
                    "extrapolate",
                    "--base",
                    os.path.join(d, "base"),
                    "--checkpoints",
                    *ckpts,
                    "--horizons",
                    hz,
                    "--out",
                    os.path.join(d, "cli" + form.replace("--", "-")),
                    "--no-progress",
                    form,
                    *opts,
                )
                lines.append(f"exit {rc} extrapolate {name} {form}")
            rc, _ = relex("materialize", "--state", os.path.join(d, "run", "relex"), "--base", os.path.join(d, "base"),
                          "--horizons", f"{horizons[0]},{5 * tcut}", "--out", os.path.join(d, "materialized"))
            lines.append(f"exit {rc} materialize {name}")
            rc, out = relex("report", os.path.join(d, "run", "relex"))
            text = re.sub(r"[0-9.]+ ?s\b", "", out)
            lines.append(f"exit {rc} report {name} sha={hashlib.sha256(text.encode()).hexdigest()[:16]}")
    run_ids = set()
    for meta in glob.glob(os.path.join(root, "**", "*.json"), recursive=True):
        try:
            with open(meta) as f:
                text = f.read()
        except OSError:
            continue
        run_ids.update(re.findall(r"\b[0-9a-f]{32}\b", text))
    for path in sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True)):
        rel = os.path.relpath(path, root)
        if os.path.isdir(path) or "/run/checkpoint-" in "/" + rel or rel.split(os.sep)[1] == "base":
            continue
        if re.search(r"(trajectory|\.lock|\.bin$|rows-|tmp)", rel):
            continue  # the run's working files (trajectory rows, lock): not outputs
        if rel.split(os.sep)[1] == "run" and rel.split(os.sep)[2] != "relex":
            continue  # the trainer's own files (TRL's model card lists its tags in set order)
        lines.append(f"{_digest(path, run_ids)} {rel}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

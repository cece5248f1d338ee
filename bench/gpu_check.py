"""One command for the checks that need a GPU (`make gpu-check`); on a machine without CUDA it says so and exits 0.

On a machine with CUDA, each check runs in its own process (a clean CUDA context, a timeout each), and one summary
table is printed. ``kernels``, ``device`` and ``host`` run side by side (each uses a sliver of one GPU), then the
solver bench alone (its figures are timings): at most 95 + 25 = 120 seconds in all, the 2 minutes `make gpu-check`
gives them before the paper-regime preset.

1. ``kernels``: ``pytest tests/test_kernels.py`` with the Triton kernels compiled for the GPU (``TRITON_INTERPRET=0``;
   the test suite's default is the CPU interpreter);
2. ``solver bench``: ``bench/solver.py --device cuda`` (gram and power on a 75-step bf16 trajectory; prints figures);
3. ``GRPO device tier`` / ``GRPO host tier``: a tiny TRL GRPO run on the GPU with ``RelexCallback(storage="device")``
   and ``storage="host"`` (pinned host memory), a checkpoint saved at every step; the horizons the callback wrote are
   compared tensor by tensor with those the CPU engine (``relex extrapolate --device cpu`` over the same checkpoints,
   buffered and streamed) writes (relative error <= 1e-5, float32 buffer).

Nothing is installed: a check whose requirement is missing (triton, trl, datasets) is reported as SKIP with the
reason, or as FAIL with ``RELEX_GPU_CHECK_STRICT=1`` (``bench/gpu_run.sh run`` sets it: there the bundle brought
them). Exit code: 0 when nothing failed (also on a CPU machine), 1 otherwise.

    python bench/gpu_check.py [--only kernels,solver,device,host]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKS = ("kernels", "solver", "device", "host")
TIMEOUTS = {"kernels": 95, "solver": 25, "device": 95, "host": 95}
PARALLEL = ("kernels", "device", "host")  # side by side, then the solver bench alone: max(95) + 25 = 120 s
TCUT, HORIZONS = 6, (20, 40)
STRICT = os.environ.get("RELEX_GPU_CHECK_STRICT") == "1"  # a missing requirement fails instead of skipping


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO, os.path.join(REPO, "tests"), env.get("PYTHONPATH", "")])
    env["TRITON_INTERPRET"] = "0"  # tests/conftest.py sets 1 only when unset: the kernels compile for the GPU
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _missing(*modules) -> list[str]:
    import importlib.util

    return [m for m in modules if importlib.util.find_spec(m) is None]


def _run(cmd, timeout) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
        return r.returncode, r.stdout + r.stderr, time.perf_counter() - t0
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return 124, out + f"\n(timed out after {timeout} s)", time.perf_counter() - t0


def _tail(text: str, n: int = 1) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " / ".join(lines[-n:])[-300:]


def check_kernels():
    miss = _missing("triton", "pytest")
    if miss:
        return ("FAIL" if STRICT else "SKIP"), 0.0, f"{', '.join(miss)} not installed (the test extras)"
    rc, out, dt = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py"],
                       TIMEOUTS["kernels"])
    return ("PASS" if rc == 0 else "FAIL"), dt, _tail(out)


def check_solver():
    rc, out, dt = _run([sys.executable, "bench/solver.py", "--device", "cuda", "--T", "75", "--numel", "2e7",
                        "--tensors", "40", "--repeat", "2", "--noise", "0.05", "--no-svd"], TIMEOUTS["solver"])
    lines = [ln for ln in out.splitlines() if "gram" in ln or "power" in ln]
    return ("PASS" if rc == 0 else "FAIL"), dt, (" / ".join(lines[-2:]) or _tail(out))[-300:]


def check_grpo(tier: str):
    miss = _missing("trl", "datasets")
    if miss:
        return ("FAIL" if STRICT else "SKIP"), 0.0, f"{', '.join(miss)} not installed (the test extras)"
    rc, out, dt = _run([sys.executable, os.path.abspath(__file__), "--grpo", tier], TIMEOUTS[tier])
    for ln in reversed(out.splitlines()):
        if ln.startswith("GPU-CHECK-RESULT "):
            res = json.loads(ln[len("GPU-CHECK-RESULT "):])
            ok = rc == 0 and res["ok"]
            return ("PASS" if ok else "FAIL"), dt, res["detail"]
    return "FAIL", dt, _tail(out, 3)


def grpo_child(tier: str) -> int:
    """One tiny GRPO run on the GPU with the given buffer tier; compares the callback's horizons with the CPU
    engine's over the checkpoints of the same run. Prints one ``GPU-CHECK-RESULT {json}`` line."""
    from datasets import Dataset
    from safetensors.torch import load_file
    from trl import GRPOConfig, GRPOTrainer

    from helpers import digit_reward
    from relex_callback import RelexCallback
    from relex_callback.offline.api import extrapolate_checkpoints
    from relex_callback.examples.toy import arithmetic_problems, build_model, build_tokenizer

    out = tempfile.mkdtemp(prefix=f"relex_gpu_{tier}_")
    tok = build_tokenizer()
    model = build_model(tok)
    model.save_pretrained(os.path.join(out, "base"))
    tok.save_pretrained(os.path.join(out, "base"))
    args = GRPOConfig(output_dir=out, per_device_train_batch_size=4, num_generations=4, max_completion_length=4,
                      learning_rate=1e-3, lr_scheduler_type="constant", warmup_steps=0, max_steps=30, logging_steps=1,
                      save_strategy="steps", save_steps=1, report_to=[], use_cpu=False, bf16=False, seed=0,
                      disable_tqdm=True)
    cb = RelexCallback(tcut=TCUT, horizons=list(HORIZONS), dtype="float32", storage=tier)
    trainer = GRPOTrainer(model=model, reward_funcs=digit_reward, args=args,
                          train_dataset=Dataset.from_list(arithmetic_problems(64, seed=1)), processing_class=tok,
                          callbacks=[cb])
    t0 = time.perf_counter()
    trainer.train()
    t_train = time.perf_counter() - t0
    relex = os.path.join(out, "relex")
    rep = json.load(open(os.path.join(relex, "report.json")))
    device = next(model.parameters()).device
    ckpts = [os.path.join(out, f"checkpoint-{t}") for t in range(1, TCUT + 1)]
    worst = {}
    for streaming in (False, True):
        cpu = os.path.join(out, f"cpu-{int(streaming)}")
        extrapolate_checkpoints(os.path.join(out, "base"), ckpts, list(HORIZONS), cpu, dtype="float32", device="cpu",
                                streaming=streaming)
        for h in HORIZONS:
            a = load_file(os.path.join(relex, f"step-{h}", "model.safetensors"))
            b = load_file(os.path.join(cpu, f"step-{h}", "model.safetensors"))
            if a.keys() != b.keys():
                worst["keys"] = float("inf")
                continue
            for k in a:
                if a[k].is_floating_point():
                    d, r = a[k].double(), b[k].double()
                    e = float((d - r).norm() / r.norm().clamp_min(1e-30))
                    worst[k] = max(worst.get(k, 0.0), e)
    w = max(worst.values()) if worst else float("inf")
    # RELEX_GPU_CHECK_ALLOW_CPU=1: the test suite runs this child on a CPU machine to check the comparison itself
    want = "cpu" if os.environ.get("RELEX_GPU_CHECK_ALLOW_CPU") == "1" else "cuda"
    ok = device.type == want and rep.get("storage") == tier and w <= 1e-5
    detail = (f"model on {device}, buffer {rep.get('storage')}, solver {rep.get('solver')}, train {t_train:.0f} s; "
              f"horizons {list(HORIZONS)} vs CPU engine (buffered and streamed): worst relative error {w:.1e} "
              f"({max(worst, key=worst.get) if worst else '-'})")
    print("GPU-CHECK-RESULT " + json.dumps({"ok": bool(ok), "detail": detail}), flush=True)
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    return 0 if ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(CHECKS), help=f"comma separated subset of {', '.join(CHECKS)}")
    ap.add_argument("--grpo", choices=("device", "host"), help=argparse.SUPPRESS)  # the child process of a GRPO check
    args = ap.parse_args(argv)
    if args.grpo:
        return grpo_child(args.grpo)
    only = [c for c in args.only.split(",") if c]
    bad = [c for c in only if c not in CHECKS]
    if bad:
        print(f"gpu-check: unknown check(s) {bad}; choose from {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU visible on this machine (torch.cuda.is_available() is False): nothing was run. "
              f"Skipped: {', '.join(only)}. Run `make gpu-check` on a machine with an NVIDIA GPU.")
        return 0
    print(f"gpu-check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    rows = []
    t_all = time.perf_counter()
    runners = {"kernels": ("Triton kernels, native (tests/test_kernels.py)", check_kernels),
               "solver": ("bench/solver.py --device cuda", check_solver),
               "device": ("GRPO, device tier vs CPU engine", lambda: check_grpo("device")),
               "host": ("GRPO, pinned host tier vs CPU engine", lambda: check_grpo("host"))}
    from concurrent.futures import ThreadPoolExecutor

    done = {}
    with ThreadPoolExecutor(max_workers=len(PARALLEL)) as pool:  # each check is a child process: threads suffice
        futures = {c: pool.submit(runners[c][1]) for c in PARALLEL if c in only}
        for c, f in futures.items():
            done[c] = f.result()
            print(f"gpu-check: {runners[c][0]}: {done[c][0]} ({done[c][1]:.0f} s)", flush=True)
    for c in CHECKS:
        if c in only and c not in done:
            done[c] = runners[c][1]()
            print(f"gpu-check: {runners[c][0]}: {done[c][0]} ({done[c][1]:.0f} s)", flush=True)
    for c in CHECKS:
        name = runners[c][0]
        if c not in only:
            rows.append((name, "SKIP", 0.0, "not selected (--only)"))
            continue
        status, dt, detail = done[c]
        rows.append((name, status, dt, detail))
    print("\n| check | result | seconds | detail |\n|---|---|---|---|")
    for name, status, dt, detail in rows:
        print(f"| {name} | {status} | {dt:.0f} | {detail.replace('|', '/')} |")
    skipped = [r[0] for r in rows if r[1] == "SKIP"]
    failed = [r[0] for r in rows if r[1] == "FAIL"]
    print(f"\ngpu-check: {len(rows) - len(skipped) - len(failed)} passed, {len(failed)} failed, {len(skipped)} skipped"
          + (f" ({'; '.join(skipped)})" if skipped else "") + f"; {time.perf_counter() - t_all:.0f} s in all")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

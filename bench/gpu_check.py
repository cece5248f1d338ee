"""The device check in one command that fits a time budget (default 600 s): every part with its own budget and
timeout, one results JSON rewritten after every part, one line per part. See docs/gpu.md.

    python bench/gpu_check.py --dry-run [--total 600] [--bundle]   # the time plan; exit 1 if it does not fit
    python bench/gpu_check.py [--total 600] [--bundle] [--json PATH] [--only a,b] [--no-preset]

Parts (the data of every check is made on the GPU with torch ops; ``bench/gpu_checks.py`` holds the checks):

* ``stage-partN`` / ``assemble`` / ``install`` / ``imports`` (``--bundle``, a machine without network): the wheels of
  ``bench/gpu_bundle.py``; the parts before the last are staged by commands of their own before this one
  (``bash bench/gpu_run.sh stage gpu_bundle/partN``), and the plan counts them;
* ``env``: the GPU, its memory, the versions;
* ``kernels``: the Triton Gram and projection kernels against exact results, offsets past 2^31 (a);
* ``fallback``: a kernel that raises is replaced by its reference, one warning, the same horizon (b);
* ``pinned``: the host tier pins exactly the planned bytes and gives them back (d);
* ``memory``: Qwen2.5-1.5B, Trainer + AdamW + ``RelexCallback(storage="auto")``, the device's peak against the plan (c);
* ``gram-bandwidth``: the Gram kernel's GB/s against a plain read of the same buffer (e);
* ``snapshot``: the per-step snapshot of 1.5B parameters against a plain copy (f);
* ``preset``: ``recipes/replicate/paper_regime.py --preset auto`` in the seconds left (g).

The bundle steps run beside ``kernels``, ``pinned`` and ``fallback`` (correctness checks); the timed checks and the
preset run alone. Without CUDA the checks run at CPU scale (their code, not a GPU's figures; ``pinned`` is skipped)
and the preset is its ``cpu-smoke`` form. Exit code: 0 when nothing failed, 1 otherwise, 2 for bad arguments.
The results JSON: ``--json``, else ``$OUT/gpu_check.json`` when ``$OUT`` is set, else ``runs/gpu_check.json``.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time
import importlib.metadata as md
import importlib.util
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT = 600  # seconds: the whole plan, the stage commands before this one included
RESERVE = 15  # seconds kept at the end: the preset's SIGTERM grace, the last JSON write, the shell's exit
PRESET_MIN = 120  # the preset measures ~60 s of start-up and probe steps before it can plan anything
STAGE = 15  # one part: verify ~56 MiB of chunks and copy them
DEFAULT_PARTS = 3  # bundle parts when no manifest is there to count them (`make gpu-bundle` writes 3)
BUNDLE_STEPS = [("assemble", 20, "join the staged chunks into wheels, every sha256 checked"),
                ("install", 45, "pip install --no-index --target gpu_bundle/site: the wheels whose module is missing"),
                ("imports", 25, "every assumed and bundled module imports; versions")]
CHECK_BUDGETS = {"env": 15, "kernels": 70, "pinned": 30, "fallback": 60, "memory": 75, "gram-bandwidth": 45,
                 "snapshot": 45}
WHAT = {
    "env": "GPU name and memory, torch / CUDA / triton / transformers versions",
    "kernels": "(a) Gram 75 x 28.7M bf16 (> 2^31 elements), Gram at columns > 2^31, projection r=3 at 2^30+ per row",
    "pinned": "(d) host tier: exactly the planned bytes registered (not a power of two), released at release()",
    "fallback": "(b) a kernel raising at the probe / in the solve: one warning each, a bitwise-equal horizon",
    "memory": "(c) Qwen2.5-1.5B + AdamW + RelexCallback(storage='auto'), 3 steps: device peak vs the plan",
    "gram-bandwidth": "(e) Gram kernel GB/s vs a plain read (sum) of the same 14 GB buffer, and the torch reference",
    "snapshot": "(f) per-step snapshot of 1.54B parameters into the device ring vs a plain device copy",
    "preset": "(g) recipes/replicate/paper_regime.py --preset auto --budget-seconds <what is left>",
}
# Not in the default plan (``--only`` adds them; budgets of their own)
OPTIONAL = {"kernels-tests": (95, "pytest tests/test_kernels.py with TRITON_INTERPRET=0 (needs pytest: the bundle)")}
TIMED = ("memory", "gram-bandwidth", "snapshot")  # alone, after the bundle and the correctness checks
BESIDE = (("kernels", "pinned"), ("fallback",))  # chains running beside the bundle's chain
CHECKS = ("env", "kernels", "pinned", "fallback", *TIMED, "preset")


# ------------------------------------------------------------------------------------------------------ the plan
def bundle_parts(root: str = os.path.join(REPO, "gpu_bundle")) -> int:
    for m in sorted(glob.glob(os.path.join(root, "part*", "manifest.json"))) + [
        os.path.join(root, "stage", "manifest.json")
    ]:
        try:
            with open(m) as f:
                return len(json.load(f)["parts"])
        except (OSError, ValueError, KeyError):
            continue
    return DEFAULT_PARTS


def make_plan(total: float = LIMIT, bundle: bool = False, parts: int | None = None, only=None) -> dict:
    """The time plan: ``steps`` (``name``, ``budget``, ``start`` offset, ``runs`` how, ``what``), the preset's
    seconds (what is left after everything else and the reserve), the sum."""
    chosen = [c for c in CHECKS if only is None or c in only or c == "env"]
    steps, t = [], 0.0

    def add(name, budget, runs, what, start=None):
        steps.append({"name": name, "budget": budget, "start": t if start is None else start, "runs": runs,
                      "what": what})

    n = (parts or bundle_parts()) if bundle else 0
    for k in range(1, n):
        add(f"stage-part{k}", STAGE, "own command, before", f"bash bench/gpu_run.sh stage gpu_bundle/part{k}")
        t += STAGE
    add("env", CHECK_BUDGETS["env"], "alone", WHAT["env"])
    t += CHECK_BUDGETS["env"]
    chains = []
    if bundle:
        chain = [(f"stage-part{n}", STAGE, f"stage the last part (copied with this command): gpu_bundle/part{n}")]
        chain += BUNDLE_STEPS
        chains.append(chain)
    for ch in BESIDE:
        c = [(x, CHECK_BUDGETS[x], WHAT[x]) for x in ch if x in chosen]
        if c:
            chains.append(c)
    if only:
        for x, (b, what) in OPTIONAL.items():
            if x in only:
                chains.append([(x, b, what)])
    group = max((sum(b for _, b, _ in ch) for ch in chains), default=0)
    for i, ch in enumerate(chains):
        s = t
        for name, b, what in ch:
            add(name, b, f"beside, chain {i + 1}", what, start=s)
            s += b
    t += group
    for x in TIMED:
        if x in chosen:
            add(x, CHECK_BUDGETS[x], "alone", WHAT[x])
            t += CHECK_BUDGETS[x]
    preset = total - t - RESERVE if "preset" in chosen else 0
    if "preset" in chosen:
        add("preset", preset, "alone, gets what is left", WHAT["preset"])
        t += preset
    add("reserve", RESERVE, "", "the preset's SIGTERM grace, the last JSON write")
    t += RESERVE
    return {"total": total, "limit": LIMIT, "sum": t, "steps": steps, "preset": preset, "group": group,
            "bundle_parts": n, "fits": t <= LIMIT and (preset >= PRESET_MIN or "preset" not in chosen)}


def format_plan(plan: dict) -> str:
    lines = [f"gpu-check time plan: {plan['total']:.0f} s in all (the limit is {LIMIT} s; the machine's own start-up "
             "comes before and is not counted)",
             f"  {'start':>5}  {'budget':>6}  {'part':<15} {'runs':<26} what"]
    for s in plan["steps"]:
        lines.append(f"  {s['start']:>5.0f}  {s['budget']:>6.0f}  {s['name']:<15} {s['runs']:<26} {s['what']}")
    lines.append(f"  sum {plan['sum']:.0f} s (side-by-side parts count once, as their longest chain: "
                 f"{plan['group']:.0f} s); the preset gets {plan['preset']:.0f} s here, and at run time whatever the "
                 f"parts before it left")
    if plan["sum"] > LIMIT:
        lines.append(f"  DOES NOT FIT: {plan['sum']:.0f} s > {LIMIT} s")
    elif plan["preset"] and plan["preset"] < PRESET_MIN:
        lines.append(f"  DOES NOT FIT: the preset's {plan['preset']:.0f} s < the {PRESET_MIN} s it needs to plan a run")
    for x, (b, what) in OPTIONAL.items():
        lines.append(f"  optional (--only {x}): {b} s, {what}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- the runner
class Results:
    """The results JSON, rewritten (atomically) after every part."""

    def __init__(self, path: str, plan: dict):
        self.path = path
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self.data = {"format": 1, "started": datetime.datetime.now().isoformat(timespec="seconds"),
                     "plan": plan, "machine": None, "parts": {}, "elapsed": 0.0, "summary": None}
        self.write()

    def put(self, name: str, rec: dict):
        with self.lock:
            self.data["parts"][name] = rec
            if name == "env" and rec.get("data"):
                self.data["machine"] = rec["data"]
            self.write()
        fig = str(rec.get("figure", "")).replace("\n", " ")
        print(f"gpu-check: {name:<15} {rec['status']:<4}  {fig}  ({rec['seconds']:.1f} s of {rec['budget']:.0f})",
              flush=True)

    def write(self):
        self.data["elapsed"] = round(time.monotonic() - self.t0, 1)
        d = os.path.dirname(self.path)
        if d:
            os.makedirs(d, exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)


_children: set = set()


def run_cmd(cmd, timeout: float, env: dict, term_grace: float = 5.0, stream: bool = False) -> tuple[int, str, float]:
    """Run ``cmd`` in its own process group; at ``timeout`` SIGTERM the group, SIGKILL ``term_grace`` s later.
    Returns ``(exit code, output, seconds)``; 124 when it timed out. ``stream``: its lines are printed as they come
    (the preset's progress), and kept."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    _children.add(p)
    lines: list = []

    def read():
        for ln in p.stdout:
            lines.append(ln)
            if stream:
                print(ln, end="", flush=True)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    timed_out = False
    try:
        p.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill(p, signal.SIGTERM)
        try:
            p.wait(timeout=term_grace)
        except subprocess.TimeoutExpired:
            _kill(p, signal.SIGKILL)
            p.wait()
    finally:
        _children.discard(p)
    reader.join(timeout=5)
    return (124 if timed_out else p.returncode), "".join(lines), time.monotonic() - t0


def _kill(p, sig):
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(text: str, n: int = 3) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " / ".join(lines[-n:])[-400:]


def child_env(cuda: bool | None, site: str | None) -> dict:
    env = dict(os.environ)
    paths = ([site] if site else []) + [REPO, os.path.join(REPO, "bench")]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["TRITON_INTERPRET"] = "0" if cuda else "1"  # compiled for the GPU; without one, the interpreter on CPU
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    return env


def run_check(name: str, budget: float, env: dict) -> dict:
    rc, out, dt = run_cmd([sys.executable, os.path.abspath(__file__), "--child", name], budget, env)
    rec = {"status": "FAIL", "seconds": round(dt, 1), "budget": budget, "rc": rc, "figure": "", "data": None}
    for ln in reversed(out.splitlines()):
        if ln.startswith("GPU-CHECK-RESULT "):
            rec.update(json.loads(ln[len("GPU-CHECK-RESULT "):]))
            break
    else:
        rec["figure"] = (f"timed out after {budget:.0f} s: " if rc == 124 else f"exit {rc}: ") + _tail(out)
    if rc != 0 and rec["status"] == "PASS":
        rec["status"], rec["figure"] = "FAIL", f"exit {rc} after PASS: " + rec["figure"]
    if rec["status"] == "FAIL":
        rec["tail"] = out[-3000:]
    return rec


def run_bundle_step(name: str, budget: float, env: dict, site: str) -> dict:
    py = [sys.executable, os.path.join(REPO, "bench", "gpu_bundle.py")]
    if name.startswith("stage-part"):
        d = os.path.join(REPO, "gpu_bundle", name[len("stage-"):])
        if not os.path.isdir(d):
            return {"status": "SKIP", "seconds": 0.0, "budget": budget, "figure": f"{d} is not here (staged before?)"}
        cmd = py + ["stage", d]
    elif name == "install":
        cmd = py + ["install", "--target", site]
    else:
        cmd = py + [name if name != "imports" else "check"]
    e = dict(env)
    if name != "imports":
        e.pop("PYTHONPATH", None)
    rc, out, dt = run_cmd(cmd, budget, e)
    rec = {
        "status": "PASS" if rc == 0 else "FAIL",
        "seconds": round(dt, 1),
        "budget": budget,
        "rc": rc,
        "figure": _tail(out, 1) if rc == 0 else (f"timed out after {budget:.0f} s: " if rc == 124 else "") + _tail(out),
    }
    if name == "imports":
        rec["data"] = out.splitlines()[-40:]
    return rec


def run_preset(budget: float, env: dict, results_dir: str, out_dir: str | None) -> dict:
    cmd = [sys.executable, os.path.join(REPO, "recipes", "replicate", "paper_regime.py"), "--preset", "auto",
           "--budget-seconds", f"{budget:.0f}", "--out", results_dir]
    rc, out, dt = run_cmd(
        cmd, budget + 5, env, term_grace=8.0, stream=True
    )  # the preset stops itself; SIGTERM writes its results
    res = {}
    try:
        with open(os.path.join(results_dir, "results.json")) as f:
            res = json.load(f)
    except (OSError, ValueError):
        pass
    p = res.get("plan") or {}
    m = p.get("measured") or {}
    chosen = p.get("chosen") or {}
    fig = (f"{res.get('preset', {}).get('name', '?')}: {res.get('status', 'no results.json')}; "
           f"{res.get('rollouts_per_step', '?')} rollouts/step at {m.get('per_step', '?')} s/step (probe), "
           f"tcut {chosen.get('tcut', '-')} ({p.get('regime') or 'none'})")
    status = "PASS" if rc == 0 else ("SKIP" if rc == 3 else "FAIL")
    if rc == 3:
        fig = "budget too small to plan a run after the probe: " + fig
    elif rc not in (0,):
        fig = f"exit {rc}: " + fig + " / " + _tail(out, 2)
    if out_dir:
        import shutil

        os.makedirs(os.path.join(out_dir, "paper_regime"), exist_ok=True)
        for f in ("results.json", "results.md"):
            if os.path.isfile(os.path.join(results_dir, f)):
                shutil.copy(os.path.join(results_dir, f), os.path.join(out_dir, "paper_regime", f))
    return {"status": status, "seconds": round(dt, 1), "budget": budget, "rc": rc, "figure": fig,
            "data": {"results_dir": results_dir, "plan_lines": p.get("lines"), "measured": m,
                     "status": res.get("status")}}


def orchestrate(total: float, bundle: bool, json_path: str, only=None, preset_cap: float | None = None) -> int:
    plan = make_plan(total, bundle, only=only)
    print(format_plan(plan), flush=True)
    res = Results(json_path, plan)
    deadline = time.monotonic() + total - sum(s["budget"] for s in plan["steps"] if s["runs"].startswith("own"))
    site = os.path.join(REPO, "gpu_bundle", "site") if bundle else None
    budgets = {s["name"]: s["budget"] for s in plan["steps"]}
    strict = bundle or os.environ.get("RELEX_GPU_CHECK_STRICT") == "1"

    def on_signal(signum, frame):
        for p in list(_children):
            _kill(p, signal.SIGTERM)
        res.data["summary"] = f"interrupted by signal {signum}"
        res.write()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)

    env_rec = run_check("env", budgets["env"], child_env(None, None))
    res.put("env", env_rec)
    cuda = bool((env_rec.get("data") or {}).get("cuda"))
    if not cuda:
        print("gpu-check: no CUDA GPU visible on this machine: the checks run at CPU scale (their code, not a GPU's "
              "figures), `pinned` is skipped, the preset runs its cpu-smoke form", flush=True)
    env = child_env(cuda, None)
    chains = []
    if bundle:
        n = plan["bundle_parts"]
        chains.append([(f"stage-part{n}", "bundle")] + [(s, "bundle") for s, _, _ in BUNDLE_STEPS])
    for ch in BESIDE:
        c = [(x, "check") for x in ch if x in budgets]
        if c:
            chains.append(c)
    for x in OPTIONAL:
        if x in budgets:
            chains.append([(x, "optional")])
    bundle_ok = {"ok": True}

    def run_chain(chain):
        for name, kind in chain:
            if kind == "bundle":
                rec = run_bundle_step(name, budgets[name], env, site)
                bundle_ok["ok"] &= rec["status"] != "FAIL"
                if rec["status"] == "FAIL":
                    res.put(name, rec)
                    for rest, _ in chain[chain.index((name, kind)) + 1:]:
                        res.put(rest, {"status": "FAIL", "seconds": 0.0, "budget": budgets[rest],
                                       "figure": f"not run: {name} failed"})
                    return
            elif kind == "optional":
                rec = run_optional(name, budgets[name], child_env(cuda, site))
            else:
                rec = run_check(name, budgets[name], env)
            res.put(name, rec)

    threads = [threading.Thread(target=run_chain, args=(ch,)) for ch in chains]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    full_env = child_env(cuda, site if bundle and bundle_ok["ok"] else None)
    for x in TIMED:
        if x in budgets:
            res.put(x, run_check(x, budgets[x], full_env))
    if "preset" in budgets:
        left = deadline - time.monotonic() - RESERVE
        if preset_cap:
            left = min(left, preset_cap)
        if bundle and not bundle_ok["ok"]:
            res.put("preset", {"status": "FAIL", "seconds": 0.0, "budget": left,
                               "figure": "not run: the bundle did not install (trl, datasets, the model file)"})
        elif left < PRESET_MIN and cuda:
            res.put("preset", {"status": "SKIP", "seconds": 0.0, "budget": left,
                               "figure": f"{left:.0f} s left, under the {PRESET_MIN} s it needs"})
        else:
            results_dir = os.environ.get("RESULTS_DIR") or os.path.join(REPO, "runs", "paper_regime")
            res.put("preset", run_preset(left, full_env, results_dir, os.environ.get("OUT")))
    parts = res.data["parts"]
    failed = [k for k, v in parts.items() if v["status"] == "FAIL"]
    skipped = [k for k, v in parts.items() if v["status"] == "SKIP"]
    if strict:
        failed += [k for k in skipped if "not installed" in str(parts[k].get("figure"))]
    res.data["summary"] = {"passed": [k for k, v in parts.items() if v["status"] == "PASS"], "failed": failed,
                           "skipped": skipped, "cuda": cuda}
    res.write()
    print(f"gpu-check: {len(parts) - len(failed) - len(skipped)} passed, {len(failed)} failed"
          f"{' (' + ', '.join(failed) + ')' if failed else ''}, {len(skipped)} skipped; "
          f"{res.data['elapsed']:.0f} s; results in {json_path}", flush=True)
    return 1 if failed else 0


def run_optional(name: str, budget: float, env: dict) -> dict:
    if importlib.util.find_spec("pytest") is None and not env.get("PYTHONPATH"):
        return {"status": "SKIP", "seconds": 0.0, "budget": budget, "figure": "pytest not installed"}
    rc, out, dt = run_cmd([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py"],
                          budget, env)
    return {"status": "PASS" if rc == 0 else "FAIL", "seconds": round(dt, 1), "budget": budget, "rc": rc,
            "figure": _tail(out, 1)}


# --------------------------------------------------------------------------------------------------- the children
def env_info() -> dict:
    d = {"cuda": torch.cuda.is_available(), "torch": torch.__version__, "cuda_version": torch.version.cuda,
         "python": sys.version.split()[0], "cpus": os.cpu_count()}
    for m in ("transformers", "triton", "accelerate", "peft", "trl", "datasets"):
        try:
            d[m] = md.version(m)
        except md.PackageNotFoundError:
            d[m] = None
    if d["cuda"]:
        p = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info(0)
        d.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count, memory_total=total,
                 memory_free=free)
    return d


def child(name: str, small: bool | None = None) -> int:
    """One check in this process; prints ``GPU-CHECK-RESULT {json}``."""
    import torch  # importing torch does not import triton: TRITON_INTERPRET can still be chosen

    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"
    t0 = time.monotonic()
    if name == "env":
        d = env_info()
        fig = (f"{d.get('gpu')} {d['memory_total'] / 1e9:.1f} GB, sm_{d['capability'].replace('.', '')}, "
               f"{d['sms']} SMs" if cuda else "no CUDA GPU") + \
              f"; torch {d['torch']} CUDA {d['cuda_version']}, triton {d['triton']}, transformers {d['transformers']}"
        rec = {"status": "PASS", "figure": fig, "data": d}
    else:
        sys.path.insert(0, REPO)
        sys.path.insert(0, os.path.join(REPO, "bench"))
        import gpu_checks

        try:
            rec = gpu_checks.CHECKS[name]("cuda" if cuda else "cpu", small=(not cuda) if small is None else small)
        except Exception as e:  # noqa: BLE001  one line in the results; the traceback in the output tail
            import traceback

            traceback.print_exc()
            rec = {"status": "FAIL", "figure": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                   "data": None}
        if not cuda and rec["status"] != "SKIP":
            rec["figure"] = (
                "cpu scale: " + rec["figure"] if not rec["figure"].startswith("cpu scale") else rec["figure"]
            )
    rec["child_seconds"] = round(time.monotonic() - t0, 2)
    print("GPU-CHECK-RESULT " + json.dumps(rec, default=str), flush=True)
    return 0 if rec["status"] != "FAIL" else 1


def default_json() -> str:
    out = os.environ.get("OUT")
    return os.path.join(out, "gpu_check.json") if out else os.path.join(REPO, "runs", "gpu_check.json")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--total", type=float, default=LIMIT, help=f"seconds for everything (default {LIMIT})")
    ap.add_argument("--bundle", action="store_true", help="stage, assemble and install gpu_bundle/ first (no network)")
    ap.add_argument("--dry-run", action="store_true", help="print the time plan; exit 1 if it does not fit")
    ap.add_argument("--json", default=None, help="results JSON (default $OUT/gpu_check.json or runs/gpu_check.json)")
    ap.add_argument("--only", default=None, help=f"comma separated subset of {', '.join(CHECKS)} "
                    f"(and the optional {', '.join(OPTIONAL)})")
    ap.add_argument("--no-preset", action="store_true", help="leave out the preset")
    ap.add_argument("--preset-budget", type=float, default=None, help="at most this many seconds for the preset "
                    "(default: whatever the parts before it left)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--small", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return child(a.child, small=True if a.small else None)
    only = None
    if a.only:
        only = [c for c in a.only.split(",") if c]
        bad = [c for c in only if c not in CHECKS and c not in OPTIONAL]
        if bad:
            print(f"gpu-check: unknown check(s) {bad}; choose from {', '.join((*CHECKS, *OPTIONAL))}", file=sys.stderr)
            return 2
    if a.no_preset:
        only = [c for c in (only or CHECKS) if c != "preset"]
    plan = make_plan(a.total, a.bundle, only=only)
    if a.dry_run:
        print(format_plan(plan))
        return 0 if plan["fits"] else 1
    if not plan["fits"]:
        print(format_plan(plan) + "\ngpu-check: the plan does not fit; lower --total or drop parts", file=sys.stderr)
        return 2
    return orchestrate(a.total, a.bundle, a.json or default_json(), only=only, preset_cap=a.preset_budget)


if __name__ == "__main__":
    sys.exit(main())

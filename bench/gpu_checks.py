"""The checks `bench/gpu_check.py` runs, one function each: ``check_<name>(device, small=False) -> dict``.

Every function makes its data on ``device`` with torch ops (nothing is built on the host row by row) and returns
``{"status": "PASS" | "FAIL" | "SKIP", "figure": one line, "data": {numbers}}``. ``small=True`` shrinks every size so
that the same code runs on a CPU in seconds (the tests do this; the Triton kernels then run in Triton's interpreter,
``TRITON_INTERPRET=1``): the arithmetic, the comparisons and the bookkeeping are the GPU run's, only the scale
differs (the 2^31 boundary of the kernels check becomes 2^12 there).

Tolerances (the kernels check): every entry of a kernel's result is compared with the exact float64 value of the
same (already rounded) inputs and must lie within the worst case of a float32-accumulated dot product,
``gamma_n sum_k |a_k b_k|`` with ``gamma_n = n u / (1 - n u)``, ``u = 2^-23`` (twice float32's unit roundoff: it also
covers accumulators that truncate; Higham, *Accuracy and Stability of Numerical Algorithms*, Lemma 3.1), ``n`` the
length of each sum; a 16-bit output adds two of its ulps (``2 u16 |x|``) and its subnormal spacing. The same bound as
``tests/test_kernels.py``. Columns no segment owns hold NaN in the input (a read there would make a result NaN) and
in the projection's output (a write there is counted).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import statistics
import tempfile
import time
import json
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Qwen2Config, Trainer, TrainerCallback, TrainingArguments
import torch
from relex_callback import RelexCallback
from relex_callback.core import kernels
from relex_callback.core.kernels import reference, triton_ops
from relex_callback.examples.toy import arithmetic_problems, build_model, build_tokenizer
from relex_callback.params import plain_tracked, trainable_named_parameters
from relex_callback.trajectory import tiers, window
from relex_callback.trajectory.plan import PlanMachine, PlanWindow, plan_memory
from relex_callback.trajectory.store import TrajectoryStore

U32 = 2.0**-24
ULP16 = {"bfloat16": 2.0**-7, "float16": 2.0**-10}

# Qwen2.5-1.5B (the memory and snapshot checks): hidden 1536, 28 layers, 12 heads, 2 kv heads, intermediate 8960,
# vocabulary 151936, tied embeddings: 1.54e9 parameters.
QWEN_1P5B = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
                 rope_theta=1e6, rms_norm_eps=1e-6)
QWEN_SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=128)


def result(status: str, figure: str, **data) -> dict:
    return {"status": status, "figure": figure, "data": data}


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def _timed(fn, device, repeat: int = 1) -> list[float]:
    out = []
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def dot_bound(A, B=None, unit: float = 2 * U32):
    """Entrywise bound on the error of float32-accumulated ``A B^T`` (``A [m, n]``, ``B [k, n]``; ``B = A`` for a
    Gram), as ``tests/helpers.dot_error_bound``."""
    A = A.double().abs()
    B = A if B is None else B.double().abs()
    n = A.shape[-1]
    return (n * unit / (1 - n * unit)) * (A @ B.transpose(-1, -2))


# ------------------------------------------------------------------------------------------------------ (a) kernels
def straddle(T: int, D: int, boundary: int, before: int, after: int) -> tuple[int, int]:
    """``(offset, numel)`` of a column range whose elements in the last row ``T - 1`` of a ``[T, D]`` arena run from
    below ``boundary`` to above it (element offset ``(T - 1) D + c``). Needs ``(T - 1) D < boundary < T D``."""
    c = boundary - (T - 1) * D
    if not 0 < c < D:
        raise ValueError(f"no column of row {T - 1} of a [{T}, {D}] arena crosses element {boundary}")
    o = max(0, c - before)
    return o, min(D, c + after) - o


def kernel_cases(small: bool) -> dict:
    """The arenas of the kernels check. ``boundary``: 2^31 on the GPU (int32 offsets overflow there), 2^12 at CPU
    scale."""
    B = (1 << 12) if small else (1 << 31)
    # Gram, the paper's window: T = 75 rows, > 2^31 elements (4.3 GB of bf16); only the last row crosses 2^31
    T = 5 if small else 75
    D = B // T + (37 if small else 70_352)  # (T - 1) D < 2^31 < T D
    o, n = straddle(T, D, B, 101 if small else 700_001, 103 if small else 900_000)
    gram = dict(T=T, D=D, segs=[(3, 1), (40, 129 if small else 4099), (o, n),
                                (D - (71 if small else 1_000_003), 70 if small else 1_000_000)])
    # Gram, columns past 2^31 (8.6 GB of bf16 at 2 rows): the program table's column numbers do not fit int32
    Dw = B + (300 if small else 1 << 21)
    wide = dict(T=2, D=Dw, segs=[(5, 17), (B - (77 if small else 300_007), 177 if small else 800_007)])
    # projection at rank 3 with >= 2^30 elements per output row: row k = 2 starts at 2 D > 2^31 (k * stride overflow)
    Dp = B // 2 + (77 if small else (1 << 21) + 5)
    proj = dict(T=4, D=Dp, r=3, segs=[(7, 33), (Dp // 2 - 11, 401 if small else 2_000_001),
                                      (Dp - (150 if small else 1_500_001), 149 if small else 1_500_000)])
    return dict(boundary=B, gram=gram, wide=wide, proj=proj, span=64 if small else None)


def _arena(T, D, segs, dtype, device, seed):
    """``[T, D]`` of NaN with N(0, 0.01^2) values in the given column ranges (made on ``device``)."""
    M = torch.full((T, D), float("nan"), dtype=dtype, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    for o, n in segs:
        M[:, o : o + n] = (torch.randn(T, n, generator=g, device=device) * 0.01).to(dtype)
    return M


def gram_error(G, M, segs) -> float:
    """Largest |error| / bound over every entry of every segment's Gram (> 1 fails; NaN counts as inf)."""
    worst = 0.0
    for i, (o, n) in enumerate(segs):
        m = M[:, o : o + n].double()
        exact = m @ m.T
        bound = dot_bound(m).clamp_min(1e-300)
        r = ((G[i].to(m.device).double() - exact).abs() / bound).max()
        worst = max(worst, float(r) if math.isfinite(float(r)) else math.inf)
    return worst


def project_error(out, M, segs, U, out_dtype: str) -> float:
    worst = 0.0

    for i, (o, n) in enumerate(segs):
        m = M[:, o : o + n].double()
        ui = U[i].to(m.device).double()
        exact = ui.T @ m
        bound = dot_bound(ui.T, m.T)
        if out_dtype in ULP16:
            dt = getattr(torch, out_dtype)
            bound = (
                bound + ULP16[out_dtype] * (exact.abs() + bound) + torch.finfo(dt).smallest_normal * torch.finfo(dt).eps
            )
        r = ((out[:, o : o + n].double() - exact).abs() / bound.clamp_min(1e-300)).max()
        worst = max(worst, float(r) if math.isfinite(float(r)) else math.inf)
    return worst


def check_kernels(device, small: bool = False) -> dict:
    """(a) The Triton Gram and projection kernels against the exact float64 results and the torch references, on
    arenas whose element offsets cross 2^31 (and columns past 2^31), and the projection at rank 3 with >= 2^30
    elements per row; plus float32 / float16 arenas of a few columns (every dtype compiled once)."""
    cases = kernel_cases(small)
    span = cases["span"]
    data = {"boundary": cases["boundary"], "tolerance": "error <= gamma_n sum|a b| (+ 2 ulp16 for 16-bit outputs)"}
    bad = []
    bf16 = torch.bfloat16

    c = cases["gram"]
    M = _arena(c["T"], c["D"], c["segs"], bf16, device, 0)
    offs, nums = [o for o, _ in c["segs"]], [n for _, n in c["segs"]]
    G = triton_ops.gram(M, offs, nums, span=span)
    R = reference.gram_reference(M, offs, nums)
    data["gram_window"] = dict(T=c["T"], D=c["D"], elements=c["T"] * c["D"], segments=c["segs"],
                           kernel=gram_error(G, M, c["segs"]), reference=gram_error(R, M, c["segs"]))
    del M, G, R

    c = cases["wide"]
    M = _arena(c["T"], c["D"], c["segs"], bf16, device, 1)
    offs, nums = [o for o, _ in c["segs"]], [n for _, n in c["segs"]]
    G = triton_ops.gram(M, offs, nums, span=span)
    data["gram_wide"] = dict(T=c["T"], D=c["D"], segments=c["segs"], kernel=gram_error(G, M, c["segs"]))
    del M, G

    c = cases["proj"]
    M = _arena(c["T"], c["D"], c["segs"], bf16, device, 2)
    offs, nums = [o for o, _ in c["segs"]], [n for _, n in c["segs"]]
    U = torch.randn(len(offs), c["T"], c["r"], generator=torch.Generator().manual_seed(3))
    owned = c["r"] * sum(nums)
    for name in ("float32", "bfloat16"):
        out = torch.full((c["r"], c["D"]), float("nan"), dtype=getattr(torch, name), device=device)
        triton_ops.project(M, offs, nums, U, out, span=span)
        written = sum(int((~torch.isnan(out[k])).sum()) for k in range(c["r"]))
        data[f"project_{name}"] = dict(T=c["T"], D=c["D"], r=c["r"], last_row_offset=(c["r"] - 1) * c["D"],
                                       segments=c["segs"], kernel=project_error(out, M, c["segs"], U, name),
                                       written=written, owned=owned)
        if written != owned:
            bad.append(f"project -> {name} wrote {written} elements, its segments own {owned}")
        del out
    del M

    # every buffer dtype once, at a few columns (T = 20: one 32-row block)
    for name in ("float32", "float16"):
        segs = [(3, 1), (10, 129), (150, 3000)]
        M = _arena(20, 3200, segs, getattr(torch, name), device, 4)
        offs, nums = [o for o, _ in segs], [n for _, n in segs]
        G = triton_ops.gram(M, offs, nums, span=span)
        U = torch.randn(len(offs), 20, 3, generator=torch.Generator().manual_seed(5))
        out = torch.full((3, 3200), float("nan"), dtype=getattr(torch, name), device=device)
        triton_ops.project(M, offs, nums, U, out, span=span)
        data[f"small_{name}"] = dict(gram=gram_error(G, M, segs), project=project_error(out, M, segs, U, name))
        del M, G, out

    ratios = {f"{k}.{kk}": v for k, d in data.items() if isinstance(d, dict)
              for kk, v in d.items() if kk in ("kernel", "reference", "gram", "project")}
    bad += [f"{k}: error / bound {v:.3g}" for k, v in ratios.items() if not v <= 1.0]
    worst = max(ratios.values())
    gw, B = data["gram_window"], cases["boundary"]
    fig = (f"error/bound max {worst:.2g} (<= 1 passes) over {len(ratios)} results; gram {gw['T']} x {gw['D']:,} bf16 "
           f"({gw['elements'] / B:.3f} x 2^{B.bit_length() - 1} elements), columns to {cases['wide']['D']:,}, "
           f"project r=3 at {cases['proj']['D']:,} per row")
    if bad:
        fig = "; ".join(bad)[:300] + " | " + fig
    return result("FAIL" if bad else "PASS", fig, **data)


# ----------------------------------------------------------------------------------------------------- (b) fallback
class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _tiny_run(out: str, device: str, tcut: int, horizon: int):
    """A tiny causal-LM Trainer run (the toy tokenizer and a 1-layer Qwen2) with RelexCallback; stops at tcut."""
    tok = build_tokenizer()
    model = build_model(tok, hidden_size=32, layers=1)
    rows = []
    for p in arithmetic_problems(64, seed=0):
        ids = tok(p["prompt"] + p["answer"])["input_ids"][:8]
        ids = ids + [tok.pad_token_id] * (8 - len(ids))
        rows.append({"input_ids": ids, "labels": ids, "attention_mask": [1] * 8})
    cb = RelexCallback(tcut=tcut, horizons=[horizon], dtype="float32", storage="device" if device != "cpu" else "host")
    if device != "cpu":  # both runs must train alike to the bit (warn_only: an op without a deterministic kernel
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # warns rather than ending the check)
        torch.use_deterministic_algorithms(True, warn_only=True)
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=8, learning_rate=5e-3,
                             lr_scheduler_type="constant", max_steps=5 * tcut, save_strategy="no", logging_steps=100,
                             report_to=[], use_cpu=device == "cpu", seed=0, data_seed=0, dataloader_num_workers=0,
                             disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=rows, processing_class=tok, callbacks=[cb]).train()
    if device != "cpu":
        torch.use_deterministic_algorithms(False)
    return os.path.join(out, "relex")


def check_fallback(device, small: bool = False) -> dict:
    """(b) A kernel that fails is replaced by its reference with one warning and the same result: two tiny Trainer
    runs with ``RelexCallback``, one on the references (``RELEX_DISABLE_TRITON=1``), one where the projection kernel
    raises at the probe when the window opens and the Gram kernel passes the probe, then raises in the solve at
    ``tcut``. The horizons must be bitwise equal, each kernel warned about once and never called again."""
    tcut, horizon = 6, 18
    tmp = tempfile.mkdtemp(prefix="relex_fallback_")
    saved_env = {k: os.environ.get(k) for k in ("RELEX_DISABLE_TRITON", "RELEX_FORCE_TRITON")}
    real = {op: getattr(triton_ops, op) for op in ("gram", "project")}
    calls = {"gram": 0, "project": 0}
    cap = _Capture()
    logger = logging.getLogger("relex_callback")
    level = logger.level  # the check counts the package's warnings: they must reach its handler whatever was set
    try:
        logger.setLevel(min(logging.WARNING, logger.getEffectiveLevel()))
        if device == "cpu":
            os.environ["RELEX_FORCE_TRITON"] = "1"  # the kernels on CPU tensors (Triton's interpreter)
        os.environ["RELEX_DISABLE_TRITON"] = "1"
        kernels.reset()
        ref_dir = _tiny_run(os.path.join(tmp, "ref"), device, tcut, horizon)
        os.environ.pop("RELEX_DISABLE_TRITON")
        kernels.reset()

        def sabotage(op, after):
            def broken(*a, **k):
                calls[op] += 1
                if calls[op] > after:
                    raise RuntimeError(f"CUDA error: an illegal memory access was encountered (injected into {op})")
                return real[op](*a, **k)
            setattr(triton_ops, op, broken)

        sabotage("project", 0)  # fails at the probe
        sabotage("gram", 1)  # passes the probe, fails in the solve
        logger.addHandler(cap)
        bad_dir = _tiny_run(os.path.join(tmp, "bad"), device, tcut, horizon)
        logger.removeHandler(cap)
        warned = [m for m in cap.messages if "Triton" in m]
        replaced = sorted(kernels.disabled())
        a = load_file(os.path.join(ref_dir, f"step-{horizon}", "model.safetensors"))
        b = load_file(os.path.join(bad_dir, f"step-{horizon}", "model.safetensors"))
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        diff = max((float((a[k].double() - b[k].double()).abs().max()) for k in a if k in b), default=math.inf)
        rep = json.load(open(os.path.join(bad_dir, "report.json")))
        dev = str(torch.device(device if device != "cuda" else f"cuda:{torch.cuda.current_device()}"))
        probe_warned = [m for m in warned if "probe at window open" in m]
        problems = []
        if len(warned) != 2:
            problems.append(f"{len(warned)} kernel warnings, want 2")
        if len(probe_warned) != 1 or "project" not in probe_warned[0]:
            problems.append("the projection was not replaced at the probe")
        if {tuple(r) for r in replaced} != {(dev, "gram"), (dev, "project")}:
            problems.append(f"replaced {replaced}")
        if calls != {"gram": 2, "project": 1}:
            problems.append(f"kernel calls {calls} (a replaced kernel was called again)")
        if not same:
            problems.append(f"horizon differs from the reference run (max |diff| {diff:.3g})")
        fig = (f"2 warnings (project at the probe, gram in the solve), step-{horizon} "
               f"{'bitwise equal to' if same else 'DIFFERS from'} the reference run; report lists "
               f"{sorted(rep.get('kernels_replaced') or {})}")
        return result("FAIL" if problems else "PASS", ("; ".join(problems) + " | " if problems else "") + fig,
                      warnings=warned, replaced=[list(r) for r in replaced], calls=dict(calls), bitwise=same,
                      max_abs_diff=diff, kernels_replaced=rep.get("kernels_replaced"))
    finally:
        logger.removeHandler(cap)
        logger.setLevel(level)
        for op, fn in real.items():
            setattr(triton_ops, op, fn)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        kernels.reset()
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------- (c) memory
def qwen_model(device, small: bool, dtype):
    """Qwen2.5-1.5B's architecture (``small``: a 2-layer one) with random weights, made on ``device``."""
    cfg = Qwen2Config(**(QWEN_SMALL if small else QWEN_1P5B))
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        except TypeError:  # transformers 4.x
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)
    return model


def memory_verdict(peak_device: int, plan: dict, total: int) -> tuple[str, str, dict]:
    """PASS when the device's peak stays under its total and the part of the peak the plan did not claim
    (activations, allocator slack) fits the plan's headroom. ``plan``: ``MemoryPlan.to_dict()``."""
    claims = plan["gpu_claims"]
    headroom = sum(v for k, v in claims.items() if k.startswith("headroom"))
    solve = sum(v for k, v in claims.items() if k.startswith("solve at tcut"))
    on_device = (
        plan["buffer_bytes"] if plan["tier"] == "device" else (plan["staging_bytes"] if plan["tier"] == "host" else 0)
    )
    planned = sum(claims.values()) - headroom - solve + on_device  # at step 3: the solve's scratch comes at tcut
    unplanned = peak_device - planned
    ok = peak_device <= total and unplanned <= headroom
    g = 1e9
    fig = (f"peak {peak_device / g:.1f} GB of {total / g:.1f} GB; planned {planned / g:.1f} GB (trainer + first step "
           f"+ theta_0 + {plan['tier']} buffer {plan['rows']} rows{' folded' if plan['folded'] else ''}) + "
           f"{unplanned / g:.2f} GB unplanned within headroom {headroom / g:.1f} GB")
    return ("PASS" if ok else "FAIL"), fig, dict(planned=planned, unplanned=unplanned, headroom=headroom,
                                                   solve_at_tcut=solve, buffer_on_device=on_device)


def check_memory(device, small: bool = False) -> dict:
    """(c) Qwen2.5-1.5B (random weights, bf16, made on the GPU), a plain Trainer with torch AdamW,
    ``RelexCallback(storage="auto")`` with a window the device cannot hold whole (so the plan sizes a folded ring
    from what is free), 3 steps: the device's peak against what the plan claimed."""
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    seq, batch, tcut, fold_rank = (16, 2, 8, 2) if small else (256, 4, 40, 4)
    tmp = tempfile.mkdtemp(prefix="relex_memory_")
    plans, seen = [], {}
    real_plan = window.plan_for_run

    def spy(*a, **k):
        p = real_plan(*a, **k)
        plans.append(p)
        return p

    class Probe(TrainerCallback):
        """What the device holds at train begin; after the last step (RelexCallback, which puts itself first, has
        taken its snapshot) it drops the callback's buffer, so the 3 recorded rows are not written out at train end
        (that is not what is measured)."""

        def __init__(self, cb):
            self.cb = cb

        def on_train_begin(self, args, state, control, **kw):
            if cuda:
                free, total = torch.cuda.mem_get_info(device)
                seen["context"] = int(total - free - torch.cuda.memory_reserved(device))
                seen["total"] = int(total)

        def on_step_end(self, args, state, control, **kw):
            seen["steps"] = state.global_step
            if state.global_step >= args.max_steps and self.cb.store is not None:
                if cuda:
                    torch.cuda.synchronize(device)
                seen["tier"] = self.cb.store.storage
                seen["rows_recorded"] = self.cb.store.num_rows
                self.cb.store.release()
                self.cb.store = None

    model = None
    try:
        window.plan_for_run = spy
        t0 = time.perf_counter()
        model = qwen_model(device, small, torch.bfloat16)
        n_params = sum(p.numel() for p in model.parameters())
        vocab = model.config.vocab_size
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (batch * 4, seq), generator=g)
        rows = [{"input_ids": r, "labels": r, "attention_mask": torch.ones_like(r)} for r in ids]
        cb = RelexCallback(tcut=tcut, horizons=[2 * tcut], storage="auto", dtype="bfloat16", fold_rank=fold_rank,
                           output_dir=os.path.join(tmp, "relex"))
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=batch, learning_rate=1e-5,
                                 lr_scheduler_type="constant", max_steps=3, save_strategy="no", logging_steps=100,
                                 report_to=[], use_cpu=not cuda, optim="adamw_torch", seed=0,
                                 dataloader_num_workers=0, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[Probe(cb), cb])
        t_build = time.perf_counter() - t0
        oom = None
        try:
            trainer.train()
        except torch.OutOfMemoryError as e:
            oom = str(e).splitlines()[0][:200]
        t_train = time.perf_counter() - t0 - t_build
        if not plans:
            return result("FAIL", f"the callback made no memory plan ({oom or 'no error'})", n_params=n_params)
        plan = plans[-1].to_dict()
        data = dict(
            n_params=n_params,
            plan=plan,
            plan_text=plans[-1].format(),
            seconds_build=round(t_build, 1),
            seconds_train=round(t_train, 1),
            steps=seen.get("steps"),
            tier=seen.get("tier"),
            rows_recorded=seen.get("rows_recorded"),
            oom=oom,
        )
        if not cuda:
            st = "FAIL" if oom or seen.get("steps") != 3 else "PASS"
            return result(st, f"cpu scale: {n_params:,} parameters, 3 steps, plan chose {plan['tier']} "
                              f"({plan['rows']} rows{' folded' if plan['folded'] else ''}); no device peak on a CPU",
                          **data)
        peak_alloc = int(torch.cuda.max_memory_allocated(device))
        peak_reserved = int(torch.cuda.max_memory_reserved(device))
        peak_device = seen.get("context", 0) + peak_reserved
        status, fig, v = memory_verdict(peak_device, plan, seen.get("total") or plan["gpu_memory"])
        data.update(v, peak_allocated=peak_alloc, peak_reserved=peak_reserved, peak_device=peak_device,
                    context=seen.get("context"), device_total=seen.get("total"))
        if oom:
            status, fig = "FAIL", f"out of memory: {oom} | " + fig
        elif seen.get("steps") != 3:
            status, fig = "FAIL", f"{seen.get('steps')} steps ran, want 3 | " + fig
        return result(status, fig + f"; allocated peak {peak_alloc / 1e9:.1f} GB", **data)
    finally:
        window.plan_for_run = real_plan
        del model
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------- (d) pinned
def check_pinned(device, small: bool = False) -> dict:
    """(d) The host tier's buffer is page-locked in place, exactly the bytes the plan says (not a power of two), and
    unlocked at release: the registration call is recorded, ``is_pinned`` read at both ends, the caching host
    allocator's stats unchanged, and a copy to the device timed from it against a pageable copy."""
    cuda = str(device).startswith("cuda")
    if not cuda and tiers.HOST_REGISTER is tiers._cudart_register:
        return result("SKIP", "needs CUDA (cudaHostRegister)")
    rows, D = (3, 1_000_003) if small else (5, 200_000_033)
    plan = plan_memory(PlanWindow(window=rows, elements=D, dtype="bfloat16", storage="host"),
                       PlanMachine(host_memory=4 * rows * D * 2, cuda=True))
    want = plan.buffer_bytes
    real = tiers.HOST_REGISTER
    calls = []

    def spy(ptr, n):
        calls.append((ptr, n))
        return real(ptr, n)

    host_stats = getattr(getattr(torch.cuda, "memory", None), "host_memory_stats", None) if cuda else None
    before = dict(host_stats()) if host_stats else None
    tiers.HOST_REGISTER = spy
    try:
        t0 = time.perf_counter()
        p = tiers.PinnedHost((rows, D), torch.bfloat16)
        t_pin = time.perf_counter() - t0
    finally:
        tiers.HOST_REGISTER = real
    M = p.tensor
    flat = M.view(-1)
    data = dict(rows=rows, D=D, plan_bytes=want, registered=[n for _, n in calls], pinned=p.pinned,
                seconds_register=round(t_pin, 3), power_of_two=(want & (want - 1)) == 0)
    problems = []
    if calls != [(M.data_ptr(), want)]:
        problems.append(f"registered {calls}, want one call of {want} bytes at the buffer")
    if not p.pinned:
        problems.append("registration refused (see `ulimit -l`)")
    if cuda:
        data["is_pinned_first_last"] = [bool(flat[:1].is_pinned()), bool(flat[-1:].is_pinned())]
        after = dict(host_stats()) if host_stats else None
        if before is not None:
            keys = [k for k in after if ("reserved" in k or "allocated" in k) and isinstance(after[k], (int, float))]
            data["host_allocator_change"] = {
                k: after[k] - before.get(k, 0) for k in keys if after[k] != before.get(k, 0)
            }
            if data["host_allocator_change"]:
                problems.append(f"the caching host allocator moved: {data['host_allocator_change']}")
        if not all(data["is_pinned_first_last"]):
            problems.append(f"is_pinned at the first / last element: {data['is_pinned_first_last']}")
        row = M[0]
        dst = torch.empty(D, dtype=torch.bfloat16, device=device)
        t_p = min(_timed(lambda: dst.copy_(row, non_blocking=True), device, 3))
        pageable = torch.empty(D, dtype=torch.bfloat16)
        pageable.fill_(1)
        t_u = min(_timed(lambda: dst.copy_(pageable), device, 3))
        data["h2d_gbps_pinned"] = round(D * 2 / t_p / 1e9, 1)
        data["h2d_gbps_pageable"] = round(D * 2 / t_u / 1e9, 1)
        del dst, pageable
    p.release()
    data["pinned_after_release"] = bool(flat[:1].is_pinned()) if cuda else False
    if data["pinned_after_release"]:
        problems.append("still pinned after release")
    del flat, M
    fig = (f"registered {want:,} bytes = the plan's {rows} x {D:,} bf16 (power of two: {data['power_of_two']}), "
           f"released at release()")
    if cuda:
        fig += f"; H2D {data['h2d_gbps_pinned']} GB/s pinned vs {data['h2d_gbps_pageable']} pageable"
    return result("FAIL" if problems else "PASS", ("; ".join(problems) + " | " if problems else "") + fig, **data)


# -------------------------------------------------------------------------------------------- (e) Gram bandwidth
def qwen_tensor_sizes(cfg: dict, layers: int | None = None) -> list[int]:
    """Element counts of the tracked tensors of a Qwen2 model (embeddings, then per layer q/k/v with biases, o, the
    MLP and two norms, then the final norm), the first ``layers`` layers only when given (no embeddings then)."""
    h, i, heads, kv = (
        cfg["hidden_size"],
        cfg["intermediate_size"],
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
    )
    hd = h // heads
    layer = [h * h, h, kv * hd * h, kv * hd, kv * hd * h, kv * hd, h * h, i * h, i * h, h * i, h, h]
    if layers is not None:
        return layer * layers
    return [cfg["vocab_size"] * h] + layer * cfg["num_hidden_layers"] + [h]


def check_gram_bandwidth(device, small: bool = False) -> dict:
    """(e) The Gram kernel's read rate over a paper-sized window (T = 75 rows, the tensors of two Qwen2.5-1.5B layers:
    94M columns, 14 GB of bf16) against a plain read of the same buffer (``sum``) and the torch reference, measured
    in the same process."""
    T = 8 if small else 75
    sizes = qwen_tensor_sizes(QWEN_SMALL if small else QWEN_1P5B, layers=2)
    offs, o = [], 0
    for n in sizes:
        offs.append(o)
        o += n
    D = o
    M = torch.empty(T, D, dtype=torch.bfloat16, device=device)
    M.normal_(0, 0.01, generator=torch.Generator(device=device).manual_seed(0))
    nbytes = T * D * 2
    span = 4096 if small else None  # few programs in the interpreter (the kernels check splits segments finely)
    G = triton_ops.gram(M, offs, sizes, span=span)  # compiles
    R = reference.gram_reference(M, offs, sizes)
    scale = float(R.abs().max())
    rel = float((G.to(R.device) - R).abs().max()) / scale
    reps = 1 if small else 3
    t_k = statistics.median(_timed(lambda: triton_ops.gram(M, offs, sizes, span=span), device, reps))
    t_r = statistics.median(_timed(lambda: reference.gram_reference(M, offs, sizes), device, 1))
    torch.sum(M, dtype=torch.float32)
    t_s = statistics.median(_timed(lambda: torch.sum(M, dtype=torch.float32), device, reps))
    gb = lambda t: nbytes / t / 1e9  # noqa: E731
    data = dict(T=T, D=D, segments=len(sizes), bytes=nbytes, seconds_kernel=t_k, seconds_reference=t_r,
                seconds_sum=t_s, gbps_kernel=gb(t_k), gbps_sum=gb(t_s), gbps_reference=gb(t_r),
                ratio_kernel_to_read=t_s / t_k,
                kernel_vs_reference_rel_diff=rel)
    ok = rel <= 1e-3 and (small or t_k < t_r)
    fig = (f"gram {gb(t_k):.1f} GB/s, plain read (sum) {gb(t_s):.1f} GB/s: ratio {t_s / t_k:.2f}; "
           f"torch reference {gb(t_r):.1f} GB/s; "
           f"{T} x {D:,} bf16 ({nbytes / 1e9:.1f} GB), {len(sizes)} segments; vs reference {rel:.1e}")
    return result("PASS" if ok else "FAIL", fig, **data)


# ---------------------------------------------------------------------------------------------------- (f) snapshot
def check_snapshot(device, small: bool = False) -> dict:
    """(f) The callback's per-step snapshot (every tracked tensor's delta from theta_0 into the device ring:
    ``TrajectoryStore.snapshot``) over Qwen2.5-1.5B's tensors, ms per step, beside the plain device-to-device copy
    of the same tensors into a row (per tensor) and of one contiguous row."""
    steps = 3 if small else 5
    model = qwen_model("meta", small, torch.bfloat16)
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=g)
    tracked = plain_tracked(trainable_named_parameters(model))
    specs = [t.spec for t in tracked]
    store = TrajectoryStore(
        specs, capacity=steps + 1, dtype="bfloat16", storage="device" if device != "cpu" else "host", device=device
    )
    store.set_theta0([t.read() for t in tracked])
    D = store.D
    nudge = min(tracked, key=lambda t: t.spec.local_numel)  # moved a little every step: every step is a new row
    times = []
    with torch.no_grad():
        for step in range(1, steps + 2):
            nudge.read().add_(1e-3)
            times += _timed(lambda: store.snapshot(step, [t.read() for t in tracked]), device, 1)
        row = torch.empty(D, dtype=torch.bfloat16, device=device)

        def per_tensor():
            for t in tracked:
                row[t.spec.offset : t.spec.offset + t.spec.local_numel].copy_(t.read().reshape(-1))

        t_copy = statistics.median(_timed(per_tensor, device, 3))
        row2 = torch.empty_like(row)
        t_row = statistics.median(_timed(lambda: row2.copy_(row), device, 3))
        # the last row holds exactly the last delta: the nudged tensor's, everything else zero
        last = store.rows()[-1]
        o, n = nudge.spec.offset, nudge.spec.local_numel
        want = (nudge.read().reshape(-1).float() - store.theta0[o : o + n].float()).to(torch.bfloat16)
        exact = torch.equal(last[o : o + n], want) and int(last.count_nonzero()) == int(want.count_nonzero())
    t_snap = statistics.median(times[1:])
    data = dict(tensors=len(specs), elements=D, steps_timed=len(times) - 1, ms_snapshot=round(t_snap * 1e3, 2),
                ms_first=round(times[0] * 1e3, 2), ms_copy_per_tensor=round(t_copy * 1e3, 2),
                ms_copy_row=round(t_row * 1e3, 2), ratio_to_copy=round(t_snap / t_copy, 2), rows=store.num_rows,
                row_exact=exact)
    ok = exact and store.num_rows == steps + 1
    store.release()
    fig = (f"snapshot {data['ms_snapshot']} ms/step ({len(specs)} tensors, {D:,} elements) vs copy "
           f"{data['ms_copy_per_tensor']} ms per tensor / {data['ms_copy_row']} ms one row: x{data['ratio_to_copy']}; "
           f"row {'exact' if exact else 'WRONG'}")
    return result("PASS" if ok else "FAIL", fig, **data)


CHECKS = {"kernels": check_kernels, "fallback": check_fallback, "memory": check_memory, "pinned": check_pinned,
          "gram-bandwidth": check_gram_bandwidth, "snapshot": check_snapshot}


"""End-of-window solver benchmark on a synthetic trajectory (prints figures; never asserts timings).

    python bench/solver.py --T 75 --numel 8e6 --tensors 20 --dtype bfloat16 --device cpu --horizons 2 --noise 0.05

For each method (gram, power): the end-of-window time (solve + materialise every horizon's weights in memory), the
bytes read from the buffer, the effective GB/s, the bandwidth of a plain copy of the buffer measured in the same
run, their ratio (1.0 = the solve reads the buffer as fast as a copy would; the design's floor is two reads), and
the time of a per-tensor ``torch.linalg.svd`` loop on the same data.

With ``--backtest`` each method also runs with ``solve(..., SolveOptions(backtest=True))`` (the in-window backtest on
the steps
``<= T/2``) in the same process, interleaved with the plain runs, and prints both times side by side, their ratio,
the bytes read and the backtest's global figures (which must agree between the methods).

    python bench/solver.py --T 75 --numel 8e6 --tensors 20 --noise 0.05 1.0 --backtest --no-svd
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from relex_callback.params import TensorSpec  # noqa: E402
from relex_callback.core.solver import SolveOptions, solve  # noqa: E402


def build(T, numel, tensors, dtype, device, noise, seed=0):
    """Near-rank-1 trajectory: Delta_t = (a t + b) v + noise * ||.|| * random, per tensor, written row by row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(tensors, generator=g) + 0.2
    sizes = (w / w.sum() * numel).long().clamp_min(1)
    sizes[-1] += int(numel) - int(sizes.sum())
    specs, o = [], 0
    for i, n in enumerate(sizes.tolist()):
        specs.append(TensorSpec(name=f"t{i}", shape=(n,), dtype=torch.bfloat16, local_numel=n, offset=o))
        o += n
    D = o
    M = torch.empty(T, D, dtype=dtype, device=device)
    steps = list(range(1, T + 1))
    for sp in specs:
        n = sp.local_numel
        v = torch.randn(n, generator=g)
        v /= v.norm()
        a, b = float(torch.rand(1, generator=g)) * 1e-3, float(torch.randn(1, generator=g)) * 1e-3
        for r, t in enumerate(steps):
            row = (a * t + b) * v
            if noise:
                row += torch.randn(n, generator=g) * (noise * abs(a * t + b) / n**0.5)
            M[r, sp.offset : sp.offset + n] = row.to(device=device, dtype=dtype)
    return M, steps, specs


def timed(f, device, cpu=False):
    """``(f(), wall seconds)``; with ``cpu`` also the process CPU seconds (all threads: on a shared machine the work
    done, which waiting for a core does not inflate)."""
    if device == "cuda":
        torch.cuda.synchronize()
    t, c = time.perf_counter(), time.process_time()
    out = f()
    if device == "cuda":
        torch.cuda.synchronize()
    if cpu:
        return out, time.perf_counter() - t, time.process_time() - c
    return out, time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=75)
    p.add_argument("--numel", type=float, default=8e6)
    p.add_argument("--tensors", type=int, default=20)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--horizons", type=int, default=2)
    p.add_argument("--noise", type=float, nargs="+", default=[0.05, 1.0], help="noise / signal per row (one run each)")
    p.add_argument("--methods", default="gram,power")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3, help="report the best of this many runs")
    p.add_argument("--svd", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--backtest",
        action="store_true",
        help="also time solve with SolveOptions(backtest=True) beside each plain solve",
    )
    p.add_argument("--pass-cost", action="store_true",
                   help="only time one fused Krylov pass over a [T, numel] segment: plain, with the backtest's Krylov "
                        "task, and with a T x T/2 Gram-column GEMM instead (the alternative the power path rejected)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    numel = int(a.numel)
    if a.pass_cost:
        return pass_cost(a.T, numel, dtype, a.device, a.repeat)
    for noise in a.noise:
        M, steps, specs = build(a.T, numel, a.tensors, dtype, a.device, noise)
        buf = M.numel() * M.element_size()
        dst = torch.empty_like(M)
        copy_s = min(timed(lambda: dst.copy_(M), a.device)[1] for _ in range(3))
        dst = None  # free the copy (the closures above read the name)
        copy_bw = buf / copy_s / 1e9
        theta0 = torch.zeros(M.shape[1], dtype=torch.bfloat16, device=a.device)
        horizons = [10 * a.T * (k + 1) for k in range(a.horizons)]
        print(f"\nT={a.T} numel={numel:,} tensors={a.tensors} dtype={a.dtype} device={a.device} noise={noise} "
              f"buffer={buf / 1e9:.3f} GB  plain copy {copy_s:.3f} s = {copy_bw:.2f} GB/s read")
        results = {}
        for method in a.methods.split(","):
            if a.backtest:
                bench_backtest(M, steps, specs, method, a)
                continue

            def end_of_window():
                sol = solve(M, steps, specs, SolveOptions(method=method))
                outs = {}
                for H in horizons:
                    for i, sp in enumerate(specs):
                        outs[(H, sp.name)] = sol.extrapolate(i, H, theta0[sp.offset : sp.offset + sp.local_numel])
                return sol
            runs = [timed(end_of_window, a.device) for _ in range(a.repeat)]  # best of: the machine may be shared
            sol, secs = min(runs, key=lambda r: r[1])
            gbs = sol.bytes_read / secs / 1e9
            results[method] = (secs, sol)
            print(f"  {method:5s}: end-of-window {secs:.3f} s (solve {sol.seconds['total']:.3f} s: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in sol.seconds.items() if k != "total")
                  + f"), read {sol.bytes_read / 1e9:.3f} GB = {sol.bytes_read / buf:.2f} buffer reads, "
                  f"{gbs:.2f} GB/s = {gbs / copy_bw:.2f} x copy bandwidth; two-reads floor {2 * copy_s:.3f} s "
                  f"({secs / (2 * copy_s):.1f} x floor); fallbacks {sol.fallbacks}/{len(specs)}")
        if a.svd and results:
            def svd_loop():
                out = []
                for sp in specs:
                    m = M[:, sp.offset : sp.offset + sp.local_numel].float()
                    U, S, Vh = torch.linalg.svd(m, full_matrices=False)
                    out.append((S[0], Vh[0]))
                return out
            svd, svd_s = timed(svd_loop, a.device)
            ref = next(iter(results.values()))[1]
            cos = min(float((svd[i][1].double() @ ref.direction(i)[0].double()).abs()
                           / ref.direction(i)[0].double().norm().clamp_min(1e-30)) for i in range(len(specs)))
            print(f"  per-tensor torch.linalg.svd loop: {svd_s:.3f} s; "
                  + ", ".join(f"{m} {svd_s / s:.1f}x faster" for m, (s, _) in results.items())
                  + f"; min |cos(v_svd, v_{next(iter(results))})| = {cos:.6f} (float32 SVD: its own error dominates)")
        M = None  # free the buffer before the next noise level


def pass_cost(T, n, dtype, device, repeat, chunk=1 << 15):
    """One pass of the power path's fused ``M (M^T q)`` over a ``[T, n]`` segment (float32 chunks), alone, with the
    backtest's second Krylov task (``M (M_P^T q_P)``, ``P`` = the first ``T // 2`` rows) and, instead, with the
    Gram columns ``M M_P^T`` accumulated in the same pass (what a Gram-column backtest would cost once)."""
    p = T // 2
    M = torch.randn(T, n, device=device).to(dtype)
    tmp, y = torch.empty(T, chunk, device=device), torch.empty(chunk, device=device)
    q, qp = torch.randn(T, device=device), torch.randn(p, device=device)

    def run(kind):
        w, wp, acc = torch.zeros(T, device=device), torch.zeros(T, device=device), torch.zeros(T, p, device=device)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            c, yy = tmp[:, : e - s], y[: e - s]
            c.copy_(M[:, s:e])
            torch.mv(c.T, q, out=yy)
            w.addmv_(c, yy)
            if kind == "krylov":
                torch.mv(c[:p].T, qp, out=yy)
                wp.addmv_(c, yy)
            elif kind == "columns":
                acc.addmm_(c, c[:p].T)

    res = {k: [] for k in ("plain", "+krylov", "+columns")}
    for _ in range(repeat):  # interleaved: the machine may be shared
        for k in res:
            res[k].append(timed(lambda: run(k.lstrip("+")), device, cpu=True))
    base = min(r[2] for r in res["plain"])
    print(f"one fused pass, T={T}, p={p}, n={n:,} {dtype}, best of {repeat}:")
    for k, v in res.items():
        wall, cpu = min(r[1] for r in v), min(r[2] for r in v)
        print(f"  {k:9s}: {wall:.3f} s wall / {cpu:.3f} s CPU (CPU x{cpu / base:.2f})")


def bench_backtest(M, steps, specs, method, a):
    """The solve with and without the backtest, alternated (the machine may be shared), best of ``a.repeat`` each
    (wall time and process CPU time)."""
    plain, withbt = [], []
    for _ in range(a.repeat):
        plain.append(timed(lambda: solve(M, steps, specs, SolveOptions(method=method)), a.device, cpu=True))
        withbt.append(timed(lambda: solve(M, steps, specs, SolveOptions(method=method, backtest=True)), a.device,
                            cpu=True))
    s0, w0, c0 = min(plain, key=lambda r: r[1])
    s1, w1, c1 = min(withbt, key=lambda r: r[1])
    c0, c1 = min(r[2] for r in plain), min(r[2] for r in withbt)
    buf = M.numel() * M.element_size()
    bt = s1.backtest
    print(f"  {method:5s}: solve {w0:.3f} s wall / {c0:.3f} s CPU -> with backtest {w1:.3f} s wall / {c1:.3f} s CPU "
          f"(wall x{w1 / w0:.2f}, CPU x{c1 / c0:.2f}; backtest arithmetic after the passes "
          f"{s1.seconds.get('backtest', 0.0) * 1e3:.1f} ms); buffer reads {s0.bytes_read / buf:.2f} -> "
          f"{s1.bytes_read / buf:.2f}; fallbacks {s0.fallbacks} -> {s1.fallbacks}")
    print(f"         backtest: fit steps <= {bt.fit_steps[-1]}, predicted step {bt.predicted_step}: cosine "
          f"{bt.cosine_global:.6f}, norm ratio {bt.norm_ratio_global:.6f}, rel. error {bt.relative_error_global:.6f}, "
          f"direction cosine {bt.direction_cosine:.6f}")


if __name__ == "__main__":
    main()

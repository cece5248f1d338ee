"""Measurement: does the in-window backtest choose the fit family that generated a trajectory, per tensor or
globally, and what does the choice do to the extrapolation error at a far horizon? Also: the published scripts'
``sin_fft`` (a line plus the strongest Fourier modes of its residual, extrapolated periodically) on the same data.

    python bench/fit_families.py [--seeds 5] [--tensors 32] [--dim 256] [--tcut 40] [--horizon 400] [--margin 0]
    python bench/fit_families.py --sin-fft-demo

Synthetic trajectories, one direction per tensor: ``Delta_t = c(t) v + noise`` for the real steps ``t = 1..tcut``,
``c`` drawn from a family (``linear``, ``power`` with p = 0.5 (sqrt-like, as measured on a real GRPO run), ``power``
with p = 1.2, ``log``) with a random scale per tensor. Two noise models, each at several levels ``s``:

* ``iid``: every step's delta gets independent isotropic noise of norm ``s * mean_t |c(t)|``;
* ``walk``: the noise is cumulative (a random walk of per-step increments, as optimiser noise adds up in
  ``theta_t - theta_0``), scaled so its norm at ``tcut`` is ``s * mean_t |c(t)|``.

Everything the backtest needs is computed by brute force from each ``M``: the first half's top direction ``v_P``,
``<Delta_t, v_P>`` and ``||Delta_t||^2``. Figures: recovery (fraction of tensors whose chosen family is the
generating one, power at any p counting as power) for the global and the per-tensor choice, and the relative
error ``sqrt(sum_i ||c_hat_i(H) v_i - c_i(H) v_i*||^2 / sum_i ||c_i(H) v_i*||^2)`` at the horizon of the whole-window
refit (averaged over the horizons H, H + tcut/4, H + tcut/2, H + 3 tcut/4) for: always linear, global auto, per-tensor
auto, the oracle (the generating family refitted), sin_fft.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from relex_callback.core.fit import AUTO_FAMILIES, FAMILIES, MARGIN, fit, select_family  # noqa: E402

GENERATORS = ("linear", "power0.5", "power1.2", "log")
FAMILY_OF = {"linear": "linear", "power0.5": "power", "power1.2": "power", "log": "log"}


def curve(kind: str, t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``[S, T]`` coefficients for scales ``a`` ``[S]``; each curve is ~0 at the start like a real delta."""
    t = t.unsqueeze(0)
    a = a.unsqueeze(1)
    if kind == "linear":
        return a * t
    if kind.startswith("power"):
        return a * t ** float(kind[5:])
    return a * 3.0 * torch.log(t)


def sin_fft_predict(c: torch.Tensor, t: torch.Tensor, H: float, modes: int = 2) -> torch.Tensor:
    """A line fitted on the window plus its residual's ``modes`` strongest Fourier modes, extrapolated as the
    periodic signal the DFT assumes (period = the window length). ``c`` ``[S, T]`` -> ``[S]`` at step ``H``."""
    f = fit(c, t)
    res = c - f.coef_at_steps(t)
    n = t.numel()
    dt = float(t[1] - t[0])
    F = torch.fft.rfft(res, dim=-1)  # [S, n//2+1]
    amp = F.abs()
    amp[:, 0] = 0  # the line has taken the mean
    top = amp.topk(min(modes, amp.shape[1] - 1), dim=-1).indices  # [S, m]
    k = top.double()
    Fk = F.gather(1, top)
    pos = (H - float(t[0])) / dt  # sample index of H in the window's own grid
    scale = torch.where((top == 0) | ((n % 2 == 0) & (top == n // 2)), 1.0, 2.0)
    wave = (scale * (Fk * torch.exp(2j * math.pi * k * pos / n)).real / n).sum(-1)
    return f.coef_at(H) + wave


def trajectories(gen: list, s: float, noise: str, n: int, steps: torch.Tensor, g: torch.Generator):
    S, T = len(gen), steps.numel()
    a = torch.exp(torch.randn(S, generator=g, dtype=torch.float64) * 0.5)
    c = torch.stack([curve(k, steps, a[i : i + 1])[0] for i, k in enumerate(gen)])  # [S, T]
    v = torch.randn(S, n, generator=g, dtype=torch.float64)
    v /= v.norm(dim=1, keepdim=True)
    scale = s * c.abs().mean(1)  # [S]
    xi = torch.randn(S, T, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    if noise == "walk":
        xi = xi.cumsum(1) / math.sqrt(T)  # a random walk whose norm at tcut is ~1
    M = c.unsqueeze(2) * v.unsqueeze(1) + scale.view(S, 1, 1) * xi  # [S, T, n]
    return a, v, M


def top_dir(M: torch.Tensor) -> torch.Tensor:
    """Top right singular vector of each ``M`` ``[S, T, n]``, signed so the coefficients sum positive."""
    v = torch.linalg.svd(M, full_matrices=False).Vh[:, 0]  # [S, n]
    sgn = torch.sign(torch.einsum("stn,sn->s", M, v))
    return v * torch.where(sgn == 0, 1.0, sgn).unsqueeze(1)


def horizon_error(coef_H: torch.Tensor, v: torch.Tensor, true_H: torch.Tensor, v_true: torch.Tensor) -> float:
    cos = (v * v_true).sum(1)
    err = coef_H**2 + true_H**2 - 2 * coef_H * true_H * cos
    return math.sqrt(float(err.clamp_min(0).sum() / (true_H**2).sum()))


def run_case(gen, s, noise, args, steps, part, later, g):
    a, v_true, M = trajectories(gen, s, noise, args.dim, steps, g)
    vP = top_dir(M[:, part])
    coeffs_P = torch.einsum("stn,sn->st", M, vP)
    sq = (M * M).sum(2)
    sel = select_family(coeffs_P, sq, steps, part, later, families=AUTO_FAMILIES, margin=args.margin)
    want = torch.tensor([AUTO_FAMILIES.index(FAMILY_OF[k]) for k in gen])
    rec_g = float((torch.tensor(AUTO_FAMILIES.index(sel.choice)) == want).double().mean())
    rec_t = float((sel.tensor_choice == want).double().mean())
    # whole-window refit; the error is averaged over 4 horizons a quarter window apart (H, H + tcut/4, ...), so
    # that a periodic extrapolation (sin_fft) is not judged at one lucky or unlucky phase
    v = top_dir(M)
    c = torch.einsum("stn,sn->st", M, v)
    per_tensor = type(sel)(sel.families, sel.scores, sel.tensor_scores, sel.choice, sel.tensor_choice, True)
    fits = {
        "linear": fit(c, steps),
        "auto-global": sel.refit(c, steps),
        "auto-tensor": per_tensor.refit(c, steps),
    }
    oracle = [fit(c[i : i + 1], steps, family=FAMILY_OF[k]) for i, k in enumerate(gen)]
    errs = {k: 0.0 for k in ("linear", "auto-global", "auto-tensor", "oracle", "sin_fft")}
    horizons = [float(args.horizon) + j * args.tcut / 4 for j in range(4)]
    for H in horizons:
        true_H = torch.stack([curve(k, torch.tensor([H], dtype=torch.float64), a[i : i + 1])[0, 0]
                              for i, k in enumerate(gen)])
        pred = {k: f.coef_at(H) for k, f in fits.items()}
        pred["oracle"] = torch.stack([f.coef_at(H)[0] for f in oracle])
        pred["sin_fft"] = sin_fft_predict(c, steps, H)
        for k, p in pred.items():
            errs[k] += horizon_error(p, v, true_H, v_true) / len(horizons)
    return rec_g, rec_t, errs


def sin_fft_demo():
    """Prediction / truth on a noise-free sqrt curve (windows 1..10 and 1..40) for linear, power and sin_fft."""
    for tcut in (10, 40):
        t = torch.arange(1, tcut + 1, dtype=torch.float64)
        c = (t**0.5).unsqueeze(0)
        lin, pw = fit(c, t), fit(c, t, family="power")
        print(f"sqrt curve, window 1..{tcut}: prediction / truth")
        print(f"{'H':>6}{'linear':>9}{'power':>9}{'sin_fft':>9}")
        for H in [tcut + k * tcut // 4 for k in range(1, 13)] + [10 * tcut]:
            tr = H**0.5
            print(f"{H:>6}{float(lin.coef_at(H)) / tr:>9.3f}{float(pw.coef_at(H)) / tr:>9.3f}"
                  f"{float(sin_fft_predict(c, t, H)[0]) / tr:>9.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--tensors", type=int, default=32)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--tcut", type=int, default=40)
    ap.add_argument("--horizon", type=int, default=400)
    ap.add_argument("--levels", default="0,0.01,0.03,0.1,0.3,1")
    ap.add_argument("--margin", type=float, default=MARGIN, help="select_family's margin (0: plain argmin)")
    ap.add_argument("--scenarios", default=",".join(GENERATORS + ("mixed",)))
    ap.add_argument("--noise", default="iid,walk")
    ap.add_argument("--sin-fft-demo", action="store_true", help="only print the sqrt-curve sin_fft table")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.sin_fft_demo:
        return sin_fft_demo()
    steps = torch.arange(1, args.tcut + 1, dtype=torch.float64)
    part = steps <= args.tcut / 2
    later = ~part
    levels = [float(x) for x in args.levels.split(",")]
    cols = ("linear", "auto-global", "auto-tensor", "oracle", "sin_fft")
    print(f"tcut {args.tcut}, backtest part t <= {args.tcut // 2}, horizon {args.horizon}, {args.tensors} tensors "
          f"x {args.dim} dims, {args.seeds} seeds; candidates {AUTO_FAMILIES} (of {FAMILIES}), margin {args.margin}")
    print("recovery = fraction of tensors given their generating family; error = relative error at the horizon")
    hdr = f"{'scenario':<14}{'noise':>6}{'level':>6} | {'rec glob':>8}{'rec tens':>9} | " + "".join(
        f"{c:>12}" for c in cols)
    for noise in args.noise.split(","):
        print()
        print(hdr)
        for scen in args.scenarios.split(","):
            for s in levels:
                g = torch.Generator().manual_seed(1000 + int(s * 1e4))
                rg = rt = 0.0
                acc = {c: 0.0 for c in cols}
                for _ in range(args.seeds):
                    if scen == "mixed":
                        gen = [GENERATORS[int(i)] for i in torch.randint(0, 4, (args.tensors,), generator=g)]
                    else:
                        gen = [scen] * args.tensors
                    a, b, e = run_case(gen, s, noise, args, steps, part, later, g)
                    rg, rt = rg + a / args.seeds, rt + b / args.seeds
                    for c in cols:
                        acc[c] += e[c] / args.seeds
                print(f"{scen:<14}{noise:>6}{s:>6g} | {rg:>8.2f}{rt:>9.2f} | " + "".join(
                    f"{acc[c]:>12.4f}" for c in cols), flush=True)


if __name__ == "__main__":
    main()

"""Helpers shared by the tests (not part of the package)."""

import functools
import math
import os
import subprocess
import sys

import torch

from relex_callback.files import streaming
from relex_callback.params import TensorSpec
from relex_callback.examples.toy import _text


def cli_env() -> dict:
    """The environment for running the `relex` CLI as a subprocess on this checkout (the repo first on PYTHONPATH)."""
    e = dict(os.environ)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    e["PYTHONPATH"] = repo + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def run_relex(*args, env=None, timeout=600, **kw) -> subprocess.CompletedProcess:
    """``relex ARGS`` as a child process (``python -m relex_callback.offline.cli``) on this checkout, its output
    captured as text; ``env`` defaults to :func:`cli_env`. Arguments are passed through ``str``."""
    return subprocess.run([sys.executable, "-m", "relex_callback.offline.cli", *map(str, args)],
                          env=cli_env() if env is None else env, capture_output=True, text=True, timeout=timeout,
                          **kw)


def arena_specs(sizes):
    """Float32 specs ``t0, t1, ...`` laid out one after the other in an arena; returns ``(specs, D)``."""
    specs, o = [], 0
    for i, n in enumerate(sizes):
        specs.append(TensorSpec(name=f"t{i}", shape=(n,), dtype=torch.float32, local_numel=n, offset=o))
        o += n
    return specs, o


def digit_reward(completions, **kwargs) -> list[float]:
    """A dense shaping reward for tests: the fraction of the completion's characters that are digits. Unlike
    :func:`arithmetic_reward` it separates the completions of an untrained model, so GRPO moves the weights from
    step 1."""
    out = []
    for c in completions:
        text = _text(c).strip()
        out.append(sum(ch.isdigit() for ch in text) / len(text) if text else 0.0)
    return out


# ------------------------------------------------------------------------------ tolerances derived from the math
# A float32 solve works on the T x T Gram G = M M^T of float32 deltas. Each entry of the computed Gram is a float32
# dot product of length n; its rounding error is at most gamma_n |m_i|.|m_j| in the worst case and, for the rounding
# errors of a real summation (independent signs; Higham & Mary, SIAM J. Sci. Comput. 41, 2019), about
# sqrt(n) u |m_i|.|m_j| with u = 2^-24 (a BLAS's blocked summation only lowers it). So
#     ||dG||_2 <= sqrt(n) u ||M||_F^2.
# Perturbation of an eigenvector (Davis-Kahan): u_k moves by at most ||dG|| / gap_k, gap_k = min_j |s_k^2 - s_j^2|,
# and its move towards u_1 by at most ||dG|| / (s_1^2 - s_k^2). Component k of the extrapolated delta is
# L(u_k) M^T u_k, with L the linear functional "least-squares line through (t, u[t]) evaluated at H"; the whole delta
# is about |L(u_1)| s_1. So, relative to it, with kappa_L = ||L|| / |L(u_1)| (how much extrapolating to H amplifies a
# change of the coefficients):
#     err_k <= kappa_L ||dG|| [ (s_k + s_k') / (s_1 gap_k) + [k > 1] / (s_1^2 - s_k^2) ],
# s_k' the largest other singular value u_k can turn towards (s_2 for k = 1). Summed over the components kept, plus
# u (||theta_0|| / ||delta|| + 1) for rounding theta_0 + delta to float32. A noise component (s_2 ~ s_3) has
# gap_2 ~ 0: float32 data does not determine its direction, and no fixed tolerance holds for it on every BLAS (one
# measured 1.6e-4 where another gave 2.6e-5); the bound grows without limit and says so.
U32 = 2.0**-24


def one_thread(fn):
    """Run ``fn`` with one torch thread (the package's :func:`relex_callback.files.streaming.one_thread`): the bounds
    are float64 algebra on T x T matrices (and thousands of tiny eigh in :func:`first_order_bound`); threads gain
    nothing there, and on a loaded 2-core machine their spin-waits made the checks 10-70x slower (measured: test_fold's
    rank-2 case 0.05 s vs 3.6 s)."""
    return functools.wraps(fn)(streaming.one_thread()(fn))


@one_thread
def extrapolation_tolerance(M64: torch.Tensor, steps, horizon: float, rank: int = 1, theta0_norm: float = 0.0,
                            fit_start=None, moved_to: torch.Tensor = None) -> float:
    """Bound on ``||delta_float32 - delta_float64|| / ||delta_float64||`` for one tensor whose exact deltas are the
    rows of ``M64`` (``T x n``), extrapolated with ``rank`` components to ``horizon`` by a float32 Gram solve (the
    derivation above). ``moved_to``: a solve that reads another trajectory ``M'`` (a folded store's ``C B``, in
    float64) instead of ``M``; its Gram moves by ``D = M' M'^T - M M^T`` and its direction pass by ``dM = M' - M``,
    measured here. Davis-Kahan in its residual form (the turn of ``u_k`` is at most ``||D u_k|| / (gap_k - ||D||)``,
    not ``||D|| / gap_k``: a fold discards directions orthogonal to the kept ones, which hardly couple to ``u_1``) and
    ``kappa_L ||dM^T u_k|| / s_1`` for the direction pass."""
    M64 = M64.double()
    T, n = M64.shape
    U, S, _ = torch.linalg.svd(M64, full_matrices=False)
    s = [float(x) for x in S] + [0.0] * max(0, T - len(S))
    if s[0] == 0.0:
        return 0.0
    t = torch.tensor([float(x) for x in steps], dtype=torch.float64)
    keep = t >= (fit_start if fit_start is not None else float(t.min()))
    X = torch.stack([t[keep], torch.ones_like(t[keep])], 1)
    L = torch.zeros(T, dtype=torch.float64)
    L[keep] = torch.tensor([float(horizon), 1.0], dtype=torch.float64) @ torch.linalg.pinv(X)
    L1 = abs(float(L @ U[:, 0]))
    kappa = float(L.norm()) / max(L1, 1e-300)
    dG = math.sqrt(n) * U32 * sum(x * x for x in s)
    D = dM = None
    if moved_to is not None:
        Mp = moved_to.double()
        dM = Mp - M64
        D = Mp @ Mp.T - M64 @ M64.T
        dG += math.sqrt(n) * U32 * float((Mp * Mp).sum())  # the moved trajectory's own Gram rounding
        nD = float(torch.linalg.matrix_norm(D, ord=2))
    total = 0.0
    for k in range(min(rank, len(S))):
        others = [s[j] for j in range(len(s)) if j != k]
        gap = min((abs(s[k] ** 2 - x ** 2) for x in others), default=s[0] ** 2)
        rest = max([s[j] for j in range(1, len(s)) if j != k], default=0.0)
        turn = min(1.0, dG / gap) if gap > 0 else 1.0
        to_1 = (min(1.0, dG / (s[0] ** 2 - s[k] ** 2)) if s[0] > s[k] else 1.0) if k else 0.0
        if D is not None:
            r = float((D @ U[:, k]).norm())
            turn = min(1.0, turn + (r / (gap - nD - dG) if gap > nD + dG else 1.0))
            if k:
                sep = s[0] ** 2 - s[k] ** 2 - nD - dG
                to_1 = min(1.0, to_1 + (r / sep if sep > 0 else 1.0))
            total += kappa * float((dM.T @ U[:, k]).norm()) / s[0]
        total += kappa * (turn * (s[k] + rest) / s[0] + to_1)
    return total + U32 * (theta0_norm / max(L1 * s[0], 1e-300) + 1.0)


def gram_rounding(M64: torch.Tensor) -> torch.Tensor:
    """Entrywise error of the float32 Gram of the rows of ``M64`` (``T x n``, the float32 data in float64), as above:
    ``sqrt(n) u |m_i| |m_j|`` (the rounding errors of a real summation; the worst case ``gamma_n sum_k |m_ik m_jk|`` of
    :func:`dot_error_bound` is ~``sqrt(n)`` times larger and, for the figures derived from a Gram, a bound 100x above
    anything a BLAS produces)."""
    M64 = M64.double()
    r = M64.norm(dim=-1)
    return math.sqrt(M64.shape[-1]) * U32 * (r[..., :, None] * r[..., None, :])


def dot_error_bound(A: torch.Tensor, B: torch.Tensor = None, unit: float = 2 * U32) -> torch.Tensor:
    """Entrywise bound on the error of the float32-accumulated products ``A B^T`` (``A [T, n]``, ``B [R, n]``, exact
    values in any dtype; ``B = A`` for a Gram): ``|fl(a_i . b_j) - a_i . b_j| <= gamma_n sum_k |a_ik b_jk|`` with
    ``gamma_n = n unit / (1 - n unit)`` (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., Lemma 3.1
    and
    eq. 3.5): a worst case, for every summation order, blocking and atomic reduction. ``unit = 2u``, not ``u``: it
    also holds where an accumulator truncates instead of rounding to nearest (GPU tensor cores); the products of
    16-bit inputs are exact in float32 and those of float32 inputs add one rounding each, inside ``gamma_n``."""
    A = A.double().abs()
    B = A if B is None else B.double().abs()
    n = A.shape[-1]
    g = n * unit / (1 - n * unit)
    return g * (A @ B.transpose(-1, -2))


@one_thread
def first_order_bound(f, G: torch.Tensor, E: torch.Tensor, backward_frobenius: float = 0.0,
                      parts: bool = False) -> torch.Tensor:
    """How far the float64 outputs of ``f`` can move when the symmetric ``T x T`` matrix ``G`` it reads is perturbed by
    ``dG`` with ``|dG_ij| <= E_ij`` entrywise (plus, optionally, any symmetric ``F`` with ``||F||_F <=
    backward_frobenius``): ``f`` maps a batch ``[B, T, T]`` to ``[B, K]``.

    Each independent entry (``i <= j``, moved together with ``G_ji``) is pushed by ``+E_ij`` and ``-E_ij`` and the
    larger
    change of each output is summed over the entries: the worst case of the linearised change over the box
    ``|dG| <= E`` (a sum of ``|df/dG_ij| E_ij``). The ``F`` term adds ``||grad f|| backward_frobenius``
    (Cauchy-Schwarz),
    the gradient taken from the same central differences. The result is doubled to cover the second-order terms,
    ``(||dG|| / gap)^2`` relative to the first: this bound is only meant for perturbations far below the spectral gaps
    ``f`` depends on (the float32 Gram of a trajectory with a clear top direction). With ``parts``: the pair
    ``(bound for E alone, bound per unit of backward_frobenius)``, whose ``a + b F`` is the bound (one evaluation for
    several ``F``)."""
    G = G.double()
    T = G.shape[-1]
    i, j = torch.triu_indices(T, T)
    N = i.numel()
    k = torch.arange(N)
    eps = E.double()[i, j]
    out = []
    for sgn in (1.0, -1.0):
        P = G.expand(N, T, T).clone()
        P[k, i, j] += sgn * eps
        off = i != j
        P[k[off], j[off], i[off]] += sgn * eps[off]
        out.append(f(P))
    f0 = f(G[None])
    dp, dm = out[0] - f0, out[1] - f0
    lin = torch.maximum(dp.abs(), dm.abs()).sum(0)
    grad = torch.where(eps[:, None] > 0, (dp - dm) / (2 * eps[:, None]).clamp_min(1e-300), torch.zeros_like(dp))
    if parts:
        return 2 * lin, 2 * grad.norm(dim=0)
    return 2 * (lin + grad.norm(dim=0) * backward_frobenius)


@one_thread
def direction_tolerance(M64: torch.Tensor) -> float:
    """Bound on ``||v_float32 - v_float64||`` (signs aligned) for the top direction ``v = M^T u_1 / s_1`` of the rows of
    ``M64`` (``T x n``) from a float32 Gram solve: ``u_1`` turns by at most ``||dG|| / gap_1`` (Davis-Kahan, ``||dG||
    <= sqrt(n) u ||M||_F^2`` as above), which moves ``v`` by at most that times ``(s_1 + s_2) / s_1``; the float32
    direction pass (``T``-term sums) adds ``gamma_T ||M||_F / s_1`` and the final normalisation a few ``u``."""
    M64 = M64.double()
    T, n = M64.shape
    S = torch.linalg.svdvals(M64)
    s = [float(x) for x in S] + [0.0] * max(0, T - len(S))
    if s[0] == 0.0:
        return 0.0
    fro2 = sum(x * x for x in s)
    dG = math.sqrt(n) * U32 * fro2
    gap = s[0] ** 2 - s[1] ** 2 if len(s) > 1 else s[0] ** 2
    turn = min(2.0, dG / gap) if gap > 0 else 2.0
    return turn * (s[0] + s[1]) / s[0] + 2 * T * U32 * math.sqrt(fro2) / s[0] + 4 * U32


# ------------------------------------------------------------------------- float64 references of recorded runs
def float64_reference(snaps: dict, steps, horizon: int) -> dict:
    """theta_0 + (a H + b) v per tensor, in float64, from recorded snapshots ``{step: {name: tensor}}`` (docs/math.md,
    "The extrapolation"); a tensor that did not move is theta_0."""
    theta0 = snaps[0]
    out = {}
    for name, t0 in theta0.items():
        t0 = t0.double()
        M = torch.stack([(snaps[t][name].double() - t0).reshape(-1) for t in steps])
        if float(M.norm()) == 0:
            out[name] = t0.clone()
            continue
        _, _, Vh = torch.linalg.svd(M, full_matrices=False)
        v = Vh[0]
        c = M @ v
        X = torch.stack([torch.tensor(steps, dtype=torch.float64), torch.ones(len(steps), dtype=torch.float64)], 1)
        a, b = torch.linalg.lstsq(X, c.unsqueeze(1)).solution.flatten().tolist()
        out[name] = t0 + ((a * horizon + b) * v).reshape(t0.shape)
    return out


def compare_weights(wa: dict, wb: dict, snaps_a: dict, horizon: int, steps, snaps_b: dict = None, label: str = "",
                    same_trajectory: bool = False, exact=()):
    """Two horizon checkpoints ``wa``, ``wb`` (name -> tensor) of one training computed two ways (offline, the CLI, a
    resumed or distributed run): each within its float32 solve's bound (``extrapolation_tolerance``, relative to the
    move) of the float64 reference of the snapshots IT recorded, so within the sum of the two of each other, plus the
    distance between the two references (0 when both read the same snapshots). A distributed run's Gram is the
    float64 all-reduce of per-process float32 Grams: sum_p sqrt(n_p) u |m_pi| |m_pj| <= sqrt(n) u |m_i| |m_j|
    (Cauchy-Schwarz), the same bound. Tensors without a move in the reference (untracked: theta_0 or the weights at
    tcut copied; and the names in ``exact``) must be equal bitwise. ``same_trajectory``: the two recordings must be
    bitwise equal (a resumed run
    replays the same float32 training: the trainer restores model, optimizer and RNG states exactly), so the
    distance term is 0 by assertion, not by measurement. Prints the largest error / bound; returns it and the bound
    per tensor (absolute, 2-norm; 0 for the bitwise ones)."""
    snaps_b = snaps_b or snaps_a
    if same_trajectory and snaps_b is not snaps_a:
        for t in [0, *steps]:
            for k in snaps_a[t]:
                assert torch.equal(snaps_a[t][k], snaps_b[t][k]), (t, k)
    assert sorted(wa) == sorted(wb)
    ref_a = float64_reference(snaps_a, steps, horizon)
    ref_b = ref_a if snaps_b is snaps_a else float64_reference(snaps_b, steps, horizon)
    worst, rel_bounds, bounds = 0.0, [], {}
    for k in wa:
        if k in exact or k not in ref_a or float((ref_a[k] - snaps_a[0][k].double()).norm()) == 0:
            assert torch.equal(wa[k], wb[k]), (label, k)
            bounds[k] = 0.0
            continue
        bound = float((ref_a[k] - ref_b[k]).norm())
        for snaps, ref in ((snaps_a, ref_a), (snaps_b, ref_b)):
            t0 = snaps[0][k].double()
            M = torch.stack([(snaps[t][k].double() - t0).reshape(-1) for t in steps])
            tol = extrapolation_tolerance(M, steps, horizon, theta0_norm=float(t0.norm()))
            bound += tol * float((ref[k] - t0).norm())
        err = float((wa[k].double().reshape(ref_a[k].shape) - wb[k].double().reshape(ref_a[k].shape)).norm())
        assert err <= bound, (label, k, err, bound)
        bounds[k] = bound
        worst = max(worst, err / bound if bound > 0 else 0.0)
        moved = float((ref_b[k] - snaps_b[0][k].double()).norm())
        if moved > 0:
            rel_bounds.append(bound / moved)
    nexact = sum(1 for b in bounds.values() if b == 0.0)
    print(f"{label} ({len(wa)} tensors, {nexact} bitwise): max error / bound {worst:.2e}, bound / move "
          f"{min(rel_bounds, default=0):.1e} .. {max(rel_bounds, default=0):.1e}")
    return worst, bounds


def load_recorded(d: str) -> dict:
    """Snapshots written by a child process's recorder (``step-<t>.pt``, ``{name: float32 tensor}``, exact copies of
    the trainable parameters) as ``{t: {name: float64 tensor}}``."""
    out = {}
    for fn in os.listdir(d):
        if fn.startswith("step-") and fn.endswith(".pt"):
            out[int(fn[5:-3])] = {k: v.double() for k, v in torch.load(os.path.join(d, fn)).items()}
    return out

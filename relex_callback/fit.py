"""Ordinary least squares of coefficients on real step numbers, batched over tensors, in float64."""

from __future__ import annotations

import torch


def fit_lines(coeffs: torch.Tensor, steps: torch.Tensor, mask: torch.Tensor):
    """Fit ``c_t = a*t + b`` for each row of ``coeffs``.

    Args:
        coeffs: ``[..., T]`` coefficients (any float dtype; computed in float64).
        steps: ``[T]`` step numbers (the real ones, not positions).
        mask: ``[T]`` bool, the steps that enter the fit (``t >= fit_start``); at least two.

    Returns:
        ``(slope, intercept, r2)``, each ``[...]`` float64. ``r2`` is 1 for a perfect fit, also when the
        coefficients are constant (e.g. a tensor that never moved), never NaN.
    """
    c = coeffs.to(torch.float64)[..., mask]
    t = steps.to(torch.float64)[mask]
    tm = t.mean()
    dt = t - tm
    cm = c.mean(-1, keepdim=True)
    slope = ((c - cm) * dt).sum(-1) / (dt * dt).sum()
    intercept = cm.squeeze(-1) - slope * tm
    pred = slope.unsqueeze(-1) * t + intercept.unsqueeze(-1)
    ss_res = ((c - pred) ** 2).sum(-1)
    ss_tot = ((c - cm) ** 2).sum(-1)
    scale = (c**2).sum(-1).clamp_min(torch.finfo(torch.float64).tiny)
    flat = ss_tot <= 1e-24 * scale
    r2 = torch.where(flat, torch.where(ss_res <= 1e-24 * scale, 1.0, 0.0), 1.0 - ss_res / ss_tot.where(~flat, 1.0))
    return slope, intercept, r2

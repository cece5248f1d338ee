"""Checkpoints checked against theta_0 before ``relex extrapolate --checkpoints`` solves anything.

The tensor set, shapes and dtypes are checked by :func:`relex_callback.files.checkpoints.check_same_tensors`. This
module checks, from a few sampled elements per tensor (memory-mapped: only their pages are read), that the
checkpoints are one run that started from ``--base``:

* **a copy**: two consecutive checkpoints with the same sampled values in every tensor, where the run moves the
  weights, are one checkpoint under two steps (a ``cp -r`` under another step's name): the line would be fitted to a
  step that did not happen. Checkpoints still at theta_0 are not copies: a GRPO step without reward variance does
  not move the weights, and docs/cli.md's ``--fit-start`` advice covers them. (The same directory twice is refused
  by its path, :func:`same_directories`.);
* **never trained, yet not the base's**: a tensor whose sampled values are identical in every checkpoint (frozen, a
  buffer) but differ from the base: training did not change it, so the base is not the model training started from;
* **another base**: training moves the weights a bounded distance per step, so the distance from the base to the
  first checkpoint (step ``s1``) is at most about ``s1`` times the distance a step moves them. The ratio

      R = |x(s1) - x(0)| / (s1 * max_i |x(s_{i+1}) - x(s_i)| / (s_{i+1} - s_i))

  (norms over the sampled elements of every tensor) is about 1 for a real run (at most 1 when the steps move the
  weights by equal amounts in one direction; below 1 when they partly cancel, since the per-step rate between two
  checkpoints is then measured as an underestimate for both terms alike). A checkpoint of a sibling model (another
  seed, a fine-tune of another model) is as far from the base as the two models are from each other: orders of
  magnitude more. Refused above :data:`MAX_RATIO` (measured on the tiny models' GRPO/Adam runs, stride 1 to 3: see
  tests/test_belongs.py); a learning rate much larger before the first checkpoint than after it can exceed it, and
  ``--no-run-check`` (``run_check=False``) then skips these checks, saying so.

And for ``relex extrapolate --trajectory`` (:func:`untracked_at_tcut`): the tensors a saved trajectory does not track
are written as the callback writes them, at their values at its last recorded step, from where those exist and are
checked to be that step's; never theta_0 for a tensor that may have been trained.
"""

from __future__ import annotations

import os
from typing import Sequence
from types import SimpleNamespace

import torch

from ..errors import RelexInputError
from ..files.checkpoints import DirectorySource
from ..files.untracked import load_untracked, record_values, UNTRACKED_FILE, UntrackedSource
from ..trajectory.persist import TRAJECTORY_DIR, verify_live
from ..files.streaming import FileReader

SAMPLES = 256  # sampled elements per tensor (all of a smaller one)
MAX_RATIO = 20.0  # R above this: the first checkpoint is not reachable from the base by this run's steps
MIN_EXPECTED = 20  # changed samples a verdict of "unchanged" needs to have expected (P(0 | Poisson 20) = 2e-9)


BLOCKS = 8  # the samples are BLOCKS runs of contiguous elements spread over the tensor: few pages read per tensor


def _indices(n: int) -> torch.Tensor:
    if n <= SAMPLES:
        return torch.arange(n)
    run = SAMPLES // BLOCKS
    starts = sorted({(i * 2654435761) % (n - run + 1) for i in range(BLOCKS)})
    return torch.unique(torch.cat([torch.arange(a, a + run) for a in starts]))


def sampled(mapped, names: Sequence[str], idx: dict) -> dict:
    """``name -> float64 [k]``: the sampled elements of each tensor (only their pages are read)."""
    return {n: mapped.get(n).reshape(-1)[idx[n]].to(torch.float64) for n in names}


def _runs(ix: torch.Tensor) -> list[tuple[int, int]]:
    """``(start, count)`` of the contiguous runs of the sorted, distinct indices ``ix``."""
    if ix.numel() == 0:
        return []
    cut = (torch.nonzero(ix[1:] - ix[:-1] != 1).reshape(-1) + 1).tolist()
    bounds = [0, *cut, ix.numel()]
    first = ix.tolist()
    return [(first[a], b - a) for a, b in zip(bounds[:-1], bounds[1:])]


def sampled_from_files(reader, names: Sequence[str], runs: dict) -> dict:
    """:func:`sampled` read with one ``preadv`` per contiguous run of samples (``runs[name]``: :func:`_runs` of its
    indices) from a :class:`~relex_callback.files.streaming.FileReader`: the same values, but only the bytes of the
    samples are copied, into one buffer per dtype widened to float64 at once (a memory map per tensor cost a mapping,
    a page fault per run and an unmapping: 0.4 s for 21 files of 98 tensors)."""
    by_dtype: dict = {}
    for n in names:
        by_dtype.setdefault(reader.locs[n].dtype, []).append(n)
    out = {}
    for dtype, group in by_dtype.items():
        isz = dtype.itemsize
        counts = [sum(k for _, k in runs[n]) for n in group]
        raw = torch.empty(sum(counts) * isz, dtype=torch.uint8)
        done = 0
        for n in group:
            for a, k in runs[n]:
                reader.read_raw(n, raw[done: done + k * isz], a)
                done += k * isz
        wide = raw.view(dtype).to(torch.float64)
        for n, piece in zip(group, torch.split(wide, counts)):
            out[n] = piece
    return {n: out[n] for n in names}


def check_belongs(base: str, src_base, cks, sources, names: Sequence[str]):
    """Refuse (``RelexInputError``, one line naming the checkpoints or tensors and what to pass) checkpoints that are
    not one run started from ``base``: see the module docstring. ``cks`` are sorted by step.

    Weights saved in bf16 with a small learning rate change only where an element crosses a rounding boundary, so
    an unchanged sample is weak evidence: "unchanged" is concluded only where the changes seen elsewhere in the same
    checkpoints predict at least :data:`MIN_EXPECTED` changed samples (a Poisson count: below that, no verdict)."""
    idx = {n: _indices(int(torch.Size(src_base.meta[n][0]).numel())) for n in names}
    runs = {n: _runs(idx[n]) for n in names}
    opened = []
    try:
        for s in [src_base, *sources]:
            opened.append(FileReader(s, names))
        x0, *xs = [sampled_from_files(r, names, runs) for r in opened]
    finally:
        for r in opened:
            r.close()
    steps = [c.step for c in cks]
    total = sum(int(idx[n].numel()) for n in names)
    changed = [sum(int((xs[i + 1][n] != xs[i][n]).sum()) for n in names) for i in range(len(xs) - 1)]
    seen = sum(changed)
    if len(xs) >= 2:
        # the fraction of samples that change per step: between the checkpoints, else from the base to the first
        moved0 = sum(int((xs[0][n] != x0[n]).sum()) for n in names)
        per_step = seen / (total * (steps[-1] - steps[0])) if seen else moved0 / (total * steps[0])
        for i, c in enumerate(changed):
            # weights still at theta_0 do not move either (GRPO steps without reward variance): not a copy
            if (c == 0 and per_step * total * (steps[i + 1] - steps[i]) >= MIN_EXPECTED
                    and any(not torch.equal(xs[i][n], x0[n]) for n in names)):
                raise RelexInputError(
                    f"{cks[i].path} (step {steps[i]}) and {cks[i + 1].path} (step {steps[i + 1]}) hold the same "
                    "weights: one checkpoint under two steps (a copy, or the same directory twice); leave one out of "
                    "--checkpoints")
        frozen = []
        for n in names:
            k = int(idx[n].numel())
            moved = int((xs[0][n] != x0[n]).sum())  # before the first checkpoint
            still = all(torch.equal(x[n], xs[0][n]) for x in xs[1:])
            # a trained tensor that changed `moved` of k samples in steps[0] steps changes about that many per step
            if still and 2 * moved > k and moved / steps[0] * (steps[-1] - steps[0]) >= MIN_EXPECTED:
                frozen.append(n)
        if frozen:
            more = f" and {len(frozen) - 3} more" if len(frozen) > 3 else ""
            raise RelexInputError(
                f"{', '.join(frozen[:3])}{more}: unchanged in every checkpoint (never trained: frozen, a buffer) but "
                f"different in the base {base}: the checkpoints did not start from this base; pass the checkpoint "
                "training started from as --base (or --no-run-check if it was changed on purpose between the base and "
                "step "
                f"{steps[0]})"
            )
        if seen >= MIN_EXPECTED:
            r, d0, rate = distance_ratio(x0, xs, steps, names)
            if r > MAX_RATIO:
                scale = float(torch.cat([x0[n] for n in names]).norm()) or 1.0
                raise RelexInputError(
                    f"{cks[0].path} (step {steps[0]}) is {r:.3g}x farther from the base {base} than {steps[0]} "
                    f"step(s) of this run move the weights (relative distance {d0 / scale:.2e}, "
                    f"{rate / scale:.2e} per step between checkpoints; above {MAX_RATIO:g}x is refused): the "
                    "checkpoints did not start from this base (another base, a fine-tune of another model); pass the "
                    "checkpoint training started from, or --no-run-check if the learning rate before the first "
                    "checkpoint was that much larger")


def distance_ratio(x0: dict, xs: list, steps: Sequence[int], names: Sequence[str]) -> tuple[float, float, float]:
    """``(R, |x(s1) - x(0)|, max per-step rate)`` over the sampled elements (module docstring)."""
    def dist(a, b):
        return float(torch.cat([(a[n] - b[n]) for n in names]).norm())

    d0 = dist(xs[0], x0)
    rate = max(dist(xs[i + 1], xs[i]) / (steps[i + 1] - steps[i]) for i in range(len(xs) - 1))
    if rate == 0:
        return (float("inf") if d0 > 0 else 0.0), d0, rate
    return d0 / (steps[0] * rate), d0, rate


def same_directories(cks) -> None:
    """The same checkpoint directory (or weights file) under two steps is refused, naming both."""
    seen = {}
    for c in cks:
        key = os.path.realpath(c.weights)
        if key in seen:
            raise RelexInputError(f"{seen[key].path} (step {seen[key].step}) and {c.path} (step {c.step}) are the same "
                                  "directory: give each checkpoint once")
        seen[key] = c


class _Live:
    """The tracked pieces of a checkpoint, read one tensor at a time each time it is iterated (for verify_live)."""

    def __init__(self, src, specs):
        self.src, self.specs = src, specs

    def __iter__(self):
        for spec in self.specs:
            yield self.src.get(spec.name).reshape(-1)[spec.flat_start: spec.flat_start + spec.local_numel]


def untracked_at_tcut(store, trajectory_dir, src, base, untracked_from, untracked_frozen):
    """The source of a ``--trajectory`` horizon: the base, with every key the trajectory does not track as the
    callback would have written it (its value at tcut, the last recorded step), recorded for the state file so that
    ``relex materialize`` writes it again. Refuses, naming the tensors and what to pass, rather than writing theta_0
    for a tensor that may have been trained; frozen tensors and buffers are checked against the base."""
    tracked = {s.name for s in store.specs}
    keys = [k for k in src.keys if k not in tracked]
    floating = [k for k in keys if src.meta[k][1].is_floating_point]
    tcut = store.steps[-1]
    if not floating:
        return src
    if untracked_from is not None and untracked_frozen:
        raise RelexInputError("--untracked-from and --untracked-frozen exclude each other: pass one")
    saved = load_untracked(trajectory_dir) if untracked_from is None else None
    if saved is not None:
        tensors, meta, step, run_id = saved
        if step != tcut or (run_id is not None and store.run_id is not None and run_id != store.run_id):
            raise RelexInputError(
                f"{os.path.join(trajectory_dir, UNTRACKED_FILE)} was written for step {step} of run {run_id}, not "
                f"for this trajectory's last step {tcut} (run {store.run_id}); delete it and pass --untracked-from a "
                f"checkpoint saved at step {tcut}")
    else:
        parent = os.path.dirname(os.path.abspath(trajectory_dir))
        if (untracked_from is None and not untracked_frozen
                and os.path.basename(os.path.abspath(trajectory_dir)) == TRAJECTORY_DIR
                and any(os.path.isfile(os.path.join(parent, f)) for f in ("model.safetensors",
                                                                            "model.safetensors.index.json"))):
            untracked_from = parent  # a checkpoint's relex_trajectory/: its weights are beside it
        if untracked_from is not None:
            tensors, meta = _untracked_from_checkpoint(store, untracked_from, src, keys, tcut)
        elif untracked_frozen:
            tensors, meta = record_values(keys, src.get, set(keys))  # from the base, checked as the run's below
        else:
            names = ", ".join(floating[:4]) + (f" and {len(floating) - 4} more" if len(floating) > 4 else "")
            raise RelexInputError(
                f"{trajectory_dir} does not hold the values at step {tcut} of the {len(floating)} tensor(s) it does "
                f"not track ({names}); the base has them at step 0. Pass --untracked-from a checkpoint saved at step "
                f"{tcut} (its weights give them), or --untracked-frozen if none of them was trained (frozen "
                "parameters, buffers)")
    out = UntrackedSource(src, SimpleNamespace(untracked=meta, tensors=tensors), keep=True)
    out.check(base)
    return out


def _untracked_from_checkpoint(store, path, src, keys, tcut):
    """``(tensors, meta)`` of the untracked ``keys`` from the checkpoint ``path``, refused unless it is the model at
    ``tcut``: its tracked tensors equal theta_0 plus the last recorded delta (to the buffer dtype's rounding), or the
    fingerprints saved with the trajectory at that step."""
    if not os.path.isdir(path):
        raise RelexInputError(f"--untracked-from {path} is not a directory; pass the checkpoint saved at step {tcut}")

    ck = DirectorySource(path)
    lost = [k for k in [s.name for s in store.specs] + list(keys) if k not in ck.meta]
    if lost:
        raise RelexInputError(f"--untracked-from {path} has no tensor {lost[0]}: pass the checkpoint of this run "
                              f"saved at step {tcut}")
    checkable = bool(store.num_ring_rows) or (store.saved.get("live") is not None and store.saved.get("step") == tcut)
    if not checkable:
        raise RelexInputError(
            f"the trajectory {store.saved.get('directory')} records no row or fingerprint at step "
            f"{tcut} to check --untracked-from {path} against; pass --untracked-frozen if none of the "
            "untracked tensors was trained, or use `relex extrapolate --checkpoints`"
        )
    problems = verify_live(store, _Live(ck, store.specs), tcut)
    if problems:
        raise RelexInputError(f"--untracked-from {path} is not the model at step {tcut}, the trajectory's last "
                              f"recorded step ({len(problems)} tensor(s), e.g. {problems[0]}); pass "
                              f"--untracked-from the checkpoint of this run saved at step {tcut}")
    same = {k for k in keys if ck.meta[k] == src.meta[k] and torch.equal(ck.get(k), src.get(k))}
    return record_values(keys, ck.get, same)  # as the callback records them: changed ones by value

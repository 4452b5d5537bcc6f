"""Simulated clicks from the error region (SPEC §10), shared by training and ``evaluate``.

Pure torch and batched over a leading dimension, so the same code runs on the GPU inside the
training loop and on the CPU for evaluation. Points are voxel indices ``(d, h, w)`` of the tensor
axes of the masks given (for a model crop: the official ``(B, 1, 3)`` int64 prompt format);
labels are 1 (positive, the voxel was missed) or 0 (negative, the voxel is a false positive).

Rules:

* ``"random"`` (SAM-Med3D ``random_sample_next_click``): a uniformly random voxel of the error
  region (false negatives or false positives); positive iff it is a false negative. With no
  error at all: a random ground-truth voxel, positive. So with an all-false ``pred`` the first
  click is a uniformly random object voxel.
* ``"ritm"`` (RITM / FastSAM3D ``get_next_click3D_torch_ritm``): exact Euclidean distance of
  every false-negative and false-positive voxel to the nearest voxel outside its class (the
  volume border counts as outside); the class with the larger maximum distance wins; the click
  is uniformly random among that class's voxels deeper than half of that maximum, i.e. near the
  middle of the largest error. With no error: the volume centre, negative.

Randomness comes only from ``generator`` (a ``torch.Generator`` on the masks' device), so a
seeded generator gives the same clicks on every run.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from fastsam3d.errors import FastSAM3DError

Rule = Literal["ritm", "random"]
RULES: tuple[str, ...] = ("ritm", "random")

# Elements per chunk of the brute-force lower-envelope pass (keeps memory ~64 MB in float32).
_EDT_CHUNK_ELEMENTS = 1 << 24


def next_click(
    pred: Tensor,
    gt: Tensor,
    rule: Rule = "ritm",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Next simulated click for each item of a batch.

    Args:
        pred: (B, D, H, W) bool, the current binary prediction (all False before the first click).
        gt: (B, D, H, W) bool, the ground truth of the target object.
        rule: ``"ritm"`` (centre of the largest error) or ``"random"`` (uniform over the error).
        generator: optional ``torch.Generator`` on the masks' device, for reproducible clicks.

    Returns:
        points (B, 1, 3) int64 voxel indices (d, h, w) and labels (B, 1) int64 (1 = positive).
    """
    if rule not in RULES:
        raise FastSAM3DError(f"Unknown click rule {rule!r}; choose one of {', '.join(RULES)}.")
    if pred.shape != gt.shape or pred.dim() != 4:
        raise FastSAM3DError(
            f"next_click needs pred and gt of the same shape (B, D, H, W); got "
            f"{tuple(pred.shape)} and {tuple(gt.shape)}."
        )
    pred, gt = pred.bool(), gt.bool()
    fn, fp = gt & ~pred, pred & ~gt
    if rule == "random":
        return _random_click(fn, fp, gt, generator)
    return _ritm_click(fn, fp, generator)


def _uniform_pick(candidates: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Uniformly random True voxel per item of (B, D, H, W); returns (B, 3) indices, (B,) any."""
    b, *spatial = candidates.shape
    flat = candidates.reshape(b, -1)
    scores = torch.rand(flat.shape, generator=generator, device=flat.device)
    scores = scores.masked_fill(~flat, -1.0)
    index = scores.argmax(dim=1)
    coords = torch.stack(torch.unravel_index(index, tuple(spatial)), dim=1)
    return coords.long(), flat.any(dim=1)


def _centre(shape: torch.Size, batch: int, device: torch.device) -> Tensor:
    centre = torch.tensor([s // 2 for s in shape], dtype=torch.long, device=device)
    return centre.expand(batch, 3).clone()


def _random_click(
    fn: Tensor, fp: Tensor, gt: Tensor, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    error = fn | fp
    coords, has_error = _uniform_pick(error, generator)
    gt_coords, has_gt = _uniform_pick(gt, generator)
    b = fn.shape[0]
    idx = torch.arange(b, device=fn.device)
    is_fn = fn[idx, coords[:, 0], coords[:, 1], coords[:, 2]]
    # No error: a random object voxel, positive; no object either: the centre, negative.
    coords = torch.where(has_error[:, None], coords, gt_coords)
    labels = torch.where(has_error, is_fn, has_gt)
    no_object = ~has_error & ~has_gt
    coords = torch.where(no_object[:, None], _centre(fn.shape[1:], b, fn.device), coords)
    return coords[:, None, :], labels.long()[:, None]


def _ritm_click(fn: Tensor, fp: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    b = fn.shape[0]
    fn_dist = torch.stack([distance_to_outside(m) for m in fn])
    fp_dist = torch.stack([distance_to_outside(m) for m in fp])
    fn_max = fn_dist.flatten(1).amax(dim=1)
    fp_max = fp_dist.flatten(1).amax(dim=1)
    positive = fn_max > fp_max
    dist = torch.where(positive[:, None, None, None], fn_dist, fp_dist)
    threshold = torch.maximum(fn_max, fp_max) / 2
    coords, has_candidate = _uniform_pick(dist > threshold[:, None, None, None], generator)
    coords = torch.where(has_candidate[:, None], coords, _centre(fn.shape[1:], b, fn.device))
    labels = positive & has_candidate
    return coords[:, None, :], labels.long()[:, None]


def distance_to_outside(mask: Tensor) -> Tensor:
    """Exact Euclidean distance (voxels) of each True voxel to the nearest False one.

    Voxels beyond the array count as False (RITM's one-voxel zero padding / ``black_border``),
    so a True voxel on the border has distance 1. False voxels get 0.

    Args:
        mask: (D, H, W) bool.

    Returns:
        (D, H, W) float32 distances. Work is restricted to the bounding box of ``mask`` plus one
        voxel (exact: the box's outer layer is all False), so small errors cost little.
    """
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    nonzero = mask.nonzero()
    if nonzero.numel() == 0:
        return out
    lo = nonzero.amin(dim=0)
    hi = nonzero.amax(dim=0) + 1
    box = mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    padded = torch.nn.functional.pad(box, (1, 1, 1, 1, 1, 1), value=False)
    sq = _squared_edt(padded)[1:-1, 1:-1, 1:-1]
    out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = sq.sqrt()
    return out


def _squared_edt(mask: Tensor) -> Tensor:
    """Squared EDT of a (D, H, W) bool mask whose outer layer is all False (separable, exact)."""
    sq = _line_distance(mask).square()
    for dim in (1, 0):
        sq = _lower_envelope(sq, dim)
    return sq


def _line_distance(mask: Tensor) -> Tensor:
    """1D distance along the last axis to the nearest False voxel (every line has one)."""
    n = mask.shape[-1]
    idx = torch.arange(n, device=mask.device, dtype=torch.float32).expand(mask.shape)
    big = float(4 * n)
    left = torch.where(mask, -big, idx).cummax(dim=-1).values
    right = torch.where(mask, big, idx).flip(-1).cummin(dim=-1).values.flip(-1)
    return torch.minimum(idx - left, right - idx)


def _lower_envelope(sq: Tensor, dim: int) -> Tensor:
    """min_j sq[..j..] + (i - j)^2 along ``dim`` (brute force in chunks; exact in float32)."""
    moved = sq.movedim(dim, -1)
    shape = moved.shape
    lines = moved.reshape(-1, shape[-1])
    n = shape[-1]
    pos = torch.arange(n, device=sq.device, dtype=torch.float32)
    offsets = (pos[:, None] - pos[None, :]).square()  # (i, j)
    chunk = max(1, _EDT_CHUNK_ELEMENTS // (n * n))
    out = torch.empty_like(lines)
    for start in range(0, lines.shape[0], chunk):
        part = lines[start : start + chunk]
        out[start : start + chunk] = (part[:, None, :] + offsets[None]).amin(dim=-1)
    return out.reshape(shape).movedim(-1, dim)

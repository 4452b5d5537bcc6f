"""Training losses as in SAM-Med3D / SAM: Dice + cross-entropy on masks, MSE on the IoU head,
and the feature-matching losses of encoder distillation."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor


def dice_ce_loss(logits: Tensor, target: Tensor) -> Tensor:
    """MONAI ``DiceCELoss(sigmoid=True, squared_pred=True)`` as SAM-Med3D trains with it: the
    mean of :func:`dice_ce_per_mask` (masks of one size, so the same as Dice mean + BCE mean)."""
    return dice_ce_per_mask(logits, target).mean()


def dice_ce_per_mask(logits: Tensor, target: Tensor) -> Tensor:
    """Soft Dice loss (squared denominators, smooth 1e-5) plus mean binary cross-entropy, per
    mask: SAM's multimask rule trains only the best of a click's candidate masks.

    Args:
        logits: (B, C, D, H, W) mask logits (upsampled to the target's size by the caller).
        target: (B, 1, D, H, W) bool or {0, 1}, shared by the C masks.

    Returns:
        (B, C) losses.
    """
    b, c = logits.shape[:2]
    return _DiceCE.apply(logits.reshape(b, c, -1), target.reshape(b, 1, -1).bool())


#: voxels per slice of :class:`_DiceCE` on the CPU (the temporaries of a slice stay in cache)
CPU_LOSS_CHUNK = 1 << 15


class _DiceCE(torch.autograd.Function):
    """Dice + BCE of (B, C, N) logits against a (B, 1, N) bool target, with its gradient in
    closed form. Autograd of the plain expression keeps five full-size temporaries per mask
    (sigmoid, products, squares, BCE terms) and builds them anew in the backward: on the CPU,
    at 128^3 voxels, that was most of a training step. Here the voxels go through in slices
    (one slice on a GPU) and only the logits are kept; the sigmoid is recomputed.

    loss = 1 - (2 I + e) / (P + T + e) + mean(softplus(x) - x t), with p = sigmoid(x),
    I = sum p t, P = sum p^2, T = sum t; d loss / d x = (-2 t / (P + T + e) + 2 p (2 I + e) /
    (P + T + e)^2) p (1 - p) + (p - t) / N.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor) -> Tensor:
        n = logits.shape[-1]
        inter, p2, bce = (logits.new_zeros(logits.shape[:2]) for _ in range(3))
        for _, x, t in _slices(logits, target):
            p = x.sigmoid()
            inter += (p * t).sum(-1)
            p2 += p.square().sum(-1)
            bce += (x.clamp_min(0) - x * t + x.abs().neg_().exp_().log1p_()).sum(-1)
        denom = p2 + target.sum(-1, dtype=logits.dtype) + 1e-5
        ctx.save_for_backward(logits, target, inter, denom)
        return 1.0 - (2.0 * inter + 1e-5) / denom + bce / n

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        logits, target, inter, denom = ctx.saved_tensors
        n = logits.shape[-1]
        a = (-2.0 * grad / denom)[..., None]  # coefficient of t in d dice / d p
        bp = (2.0 * grad * (2.0 * inter + 1e-5) / denom.square())[..., None]  # ... of p
        g = grad[..., None] / n
        out = torch.empty_like(logits)
        for part, x, t in _slices(logits, target):
            p = x.sigmoid()
            out[..., part] = (a * t + bp * p) * p * (1 - p) + g * (p - t)
        return out, None


def _slices(logits: Tensor, target: Tensor) -> Iterator[tuple[slice, Tensor, Tensor]]:
    """(slice, logits, float target) along the voxel axis: one slice on a GPU, cache-sized
    ones on a CPU."""
    n = logits.shape[-1]
    step = n if logits.is_cuda else CPU_LOSS_CHUNK
    for i in range(0, n, step):
        part = slice(i, i + step)
        yield part, logits[..., part], target[..., part].to(logits.dtype)


def mask_iou(logits: Tensor, target: Tensor) -> Tensor:
    """IoU of ``logits > 0`` with ``target``, (B, C) per mask channel (no gradient)."""
    with torch.no_grad():
        pred = logits > 0
        target = target.bool()
        dims = tuple(range(2, logits.ndim))
        inter = (pred & target).sum(dims).float()
        union = (pred | target).sum(dims).float()
        return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def iou_head_loss(iou_pred: Tensor, logits: Tensor, target: Tensor) -> Tensor:
    """SAM's IoU-head regression: MSE between the predicted and the actual mask IoU, (B, C)."""
    return F.mse_loss(iou_pred.float(), mask_iou(logits, target))


FEATURE_LOSSES = ("relative", "mse")


def feature_loss(student: Tensor, teacher: Tensor, kind: str = "mse") -> Tensor:
    """Distance between feature maps of equal shape (distillation targets).

    ``"mse"`` (the papers' loss): mean squared error in the teacher's units. ``"relative"``:
    the same divided by the teacher's mean square (detached), i.e. 1 for a student that outputs
    zeros, so that every matched layer weighs alike; with raw MSE the layers with the largest
    features set the gradient and the clip (a ViT-B teacher's matched layer gave ~10^5 at the
    first step, the normed embedding ~1). At CPU toy scale relative was no better (worse for
    the progressive schedule, benchmarks/NOTES.md), so it is an option to compare, not the
    default.
    """
    mse = F.mse_loss(student.float(), teacher.float())
    if kind == "mse":
        return mse
    if kind == "relative":
        return mse / teacher.detach().float().square().mean().clamp_min(1e-12)
    raise ValueError(f"feature loss must be one of {FEATURE_LOSSES}, got {kind!r}")

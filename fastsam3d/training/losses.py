"""Training losses as in SAM-Med3D / SAM: Dice + cross-entropy on masks, MSE on the IoU head,
and the feature-matching losses of encoder distillation."""

from __future__ import annotations

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
    target = target.to(logits.dtype)
    prob = logits.sigmoid()
    dims = tuple(range(2, logits.ndim))
    inter = (prob * target).sum(dims)
    denom = prob.square().sum(dims) + target.square().sum(dims)
    dice = 1.0 - (2.0 * inter + 1e-5) / (denom + 1e-5)
    bce = F.binary_cross_entropy_with_logits(logits, target.expand_as(logits), reduction="none")
    return dice + bce.mean(dims)


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

"""Validation on held-out real objects during training, to pick checkpoints by real Dice.

Training loss keeps falling on synthetic and training crops while Dice on real CT can peak early
(MODEL_CARD.md, v5), so a run should be judged, and its best checkpoint kept, on real objects it
never trains on. :class:`CropValidator` builds one fixed 128^3 crop per object of the given
prepared cases (``fastsam3d train --save-cases``), centred on the object's sampled voxels, and
scores a model with the training click loop itself (:func:`fastsam3d.training.loop.click_loss`)
under ``no_grad``: first click at the centre of the object, later clicks at the centre of the
largest error (the ``ritm`` rule of ``fastsam3d evaluate``), previous logits fed back; and a
second pass that starts from a jittered box. Seeds are fixed, so two checkpoints see the same
clicks for as long as their masks agree.

Dice here is measured in the crop, not on the native grid as ``fastsam3d evaluate`` does: an
object larger than the crop only counts its part inside, so the figures rank checkpoints but are
not the evaluation table.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fastsam3d.errors import FastSAM3DError
from fastsam3d.training.data import Case
from fastsam3d.training.loop import Batch, click_loss
from fastsam3d.transforms import (
    CROP_SIZE,
    MODEL_SPACING_MM,
    CropGrid,
    normalize_crop,
    sample_crop,
)


class CropValidator:
    """Scores a model on fixed crops of held-out real objects (see module docstring).

    Args:
        cases: prepared cases; every object in ``case.objects`` is validated.
        rounds: prompts per object (Dice is reported after each).
        chunk: objects per forward pass.
        size: crop size (the model's ``img_size``).
        spacing: mm per crop voxel (the model's ``crop_spacing_mm``: judged as it is used).
    """

    def __init__(
        self,
        cases: list[Case],
        rounds: int = 5,
        chunk: int = 8,
        size: int = CROP_SIZE,
        spacing: float = MODEL_SPACING_MM,
    ) -> None:
        images, targets = [], []
        for case in cases:
            for value, voxels in case.objects.items():
                centre_vox = voxels.double().mean(0).cpu().numpy()
                centre = (case.affine @ np.append(centre_vox, 1.0))[:3]
                grid = CropGrid.around(centre, spacing, size=size)
                images.append(normalize_crop(sample_crop(case.image, case.affine, grid)))
                targets.append(sample_crop(case.label == value, case.affine, grid) > 0.5)
        keep = [i for i, t in enumerate(targets) if t.any()]
        if not keep:
            raise FastSAM3DError("no validation object lies in its own crop; check --val-cases")
        self.images = torch.cat([images[i] for i in keep]).half()
        self.targets = torch.cat([targets[i] for i in keep])
        self.rounds, self.chunk = rounds, chunk

    def __len__(self) -> int:
        return len(self.images)

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> dict[str, float]:
        """Mean crop Dice after each click (``dice1`` ...), from a box (``box_dice1`` ...), and
        ``score``: the mean of the click Dice over all rounds, which picks the best checkpoint.
        The box pass runs only for models with box embeddings."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        sums: dict[str, float] = {}
        for start in range(0, len(self), self.chunk):
            image = self.images[start : start + self.chunk].to(device).float()
            target = self.targets[start : start + self.chunk].to(device)
            n = len(image)
            batch = Batch(
                image, target, torch.full((n, 3), -1, device=device), torch.arange(n, device=device)
            )
            emb = model.image_encoder(image)
            passes = [("", 0.0)] + [("box_", 1.0)] * model.prompt_encoder.accepts_boxes
            for prefix, box_prob in passes:
                gen = torch.Generator(device=device).manual_seed(start)
                _, metrics = click_loss(
                    model, batch, gen, self.rounds, box_prob, embedding=emb, rule="ritm"
                )
                for r in range(1, self.rounds + 1):
                    key = f"{prefix}dice{r}"
                    sums[key] = sums.get(key, 0.0) + metrics[f"dice{r}"] * n
        model.train(was_training)
        out = {k: v / len(self) for k, v in sums.items()}
        out["score"] = sum(out[f"dice{r}"] for r in range(1, self.rounds + 1)) / self.rounds
        return out

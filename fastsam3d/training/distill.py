"""Encoder distillation from a teacher (SAM-Med3D or any model trained here) to a student.

Three schedules, selectable and run on the same data and budget (``progress`` in [0, 1] comes
from :func:`fastsam3d.training.loop.run`):

* ``decoupled`` (MobileSAM): only the final image embedding is matched; the student keeps
  the teacher's prompt encoder and mask decoder, which must fit it exactly (same sizes and PE
  switches), since nothing else ever trains them. No click loop.
* ``progressive`` (FastSAM3D, layer-wise): student block ``i`` is matched to teacher block
  ``round((i + 1) * Lt / Ls) - 1``. During the first 60% of the run the matched layers are
  switched on one after another (layer 1 from the start, layer ``k`` from ``0.6 * (k - 1) / Ls``);
  from 60% to 85% only the final embedding is matched; the last 15% is an end-to-end fine-tune
  of the whole student with the interactive click loop.
* ``dynamic`` (SAM-Lightening's dynamic layer-wise weights): all layers are matched at once
  with weights that move from shallow to deep layers as training goes (a Gaussian bump over the
  relative depth centred at ``progress / 0.85``), plus the embedding with weight ``progress``;
  the last 15% is the same end-to-end fine-tune.

Every match is an MSE (``feature="mse"``, the papers' loss) or, to be compared on the GPU, a
relative squared error (``"relative"``: MSE over the teacher's mean square, so that layers
with large features do not dominate; :func:`fastsam3d.training.losses.feature_loss`).

Widths may differ: learned linear projections (kept in ``extra.safetensors`` of the run, not in
the student) map student features to the teacher's width. Teacher features are computed under
``no_grad`` in eval mode.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fastsam3d.errors import FastSAM3DError
from fastsam3d.training.loop import Batch, click_loss
from fastsam3d.training.losses import FEATURE_LOSSES, feature_loss

SCHEDULES = ("decoupled", "progressive", "dynamic")
LAYER_PHASE = 0.6  # progressive: end of the layer-by-layer phase
FINETUNE_FROM = 0.85  # progressive/dynamic: start of the end-to-end click-loop fine-tune
# Config switches that change what the prompt encoder / decoder compute without changing shapes.
DECODER_SWITCHES = ("swap_pe_axes", "duplicate_sine", "flash_decoder")


def layer_map(student_depth: int, teacher_depth: int) -> list[int]:
    """Teacher block index matched to each student block (evenly spread, last to last)."""
    return [round((i + 1) * teacher_depth / student_depth) - 1 for i in range(student_depth)]


def layer_weights(schedule: str, progress: float, depth: int) -> list[float]:
    """Weight of each matched layer's loss at ``progress`` (zeros once only the embedding or the
    fine-tune runs). See the module docstring for each schedule."""
    if schedule == "progressive":
        if progress >= LAYER_PHASE:
            return [0.0] * depth
        active = 1 + int(progress / LAYER_PHASE * depth)
        return [1.0 if i < active else 0.0 for i in range(depth)]
    if schedule == "dynamic":
        if progress >= FINETUNE_FROM:
            return [0.0] * depth
        centre = progress / FINETUNE_FROM
        raw = [
            math.exp(-(((i / max(depth - 1, 1)) - centre) ** 2) / (2 * 0.2**2))
            for i in range(depth)
        ]
        total = sum(raw)
        return [w / total for w in raw]
    return [0.0] * depth


class Distiller(nn.Module):
    """Holds the frozen teacher and the projections; :meth:`objective` is the loop's objective.

    Args:
        student: a :class:`fastsam3d.modeling.Sam3D` (trained).
        teacher: a :class:`fastsam3d.modeling.Sam3D` (frozen here).
        schedule: one of :data:`SCHEDULES`.
        rounds, box_prob: click-loop settings of the end-to-end phase.
        feature: ``"mse"`` (default) or ``"relative"``, see
            :func:`fastsam3d.training.losses.feature_loss`.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        schedule: str = "progressive",
        rounds: int = 5,
        box_prob: float = 0.0,
        feature: str = "mse",
    ) -> None:
        super().__init__()
        if schedule not in SCHEDULES:
            raise FastSAM3DError(f"unknown schedule {schedule!r}; choose {', '.join(SCHEDULES)}")
        if feature not in FEATURE_LOSSES:
            raise FastSAM3DError(
                f"unknown feature loss {feature!r}; choose {', '.join(FEATURE_LOSSES)}"
            )
        self.schedule, self.rounds, self.box_prob = schedule, rounds, box_prob
        self.feature = feature
        self.student = [student]  # a list: not a submodule, so not saved with the projections
        self.teacher = [teacher.eval().requires_grad_(False)]
        s_enc, t_enc = student.image_encoder, teacher.image_encoder
        s_dim, t_dim = s_enc.patch_embed.proj.out_channels, t_enc.patch_embed.proj.out_channels
        self.map = layer_map(len(s_enc.blocks), len(t_enc.blocks))
        self.layer_proj = nn.ModuleList(
            nn.Identity() if s_dim == t_dim else nn.Linear(s_dim, t_dim) for _ in self.map
        )
        s_out = student.mask_decoder.transformer_dim
        t_out = teacher.mask_decoder.transformer_dim
        self.embed_proj = nn.Identity() if s_out == t_out else nn.Conv3d(s_out, t_out, 1)
        mismatch = self._copy_decoder()
        if schedule == "decoupled" and mismatch:
            raise FastSAM3DError(
                "the decoupled schedule trains only the encoder and keeps the teacher's prompt "
                "encoder and mask decoder, so the student's must match them exactly: "
                + "; ".join(mismatch)
                + " (set those student fields to the teacher's, or use another schedule)"
            )
        self.generator: torch.Generator | None = None

    def _copy_decoder(self) -> list[str]:
        """Start the student from the teacher's prompt encoder and mask decoder when they fit;
        returns why the student's would not compute the same function (empty: exact copy)."""
        student, teacher = self.student[0], self.teacher[0]
        mismatch = []
        for name in ("prompt_encoder", "mask_decoder"):
            src = getattr(teacher, name).state_dict()
            dst = getattr(student, name).state_dict()
            if src.keys() <= dst.keys() and all(src[k].shape == dst[k].shape for k in src):
                getattr(student, name).load_state_dict(src, strict=False)
                if src.keys() != dst.keys():
                    extra = ", ".join(sorted(dst.keys() - src.keys()))
                    mismatch.append(f"the student's {name} has tensors the teacher lacks ({extra})")
            else:
                mismatch.append(f"{name} sizes differ")
        for key in DECODER_SWITCHES:
            s_val = getattr(student.config, key, None)
            t_val = getattr(teacher.config, key, None)
            if s_val != t_val:
                mismatch.append(f"{key} is {s_val} in the student, {t_val} in the teacher")
        return mismatch

    def objective(self, batch: Batch, progress: float) -> tuple[Tensor, dict[str, float]]:
        """Loss of one batch at ``progress`` (see module docstring)."""
        student, teacher = self.student[0], self.teacher[0]
        if self.generator is None:
            self.generator = torch.Generator(device=batch.image.device).manual_seed(0)
        if self.schedule != "decoupled" and progress >= FINETUNE_FROM:
            loss, metrics = click_loss(student, batch, self.generator, self.rounds, self.box_prob)
            return loss, {**metrics, "phase": 2.0}
        with torch.no_grad():
            t_emb, t_blocks = teacher.image_encoder(batch.image, return_blocks=True)
        s_emb, s_blocks = student.image_encoder(batch.image, return_blocks=True)
        weights = layer_weights(self.schedule, progress, len(s_blocks))
        loss = torch.zeros((), device=batch.image.device)
        metrics: dict[str, float] = {}
        for i, (w, j) in enumerate(zip(weights, self.map)):
            if w > 0:
                layer = feature_loss(self.layer_proj[i](s_blocks[i]), t_blocks[j], self.feature)
                loss = loss + w * layer
                metrics[f"layer{i}"] = layer.item()
        emb_w = {"decoupled": 1.0, "progressive": float(progress >= LAYER_PHASE)}.get(
            self.schedule, progress
        )
        emb = feature_loss(self.embed_proj(s_emb), t_emb, self.feature)
        loss = loss + emb_w * emb
        metrics.update(loss=loss.item(), embedding=emb.item(), phase=float(emb_w == 1.0))
        return loss, metrics

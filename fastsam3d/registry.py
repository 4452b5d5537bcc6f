"""Architectures as frozen config dataclasses, and :func:`build_model`.

Every official quirk that changes outputs (SPEC §13) is a field of :class:`ModelConfig`, so
the official models and our clean variant differ only in numbers and switches:

* ``fastsam3d``: the released FastSAM3D student (6 blocks: 2 MLP-only + 4 global rel-pos).
* ``fastsam3d_sparse``: the same weights through the released "3D sparse flash attention".
* ``sam_med3d``: the SAM-Med3D ``vit_b_ori`` teacher (= SAM-Med3D-turbo).
* ``fastsam3d_dilated``: our own default: clean block order, correct rel-pos and dense PE, no
  duplicated sine, 3D dilated ("grid") / local ("block") sparse attention, box prompts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastsam3d.modeling import (
    ImageEncoderViT3D,
    MaskDecoder3D,
    PromptEncoder3D,
    Sam3D,
    TwoWayTransformer3D,
)
from fastsam3d.transforms import MODEL_SPACING_MM


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a :class:`~fastsam3d.modeling.Sam3D`.

    Sizes: crops are ``img_size``^3 voxels, tokens ``img_size/patch_size`` per axis, low-res
    masks 4x the token grid. Block layout: the first ``mlp_only_blocks`` blocks have no
    attention; the others use ``attention``: "global", "official_sparse" or "dilated" (cycling
    through ``sparse_pattern``, each "grid" or "block" with ``sparse_group``^3 tokens per group);
    with ``window_size > 0`` blocks not in ``global_attn_indexes`` are windowed (teacher).

    ``first_click_multimask``: the checkpoint was trained (``finetune --multimask``) to answer a
    lone first click with whichever of its 4 outputs (the single one and the 3 multimask ones)
    has the highest predicted IoU (SAM's answer to "part or whole?"); else the single output.

    ``crop_spacing_mm``: the voxel size of the crops a :class:`~fastsam3d.session.Session`
    samples for this model. Training and the official preprocessing use 1.5 mm (the default);
    the bundled v5 answers clicks better on 1.0 mm crops (128 mm instead of 192 mm across:
    MODEL_CARD.md, "Crop spacing"), so its checkpoint says so.

    Quirk switches (True/"official" = reproduce the released code, SPEC §13):
    ``fs3d_block_order`` (norm2 applied to x + attn), ``mlp_residual_after_norm`` (MLP-only
    blocks carry the normalised input), ``official_rel_pos`` (misplaced rel-pos broadcasting),
    ``swap_pe_axes`` (dense PE swaps axes 0/1), ``duplicate_sine`` (sin, cos, sin features),
    ``window_pad_unmasked`` (window padding tokens take part in attention),
    ``fp16_rounding`` (fp16 rounding around the official flash-attn calls),
    ``flash_decoder`` (channel-major head merge of the official flash decoder).
    """

    arch: str
    img_size: int = 128
    patch_size: int = 16
    in_chans: int = 1
    embed_dim: int = 768
    depth: int = 6
    num_heads: int = 6
    mlp_ratio: float = 4.0
    out_chans: int = 384
    mlp_only_blocks: int = 2
    attention: str = "global"
    window_size: int = 0
    global_attn_indexes: tuple[int, ...] = ()
    sparse_pattern: tuple[str, ...] = ("grid", "block")
    sparse_group: int = 4
    use_rel_pos: bool = True
    prompt_embed_dim: int = 384
    mask_in_chans: int = 16
    num_point_embeddings: int = 2
    num_multimask_outputs: int = 3
    first_click_multimask: bool = False
    crop_spacing_mm: float = MODEL_SPACING_MM
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    fs3d_block_order: bool = True
    mlp_residual_after_norm: bool = True
    official_rel_pos: bool = True
    swap_pe_axes: bool = True
    duplicate_sine: bool = True
    window_pad_unmasked: bool = True
    fp16_rounding: bool = False
    flash_decoder: bool = False
    backend: str = "sdpa"

    def __post_init__(self) -> None:
        """Reject sizes the layers cannot split evenly (else the first prompt fails deep inside)."""
        pe_blocks = 3 if self.duplicate_sine else 2  # (sin, cos, sin) or (sin, cos) features
        checks = [
            (self.embed_dim % self.num_heads == 0, "embed_dim must be a multiple of num_heads"),
            (
                self.prompt_embed_dim % pe_blocks == 0,
                f"prompt_embed_dim must be a multiple of {pe_blocks}",
            ),
            (
                self.prompt_embed_dim % (2 * self.decoder_heads) == 0,
                "prompt_embed_dim must be a multiple of 2 * decoder_heads",
            ),
            (self.img_size % self.patch_size == 0, "img_size must be a multiple of patch_size"),
        ]
        problems = [msg for ok, msg in checks if not ok]
        if problems:
            raise ValueError(f"invalid {self.arch} config: " + "; ".join(problems))

    @property
    def accepts_boxes(self) -> bool:
        """True when the prompt encoder has box-corner embeddings."""
        return self.num_point_embeddings >= 4

    @property
    def grid_size(self) -> int:
        """Tokens per axis (8 for 128^3 crops)."""
        return self.img_size // self.patch_size

    @property
    def low_res_size(self) -> int:
        """Voxels per axis of the low-res logits / mask input (32 for 128^3 crops)."""
        return 4 * self.grid_size

    def block_kinds(self) -> tuple[str, ...]:
        """Kind of every encoder block (see ``fastsam3d.modeling.image_encoder.BLOCK_KINDS``)."""
        kinds = []
        for i in range(self.depth):
            j = i - self.mlp_only_blocks  # index among attention blocks
            if j < 0:
                kinds.append("mlp")
            elif self.attention == "dilated":
                kinds.append(self.sparse_pattern[j % len(self.sparse_pattern)])
            elif self.attention == "official_sparse":
                kinds.append("official_sparse")
            elif self.window_size > 0 and j not in self.global_attn_indexes:
                kinds.append("window")
            else:
                kinds.append("global")
        return tuple(kinds)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (stored in our safetensors metadata)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; lists become tuples, unknown keys are rejected."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


_STUDENT = ModelConfig(arch="fastsam3d")
ARCHITECTURES: dict[str, ModelConfig] = {
    "fastsam3d": _STUDENT,
    "fastsam3d_sparse": dataclasses.replace(
        _STUDENT, arch="fastsam3d_sparse", attention="official_sparse", fp16_rounding=True
    ),
    "sam_med3d": ModelConfig(
        arch="sam_med3d",
        depth=12,
        num_heads=12,
        mlp_only_blocks=0,
        window_size=14,
        global_attn_indexes=(2, 5, 8, 11),
        fs3d_block_order=False,
    ),
    "fastsam3d_dilated": ModelConfig(
        arch="fastsam3d_dilated",
        attention="dilated",
        fs3d_block_order=False,
        mlp_residual_after_norm=False,
        official_rel_pos=False,
        swap_pe_axes=False,
        duplicate_sine=False,
        window_pad_unmasked=False,
        num_point_embeddings=4,
    ),
}
ARCH_DESCRIPTIONS = {
    "fastsam3d": "FastSAM3D student as released (2 MLP-only + 4 global rel-pos blocks)",
    "fastsam3d_sparse": "FastSAM3D student through the released 3D sparse attention",
    "sam_med3d": "SAM-Med3D vit_b_ori teacher / SAM-Med3D-turbo (12 blocks, window 14)",
    "fastsam3d_dilated": "ours: clean student with 3D dilated/block sparse attention, boxes",
}
DEFAULT_ARCH = "fastsam3d_dilated"


def list_architectures() -> list[tuple[str, str]]:
    """(name, one-line description) of every registered architecture."""
    return [(name, ARCH_DESCRIPTIONS[name]) for name in ARCHITECTURES]


def get_config(arch: str, **overrides: Any) -> ModelConfig:
    """The registered config of ``arch`` with fields replaced by ``overrides``."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown model config fields: {sorted(unknown)}")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return dataclasses.replace(ARCHITECTURES[arch], **overrides)


def build_from_config(config: ModelConfig) -> Sam3D:
    """Instantiate a randomly initialised model for ``config`` (on the current default device)."""
    grid = config.grid_size
    encoder = ImageEncoderViT3D(
        config.block_kinds(),
        img_size=config.img_size,
        patch_size=config.patch_size,
        in_chans=config.in_chans,
        embed_dim=config.embed_dim,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        out_chans=config.out_chans,
        window_size=config.window_size,
        use_rel_pos=config.use_rel_pos,
        group_size=config.sparse_group,
        fs3d_order=config.fs3d_block_order,
        mlp_residual_after_norm=config.mlp_residual_after_norm,
        official_rel_pos=config.official_rel_pos,
        window_pad_unmasked=config.window_pad_unmasked,
        fp16_rounding=config.fp16_rounding and config.attention == "official_sparse",
        backend=config.backend,
    )
    prompt_encoder = PromptEncoder3D(
        config.prompt_embed_dim,
        (grid, grid, grid),
        (config.img_size,) * 3,
        mask_in_chans=config.mask_in_chans,
        num_point_embeddings=config.num_point_embeddings,
        swap_pe_axes=config.swap_pe_axes,
        duplicate_sine=config.duplicate_sine,
    )
    transformer = TwoWayTransformer3D(
        config.decoder_depth,
        config.prompt_embed_dim,
        config.decoder_heads,
        config.decoder_mlp_dim,
        channel_major_merge=config.flash_decoder,
        fp16_rounding=config.fp16_rounding and config.flash_decoder,
        backend=config.backend,
    )
    decoder = MaskDecoder3D(
        config.prompt_embed_dim,
        transformer,
        num_multimask_outputs=config.num_multimask_outputs,
        iou_head_depth=config.iou_head_depth,
        iou_head_hidden_dim=config.iou_head_hidden_dim,
    )
    return Sam3D(encoder, prompt_encoder, decoder, config)


def build_model(
    arch: str | None = None,
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    decoder_checkpoint: str | Path | None = None,
    **overrides: Any,
) -> Sam3D:
    """Build a model, optionally loading weights; returns it in eval mode on ``device``.

    Args:
        arch: a name from :func:`list_architectures`. With a checkpoint and no ``arch`` the
            architecture and sizes are inferred from the file (our safetensors store their
            config; official files are recognised from their tensors). With both, the variant
            comes from ``arch`` and the sizes still from the file.
        checkpoint: official ``.pth`` (bare state dict, ``model_state_dict``, encoder-only
            student, combined Slicer layout) or our ``.safetensors``.
        device: where the model goes.
        decoder_checkpoint: a full-model file whose prompt encoder and mask decoder complete an
            encoder-only student checkpoint (the official validation combines the student
            encoder with the teacher's decoder).
        **overrides: :class:`ModelConfig` fields (e.g. ``embed_dim=96, depth=4``).

    Raises:
        fastsam3d.errors.CheckpointError: unreadable/unsafe file or mismatching tensors.
    """
    if checkpoint is None:
        if decoder_checkpoint is not None:
            raise ValueError("decoder_checkpoint needs checkpoint (the encoder weights)")
        model = build_from_config(get_config(arch or DEFAULT_ARCH, **overrides))
        return model.to(device).eval()
    from fastsam3d.checkpoint import load_model

    return load_model(checkpoint, arch, decoder_checkpoint, device, **overrides)

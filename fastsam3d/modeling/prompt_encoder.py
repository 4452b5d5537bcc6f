"""3D prompt encoder: clicks, boxes and a low-res mask -> sparse and dense prompt embeddings.

Point coordinates are (B, N, 3) in voxel units of the model crop, in the order of the image
tensor's axes 2, 3, 4 (the official convention); labels (B, N): 1 positive, 0 negative,
-1 padding. Boxes (B, 2, 3) are the low and high corners in the same units.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fastsam3d.errors import PromptError
from fastsam3d.modeling.common import LayerNorm3d


class PositionEmbeddingRandom3D(nn.Module):
    """Random Fourier features of coordinates in [0, 1]^3 (buffer kept under its official name).

    ``duplicate_sine``: official features are concat(sin, cos, sin) of C/3 frequencies
    (SPEC §13.4); the clean variant uses concat(sin, cos) of C/2 frequencies.
    """

    def __init__(self, num_pos_feats: int, duplicate_sine: bool = True) -> None:
        super().__init__()
        self.duplicate_sine = duplicate_sine
        width = num_pos_feats // 3 if duplicate_sine else num_pos_feats // 2
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(3, width))

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        """(..., 3) normalised coordinates -> (..., C) features."""
        v = 2 * math.pi * ((2 * coords - 1) @ self.positional_encoding_gaussian_matrix)
        if self.duplicate_sine:  # quirk (SPEC §13.4): the sine block appears twice
            return torch.cat([v.sin(), v.cos(), v.sin()], dim=-1)
        return torch.cat([v.sin(), v.cos()], dim=-1)


class PromptEncoder3D(nn.Module):
    """Encodes prompts for :class:`~fastsam3d.modeling.mask_decoder.MaskDecoder3D`.

    Args:
        embed_dim: prompt/decoder width C.
        image_embedding_size: token grid (d, h, w) of the image embedding.
        input_image_size: crop size (D, H, W) in voxels, used to normalise coordinates.
        mask_in_chans: hidden channels of the mask downscaling convs.
        num_point_embeddings: 2 (official: negative, positive) or 4 (+ box corners lo, hi).
        swap_pe_axes: official dense PE swaps grid axes 0 and 1 (SPEC §13.3).
        duplicate_sine: see :class:`PositionEmbeddingRandom3D`.
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int, int],
        input_image_size: tuple[int, int, int],
        mask_in_chans: int = 16,
        num_point_embeddings: int = 2,
        swap_pe_axes: bool = True,
        duplicate_sine: bool = True,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = tuple(image_embedding_size)
        self.input_image_size = tuple(input_image_size)
        self.swap_pe_axes = swap_pe_axes
        self.pe_layer = PositionEmbeddingRandom3D(embed_dim, duplicate_sine)
        self.point_embeddings = nn.ModuleList(
            nn.Embedding(1, embed_dim) for _ in range(num_point_embeddings)
        )
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv3d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv3d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans),
            nn.GELU(),
            nn.Conv3d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    @property
    def accepts_boxes(self) -> bool:
        """Whether box-corner embeddings exist (our own models; official ones have none)."""
        return len(self.point_embeddings) >= 4

    def get_dense_pe(self, size: tuple[int, int, int] | None = None) -> torch.Tensor:
        """Positional encoding of the token grid: (1, C, d, h, w) (default: the trained grid)."""
        d, h, w = size or self.image_embedding_size
        device = self.pe_layer.positional_encoding_gaussian_matrix.device
        axes = [(torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n for n in (d, h, w)]
        ud, uh, uw = torch.meshgrid(*axes, indexing="ij")
        if self.swap_pe_axes:  # quirk (SPEC §13.3): grid axis 1 pairs with point coordinate 0
            coords = torch.stack([uh, ud, uw], dim=-1)
        else:
            coords = torch.stack([ud, uh, uw], dim=-1)
        return self.pe_layer.encode(coords).permute(3, 0, 1, 2)[None]

    def _embed_coords(self, coords: torch.Tensor) -> torch.Tensor:
        # per-axis Python scalars, not a size tensor: no host -> device copy in the click path
        # (such a copy is a host sync and cannot be captured in a CUDA graph)
        coords = coords.float()
        norm = [(coords[..., i] + 0.5) / n for i, n in enumerate(self.input_image_size)]
        return self.pe_layer.encode(torch.stack(norm, dim=-1))

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sparse prompt tokens (B, N, C) of labelled points, without the padding point.

        Labels: -1 padding (``not_a_point_embed``), 0 negative, 1 positive, 2 / 3 a box's low /
        high corner (models with 4 point embeddings). A box is its two corners, so clicks and a
        box are one call (and one exported ONNX graph).
        """
        table = torch.cat([e.weight for e in self.point_embeddings])
        emb = self._embed_coords(coords)
        known = (labels >= 0)[..., None]
        return torch.where(known, emb + table[labels.clamp_min(0)], self.not_a_point_embed.weight)

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed prompts.

        Args:
            points: (coords (B, N, 3), labels (B, N)) or None.
            boxes: (B, 2, 3) low/high corners, or None (needs ``num_point_embeddings=4``).
            masks: (B, 1, 4d, 4h, 4w) low-res logits of a previous round, or None.

        Returns:
            sparse (B, N+1 or N+2, C) and dense (B, C, d, h, w) embeddings.
        """
        if boxes is not None and not self.accepts_boxes:
            raise PromptError(
                "this model has no box embeddings (official FastSAM3D/SAM-Med3D weights accept "
                "clicks only); give point prompts instead of a box"
            )
        bs = next((t.shape[0] for t in (points and points[0], boxes, masks) if t is not None), 1)
        device = self.no_mask_embed.weight.device
        coords: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        if points is not None:
            coords.append(points[0].float())
            labels.append(points[1])
            if boxes is None:  # one padding point when no box follows (official behaviour)
                coords.append(torch.zeros(bs, 1, 3, device=device))
                labels.append(-torch.ones(bs, 1, dtype=torch.int64, device=device))
        if boxes is not None:
            coords.append(boxes.reshape(bs, 2, 3).float())
            labels.append(torch.arange(2, 4, device=device).expand(bs, 2))
        if labels:
            sparse = self.embed_points(torch.cat(coords, dim=1), torch.cat(labels, dim=1))
        else:
            sparse = torch.empty(bs, 0, self.embed_dim, device=device)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(
                bs, -1, *self.image_embedding_size
            )
        return sparse, dense

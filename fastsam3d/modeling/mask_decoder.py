"""3D mask decoder: image embedding + prompt embeddings -> low-res mask logits and IoU (SPEC §6)."""

from __future__ import annotations

import torch
from torch import nn

from fastsam3d.modeling.common import MLP, LayerNorm3d
from fastsam3d.modeling.transformer import TwoWayTransformer3D


class MaskDecoder3D(nn.Module):
    """Predicts masks at 4x the token grid (32^3 for a 128^3 crop) from prompt tokens."""

    def __init__(
        self,
        transformer_dim: int,
        transformer: TwoWayTransformer3D,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm3d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose3d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth
        )

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode masks.

        Args:
            image_embeddings: (B_img, C, d, h, w); repeated when B_img differs from the
                number of prompt sets.
            image_pe: (1, C, d, h, w) from ``prompt_encoder.get_dense_pe()``.
            sparse_prompt_embeddings: (B, N, C); dense_prompt_embeddings: (B, C, d, h, w).
            multimask_output: True -> the 3 multimask outputs, False -> the single mask.

        Returns:
            logits (B, 1 or 3, 4d, 4h, 4w) and IoU predictions (B, 1 or 3).
        """
        b = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.expand(b, -1, -1), sparse_prompt_embeddings], dim=1)
        src = image_embeddings
        if src.shape[0] != b:
            src = torch.repeat_interleave(src, b, dim=0)
        src = src + dense_prompt_embeddings
        pos_src = torch.repeat_interleave(image_pe, b, dim=0)
        c, grid = src.shape[1], src.shape[2:]
        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens]
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, *grid))
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
            dim=1,
        )
        masks = (hyper_in @ upscaled.flatten(2)).reshape(b, -1, *upscaled.shape[2:])
        iou = self.iou_prediction_head(iou_token_out)
        sel = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sel], iou[:, sel]

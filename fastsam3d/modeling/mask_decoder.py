"""3D mask decoder: image embedding + prompt embeddings -> low-res mask logits and IoU (SPEC §6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
        outputs: range | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode masks.

        Args:
            image_embeddings: (B_img, C, d, h, w); repeated when B_img differs from the
                number of prompt sets.
            image_pe: (1, C, d, h, w) from ``prompt_encoder.get_dense_pe()``.
            sparse_prompt_embeddings: (B, N, C); dense_prompt_embeddings: (B, C, d, h, w).
            multimask_output: True -> the 3 multimask outputs, False -> the single mask.
            outputs: the mask outputs to decode instead (0 the single mask, 1-3 the multimask
                ones): training takes ``range(4)`` from one transformer pass.

        Returns:
            logits (B, K, 4d, 4h, 4w) and IoU predictions (B, K); K = 1 or 3, or len(outputs).
        """
        b = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.expand(b, -1, -1), sparse_prompt_embeddings], dim=1)
        src = image_embeddings
        if src.shape[0] != b:
            src = torch.repeat_interleave(src, b, dim=0)
        src = src + dense_prompt_embeddings
        pos_src = image_pe.expand(b, -1, -1, -1, -1)  # a view: repeat_interleave copied it
        grid = src.shape[2:]
        hs, src = self.transformer(src, pos_src, tokens)
        # only the selected masks' hypernetworks run (the single mask skips the other three)
        sel = outputs or (range(1, self.num_mask_tokens) if multimask_output else range(1))
        mlps = self.output_hypernetworks_mlps
        hyper_in = torch.stack([mlps[i](hs[:, 1 + i]) for i in sel], dim=1)
        iou = self.iou_prediction_head(hs[:, 0])[:, sel.start : sel.stop]
        return self._upscale_masks(src, hyper_in, grid), iou

    def _upscale_masks(
        self, src: torch.Tensor, hyper_in: torch.Tensor, grid: tuple[int, int, int]
    ) -> torch.Tensor:
        """``hyper_in @ output_upscaling(src)`` without moving the 4x upscaled features.

        Both transposed convolutions have stride = kernel = 2, so each writes one disjoint
        2^3 patch per input voxel: a matrix product per voxel. Here they run as such on
        channels-last features kept in patch order (token, sub-voxel, sub-sub-voxel), with
        LayerNorm and GELU per voxel, and only the K mask channels are put back in grid order
        at the end. Same arithmetic as the ``nn.Sequential`` (parameters and keys unchanged);
        the upscaled features are never permuted (a 48 x 32^3 strided copy per click). On the
        CPU the tokens go through in chunks of ``CPU_CHUNK``, so that the 64x upscaled
        features of a chunk (1.5 MB) stay in cache between the product, bias, GELU and mask
        product: 2 of the 23 ms of a one-thread click; a GPU takes them in one go.

        Args:
            src: (B, d*h*w, C) image tokens from the transformer, row-major.
            hyper_in: (B, K, C/8) per-mask weights.
            grid: (d, h, w).

        Returns:
            (B, K, 4d, 4h, 4w) mask logits.
        """
        up1, norm, act1, up2, act2 = self.output_upscaling
        (b, n, _), (d, h, w) = src.shape, grid
        w1, w2 = _patch_weight(up1), _patch_weight(up2)
        step = n if src.is_cuda else CPU_CHUNK
        chunks = []
        for i in range(0, n, step):
            x = _patch_deconv(up1, w1, src[:, i : i + step])  # (B, m*8, C/4)
            x = act1(F.layer_norm(x, norm.weight.shape, norm.weight, norm.bias, norm.eps))
            x = act2(_patch_deconv(up2, w2, x))  # (B, m*64, C/8), order (token, sub, sub-sub)
            chunks.append(x @ hyper_in.transpose(1, 2))  # (B, m*64, K)
        masks = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)
        k = masks.shape[-1]
        masks = masks.reshape(b, d, h, w, 2, 2, 2, 2, 2, 2, k)
        # voxel along an axis = 4 * token + 2 * sub + sub-sub
        masks = masks.permute(0, 10, 1, 4, 7, 2, 5, 8, 3, 6, 9)
        return masks.reshape(b, k, 4 * d, 4 * h, 4 * w)


#: image tokens per chunk of the CPU upscaling (see ``MaskDecoder3D._upscale_masks``)
CPU_CHUNK = 128


def _patch_weight(conv: nn.ConvTranspose3d) -> torch.Tensor:
    """A stride-2, kernel-2 transposed conv's weight as (C_in, 8 * C_out), sub-voxel order
    (kd, kh, kw) then channel.

    The permuted copy (1.2 MB for the first upscaling) is kept on the module while the weight
    stays the same tensor at the same version, outside autograd and ``torch.compile``: a click
    then skips it (~0.3 ms of a 15 ms one-thread CPU click; two copy kernels on a GPU).
    """
    weight = conv.weight
    if (weight.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        return _patch_layout(conv)
    version = None if weight.is_inference() else weight._version
    key = (weight.data_ptr(), version, weight.dtype, weight.device)
    cached = conv.__dict__.get("_patch_cache")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = conv.__dict__["_patch_cache"] = (key, _patch_layout(conv))
    return cached[1]


def _patch_layout(conv: nn.ConvTranspose3d) -> torch.Tensor:
    """``conv.weight`` permuted to (C_in, 8 * C_out) (a copy: the permutation is no view)."""
    return conv.weight.permute(0, 2, 3, 4, 1).reshape(conv.in_channels, 8 * conv.out_channels)


def _patch_deconv(conv: nn.ConvTranspose3d, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Stride-2, kernel-2 transposed conv on channels-last voxels (B, M, C_in) ->
    (B, M * 8, C_out): each voxel becomes its 2^3 patch; ``weight`` from :func:`_patch_weight`.

    A weight stored in another dtype than ``x`` (bfloat16 in ``Predictor(dtype="bf16")`` on
    the CPU) sets the product's dtype; the result keeps ``x``'s."""
    y = x @ weight if x.dtype == weight.dtype else (x.to(weight.dtype) @ weight).to(x.dtype)
    y = y.reshape(x.shape[0], x.shape[1] * 8, conv.out_channels)
    if conv.bias is not None:  # added in place: addmm's copy of the broadcast bias cost more
        y.add_(conv.bias)
    return y

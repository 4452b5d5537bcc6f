"""3D ViT image encoder (FastSAM3D student, its sparse variant, SAM-Med3D teacher, our own).

Input (B, in_chans, D, H, W) with D = H = W = img_size (128 in every official model); patch
embedding to a channels-last token grid (B, D/16, H/16, W/16, C); blocks; a convolutional neck
to the image embedding (B, out_chans, D/16, H/16, W/16). Tensor axes 2, 3, 4 are the crop's
voxel axes (a, b, c), i.e. R, A, S in model space (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastsam3d.modeling.attention import Attention
from fastsam3d.modeling.common import LayerNorm3d, MLPBlock

BLOCK_KINDS = ("mlp", "global", "window", "official_sparse", "grid", "block")


class PatchEmbed3D(nn.Module):
    """Non-overlapping patches -> tokens: (B, C_in, D, H, W) -> (B, D/p, H/p, W/p, C).

    The weights are a ``Conv3d`` (official key ``proj``). On a GPU, and under CPU autocast, the
    patches go through one matrix product instead (:meth:`matmul_forward`, the same linear
    map): cuDNN's 3D kernels for a 16^3 kernel took 1.3 ms (fp32) / 0.6 ms (bf16) of a ~3.7 /
    1.5 ms encoder on an H100, and oneDNN's bfloat16 convolution 24 ms of a 62 ms CPU encoder
    (benchmarks/NOTES.md). The float32 CPU path keeps the convolution, whose summation order the
    official fp16-rounded parity fixtures were made with.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda or torch.is_autocast_enabled(x.device.type):
            return self.matmul_forward(x)
        return self.proj(x).permute(0, 2, 3, 4, 1)

    def matmul_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution as flattened patches @ weight (voxels past the last whole patch
        are dropped, as the convolution drops them)."""
        p = self.proj.kernel_size[0]
        b, c, d, h, w = x.shape
        d, h, w = d // p, h // p, w // p
        x = x[:, :, : d * p, : h * p, : w * p].reshape(b, c, d, p, h, p, w, p)
        patches = x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, d, h, w, c * p**3)
        weight = self.proj.weight.reshape(self.proj.out_channels, -1)
        return F.linear(patches, weight, self.proj.bias)


def _window_partition(x: torch.Tensor, ws: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Zero-pad (B, D, H, W, C) at the high end to multiples of ``ws`` and cut into windows.

    Returns windows (B * nW, ws, ws, ws, C) and the padded grid size.
    """
    b, d, h, w, c = x.shape
    pd, ph, pw = (-d) % ws, (-h) % ws, (-w) % ws
    x = F.pad(x, (0, 0, 0, pw, 0, ph, 0, pd))
    dp, hp, wp = d + pd, h + ph, w + pw
    x = x.reshape(b, dp // ws, ws, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(-1, ws, ws, ws, c), (dp, hp, wp)


def _window_unpartition(
    x: torch.Tensor, ws: int, padded: tuple[int, int, int], size: tuple[int, int, int]
) -> torch.Tensor:
    """Inverse of :func:`_window_partition`, cropping the padding: -> (B, D, H, W, C)."""
    dp, hp, wp = padded
    c = x.shape[-1]
    x = x.reshape(-1, dp // ws, hp // ws, wp // ws, ws, ws, ws, c).permute(0, 1, 4, 2, 5, 3, 6, 7)
    x = x.reshape(-1, dp, hp, wp, c)
    return x[:, : size[0], : size[1], : size[2]]


class Block(nn.Module):
    """Transformer block on a channels-last grid; ``kind`` "mlp" has no attention at all.

    Keys: ``norm1``/``attn`` (absent for "mlp"), ``norm2``, ``mlp.lin1``, ``mlp.lin2``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        kind: str,
        grid_size: int,
        window_size: int = 0,
        use_rel_pos: bool = True,
        group_size: int = 4,
        fs3d_order: bool = False,
        mlp_residual_after_norm: bool = False,
        official_rel_pos: bool = True,
        window_pad_unmasked: bool = True,
        fp16_rounding: bool = False,
        backend: str = "sdpa",
    ) -> None:
        super().__init__()
        if kind not in BLOCK_KINDS:
            raise ValueError(f"unknown block kind {kind!r}; choose one of {BLOCK_KINDS}")
        self.kind = kind
        self.window_size = window_size if kind == "window" else 0
        self.fs3d_order = fs3d_order
        self.mlp_residual_after_norm = mlp_residual_after_norm
        self.window_pad_unmasked = window_pad_unmasked
        if kind != "mlp":
            self.norm1 = nn.LayerNorm(dim, eps=1e-6)
            self.attn = Attention(
                dim,
                num_heads,
                input_size=self.window_size or grid_size,
                use_rel_pos=use_rel_pos,
                pattern="global" if kind == "window" else kind,
                group_size=group_size,
                official_rel_pos=official_rel_pos,
                fp16_rounding=fp16_rounding,
                backend=backend,
            )
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W, C) -> (B, D, H, W, C)."""
        if self.kind == "mlp":
            if self.mlp_residual_after_norm:  # quirk (SPEC §4.2): residual starts after norm2
                x = self.norm2(x)
                return x + self.mlp(x)
            return x + self.mlp(self.norm2(x))
        a = self._attention(self.norm1(x))
        if self.fs3d_order:  # quirk (SPEC §4.3): FastSAM3D order, norm2 on the residual stream
            y = self.norm2(x + a)
            return y + self.mlp(y)
        x = x + a
        return x + self.mlp(self.norm2(x))

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        if not self.window_size:
            return self.attn(x)
        size = x.shape[1:4]
        windows, padded = _window_partition(x, self.window_size)
        key_mask = None
        if not self.window_pad_unmasked and padded != tuple(size):
            # clean variant: padded positions are not keys (official: SPEC §13.6, they are)
            valid = torch.zeros(padded, dtype=torch.bool, device=x.device)
            valid[: size[0], : size[1], : size[2]] = True
            key_mask, _ = _window_partition(valid[None, ..., None], self.window_size)
            key_mask = key_mask.reshape(key_mask.shape[0], 1, 1, -1).repeat(x.shape[0], 1, 1, 1)
        out = self.attn(windows, key_mask)
        return _window_unpartition(out, self.window_size, padded, size)


class ImageEncoderViT3D(nn.Module):
    """ViT image encoder: (B, in_chans, D, H, W) -> embedding (B, out_chans, D/p, H/p, W/p).

    ``block_kinds`` names each block (see :data:`BLOCK_KINDS`); the quirk switches are
    documented on :class:`fastsam3d.registry.ModelConfig`.
    """

    def __init__(
        self,
        block_kinds: Sequence[str],
        img_size: int = 128,
        patch_size: int = 16,
        in_chans: int = 1,
        embed_dim: int = 768,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        out_chans: int = 384,
        window_size: int = 0,
        use_rel_pos: bool = True,
        group_size: int = 4,
        fs3d_order: bool = False,
        mlp_residual_after_norm: bool = False,
        official_rel_pos: bool = True,
        window_pad_unmasked: bool = True,
        fp16_rounding: bool = False,
        backend: str = "sdpa",
    ) -> None:
        super().__init__()
        grid = img_size // patch_size
        self.img_size = img_size
        self.patch_size = patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, grid, embed_dim))
        self.patch_embed = PatchEmbed3D(patch_size, in_chans, embed_dim)
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio,
                kind,
                grid,
                window_size=window_size,
                use_rel_pos=use_rel_pos,
                group_size=group_size,
                fs3d_order=fs3d_order,
                mlp_residual_after_norm=mlp_residual_after_norm,
                official_rel_pos=official_rel_pos,
                window_pad_unmasked=window_pad_unmasked,
                fp16_rounding=fp16_rounding,
                backend=backend,
            )
            for kind in block_kinds
        )
        self.neck = nn.Sequential(
            nn.Conv3d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm3d(out_chans),
            nn.Conv3d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(out_chans),
        )

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding + absolute positions: (B, C_in, D, H, W) -> (B, d, h, w, C).

        The pos-embed is trilinearly resized when the token grid differs from the one it was
        trained for (inputs other than ``img_size``; the official code has no such path).
        """
        x = self.patch_embed(x)
        pos = self.pos_embed
        if pos.shape[1:4] != x.shape[1:4]:
            pos = F.interpolate(
                pos.permute(0, 4, 1, 2, 3), size=x.shape[1:4], mode="trilinear", align_corners=False
            ).permute(0, 2, 3, 4, 1)
        return x + pos

    def forward(
        self, x: torch.Tensor, return_blocks: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Encode a crop.

        Args:
            x: (B, in_chans, D, H, W) normalised crop, D, H, W multiples of the patch size.
            return_blocks: also return the output of every block (for distillation).

        Returns:
            The embedding (B, out_chans, D/p, H/p, W/p); with ``return_blocks`` the tuple
            (embedding, [block outputs, each (B, D/p, H/p, W/p, C) channels-last]).
        """
        x = self.embed_tokens(x)
        outputs = []
        for block in self.blocks:
            x = block(x)
            if return_blocks:
                outputs.append(x)
        emb = self.neck(x.permute(0, 4, 1, 2, 3))
        return (emb, outputs) if return_blocks else emb

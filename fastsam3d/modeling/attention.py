"""Attention kernels for the 3D image encoder and the mask decoder.

Everything runs through :func:`attend`, which dispatches to a backend:

* ``"sdpa"`` (default): :func:`torch.nn.functional.scaled_dot_product_attention` (flash /
  memory-efficient kernels on GPU; relative positions enter as an additive float mask);
* ``"flash"``: the ``flash-attn`` package, used only when it is importable, the tensors are on a
  GPU of compute capability >= 8.0 and no additive bias is needed (otherwise SDPA runs);
* ``"math"``: explicit softmax(q k^T * scale + bias) v, for tests.

Token grids are channels-last cubes ``(B, D, H, W, C)``; token ``t = d*H*W + h*W + w``.
Group patterns of :class:`Attention` (one batched kernel call per layer, no loop over groups):

* ``"global"``: every token attends to every token of the grid (or of one window);
* ``"official_sparse"``: the released FastSAM3D "3D sparse flash attention" (SPEC §4.6);
* ``"grid"``: dilated 3D sub-grids: token (d, h, w) joins group (d % s, h % s, w % s) with
  stride ``s = L / g`` (g tokens per axis and group), i.e. ``s^3`` groups of ``g^3`` tokens;
* ``"block"``: contiguous ``g^3`` blocks. Alternating grid and block layers mixes information
  across the whole grid in two layers (MaxViT-style); results are put back in place.
"""

from __future__ import annotations

import functools
import importlib.util
import math

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("sdpa", "flash", "math")
PATTERNS = ("global", "official_sparse", "grid", "block")
OFFICIAL_SPARSE_SEGMENT = 64  # groups in the official sparse attention (hard-coded upstream)


@functools.cache
def _flash_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def flash_supported(device: torch.device | str | None = None) -> bool:
    """True if ``flash-attn`` is importable and ``device`` (default: cuda:0) can run it."""
    if not _flash_installed() or not torch.cuda.is_available():
        return False
    device = torch.device(device or "cuda")
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def available_backends() -> list[str]:
    """Attention backends usable on this machine (``flash`` only with flash-attn on a GPU)."""
    return [b for b in BACKENDS if b != "flash" or flash_supported()]


def set_attention_backend(module: nn.Module, backend: str) -> None:
    """Switch every attention layer inside ``module`` to ``backend`` (one of :data:`BACKENDS`)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    for m in module.modules():
        if hasattr(m, "backend"):
            m.backend = backend


def round_fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to float16 precision and back (emulates the official fp16 flash-attn calls)."""
    return x.to(torch.float16).to(x.dtype)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    backend: str = "sdpa",
    fp16_rounding: bool = False,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v.

    Args:
        q, k, v: (N, heads, S_q or S_k, d).
        bias: additive logits bias broadcastable to (N, heads, S_q, S_k), or None.
        backend: one of :data:`BACKENDS`.
        fp16_rounding: round q, k, v and the output to fp16 precision (the official sparse
            encoder and flash decoder cast to fp16 around flash-attn; arithmetic stays fp32).

    Returns:
        (N, heads, S_q, d) in the dtype of ``q``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if fp16_rounding:
        q, k, v = round_fp16(q), round_fp16(k), round_fp16(v)
    if backend == "math":
        logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        out = logits.softmax(-1) @ v
    elif backend == "flash" and bias is None and q.is_cuda and flash_supported(q.device):
        from flash_attn import flash_attn_func

        half = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.float16
        out = flash_attn_func(*(t.transpose(1, 2).to(half) for t in (q, k, v)))
        out = out.transpose(1, 2).to(q.dtype)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return round_fp16(out) if fp16_rounding else out


def rel_pos_table(table: torch.Tensor, extent: int, members: int, spacing: int) -> torch.Tensor:
    """Gather a relative-position table for ``members`` positions ``spacing`` apart.

    Args:
        table: (T, d) learned table, entry ``L - 1 + r`` for relative offset r; linearly
            resized to ``2 * extent - 1`` rows when its length differs (official behaviour).
        extent: L, the token-grid (or window) length along this axis.
        members: number of positions per group along this axis.
        spacing: distance in tokens between neighbouring members (1 dense/block, s grid).

    Returns:
        (members, members, d): ``R[i, j] = table[spacing * (i - j) + L - 1]``.
    """
    length = 2 * extent - 1
    if table.shape[0] != length:
        table = F.interpolate(table.T[None], size=length, mode="linear")[0].T
    # rows for the offsets -(m-1)s ... (m-1)s, then R[i, j] = rows[m-1 + i - j] as windows of
    # that strided view: views and one flip, where an index tensor took 5 kernels per axis
    start = extent - 1 - spacing * (members - 1)
    rows = table[start : start + 2 * spacing * (members - 1) + 1 : spacing]
    return rows.unfold(0, members, 1).flip(-1).transpose(1, 2)


def rel_pos_bias(
    q: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor], official: bool
) -> torch.Tensor:
    """Additive attention bias from decomposed 3D relative positions (unscaled q).

    Args:
        q: (N, gd, gh, gw, d) query vectors of one group (N = batch * groups * heads).
        tables: (Rd, Rh, Rw) gathered tables of shape (g, g, d) (see :func:`rel_pos_table`).
        official: reproduce the released code's misplaced broadcasting (SPEC §4.4):
            ``q(qd,qh,qw)·Rd[qd-kw] + q(qd,qh,kd)·Rh[qh-kw] + q(qd,qh,kh)·Rw[kh-kw]``; only
            defined for cubic groups. Otherwise the intended
            ``q·(Rd[qd-kd] + Rh[qh-kh] + Rw[qw-kw])``.

    Returns:
        (N, S, S) with S = gd*gh*gw, query-major.
    """
    rd, rh, rw = tables
    n, gd, gh, gw, _ = q.shape
    s = gd * gh * gw
    if official:  # quirk (SPEC §13.1): official 3D rel-pos broadcasting, kept for trained weights
        t1 = torch.einsum("ndhwc,dkc->ndhwk", q, rd)[:, :, :, :, None, None, :]
        t2 = torch.einsum("ndhxc,hkc->ndhxk", q, rh)[:, :, :, None, :, None, :]
        t3 = torch.einsum("ndhxc,xkc->ndhxk", q, rw)[:, :, :, None, None, :, :]
        return (t1 + t2 + t3).reshape(n, s, s)
    bd = torch.einsum("ndhwc,dkc->ndhwk", q, rd)[..., :, None, None]
    bh = torch.einsum("ndhwc,hkc->ndhwk", q, rh)[..., None, :, None]
    bw = torch.einsum("ndhwc,wkc->ndhwk", q, rw)[..., None, None, :]
    return (bd + bh + bw).reshape(n, s, s)


def _split_axes(pattern: str, sizes: tuple[int, int, int], group: int) -> list[int]:
    """View shape (per axis: outer, inner) that exposes group members for ``pattern``."""
    shape = []
    for n in sizes:
        if pattern == "global":
            shape += [1, n]
        elif n % group:
            raise ValueError(
                f"{pattern!r} attention needs a token grid divisible by {group}, got {n}"
            )
        elif pattern == "grid":
            shape += [group, n // group]  # member index outer, group (offset) index inner
        else:
            shape += [n // group, group]
    return shape


class Attention(nn.Module):
    """Multi-head self-attention on a channels-last token cube with optional 3D rel-pos.

    Parameter names follow the official checkpoints: ``rel_pos_d/h/w`` (2L-1, head_dim),
    ``qkv`` (C -> 3C, laid out [q | k | v], head-major), ``proj`` (C -> C).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        input_size: int,
        qkv_bias: bool = True,
        use_rel_pos: bool = True,
        pattern: str = "global",
        group_size: int = 4,
        official_rel_pos: bool = True,
        fp16_rounding: bool = False,
        backend: str = "sdpa",
    ) -> None:
        """``input_size`` is the grid (or window) length L the rel-pos tables are sized for."""
        super().__init__()
        if pattern not in PATTERNS:
            raise ValueError(f"unknown attention pattern {pattern!r}; choose one of {PATTERNS}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.pattern = pattern
        self.group_size = group_size
        self.official_rel_pos = official_rel_pos
        self.fp16_rounding = fp16_rounding
        self.backend = backend
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            self.rel_pos_d = nn.Parameter(torch.zeros(2 * input_size - 1, self.head_dim))
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size - 1, self.head_dim))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, D, H, W, C) -> (B, D, H, W, C).

        ``key_mask``: bool broadcastable to (B, 1, 1, D*H*W), False = key ignored (global
        pattern only; masks window padding in clean models).
        """
        b, d, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, d, h, w, 3, self.num_heads, self.head_dim)
        if self.pattern == "official_sparse":
            out = self._official_sparse(qkv)
        else:
            out = self._grouped(qkv, key_mask)
        return self.proj(out)

    def _grouped(self, qkv: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        b, d, h, w = qkv.shape[:4]
        heads, hd = self.num_heads, self.head_dim
        split = _split_axes(self.pattern, (d, h, w), self.group_size)
        member = (0, 2, 4) if self.pattern == "grid" else (1, 3, 5)
        outer = tuple(i for i in range(6) if i not in member)
        g = [split[i] for i in member]
        n_groups = math.prod(split[i] for i in outer)
        # (B, a0, a1, b0, b1, c0, c1, 3, h, d) -> (3, B, groups..., h, members..., d)
        t = qkv.reshape(b, *split, 3, heads, hd)
        perm = (7, 0, *(1 + i for i in outer), 8, *(1 + i for i in member), 9)
        t = t.permute(perm).reshape(3, b * n_groups, heads, *g, hd)
        q, k, v = t[0], t[1], t[2]
        bias = None
        if self.use_rel_pos and self.pattern != "official_sparse":
            spacing = [split[i + 1] if self.pattern == "grid" else 1 for i in (0, 2, 4)]
            tables = tuple(
                rel_pos_table(table, size, gi, sp)
                for table, size, gi, sp in zip(
                    (self.rel_pos_d, self.rel_pos_h, self.rel_pos_w), (d, h, w), g, spacing
                )
            )
            bias = rel_pos_bias(q.reshape(-1, *g, hd), tables, self.official_rel_pos)
            bias = bias.reshape(b * n_groups, heads, *bias.shape[-2:])
        if key_mask is not None:
            mask = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device)
            mask = mask.masked_fill(~key_mask.to(q.device), float("-inf"))
            bias = mask if bias is None else bias + mask
        s = math.prod(g)
        out = attend(
            q.reshape(-1, heads, s, hd),
            k.reshape(-1, heads, s, hd),
            v.reshape(-1, heads, s, hd),
            bias,
            self.backend,
            self.fp16_rounding,
        )
        # back in place: (B, groups..., h, members..., d) -> (B, a0, a1, b0, b1, c0, c1, h, d)
        out = out.reshape(b, *(split[i] for i in outer), heads, *g, hd)
        inv = [0] * 9
        for pos, src in enumerate((*(1 + i for i in outer), 7, *(1 + i for i in member), 8)):
            inv[src] = pos + 1
        out = out.permute(0, *inv[1:7], inv[7], inv[8])
        return out.reshape(b, d, h, w, heads * hd)

    def _official_sparse(self, qkv: torch.Tensor) -> torch.Tensor:
        """The released "3D sparse flash attention" (SPEC §4.6), reproduced for parity.

        Token t joins group t mod 64 (on an 8^3 grid: axial attention along D), no rel-pos,
        and the concatenated group outputs are read back row-major without undoing the
        grouping (output position g*n + j carries token g + 64*j).
        """
        b, d, h, w = qkv.shape[:4]
        heads, hd = self.num_heads, self.head_dim
        seg = OFFICIAL_SPARSE_SEGMENT
        s = d * h * w
        if s % seg:
            raise ValueError(f"official sparse attention needs a multiple of {seg} tokens, got {s}")
        n = s // seg
        t = qkv.reshape(b, n, seg, 3, heads, hd).permute(3, 0, 2, 4, 1, 5)
        t = t.reshape(3, b * seg, heads, n, hd)
        out = attend(t[0], t[1], t[2], None, self.backend, self.fp16_rounding)
        # quirk (SPEC §13.7): groups concatenated and read back as row-major (scrambled order)
        out = out.reshape(b, seg, heads, n, hd).permute(0, 1, 3, 2, 4)
        return out.reshape(b, d, h, w, heads * hd)

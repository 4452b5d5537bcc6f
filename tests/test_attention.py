"""Attention kernels: backends agree, rel-pos bias formulas, sparse group patterns."""

from __future__ import annotations

import pytest
import torch

from fastsam3d.modeling.attention import (
    Attention,
    attend,
    available_backends,
    rel_pos_bias,
    rel_pos_table,
    set_attention_backend,
)
from fastsam3d.modeling.image_encoder import Block
from fastsam3d.registry import build_model

torch.manual_seed(0)


def _rand_attention(pattern: str, dim: int = 16, heads: int = 2, size: int = 8, **kw) -> Attention:
    attn = Attention(dim, heads, input_size=size, pattern=pattern, **kw)
    with torch.no_grad():
        for p in (attn.rel_pos_d, attn.rel_pos_h, attn.rel_pos_w):
            p.normal_(0, 0.5)
    return attn


@pytest.mark.parametrize("with_bias", [False, True])
def test_backends_agree(with_bias: bool) -> None:
    q, k, v = (torch.randn(3, 2, 40, 8) for _ in range(3))
    bias = torch.randn(3, 2, 40, 40) if with_bias else None
    ref = attend(q, k, v, bias, backend="math")
    for backend in available_backends():
        out = attend(q, k, v, bias, backend=backend)
        assert torch.allclose(out, ref, atol=1e-5), backend


def test_unknown_backend_is_refused() -> None:
    q = torch.randn(1, 1, 4, 2)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attend(q, q, q, backend="xformers")


def test_official_rel_pos_matches_brute_force() -> None:
    """SPEC §4.4: q(qd,qh,qw)·Rd[qd-kw] + q(qd,qh,kd)·Rh[qh-kw] + q(qd,qh,kh)·Rw[kh-kw]."""
    n, size, c = 2, 3, 4
    q = torch.randn(n, size, size, size, c, dtype=torch.float64)
    tables = [torch.randn(2 * size - 1, c, dtype=torch.float64) for _ in range(3)]
    gathered = tuple(rel_pos_table(t, size, size, 1) for t in tables)
    got = rel_pos_bias(q, gathered, official=True).reshape(n, *(size,) * 6)
    rd, rh, rw = tables
    o = size - 1
    for a, b, c_, d, e, f in torch.cartesian_prod(*[torch.arange(size)] * 6).tolist():
        want = (
            q[:, a, b, c_] @ rd[a - f + o]
            + q[:, a, b, d] @ rh[b - f + o]
            + q[:, a, b, e] @ rw[e - f + o]
        )
        assert torch.allclose(got[:, a, b, c_, d, e, f], want)


def test_decomposed_rel_pos_matches_brute_force() -> None:
    n, size, c = 1, 3, 4
    q = torch.randn(n, size, size, size, c, dtype=torch.float64)
    tables = [torch.randn(2 * size - 1, c, dtype=torch.float64) for _ in range(3)]
    gathered = tuple(rel_pos_table(t, size, size, 1) for t in tables)
    got = rel_pos_bias(q, gathered, official=False).reshape(n, *(size,) * 6)
    rd, rh, rw = tables
    o = size - 1
    for a, b, c_, d, e, f in torch.cartesian_prod(*[torch.arange(size)] * 6).tolist():
        want = q[:, a, b, c_] @ (rd[a - d + o] + rh[b - e + o] + rw[c_ - f + o])
        assert torch.allclose(got[:, a, b, c_, d, e, f], want)


def _group_ids(pattern: str, size: int, g: int) -> torch.Tensor:
    idx = torch.arange(size)
    per_axis = idx % (size // g) if pattern == "grid" else idx // g
    d, h, w = torch.meshgrid(per_axis, per_axis, per_axis, indexing="ij")
    return ((d * size + h) * size + w).reshape(-1)


@pytest.mark.parametrize("pattern", ["grid", "block"])
@pytest.mark.parametrize("size", [8, 12])
def test_dilated_groups_equal_masked_dense_attention(pattern: str, size: int) -> None:
    """Grouped attention = dense attention (correct rel-pos, full grid) masked to the groups."""
    dim, heads = 16, 2
    sparse = _rand_attention(pattern, dim, heads, size, official_rel_pos=False)
    dense = _rand_attention("global", dim, heads, size, official_rel_pos=False)
    dense.load_state_dict(sparse.state_dict())
    ids = _group_ids(pattern, size, 4)
    same = ids[:, None] == ids[None, :]
    x = torch.randn(2, size, size, size, dim)
    # dense reference with a -inf bias outside the group, computed through the math backend
    qkv = dense.qkv(x).reshape(2, size**3, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    tables = tuple(
        rel_pos_table(t, size, size, 1) for t in (dense.rel_pos_d, dense.rel_pos_h, dense.rel_pos_w)
    )
    q_grid = qkv[0].reshape(2 * heads, size, size, size, dim // heads)
    bias = rel_pos_bias(q_grid, tables, official=False).reshape(2, heads, size**3, size**3)
    bias = bias.masked_fill(~same, float("-inf"))
    ref = attend(qkv[0], qkv[1], qkv[2], bias, backend="math")
    ref = dense.proj(ref.transpose(1, 2).reshape(2, size, size, size, dim))
    assert torch.allclose(sparse(x), ref, atol=1e-5)


def test_grid_then_block_mixes_every_token() -> None:
    """Two layers (grid, block) give every output a dependence on every input token."""
    dim = 8
    layers = [_rand_attention(p, dim, 2, 8, official_rel_pos=False) for p in ("grid", "block")]
    x = torch.randn(1, 8, 8, 8, dim, requires_grad=True)
    y = layers[1](layers[0](x) + x)
    y[0, 0, 0, 0].sum().backward()
    assert (x.grad.abs().sum(-1) > 0).all()


def test_official_sparse_equals_per_group_loop() -> None:
    """The batched official sparse attention equals 64 separate calls, recomposed as released."""
    dim, heads = 16, 2
    attn = _rand_attention("official_sparse", dim, heads)
    x = torch.randn(1, 8, 8, 8, dim)
    qkv = attn.qkv(x).reshape(1, 512, 3, heads, dim // heads)
    outs = []
    for g in range(64):
        q, k, v = qkv[:, g::64].permute(2, 0, 3, 1, 4)
        outs.append(attend(q, k, v, backend="math").transpose(1, 2))  # (1, 8, heads, d)
    ref = attn.proj(torch.cat(outs, dim=1).reshape(1, 8, 8, 8, dim))
    assert torch.allclose(attn(x), ref, atol=1e-5)


def test_masked_window_padding_equals_global_attention() -> None:
    """Clean windowed block with masked padding = global attention on the unpadded grid."""
    dim, heads = 16, 2
    kw = {"use_rel_pos": True, "official_rel_pos": False, "fs3d_order": False}
    win = Block(dim, heads, 4.0, "window", 8, window_size=14, window_pad_unmasked=False, **kw)
    glob = Block(dim, heads, 4.0, "global", 8, **kw)
    with torch.no_grad():
        for p in (win.attn.rel_pos_d, win.attn.rel_pos_h, win.attn.rel_pos_w):
            p.normal_(0, 0.5)
    sd = win.state_dict()
    for axis in "dhw":  # the window tables (27 rows) centred on offset 0 cover offsets -7..7
        sd[f"attn.rel_pos_{axis}"] = sd[f"attn.rel_pos_{axis}"][13 - 7 : 13 + 8]
    glob.load_state_dict(sd)
    x = torch.randn(1, 8, 8, 8, dim)
    assert torch.allclose(win(x), glob(x), atol=1e-5)
    official = Block(dim, heads, 4.0, "window", 8, window_size=14, **kw)
    official.load_state_dict(win.state_dict())
    assert not torch.allclose(official(x), glob(x), atol=1e-3)  # padding tokens take part


def test_rel_pos_index_tensors_follow_the_table_device() -> None:
    table = torch.randn(15, 4, device="meta")
    assert rel_pos_table(table, 8, 4, 2).device.type == "meta"


@pytest.mark.parametrize("arch", ["fastsam3d", "sam_med3d", "fastsam3d_dilated"])
def test_models_agree_across_backends(arch: str) -> None:
    """Whole encoders (global, windowed, dilated) give the same embedding with every backend."""
    torch.manual_seed(3)
    model = build_model(arch, embed_dim=24, depth=3, num_heads=3, out_chans=12, prompt_embed_dim=48)
    x = torch.randn(1, 1, 128, 128, 128)
    with torch.no_grad():
        for p in model.parameters():  # non-zero rel-pos tables and pos-embed
            if p.abs().sum() == 0:
                p.normal_(0, 0.2)
        ref = model.image_encoder(x)
        for backend in available_backends():
            set_attention_backend(model, backend)
            assert torch.allclose(model.image_encoder(x), ref, atol=1e-4), backend


@pytest.mark.parametrize(("size", "grid"), [(192, 12), (256, 16)])
def test_dilated_encoder_runs_on_larger_crops(size: int, grid: int) -> None:
    """Non-128 crops: pos-embed resized trilinearly, groups tile 12^3 / 16^3 token grids."""
    model = build_model("fastsam3d_dilated", embed_dim=24, num_heads=3, out_chans=12)
    with torch.no_grad():
        emb, blocks = model.image_encoder(torch.randn(1, 1, size, size, size), return_blocks=True)
    assert emb.shape == (1, 12, grid, grid, grid)
    assert len(blocks) == 6 and blocks[-1].shape == (1, grid, grid, grid, 24)


@pytest.mark.parametrize("channel_major_merge", [False, True])
@pytest.mark.parametrize(("nq", "nk"), [(9, 512), (512, 9), (9, 9), (40, 512), (2, 64), (64, 64)])
def test_decoder_attention_folded_forms_equal_the_plain_one(
    channel_major_merge: bool, nq: int, nk: int
) -> None:
    """Folding the image side's projections into the prompt tokens' side (CPU) is the same
    attention up to float rounding, in both head-merge orders, batched; the cost model picks a
    folded form for the decoder's few-tokens-to-image shapes and the plain one otherwise."""
    from fastsam3d.modeling.transformer import DecoderAttention

    attn = DecoderAttention(384, 8, 2, channel_major_merge=channel_major_merge).eval()
    q, k, v = torch.randn(2, nq, 384), torch.randn(2, nk, 384), torch.randn(2, nk, 384)
    with torch.no_grad():
        plain = attn._merge(
            attend(attn._split(attn.q_proj(q)), attn._split(attn.k_proj(k)),
                   attn._split(attn.v_proj(v)))
        )  # fmt: skip
        for form in (attn._few_queries, attn._few_keys, attn):
            torch.testing.assert_close(form(q, k, v), plain, rtol=1e-5, atol=2e-6)
    costs = attn._fold_costs(nq, nk)
    expected = {(9, 512): "queries", (512, 9): "keys", (2, 64): "queries"}.get((nq, nk))
    assert min(costs, key=costs.get) == expected

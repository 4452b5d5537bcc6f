"""Two-way transformer of the mask decoder (prompt tokens <-> image tokens), SPEC §6.2."""

from __future__ import annotations

import torch
from torch import nn

from fastsam3d.modeling.attention import attend
from fastsam3d.modeling.common import MLPBlock


class DecoderAttention(nn.Module):
    """Attention with separate q/k/v projections, optional downsampled internal width.

    ``channel_major_merge`` reproduces the official flash decoder, which merges heads as
    channel c*heads + head instead of head*d + c before ``out_proj`` (SPEC §6.4).
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        downsample_rate: int = 1,
        channel_major_merge: bool = False,
        fp16_rounding: bool = False,
        backend: str = "sdpa",
    ) -> None:
        super().__init__()
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        self.channel_major_merge = channel_major_merge
        self.fp16_rounding = fp16_rounding
        self.backend = backend
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, Nq, C), k and v (B, Nk, C) -> (B, Nq, C).

        On the CPU, where the decoder is bound by arithmetic, a cross-attention between a few
        prompt tokens and many image tokens folds the image side's projections into the
        tokens' side (same result up to float rounding; ``_fold_costs`` picks the cheapest):
        with 8 heads and ~10 tokens that is ~2.7x fewer multiply-adds than projecting every
        image token to the internal width. On a GPU the click is launch-bound and the folded
        form launches more kernels, so it keeps the plain one, as do the fp16 parity quirks.
        """
        fold = None
        if not (q.is_cuda or self.fp16_rounding):
            costs = self._fold_costs(q.shape[1], k.shape[1])
            fold = min(costs, key=costs.get)
        if fold == "queries":
            return self._few_queries(q, k, v)
        if fold == "keys":
            return self._few_keys(q, k, v)
        out = attend(
            self._split(self.q_proj(q)),
            self._split(self.k_proj(k)),
            self._split(self.v_proj(v)),
            backend=self.backend,
            fp16_rounding=self.fp16_rounding,
        )  # (B, heads, Nq, d)
        return self._merge(out)

    def _merge(self, out: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, d) -> out_proj of the merged heads, (B, N, C)."""
        if self.channel_major_merge:  # quirk (SPEC §13.7): official flash decoder merge order
            out = out.permute(0, 2, 3, 1)
        else:
            out = out.transpose(1, 2)
        return self.out_proj(out.reshape(out.shape[0], out.shape[1], -1))

    def _fold_costs(self, nq: int, nk: int) -> dict[str | None, int]:
        """Multiply-adds of the plain attention (None) and of the two folded forms."""
        c, i, h = self.q_proj.in_features, self.internal_dim, self.num_heads
        return {
            None: (nq + 2 * nk) * c * i + 2 * nq * nk * i + nq * i * c,
            "queries": 3 * nq * c * i + 2 * h * nq * nk * c + nq * i * c,
            "keys": 4 * nk * c * i + 2 * h * nq * nk * c,
        }

    def _head_weights(self, linear: nn.Linear) -> torch.Tensor:
        """A projection to the internal width as (heads, d, C): row ``head*d + c``."""
        return linear.weight.view(self.num_heads, -1, linear.in_features)

    def _few_queries(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Few queries, many keys (tokens -> image): the keys are never projected.

        scores_h = (Q_h W_k,h) k^T (the key bias adds a constant per query row, which softmax
        drops) and A_h (v W_v,h^T + b_v,h) = (A_h v) W_v,h^T + b_v,h (rows of A_h sum to 1).
        """
        b, n, _ = q.shape
        h = self.num_heads
        qh = self._split(self.q_proj(q))  # (B, h, n, d)
        folded = (qh * qh.shape[-1] ** -0.5) @ self._head_weights(self.k_proj)  # (B, h, n, C)
        attn = (folded.reshape(b, h * n, -1) @ k.transpose(1, 2)).softmax(-1)  # (B, h*n, Nk)
        av = (attn @ v).view(b, h, n, -1)  # (B, h, n, C)
        out = av @ self._head_weights(self.v_proj).transpose(1, 2)  # (B, h, n, d)
        return self._merge(out + self.v_proj.bias.view(h, 1, -1))

    def _few_keys(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Few keys, many queries (image -> tokens): the queries are never projected and the
        output projection acts on the few values.

        scores_h = q (K_h W_q,h)^T + K_h b_q,h and A_h V_h W_o,h^T = A_h (V_h W_o,h^T), all
        heads in one matrix product each.
        """
        b, n, _ = k.shape
        h = self.num_heads
        kh = self._split(self.k_proj(k))  # (B, h, n, d)
        kh = kh * kh.shape[-1] ** -0.5
        folded = (kh @ self._head_weights(self.q_proj)).reshape(b, h * n, -1)  # (B, h*n, C)
        bias = (kh @ self.q_proj.bias.view(h, -1, 1)).reshape(b, h * n, 1)
        scores = torch.baddbmm(bias, folded, q.transpose(1, 2))  # (B, h*n, Nq)
        # softmax over the n keys as the middle axis: over a last axis of ~10 it ran 20x slower
        attn = scores.view(b, h, n, -1).softmax(2).view(b, h * n, -1)
        w_out = self.out_proj.weight  # (C, internal): merged index head*d + c, or c*h + head
        if self.channel_major_merge:
            w_out = w_out.view(w_out.shape[0], -1, h).transpose(1, 2)
        w_out = w_out.reshape(w_out.shape[0], h, -1).permute(1, 2, 0)  # (h, d, C)
        values = (self._split(self.v_proj(v)) @ w_out).reshape(b, h * n, -1)  # (B, h*n, C)
        return torch.baddbmm(self.out_proj.bias.expand(b, 1, -1), attn.transpose(1, 2), values)


class TwoWayAttentionBlock(nn.Module):
    """Self-attn on tokens, token->image cross-attn, MLP, image->token cross-attn."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        attention_downsample_rate: int,
        skip_first_layer_pe: bool,
        **attn_kwargs: bool | str,
    ) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(embedding_dim, num_heads, **attn_kwargs)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = DecoderAttention(
            embedding_dim, num_heads, attention_downsample_rate, **attn_kwargs
        )
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = DecoderAttention(
            embedding_dim, num_heads, attention_downsample_rate, **attn_kwargs
        )
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (B, Nt, C) prompt tokens, keys (B, Ni, C) image tokens; PEs alike."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q = queries + query_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer3D(nn.Module):
    """``depth`` two-way blocks then a final token->image attention."""

    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        attention_downsample_rate: int = 2,
        **attn_kwargs: bool | str,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim, num_heads, mlp_dim, attention_downsample_rate, i == 0, **attn_kwargs
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = DecoderAttention(
            embedding_dim, num_heads, attention_downsample_rate, **attn_kwargs
        )
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embedding/image_pe (B, C, d, h, w), point_embedding (B, Nt, C).

        Returns (tokens (B, Nt, C), image tokens (B, d*h*w, C)), image tokens row-major.
        """
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        if not keys.is_cuda:  # the CPU adds them 5 times: contiguous, a click is ~0.5 ms faster
            keys, key_pe = keys.contiguous(), key_pe.contiguous()
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        attn = self.final_attn_token_to_image(queries + point_embedding, keys + key_pe, keys)
        return self.norm_final_attn(queries + attn), keys

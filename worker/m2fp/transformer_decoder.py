"""Masked-attention transformer decoder (Mask2Former) predicting class and mask logits per query.

The cross-attention runs `nn.MultiheadAttention`'s arithmetic itself (`masked_cross_attention`:
the module's own projections, then `F.scaled_dot_product_attention`), so that one additive mask
per query serves all heads (the module wants it repeated per head: 8x the bool mask, its
fully-masked test, its float conversion) and the per-level key/value inputs are made once, not
once per layer.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from worker.m2fp import dense
from worker.m2fp.config import M2FPConfig
from worker.m2fp.interpolation import downscale_bilinear
from worker.m2fp.position_encoding import PositionEmbeddingSine

NUM_FEATURE_LEVELS = 3  # the decoder cycles over the pixel decoder's [/32, /16, /8] features


def masked_cross_attention(
    attention: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    blocked: torch.Tensor,
) -> torch.Tensor:
    """`attention(query, key, value, attn_mask=...)[0]` with one mask for every head.

    query (L, B, E), key and value (S, B, E); `blocked` (B, L, S) bool, True where a query may not
    attend (no row all True). The arithmetic of `F.multi_head_attention_forward` for distinct
    query, key and value without dropout: the three input projections, scaled dot-product
    attention with -inf at the blocked positions, the output projection.
    """
    length, batch, embed = query.shape
    heads = attention.num_heads
    if attention.in_proj_weight is None or attention.in_proj_bias is None:
        raise ValueError("masked_cross_attention needs a packed in-projection with bias")
    w_q, w_k, w_v = attention.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attention.in_proj_bias.chunk(3)

    def heads_first(projected: torch.Tensor) -> torch.Tensor:
        # (N, B, E) -> (N, B, heads, E/heads) -> (B, heads, N, E/heads)
        return projected.view(projected.shape[0], batch, heads, -1).permute(1, 2, 0, 3)

    queries = heads_first(dense.linear(query, w_q, b_q))
    mask = torch.zeros(blocked.shape, dtype=queries.dtype, device=queries.device)
    mask = mask.masked_fill_(blocked, float("-inf")).unsqueeze(1)  # (B, 1, L, S): every head
    attended = F.scaled_dot_product_attention(
        queries,
        heads_first(dense.linear(key, w_k, b_k)),
        heads_first(dense.linear(value, w_v, b_v)),
        mask,
    )  # (B, heads, L, E/heads)
    attended = attended.permute(2, 0, 1, 3).reshape(length, batch, embed)
    return attention.out_proj(attended)


class CrossAttentionLayer(nn.Module):
    """Post-norm cross-attention from the queries to one level of image features."""

    def __init__(self, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(embed_dim, num_heads, dropout=0.0)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(
        self,
        queries: torch.Tensor,
        memory: torch.Tensor,
        blocked: torch.Tensor,
        memory_keys: torch.Tensor,
        query_position: torch.Tensor,
    ) -> torch.Tensor:
        """Update (Q, B, C) queries from (HW, B, C) memory; `memory_keys` is memory + its position
        embedding, `blocked` (B, Q, HW) True where a query does not attend."""
        attended = masked_cross_attention(
            self.multihead_attn, queries + query_position, memory_keys, memory, blocked
        )
        return self.norm(queries + attended)


class SelfAttentionLayer(nn.Module):
    """Post-norm self-attention among the queries."""

    def __init__(self, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(embed_dim, num_heads, dropout=0.0)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, queries: torch.Tensor, query_position: torch.Tensor) -> torch.Tensor:
        """Update the (Q, B, C) queries."""
        queries_with_position = queries + query_position
        attended = self.self_attn(
            queries_with_position, queries_with_position, queries, need_weights=False
        )[0]
        return self.norm(queries + attended)


class FeedForwardLayer(nn.Module):
    """Post-norm ReLU feed-forward block."""

    def __init__(self, embed_dim: int, feedforward_dim: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(embed_dim, feedforward_dim)
        self.linear2 = nn.Linear(feedforward_dim, embed_dim)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        """Update the (Q, B, C) queries."""
        return self.norm(queries + self.linear2(F.relu(self.linear1(queries))))


class MLP(nn.Module):
    """Linear layers with ReLU between them (none after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(
            nn.Linear(d_in, d_out) for d_in, d_out in itertools.pairwise(dims)
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Apply the layers to (..., input_dim) inputs."""
        for index, layer in enumerate(self.layers):
            inputs = layer(inputs)
            if index < len(self.layers) - 1:
                inputs = F.relu(inputs)
        return inputs


class MultiScaleMaskedTransformerDecoder(nn.Module):
    """Queries attend, layer by layer, to the /32, /16, /8 features restricted to their own predicted masks."""

    def __init__(self, config: M2FPConfig) -> None:
        super().__init__()
        hidden_dim = config.hidden_dim
        self.num_heads = config.decoder_heads
        self.num_layers = config.decoder_layers
        self.position_embedding = PositionEmbeddingSine(hidden_dim // 2)
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, config.decoder_heads)
            for _ in range(config.decoder_layers)
        )
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, config.decoder_heads)
            for _ in range(config.decoder_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(
            FeedForwardLayer(hidden_dim, config.decoder_feedforward_dim)
            for _ in range(config.decoder_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(config.num_queries, hidden_dim)  # initial query features
        self.query_embed = nn.Embedding(
            config.num_queries, hidden_dim
        )  # query positional embeddings
        self.level_embed = nn.Embedding(NUM_FEATURE_LEVELS, hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, config.num_classes + 1)  # + "no object"
        self.mask_embed = MLP(hidden_dim, hidden_dim, config.mask_dim, 3)

    def prediction_heads(
        self,
        queries: torch.Tensor,
        mask_features: torch.Tensor,
        attention_mask_size: tuple[int, int],
        attention_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Class logits (B, Q, C+1), mask logits (B, Q, H/4, W/4) and the next attention mask.

        The attention mask is (B, Q, h*w) at `attention_mask_size` (one for all heads), True where the
        query's own mask probability is below 0.5 (those pixels are not attended). Given `attention_features` (the mask
        features already resized to that size), the mask logits at H/4 x W/4 are not computed (None)
        and the attention mask comes from the small map: the bilinear resize is linear, so resizing
        the features and then taking the products equals resizing the products, up to rounding, at
        1/64 to 1/4 of the work.
        """
        decoded = self.decoder_norm(queries).transpose(0, 1)  # (Q, B, C) -> (B, Q, C)
        class_logits = self.class_embed(decoded)  # (B, Q, C+1)
        mask_embeddings = self.mask_embed(decoded)  # (B, Q, mask_dim)
        mask_logits = None
        if attention_features is None:
            mask_logits = dense.matrix_times_map(mask_embeddings, mask_features)  # (B, Q, H/4, W/4)
            resized = F.interpolate(
                mask_logits, size=attention_mask_size, mode="bilinear", align_corners=False
            )
        else:
            resized = dense.matrix_times_map(mask_embeddings, attention_features)
        attention_mask = resized.sigmoid().flatten(2) < 0.5  # (B, Q, h, w) -> (B, Q, h*w)
        return class_logits, mask_logits, attention_mask.detach()

    def forward(
        self,
        multi_scale_features: list[torch.Tensor],
        mask_features: torch.Tensor,
        all_masks: bool = True,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Run the decoder.

        Args:
            multi_scale_features: [(B, C, H/32, W/32), (B, C, H/16, W/16), (B, C, H/8, W/8)].
            mask_features: (B, mask_dim, H/4, W/4) per-pixel embeddings.
            all_masks: compute every prediction's H/4 x W/4 mask logits; if False only the last
                one's (the output), the others being None and their attention masks taken from the
                mask features resized to each level (`prediction_heads`).

        Returns:
            The class logits (B, Q, C+1) and mask logits (B, Q, H/4, W/4) of every prediction, in order:
            one on the initial queries and one after each layer (the last is the final output).
        """
        if len(multi_scale_features) != NUM_FEATURE_LEVELS:
            raise ValueError(
                f"expected {NUM_FEATURE_LEVELS} feature levels, but got {len(multi_scale_features)}"
            )
        batch_size = mask_features.shape[0]
        memories = []
        memory_keys = []
        attention_mask_sizes = []
        for level, features in enumerate(multi_scale_features):
            attention_mask_sizes.append((features.shape[2], features.shape[3]))
            # (B, C, H, W) -> (B, C, HW) -> (HW, B, C), contiguous once for every layer's linears
            memory = (features.flatten(2) + self.level_embed.weight[level][None, :, None]).permute(
                2, 0, 1
            )
            memories.append(memory.contiguous())
            position = self.position_embedding.tokens(features).transpose(0, 1)  # (HW, B, C)
            memory_keys.append(memory + position)  # the keys' input, the same for every layer

        # (Q, C) -> (Q, B, C)
        query_position = self.query_embed.weight.unsqueeze(1).expand(-1, batch_size, -1)
        queries = self.query_feat.weight.unsqueeze(1).expand(-1, batch_size, -1)

        resized_features: dict[int, torch.Tensor] = {}

        def attention_features(level: int, last: bool) -> torch.Tensor | None:
            """The mask features at `level`'s size (bilinear, `downscale_bilinear`: the levels divide
            the mask features' size exactly), once per level; None when the masks are wanted."""
            if all_masks or last:
                return None
            if level not in resized_features:
                resized_features[level] = downscale_bilinear(
                    mask_features, attention_mask_sizes[level]
                )
            return resized_features[level]

        class_logits, mask_logits, attention_mask = self.prediction_heads(
            queries,
            mask_features,
            attention_mask_sizes[0],
            attention_features(0, last=self.num_layers == 0),
        )
        all_class_logits = [class_logits]
        all_mask_logits: list[torch.Tensor | None] = [mask_logits]
        for layer_index in range(self.num_layers):
            level = layer_index % NUM_FEATURE_LEVELS
            # a query whose mask is empty at this level attends everywhere instead of nowhere
            fully_masked = attention_mask.all(dim=-1, keepdim=True)  # (B, Q, 1)
            attention_mask = attention_mask & ~fully_masked
            queries = self.transformer_cross_attention_layers[layer_index](
                queries, memories[level], attention_mask, memory_keys[level], query_position
            )
            queries = self.transformer_self_attention_layers[layer_index](queries, query_position)
            queries = self.transformer_ffn_layers[layer_index](queries)
            next_level = (layer_index + 1) % NUM_FEATURE_LEVELS
            class_logits, mask_logits, attention_mask = self.prediction_heads(
                queries,
                mask_features,
                attention_mask_sizes[next_level],
                attention_features(next_level, last=layer_index == self.num_layers - 1),
            )
            all_class_logits.append(class_logits)
            all_mask_logits.append(mask_logits)
        return all_class_logits, all_mask_logits

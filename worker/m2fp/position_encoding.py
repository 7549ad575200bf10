"""Normalised sine position embedding of a feature map (depends only on its height and width)."""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """2-D sine/cosine embedding: `num_pos_feats` channels for y followed by `num_pos_feats` for x."""

    def __init__(
        self, num_pos_feats: int = 128, temperature: float = 10000.0, scale: float = 2 * math.pi
    ) -> None:
        super().__init__()
        if num_pos_feats % 2 != 0:
            raise ValueError(f"num_pos_feats must be even, but got {num_pos_feats}")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = scale

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Return the (B, 2*num_pos_feats, H, W) embedding for (B, C, H, W) features."""
        return self.channels_last(features).permute(0, 3, 1, 2)

    def tokens(self, features: torch.Tensor) -> torch.Tensor:
        """The same embedding as (B, H*W, 2*num_pos_feats) tokens, row-major: no transposing copy."""
        return self.channels_last(features).flatten(1, 2)

    def channels_last(self, features: torch.Tensor) -> torch.Tensor:
        """The embedding as computed, (B, H, W, 2*num_pos_feats) contiguous."""
        batch_size, _, height, width = features.shape
        device = features.device
        ones = torch.ones((batch_size, height, width), dtype=torch.float32, device=device)
        y_embed = ones.cumsum(1)  # (B, H, W): 1..H down the rows
        x_embed = ones.cumsum(2)  # (B, H, W): 1..W along the columns
        epsilon = 1e-6
        y_embed = y_embed / (y_embed[:, -1:, :] + epsilon) * self.scale
        x_embed = x_embed / (x_embed[:, :, -1:] + epsilon) * self.scale

        feature_index = torch.arange(self.num_pos_feats, dtype=torch.float32, device=device)
        frequencies = self.temperature ** (
            2 * torch.div(feature_index, 2, rounding_mode="floor") / self.num_pos_feats
        )

        position_x = x_embed[:, :, :, None] / frequencies  # (B, H, W, F)
        position_y = y_embed[:, :, :, None] / frequencies  # (B, H, W, F)
        # interleave sin (even channels) and cos (odd channels): (B, H, W, F/2, 2) -> (B, H, W, F)
        position_x = torch.stack(
            (position_x[..., 0::2].sin(), position_x[..., 1::2].cos()), dim=4
        ).flatten(3)
        position_y = torch.stack(
            (position_y[..., 0::2].sin(), position_y[..., 1::2].cos()), dim=4
        ).flatten(3)
        return torch.cat((position_y, position_x), dim=3)  # (B, H, W, 2F)

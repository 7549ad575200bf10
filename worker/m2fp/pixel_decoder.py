"""MSDeformAttn pixel decoder: a deformable transformer encoder on res5/res4/res3 plus one FPN level on res2."""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from worker.m2fp import dense
from worker.m2fp.backbone import Conv2dNormActivation
from worker.m2fp.config import M2FPConfig
from worker.m2fp.deformable_attention import MultiScaleDeformableAttention
from worker.m2fp.position_encoding import PositionEmbeddingSine

# The encoder runs on these backbone levels, coarsest first (the order of input_proj.{0,1,2}).
TRANSFORMER_IN_FEATURES = ("res5", "res4", "res3")


def pointwise_conv_nchw(
    features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """A 1x1 convolution as one matrix product whose output is NCHW whatever the input's layout.

    `conv2d` answers a channels-last input (the fused backbone's maps) in channels-last, and a 1x1
    weight's strides are ambiguous enough that it may do so for an NCHW one too; the GroupNorm
    that follows must see NCHW (it sums in another order on NHWC) and the resizes copy
    channels-last maps back to NCHW: 35 MB per copy at /4. Here (O, C) @ (B, C, H*W) reads
    either layout in place and writes NCHW (`dense.matrix_times_map`: oneDNN on the CPU).
    """
    output = dense.matrix_times_map(weight.view(weight.shape[0], -1), features)
    if bias is not None:
        output += bias.view(1, -1, 1, 1)
    return output


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention then a ReLU FFN, each with a residual."""

    def __init__(
        self, embed_dim: int, num_heads: int, num_levels: int, num_points: int, feedforward_dim: int
    ) -> None:
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(embed_dim, num_heads, num_levels, num_points)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.linear1 = nn.Linear(embed_dim, feedforward_dim)
        self.linear2 = nn.Linear(feedforward_dim, embed_dim)
        self.norm2 = nn.LayerNorm(embed_dim)

    def forward(
        self,
        source: torch.Tensor,
        position: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
    ) -> torch.Tensor:
        """Update the (B, S, C) flattened multi-scale features; `position` has the same shape."""
        attended = self.self_attn(source + position, reference_points, source, spatial_shapes)
        source = self.norm1(source + attended)
        return self.norm2(source + self.feedforward(source))

    def feedforward(self, source: torch.Tensor) -> torch.Tensor:
        """linear2(relu(linear1(source))); the ReLU in place: the hidden (S, 1024) activations
        are 46 MB at 640x864, not worth a copy."""
        return self.linear2(F.relu(self.linear1(source), inplace=True))


class DeformableEncoder(nn.Module):
    """Stack of deformable encoder layers."""

    def __init__(self, num_layers: int, **layer_kwargs: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(**layer_kwargs) for _ in range(num_layers)
        )

    def forward(
        self,
        source: torch.Tensor,
        position: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
    ) -> torch.Tensor:
        """Run every layer on the (B, S, C) flattened features."""
        for layer in self.layers:
            source = layer(source, position, reference_points, spatial_shapes)
        return source


def encoder_reference_points(
    spatial_shapes: list[tuple[int, int]], batch_size: int, device: torch.device
) -> torch.Tensor:
    """Normalised pixel centres ((j + 0.5) / W, (i + 0.5) / H) of every level, as (B, S, L, 2)."""
    points_per_level = []
    for height, width in spatial_shapes:
        row_centres = (
            torch.arange(height, dtype=torch.float32, device=device) + 0.5
        ) / height  # (H,)
        column_centres = (
            torch.arange(width, dtype=torch.float32, device=device) + 0.5
        ) / width  # (W,)
        grid_y, grid_x = torch.meshgrid(row_centres, column_centres, indexing="ij")  # (H, W) each
        points_per_level.append(
            torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), dim=-1)
        )  # (H*W, 2)
    reference_points = torch.cat(points_per_level, dim=0)  # (S, 2)
    # the same point is the reference on every level (no padding, valid ratios are 1)
    # (S, 2) -> (B, S, L, 2)
    return reference_points[None, :, None, :].expand(batch_size, -1, len(spatial_shapes), -1)


class MSDeformAttnTransformerEncoder(nn.Module):
    """Adds position and level embeddings, flattens the levels and runs the deformable encoder."""

    def __init__(self, config: M2FPConfig) -> None:
        super().__init__()
        num_levels = len(TRANSFORMER_IN_FEATURES)
        self.level_embed = nn.Parameter(torch.empty(num_levels, config.conv_dim))
        self.encoder = DeformableEncoder(
            config.encoder_layers,
            embed_dim=config.conv_dim,
            num_heads=config.encoder_heads,
            num_levels=num_levels,
            num_points=config.encoder_points,
            feedforward_dim=config.encoder_feedforward_dim,
        )
        nn.init.normal_(self.level_embed)

    def forward(
        self, sources: list[torch.Tensor], positions: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Encode per-level (B, C, H_l, W_l) features jointly, given their (B, H_l*W_l, C) position
        embeddings; returns the features in the same shapes and order."""
        spatial_shapes = [(source.shape[2], source.shape[3]) for source in sources]
        batch_size = sources[0].shape[0]
        # (B, C, H, W) -> (B, C, H*W) -> (B, H*W, C), concatenated over levels -> (B, S, C)
        flat_sources = torch.cat([source.flatten(2).transpose(1, 2) for source in sources], dim=1)
        flat_positions = torch.cat(
            [
                position + self.level_embed[level].view(1, 1, -1)
                for level, position in enumerate(positions)
            ],
            dim=1,
        )
        reference_points = encoder_reference_points(spatial_shapes, batch_size, flat_sources.device)
        memory = self.encoder(
            flat_sources, flat_positions, reference_points, spatial_shapes
        )  # (B, S, C)
        outputs = []
        for level_memory, (height, width) in zip(
            memory.split([height * width for height, width in spatial_shapes], dim=1),
            spatial_shapes,
            strict=True,
        ):
            # (B, H*W, C) -> (B, C, H*W) -> (B, C, H, W)
            outputs.append(level_memory.transpose(1, 2).reshape(batch_size, -1, height, width))
        return outputs


class MSDeformAttnPixelDecoder(nn.Module):
    """Turns res2..res5 into per-pixel `mask_features` (/4) and the multi-scale features [/32, /16, /8]."""

    def __init__(self, config: M2FPConfig, backbone_channels: dict[str, int]) -> None:
        super().__init__()
        conv_dim = config.conv_dim
        self.input_proj = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(backbone_channels[name], conv_dim, kernel_size=1),
                nn.GroupNorm(config.norm_groups, conv_dim),
            )
            for name in TRANSFORMER_IN_FEATURES
        )
        self.transformer = MSDeformAttnTransformerEncoder(config)
        self.position_embedding = PositionEmbeddingSine(conv_dim // 2)
        self.mask_features = nn.Conv2d(conv_dim, config.mask_dim, kernel_size=1)
        # one FPN level on res2 (log2(8) - log2(4) = 1); names are the checkpoint's
        self.adapter_1 = Conv2dNormActivation(
            backbone_channels["res2"], conv_dim, 1, norm=nn.GroupNorm(config.norm_groups, conv_dim)
        )
        self.layer_1 = Conv2dNormActivation(
            conv_dim,
            conv_dim,
            3,
            padding=1,
            norm=nn.GroupNorm(config.norm_groups, conv_dim),
            relu=True,
        )

    def forward(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Return `mask_features` (B, mask_dim, H/4, W/4) and [(B, C, H/32, W/32), /16, /8] features."""
        sources = []
        positions = []
        for projection, name in zip(self.input_proj, TRANSFORMER_IN_FEATURES, strict=True):
            conv, norm = cast(tuple[nn.Conv2d, nn.GroupNorm], tuple(projection.children()))
            feature = features[name].float()
            sources.append(norm(pointwise_conv_nchw(feature, conv.weight, conv.bias)))
            positions.append(self.position_embedding.tokens(feature))
        multi_scale_features = self.transformer(sources, positions)  # [/32, /16, /8]

        adapter = self.adapter_1  # 1x1 convolution and GroupNorm, no ReLU
        adapter_norm = cast(nn.GroupNorm, adapter.norm)
        lateral = adapter_norm(
            pointwise_conv_nchw(features["res2"].float(), adapter.weight, adapter.bias)
        )
        # The encoder's maps are channels-last views of its tokens; upsampled as they are, the /4
        # maps after them come out channels-last too, and every op at /4 (the GroupNorms, the
        # decoder's resizes) then copies 35 MB to NCHW. One 9 MB copy at /8 instead.
        upsampled = F.interpolate(
            multi_scale_features[-1].contiguous(),
            size=lateral.shape[-2:],
            mode="bilinear",
            align_corners=False,
        )
        # The sum in the layout `layer_1` reads (a CPU inference variant may want channels-last:
        # worker/m2fp/fusion.py); the values are the same either way.
        layout = getattr(self.layer_1, "input_memory_format", torch.contiguous_format)
        finest = torch.add(lateral, upsampled, out=torch.empty_like(lateral, memory_format=layout))
        finest = self.layer_1(finest)
        mask_features = pointwise_conv_nchw(
            finest, self.mask_features.weight, self.mask_features.bias
        )
        return mask_features, multi_scale_features

"""ResNet backbone with the DeepLab 3-conv stem and frozen batch norms (M2FP's "R-103" = ResNet-101)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from worker.m2fp.config import M2FPConfig


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine terms, all stored as buffers (no num_batches_tracked)."""

    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Normalise (B, C, H, W) features with the stored statistics."""
        return F.batch_norm(
            features,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            training=False,
            momentum=0.0,
            eps=self.eps,
        )

    def extra_repr(self) -> str:
        """Show the size and epsilon in the module repr."""
        return f"{self.num_features}, eps={self.eps}"


class Conv2dNormActivation(nn.Conv2d):
    """Conv2d followed by an optional `norm` submodule and an optional ReLU (keys `weight`, `norm.*`)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        bias: bool = False,
        norm: nn.Module | None = None,
        relu: bool = False,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias
        )
        self.norm = norm
        self.relu = relu

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Apply conv -> norm -> ReLU."""
        features = super().forward(features)
        if self.norm is not None:
            features = self.norm(features)
        if self.relu:
            features = F.relu(features)
        return features


class DeepLabStem(nn.Module):
    """Three 3x3 convs (the first with stride 2) and a stride-2 max pool: output stride 4."""

    def __init__(self, in_channels: int, out_channels: int, eps: float) -> None:
        super().__init__()
        half = out_channels // 2
        self.conv1 = Conv2dNormActivation(
            in_channels, half, 3, stride=2, padding=1, norm=FrozenBatchNorm2d(half, eps), relu=True
        )
        self.conv2 = Conv2dNormActivation(
            half, half, 3, padding=1, norm=FrozenBatchNorm2d(half, eps), relu=True
        )
        self.conv3 = Conv2dNormActivation(
            half, out_channels, 3, padding=1, norm=FrozenBatchNorm2d(out_channels, eps), relu=True
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Map (B, 3, H, W) images to (B, out_channels, H/4, W/4) features."""
        features = self.conv3(self.conv2(self.conv1(images)))
        return F.max_pool2d(features, kernel_size=3, stride=2, padding=1)


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 (carries the stride) -> 1x1 residual block; a projection shortcut when channels change."""

    def __init__(
        self, in_channels: int, bottleneck_channels: int, out_channels: int, stride: int, eps: float
    ) -> None:
        super().__init__()
        if in_channels != out_channels:
            self.shortcut: Conv2dNormActivation | None = Conv2dNormActivation(
                in_channels,
                out_channels,
                1,
                stride=stride,
                norm=FrozenBatchNorm2d(out_channels, eps),
            )
        else:
            if stride != 1:
                raise ValueError(f"an identity shortcut needs stride 1, but got stride {stride}")
            self.shortcut = None
        self.conv1 = Conv2dNormActivation(
            in_channels,
            bottleneck_channels,
            1,
            norm=FrozenBatchNorm2d(bottleneck_channels, eps),
            relu=True,
        )
        self.conv2 = Conv2dNormActivation(
            bottleneck_channels,
            bottleneck_channels,
            3,
            stride=stride,
            padding=1,
            norm=FrozenBatchNorm2d(bottleneck_channels, eps),
            relu=True,
        )
        self.conv3 = Conv2dNormActivation(
            bottleneck_channels, out_channels, 1, norm=FrozenBatchNorm2d(out_channels, eps)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Apply the residual block to (B, C_in, H, W) features."""
        residual = self.conv3(self.conv2(self.conv1(features)))
        shortcut = features if self.shortcut is None else self.shortcut(features)
        return F.relu(residual + shortcut)


class DeepLabResNet(nn.Module):
    """ResNet with a DeepLab stem returning {"res2": /4, "res3": /8, "res4": /16, "res5": /32} features."""

    stage_names = ("res2", "res3", "res4", "res5")

    def __init__(self, config: M2FPConfig) -> None:
        super().__init__()
        eps = config.backbone_norm_eps
        self.stem = DeepLabStem(3, config.stem_out_channels, eps)
        in_channels = config.stem_out_channels
        out_channels = config.res2_out_channels
        bottleneck_channels = config.bottleneck_channels
        self.out_channels: dict[str, int] = {}
        for stage_index, (stage_name, num_blocks) in enumerate(
            zip(self.stage_names, config.backbone_stage_blocks, strict=True)
        ):
            first_stride = 1 if stage_index == 0 else 2
            blocks = []
            for block_index in range(num_blocks):
                blocks.append(
                    BottleneckBlock(
                        in_channels,
                        bottleneck_channels,
                        out_channels,
                        stride=first_stride if block_index == 0 else 1,
                        eps=eps,
                    )
                )
                in_channels = out_channels
            self.add_module(stage_name, nn.Sequential(*blocks))
            self.out_channels[stage_name] = out_channels
            out_channels *= 2
            bottleneck_channels *= 2

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Map (B, 3, H, W) images (H, W multiples of 32) to the res2..res5 feature maps."""
        features = self.stem(images)
        outputs: dict[str, torch.Tensor] = {}
        for stage_name in self.stage_names:
            features = getattr(self, stage_name)(features)
            outputs[stage_name] = features
        return outputs

"""The M2FP network: DeepLab ResNet backbone -> MSDeformAttn pixel decoder -> masked-attention decoder."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import nn

from worker.m2fp.backbone import DeepLabResNet
from worker.m2fp.config import CIHP, M2FPConfig
from worker.m2fp.pixel_decoder import MSDeformAttnPixelDecoder
from worker.m2fp.transformer_decoder import MultiScaleMaskedTransformerDecoder

PIXEL_MEAN: tuple[float, float, float] = CIHP.pixel_mean  # RGB, 0..255 scale
PIXEL_STD: tuple[float, float, float] = CIHP.pixel_std


@dataclass
class M2FPOutput:
    """Network outputs; also readable as a mapping (`output["pred_logits"]`).

    Attributes:
        pred_logits: `(B, Q, C+1)` class logits of the final prediction; the last class is "no object".
        pred_masks: `(B, Q, Hp/4, Wp/4)` mask logits of the final prediction (Hp, Wp: padded input size).
        aux_pred_logits: the earlier predictions' class logits (one on the initial queries, then one after
            every decoder layer but the last), only with `return_intermediates=True`.
        aux_pred_masks: their mask logits, same condition.
        backbone_features: {"res2": (B, 256, Hp/4, Wp/4), ..., "res5": (B, 2048, Hp/32, Wp/32)}.
        mask_features: `(B, mask_dim, Hp/4, Wp/4)` per-pixel embeddings of the pixel decoder.
        multi_scale_features: pixel decoder outputs [(B, C, Hp/32, Wp/32), /16, /8] fed to the decoder.
    """

    pred_logits: torch.Tensor
    pred_masks: torch.Tensor
    aux_pred_logits: list[torch.Tensor] | None = None
    aux_pred_masks: list[torch.Tensor] | None = None
    backbone_features: dict[str, torch.Tensor] | None = None
    mask_features: torch.Tensor | None = None
    multi_scale_features: list[torch.Tensor] | None = None

    def __getitem__(self, name: str) -> object:
        """Dict-style access to a field."""
        if name not in self.keys():
            raise KeyError(name)
        return getattr(self, name)

    def keys(self) -> list[str]:
        """Names of the fields that are set."""
        return [field.name for field in fields(self) if getattr(self, field.name) is not None]


def checked_image_list(images: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The `(3, H, W)` images of a batch tensor or a sequence, each checked (ValueError)."""
    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4:
            raise ValueError(
                f"images must be (B, 3, H, W) or (3, H, W), but got shape {tuple(images.shape)}"
            )
        image_list = list(images.unbind(0))
    else:
        image_list = list(images)
    if not image_list:
        raise ValueError("images is empty")
    for image in image_list:
        if image.dim() != 3 or image.shape[0] != 3 or image.shape[1] < 1 or image.shape[2] < 1:
            raise ValueError(
                f"every image must be (3, H, W) with H, W >= 1, but got shape {tuple(image.shape)}"
            )
        if image.is_complex() or image.dtype == torch.bool:
            raise ValueError(f"images must be uint8 or float, but got dtype {image.dtype}")
    return image_list


def normalize_and_pad(
    images: torch.Tensor | Sequence[torch.Tensor],
    pixel_mean: Sequence[float] | torch.Tensor = PIXEL_MEAN,
    pixel_std: Sequence[float] | torch.Tensor = PIXEL_STD,
    size_divisibility: int = 32,
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Normalise RGB 0..255 images with mean/std, then zero-pad them right/bottom to a multiple of 32.

    Args:
        images: a `(B, 3, H, W)` or `(3, H, W)` tensor, or a sequence of `(3, H_i, W_i)` tensors; uint8 or
            float, RGB channel order, 0..255 scale.
        pixel_mean: 3 RGB means (0..255 scale).
        pixel_std: 3 RGB standard deviations.
        size_divisibility: the padded height and width are multiples of this.

    Returns:
        The float32 `(B, 3, Hp, Wp)` batch (padding is 0 after normalisation) and each image's unpadded (H, W).
    """
    if size_divisibility < 1:
        raise ValueError(f"size_divisibility must be >= 1, but got {size_divisibility}")
    image_list = checked_image_list(images)
    device = image_list[0].device
    mean = torch.as_tensor(pixel_mean, dtype=torch.float32, device=device).view(3, 1, 1)
    std = torch.as_tensor(pixel_std, dtype=torch.float32, device=device).view(3, 1, 1)
    image_sizes = [(int(image.shape[1]), int(image.shape[2])) for image in image_list]
    padded_height = (
        math.ceil(max(height for height, _ in image_sizes) / size_divisibility) * size_divisibility
    )
    padded_width = (
        math.ceil(max(width for _, width in image_sizes) / size_divisibility) * size_divisibility
    )
    padded = torch.zeros(
        (len(image_list), 3, padded_height, padded_width), dtype=torch.float32, device=device
    )
    for index, image in enumerate(image_list):
        height, width = image_sizes[index]
        padded[index, :, :height, :width] = (
            image.to(device=device, dtype=torch.float32) - mean
        ) / std
    return padded, image_sizes


class M2FPHead(nn.Module):
    """The segmentation head: pixel decoder and transformer decoder (`predictor`)."""

    def __init__(self, config: M2FPConfig, backbone_channels: dict[str, int]) -> None:
        super().__init__()
        self.pixel_decoder = MSDeformAttnPixelDecoder(config, backbone_channels)
        self.predictor = MultiScaleMaskedTransformerDecoder(config)


class M2FP(nn.Module):
    """Mask2Former for Parsing: per-query class logits and mask logits for a normalised, padded batch.

    The state_dict keys equal those of the official ModelScope checkpoints (without `num_batches_tracked`:
    the backbone uses frozen batch norms whose affine terms and statistics are buffers).
    """

    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor

    def __init__(self, config: M2FPConfig = CIHP) -> None:
        super().__init__()
        self.config = config
        self.backbone = DeepLabResNet(config)
        self.sem_seg_head = M2FPHead(config, self.backbone.out_channels)
        self.register_buffer(
            "pixel_mean",
            torch.tensor(config.pixel_mean, dtype=torch.float32).view(3, 1, 1),
            persistent=False,
        )
        self.register_buffer(
            "pixel_std",
            torch.tensor(config.pixel_std, dtype=torch.float32).view(3, 1, 1),
            persistent=False,
        )

    def normalize_and_pad(
        self, images: torch.Tensor | Sequence[torch.Tensor], size_divisibility: int | None = None
    ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Normalise RGB 0..255 images and zero-pad them, on the model's device (see `normalize_and_pad`)."""
        device = self.pixel_mean.device
        if isinstance(images, torch.Tensor):
            images = images.to(device)
        else:
            images = [image.to(device) for image in images]
        divisibility = (
            self.config.size_divisibility if size_divisibility is None else size_divisibility
        )
        return normalize_and_pad(images, self.pixel_mean, self.pixel_std, divisibility)

    def forward(self, images: torch.Tensor, return_intermediates: bool = False) -> M2FPOutput:
        """Predict class and mask logits.

        Args:
            images: `(B, 3, Hp, Wp)` float32 batch from `normalize_and_pad` (Hp, Wp multiples of 32).
            return_intermediates: also return the backbone and pixel decoder features and the earlier
                decoder predictions.

        Returns:
            An `M2FPOutput` with `pred_logits` (B, Q, C+1) and `pred_masks` (B, Q, Hp/4, Wp/4).
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, Hp, Wp), but got shape {tuple(images.shape)}")
        if images.shape[2] % 32 != 0 or images.shape[3] % 32 != 0:
            raise ValueError(
                f"image height and width must be multiples of 32 (use normalize_and_pad), "
                f"but got {tuple(images.shape[2:])}"
            )
        if not images.is_floating_point():
            raise ValueError(
                f"images must be a normalised float tensor, but got dtype {images.dtype}"
            )
        backbone_features = self.backbone(images)
        mask_features, multi_scale_features = self.sem_seg_head.pixel_decoder(backbone_features)
        # Without intermediates, the decoder skips the earlier predictions' full-size masks.
        all_class_logits, all_mask_logits = self.sem_seg_head.predictor(
            multi_scale_features, mask_features, all_masks=return_intermediates
        )
        masks = [mask for mask in all_mask_logits if mask is not None]
        output = M2FPOutput(pred_logits=all_class_logits[-1], pred_masks=masks[-1])
        if return_intermediates:
            output.aux_pred_logits = all_class_logits[:-1]
            output.aux_pred_masks = masks[:-1]
            output.backbone_features = backbone_features
            output.mask_features = mask_features
            output.multi_scale_features = multi_scale_features
        return output


def count_trainable_parameters(model: nn.Module) -> int:
    """Number of parameter elements (frozen batch-norm buffers are not parameters)."""
    return sum(parameter.numel() for parameter in model.parameters())

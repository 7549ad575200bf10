"""Hyperparameters of the M2FP (Mask2Former for Parsing) network and its two official variants."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from shared.constants import CIHP_CLASSES, LIP_CLASSES

# Class lists (SPEC §5) are shared with the gateway: shared.constants is the one copy.
CIHP_CLASS_NAMES: tuple[str, ...] = CIHP_CLASSES + ("Human",)  # 20 = Human: instances only
LIP_CLASS_NAMES: tuple[str, ...] = LIP_CLASSES


@dataclass(frozen=True)
class M2FPConfig:
    """Every hyperparameter of an M2FP network (ResNet-101 DeepLab backbone, MSDeformAttn pixel decoder,
    masked-attention transformer decoder), plus the pre/postprocessing constants of the ModelScope pipeline.

    The structure is fixed: the backbone has four stages res2..res5 (strides 4, 8, 16, 32); the pixel
    decoder runs its deformable encoder on the 3 coarsest levels (res5, res4, res3) and adds one FPN level
    on res2; the transformer decoder cycles over those 3 levels. The defaults are the official CIHP model.

    Attributes:
        name: variant name ("cihp", "lip", "tiny").
        backbone_stage_blocks: bottleneck blocks per stage res2..res5; (3, 4, 23, 3) is ResNet-101.
        stem_out_channels: channels after the DeepLab 3-conv stem (its first two convs use half of this).
        res2_out_channels: output channels of res2; every later stage doubles them (res5 = 8x).
        bottleneck_channels: inner (3x3) width of the res2 blocks; doubles every stage like the output.
        backbone_norm_eps: epsilon of the backbone's frozen batch norms.
        conv_dim: channel width of the pixel decoder (input projections, deformable encoder, FPN level).
        mask_dim: channels of the per-pixel `mask_features` and of the query mask embeddings.
        norm_groups: GroupNorm groups in the pixel decoder; conv_dim must be divisible by it.
        encoder_layers: deformable transformer encoder layers in the pixel decoder.
        encoder_heads: attention heads of the multi-scale deformable attention.
        encoder_feedforward_dim: hidden width of each encoder layer's FFN (hard-coded 1024 in M2FP).
        encoder_points: sampling points per head and level of the deformable attention.
        hidden_dim: query width of the transformer decoder; must equal conv_dim (its input projections are
            identities, as in the checkpoint, which has no keys for them).
        decoder_layers: masked-attention decoder layers (9: the M2FP yaml's DEC_LAYERS 10 minus the
            initial prediction on the raw queries).
        decoder_heads: attention heads of the decoder's cross- and self-attention.
        decoder_feedforward_dim: hidden width of each decoder layer's FFN.
        num_queries: learned object queries.
        num_classes: classifier classes without the extra "no object" logit (21 CIHP: background,
            19 parts, Human; 20 LIP: background, 19 parts).
        num_parsing: number of parsing (semantic) classes: background + 19 parts = 20 for both variants;
            in the multi-human model, class id `num_parsing` is "Human".
        single_human: True for the LIP single-person model (semantic readout, centre-padded input),
            False for the CIHP multi-person model (instance parsing readout, shortest-edge resize).
        class_names: one name per classifier class (index = class id).
        pixel_mean: RGB mean subtracted from 0..255 input pixels.
        pixel_std: RGB standard deviation the input pixels are divided by.
        size_divisibility: the normalised batch is zero-padded right/bottom to multiples of this.
        min_size_test: multi-human preprocessing: shortest image side after resizing.
        max_size_test: multi-human preprocessing: longest side cap after resizing.
        single_human_input_size: single-human preprocessing: (width, height) the image is fitted and
            centre-padded (with value 128) to.
        parsing_instance_score_threshold: multi-human semantic pasting keeps instances at or above this score.
        test_topk_per_image: multi-human readout keeps this many (query, class) pairs.
    """

    name: str = "cihp"
    # Backbone (DeepLab-stem ResNet, stride on the 3x3 conv, dilation 1 everywhere).
    backbone_stage_blocks: tuple[int, int, int, int] = (3, 4, 23, 3)
    stem_out_channels: int = 128
    res2_out_channels: int = 256
    bottleneck_channels: int = 64
    backbone_norm_eps: float = 1e-5
    # Pixel decoder (MSDeformAttn encoder on res5/res4/res3 + one FPN level on res2).
    conv_dim: int = 256
    mask_dim: int = 256
    norm_groups: int = 32
    encoder_layers: int = 6
    encoder_heads: int = 8
    encoder_feedforward_dim: int = 1024
    encoder_points: int = 4
    # Transformer decoder (masked attention, post-norm, no dropout at inference).
    hidden_dim: int = 256
    decoder_layers: int = 9
    decoder_heads: int = 8
    decoder_feedforward_dim: int = 2048
    num_queries: int = 100
    # Classes.
    num_classes: int = (
        21  # background + 19 parts + Human; the classifier adds one "no object" logit
    )
    num_parsing: int = 20  # background + 19 parts
    single_human: bool = False
    class_names: tuple[str, ...] = CIHP_CLASS_NAMES
    # Input normalisation (RGB order, 0..255 scale) and padding.
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    size_divisibility: int = 32
    # Pipeline pre/postprocessing constants (used by the Predictor, not by the network).
    min_size_test: int = 640
    max_size_test: int = 1333
    single_human_input_size: tuple[int, int] = (384, 512)  # (width, height)
    parsing_instance_score_threshold: float = 0.3
    test_topk_per_image: int = 100

    def __post_init__(self) -> None:
        """Reject inconsistent hyperparameters with the offending values."""
        self._check_widths()
        self._check_classes_and_input()

    def _check_widths(self) -> None:
        """The backbone stages and the channel widths fit together."""
        if len(self.backbone_stage_blocks) != 4 or min(self.backbone_stage_blocks) < 1:
            raise ValueError(
                f"backbone_stage_blocks must be 4 positive counts (res2..res5), but got {self.backbone_stage_blocks}"
            )
        if self.stem_out_channels % 2 != 0:
            raise ValueError(f"stem_out_channels must be even, but got {self.stem_out_channels}")
        if self.conv_dim % self.norm_groups != 0:
            raise ValueError(
                f"conv_dim must be divisible by norm_groups, but got {self.conv_dim} and {self.norm_groups}"
            )
        if self.conv_dim % self.encoder_heads != 0:
            raise ValueError(
                f"conv_dim must be divisible by encoder_heads, but got {self.conv_dim} and {self.encoder_heads}"
            )
        if self.hidden_dim != self.conv_dim:
            raise ValueError(
                f"hidden_dim must equal conv_dim (identity decoder input projections), "
                f"but got {self.hidden_dim} and {self.conv_dim}"
            )
        if self.hidden_dim % self.decoder_heads != 0:
            raise ValueError(
                f"hidden_dim must be divisible by decoder_heads, but got {self.hidden_dim} and {self.decoder_heads}"
            )

    def _check_classes_and_input(self) -> None:
        """Class lists, pixel statistics, padding and layer counts are consistent."""
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"class_names must have num_classes={self.num_classes} entries, but got {len(self.class_names)}"
            )
        if not self.single_human and self.num_classes != self.num_parsing + 1:
            raise ValueError(
                f"a multi-human model needs num_classes == num_parsing + 1 (the Human class), "
                f"but got num_classes={self.num_classes} and num_parsing={self.num_parsing}"
            )
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3 or min(self.pixel_std) <= 0:
            raise ValueError(
                f"pixel_mean/pixel_std must be 3 values with std > 0, but got {self.pixel_mean} and {self.pixel_std}"
            )
        if self.size_divisibility < 32 or self.size_divisibility % 32 != 0:
            raise ValueError(
                f"size_divisibility must be a positive multiple of 32, but got {self.size_divisibility}"
            )
        for field_name in (
            "encoder_layers",
            "decoder_layers",
            "num_queries",
            "encoder_points",
            "mask_dim",
        ):
            if getattr(self, field_name) < 1:
                raise ValueError(f"{field_name} must be >= 1, but got {getattr(self, field_name)}")

    @property
    def backbone_depth(self) -> int:
        """Nominal ResNet depth: 3 convs per bottleneck block plus the stem and the classifier (101)."""
        return 3 * sum(self.backbone_stage_blocks) + 2

    @property
    def human_class_id(self) -> int | None:
        """Class id of "Human" in the multi-human model, None for the single-human model."""
        return None if self.single_human else self.num_parsing

    def replace(self, **changes: Any) -> M2FPConfig:
        """Return a copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


CIHP = M2FPConfig()

LIP = M2FPConfig(
    name="lip",
    num_classes=20,  # background + 19 parts, no Human class
    num_parsing=20,
    single_human=True,
    class_names=LIP_CLASS_NAMES,
)

# Same structure as CIHP (multi-human, 21 classes) with tiny widths and depths, for fast CPU tests.
TINY = M2FPConfig(
    name="tiny",
    backbone_stage_blocks=(1, 1, 1, 1),
    stem_out_channels=32,
    res2_out_channels=64,
    bottleneck_channels=16,
    conv_dim=64,
    mask_dim=64,
    encoder_layers=2,
    encoder_heads=8,
    encoder_feedforward_dim=128,
    hidden_dim=64,
    decoder_layers=3,
    decoder_heads=8,
    decoder_feedforward_dim=128,
    num_queries=10,
)

_PRESETS: dict[str, M2FPConfig] = {"cihp": CIHP, "lip": LIP, "tiny": TINY}


def get_config(name: str) -> M2FPConfig:
    """Return the preset config called `name` ("cihp", "lip" or "tiny", case-insensitive)."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in _PRESETS:
        raise ValueError(f"unknown M2FP variant {name!r}; expected one of {sorted(_PRESETS)}")
    return _PRESETS[key]

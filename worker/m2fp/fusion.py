"""Inference-time fusion of the ResNet backbone for CPUs: one oneDNN call per convolution.

Owns `FusedBackbone`, a drop-in replacement for `backbone.DeepLabResNet` at inference on CPU, built
from the loaded model (the checkpoint's modules stay as they are):

- every frozen batch norm is folded into its convolution (weight x scale, bias shifted);
- each convolution runs as `mkldnn._convolution_pointwise` with its ReLU as a oneDNN post-op, and a
  bottleneck's last convolution adds the shortcut and applies the ReLU in the same call (the
  `.binary` post-op): no separate batch-norm, ReLU or add passes over the feature maps;
- features are channels-last (NHWC in memory), the layout oneDNN's AVX2/AVX-512 convolutions use
  natively, so no reorder happens between layers;
- given a `winograd.Plan` (the CPU's: `winograd.plan_for`), the 3x3 stride-1 convolutions it
  names (per stage, wide enough to pay: `Plan.applies`) run as `winograd.WinogradConv` with the
  tile the plan gives their stage.

`with_winograd_fpn` gives the pixel decoder's 3x3 output convolution at stride 4 (`layer_1`, 41
GFLOP at 640x864, the largest single convolution of the network) the same route.

`with_amx` (bf16x3, the precision `auto` runs on an AMX CPU) packs the products' weights for
`worker.m2fp.amx` once the model is built: the 1x1 and direct 3x3 convolutions, the F(2x2)
Winograd products and the linears then run as three bf16 AMX products each.

The outputs are the same res2..res5 maps (channels-last in memory) up to float32 rounding of the
folded weights and of the NHWC kernels' summation order: about 1e-6 relative per layer, within the
golden tolerances (tests/model/test_m2fp_fusion.py, and the golden pipeline suite, which runs the
Predictor and so this backbone).
Forward-only, float32, CPU; the Predictor uses it where `available()` (oneDNN built in) and the
precision is fp32, bf16x3, int8 or bf16 (which on the CPU is oneDNN's bf16 math mode around these
same ops: worker.m2fp.precision).
"""

from __future__ import annotations

import copy
from typing import TypeVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from worker.m2fp import amx, dense, winograd
from worker.m2fp.backbone import (
    BottleneckBlock,
    Conv2dNormActivation,
    DeepLabResNet,
    FrozenBatchNorm2d,
)
from worker.m2fp.pixel_decoder import DeformableEncoderLayer

PIXEL_DECODER_PATH = "sem_seg_head.pixel_decoder"
ENCODER_PATH = f"{PIXEL_DECODER_PATH}.transformer.encoder"

ModelT = TypeVar("ModelT", bound=nn.Module)


def available() -> bool:
    """Whether this torch has the oneDNN (mkldnn) CPU convolution with post-ops."""
    return dense.convolution_available()


def folded_weights(conv: Conv2dNormActivation) -> tuple[torch.Tensor, torch.Tensor]:
    """The (weight, bias) of `conv` with its frozen batch norm folded in (channels-last weight)."""
    weight = conv.weight.detach().float()
    bias = (
        conv.bias.detach().float()
        if conv.bias is not None
        else torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
    )
    norm = conv.norm
    if isinstance(norm, FrozenBatchNorm2d):
        scale = norm.weight.float() / torch.sqrt(norm.running_var.float() + norm.eps)
        weight = weight * scale[:, None, None, None]
        bias = (bias - norm.running_mean.float()) * scale + norm.bias.float()
    elif norm is not None:
        raise TypeError(f"cannot fold a {type(norm).__name__} into its convolution")
    return weight.contiguous(memory_format=torch.channels_last), bias.contiguous()


class FusedConv(nn.Module):
    """One folded convolution with its ReLU (and optionally a residual add) as oneDNN post-ops."""

    weight: torch.Tensor
    bias: torch.Tensor

    def __init__(self, conv: Conv2dNormActivation) -> None:
        super().__init__()
        weight, bias = folded_weights(conv)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.padding = list(conv.padding)
        self.stride = list(conv.stride)
        self.dilation = list(conv.dilation)
        self.groups = conv.groups
        self.relu = bool(conv.relu)
        self.kernel_size = tuple(weight.shape[2:])
        self.in_channels = int(weight.shape[1])
        self.packed: amx.PackedWeight | None = None  # `pack_for_amx`

    def pointwise(self) -> bool:
        """Whether this is a 1x1 convolution without padding or groups (an AMX product)."""
        return (
            self.kernel_size == (1, 1)
            and self.padding == [0, 0]
            and self.groups == 1
            and self.stride[0] == self.stride[1]
        )

    def three_by_three(self) -> bool:
        """Whether this is a 3x3, padding 1, stride 1 or 2 convolution over channels a multiple
        of 32, without groups or dilation (`amx.conv3x3`)."""
        return (
            self.kernel_size == (3, 3)
            and self.padding == [1, 1]
            and self.groups == 1
            and self.dilation == [1, 1]
            and self.stride[0] == self.stride[1] in (1, 2)
            and self.in_channels % 32 == 0
        )

    def pack_for_amx(self) -> None:
        """Hold the weight as AMX tiles only (1x1 or 3x3: `pointwise`, `three_by_three`)."""
        weight = self.weight
        self.packed = amx.PackedWeight(weight) if self.pointwise() else amx.conv3x3_weight(weight)
        self.weight = torch.empty(0)  # the tiles are the same bytes again: not held twice

    def forward(self, features: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """conv(features) [+ residual] [-> ReLU] in one call; `residual` implies the ReLU after the add."""
        if self.packed is not None:
            amx.require(features, "convolution")
            relu = self.relu or residual is not None
            if self.three_by_three():
                if residual is not None:  # a bottleneck adds its shortcut in the last, 1x1 one
                    raise NotImplementedError("a bf16x3 3x3 convolution takes no residual")
                return amx.conv3x3(features, self.packed, self.bias, relu, self.stride[0])
            return amx.pointwise_conv(
                features, self.packed, self.bias, relu, self.stride[0], residual
            )
        geometry = (self.padding, self.stride, self.dilation, self.groups)
        if residual is None:
            unary = "relu" if self.relu else "none"
            return torch.ops.mkldnn._convolution_pointwise(
                features, self.weight, self.bias, *geometry, unary, [], ""
            )
        return torch.ops.mkldnn._convolution_pointwise.binary(
            features, residual, self.weight, self.bias, *geometry, "add", None, "relu", [], ""
        )


def fused_conv(
    conv: Conv2dNormActivation, plan: winograd.Plan | None = None, stage: str = ""
) -> nn.Module:
    """The folded convolution as a `WinogradConv` where `plan` gives `stage` a tile and applies
    to `conv`, else a `FusedConv` (for convolutions that take no residual)."""
    tile = plan.tile_for(conv, stage) if plan is not None else None
    if tile is not None:
        weight, bias = folded_weights(conv)
        return winograd.WinogradConv(weight, bias, bool(conv.relu), tile)
    return FusedConv(conv)


class FusedBottleneck(nn.Module):
    """`BottleneckBlock` as three (or four, with a projection) fused convolutions."""

    def __init__(
        self, block: BottleneckBlock, plan: winograd.Plan | None = None, stage: str = ""
    ) -> None:
        super().__init__()
        self.conv1, self.conv2 = FusedConv(block.conv1), fused_conv(block.conv2, plan, stage)
        self.conv3 = FusedConv(block.conv3)
        self.shortcut = None if block.shortcut is None else FusedConv(block.shortcut)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """relu(conv3(conv2(conv1(x))) + shortcut(x)), the add and ReLU inside conv3's call."""
        shortcut = features if self.shortcut is None else self.shortcut(features)
        return self.conv3(self.conv2(self.conv1(features)), residual=shortcut)


class FusedBackbone(nn.Module):
    """`DeepLabResNet` with folded, fused, channels-last convolutions (same outputs, same keys out)."""

    def __init__(self, backbone: DeepLabResNet, plan: winograd.Plan | None = None) -> None:
        super().__init__()
        stem = backbone.stem
        self.stem = nn.ModuleList(
            [fused_conv(conv, plan, "stem") for conv in (stem.conv1, stem.conv2, stem.conv3)]
        )
        self.stage_names = backbone.stage_names
        self.out_channels = dict(backbone.out_channels)
        for name in self.stage_names:
            blocks = [FusedBottleneck(block, plan, name) for block in getattr(backbone, name)]
            self.add_module(name, nn.Sequential(*blocks))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Map (B, 3, H, W) images to the res2..res5 maps, as `DeepLabResNet.forward`."""
        features = images.contiguous(memory_format=torch.channels_last)
        for conv in self.stem:
            features = conv(features)
        features = F.max_pool2d(features, kernel_size=3, stride=2, padding=1)
        outputs: dict[str, torch.Tensor] = {}
        for name in self.stage_names:
            features = getattr(self, name)(features)
            # Channels-last out: the pixel decoder's first op on each map is a 1x1 convolution,
            # which takes NHWC as it is; its 256 output channels become NCHW before the GroupNorm
            # (on NHWC it sums in another order, which moved the golden LIP logits 2.3e-3, past
            # their 2e-3 tolerance). Copying res3-res5 (512-2048 channels) to NCHW here cost more.
            outputs[name] = features
        return outputs


def backbone_path(model: nn.Module, device: str, precision: str, fuse: bool | None = None) -> str:
    """`fused` or `as built: <why>` for `model` on `device`; `fuse` None: where it applies.

    Every precision fuses on the CPU now (bf16 is oneDNN's math mode around these same ops); the
    `precision` argument stays for bench/revision_bench.py, which calls older revisions too.

    Raises ValueError when `fuse` is True where the fused backbone cannot run.
    """
    if not device.startswith("cpu"):
        why = f"as built: the fused backbone is CPU-only (device {device})"
    elif not available():
        why = "as built: this torch has no oneDNN convolution with post-ops"
    elif not isinstance(getattr(model, "backbone", None), DeepLabResNet):
        why = "as built: the backbone is not a DeepLabResNet"
    elif fuse is False:
        why = "as built: fusion switched off"
    else:
        return "fused"
    if fuse:
        raise ValueError(f"cannot fuse the backbone: {why.removeprefix('as built: ')}")
    return why


def with_fused_backbone(model: ModelT, plan: winograd.Plan | None = None) -> ModelT:
    """A shallow copy of `model` whose `backbone` is a FusedBackbone (with Winograd where `plan`
    says); `model` itself is unchanged.

    The copy shares every other submodule (and so their weights) with `model`.
    """
    backbone = model.get_submodule("backbone")
    if not isinstance(backbone, DeepLabResNet):
        raise TypeError(f"expected a DeepLabResNet backbone, but got {type(backbone).__name__}")
    return _with_submodule(model, "backbone", FusedBackbone(backbone, plan))


NCHW_BLOCK_PIXELS = 512  # pixels per block of `channels_first`'s transposition


def channels_first(features: torch.Tensor) -> torch.Tensor:
    """`features.contiguous()` (NCHW in memory) of a (B, C, H, W) map, the same values; a
    channels-last one is transposed `NCHW_BLOCK_PIXELS` pixels at a time, so that a block's rows
    and columns stay in cache. The FPN's (1, 256, 160, 216) map, alone in a loop on run J's Intel
    Xeon (2 threads): 18-19 ms against 33-35 ms for PyTorch's copy (docs/BENCHMARKS.md, run J)."""
    if features.is_contiguous() or not features.is_contiguous(memory_format=torch.channels_last):
        return features.contiguous()
    batch, channels, height, width = features.shape
    pixels = features.permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # a view
    out = features.new_empty((batch, channels, height * width))
    for start in range(0, height * width, NCHW_BLOCK_PIXELS):
        block = slice(start, start + NCHW_BLOCK_PIXELS)
        out[:, :, block] = pixels[:, block].transpose(1, 2)
    return out.view(batch, channels, height, width)


class WinogradNormConv(nn.Module):
    """The pixel decoder's `layer_1` (3x3 convolution, GroupNorm, ReLU) with its convolution as
    a `WinogradConv`; the GroupNorm and ReLU are the layer's own, on the NCHW map as before (the
    GroupNorm's summation order on channels-last moves the golden logits, see FusedBackbone).

    `input_memory_format` tells the pixel decoder to write the sum it feeds this layer as
    channels-last (the layout the Winograd transforms read) in the add itself: one pass over the
    35 MB map at 640x864 instead of an add and then a copy (16 vs 34 ms alone in a loop). With
    `channels_first` on the way out, the whole forward on run J's Xeon: 0.990x against a44957a
    (median of 11 interleaved rounds), outputs bit for bit the same."""

    input_memory_format = torch.channels_last

    def __init__(self, layer: Conv2dNormActivation, tile: int) -> None:
        super().__init__()
        bias = layer.bias if layer.bias is not None else torch.zeros(layer.out_channels)
        self.conv = winograd.WinogradConv(layer.weight, bias, relu=False, tile=tile)
        self.norm, self.relu = layer.norm, bool(layer.relu)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """conv -> norm -> ReLU, NCHW out (from NCHW or channels-last in)."""
        out = channels_first(self.conv(features))
        if self.norm is not None:
            out = self.norm(out)
        return F.relu(out) if self.relu else out


def with_winograd_fpn(model: ModelT, plan: winograd.Plan) -> ModelT:
    """A shallow copy of `model` whose pixel decoder's `layer_1` is a `WinogradNormConv` of the
    plan's tile where the plan applies to it; `model` itself is unchanged and shares every other
    submodule."""
    path = f"{PIXEL_DECODER_PATH}.layer_1"
    layer = model.get_submodule(path)
    if not isinstance(layer, Conv2dNormActivation):
        return model
    tile = plan.tile_for(layer, winograd.FPN_STAGE)
    return model if tile is None else _with_submodule(model, path, WinogradNormConv(layer, tile))


class FusedEncoderLayer(DeformableEncoderLayer):
    """`DeformableEncoderLayer` with its FFN as two oneDNN linears, the ReLU a post-op of the first.

    MKL's `addmm` (what `nn.Linear` runs) first copies the bias into every output row, 46 MB for
    the (11340, 1024) hidden activations at 640x864, and the ReLU is another pass; oneDNN adds the
    bias and applies the ReLU as it writes. Measured on the FFN's shapes, interleaved, malloc tuned:
    83.6 vs 94.5 ms (minima), 93.3 vs 138.0 ms (medians) per layer; outputs within 1e-5. The
    layer's own modules are shared (same state_dict keys), only `feedforward` differs.
    """

    def __init__(self, layer: DeformableEncoderLayer) -> None:
        nn.Module.__init__(self)  # not the layer's __init__: it would build new weights
        self.self_attn, self.norm1, self.norm2 = layer.self_attn, layer.norm1, layer.norm2
        self.linear1, self.linear2 = layer.linear1, layer.linear2

    def feedforward(self, source: torch.Tensor) -> torch.Tensor:
        """linear2(relu(linear1(source))), the ReLU a post-op of the first (`dense.linear`)."""
        return apply_linear(self.linear2, apply_linear(self.linear1, source, "relu"))


def with_fused_encoder(model: ModelT) -> ModelT:
    """A shallow copy of `model` whose deformable encoder layers are `FusedEncoderLayer`s (fp32,
    CPU); `model` itself is unchanged and shares every other submodule."""
    encoder = model.get_submodule(ENCODER_PATH)
    fused_encoder = copy.copy(encoder)
    fused_encoder._modules = dict(encoder._modules)
    fused_encoder._modules["layers"] = nn.ModuleList(
        FusedEncoderLayer(cast(DeformableEncoderLayer, layer))
        for layer in encoder.get_submodule("layers").children()
    )
    return _with_submodule(model, ENCODER_PATH, fused_encoder)


class OneDNNLinear(nn.Linear):
    """An `nn.Linear` (the same weight and bias objects, the same state_dict keys) that runs
    through `dense.linear`: oneDNN on the CPU in float32 inference, `F.linear` otherwise."""

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)  # not nn.Linear's __init__: it would build new weights
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self.packed: amx.PackedWeight | None = None  # `pack_for_amx`

    def forward(self, features: torch.Tensor, post: str = "none") -> torch.Tensor:
        """features @ weight.T + bias, then ReLU when `post` is "relu"."""
        if self.packed is not None:
            amx.require(features, "linear")
            return amx.linear(features, self.packed, self.bias, relu=post == "relu")
        return dense.linear(features, self.weight, self.bias, post)

    def pack_for_amx(self) -> None:
        """Hold the weight as AMX tiles only (`amx.PackedWeight`, the same bytes as the float32
        weight): the module's own reference to the float32 weight is dropped, so that the
        weights are not held twice once the checkpoint's modules are gone (a worker keeps only
        the Predictor's model)."""
        self.packed = amx.PackedWeight(self.weight)
        self.weight = nn.Parameter(torch.empty(0), requires_grad=False)


def apply_linear(module: nn.Module, features: torch.Tensor, post: str = "none") -> torch.Tensor:
    """`module` (an nn.Linear) applied to `features`, its ReLU (`post` "relu") fused where it can."""
    if isinstance(module, OneDNNLinear):
        return module(features, post)
    linear = cast(nn.Linear, module)
    return dense.linear(features, linear.weight, linear.bias, post)


def with_onednn_linears(model: ModelT) -> ModelT:
    """A copy of `model`'s module tree with every `nn.Linear` an `OneDNNLinear`; every module is
    a shallow copy (parameters and buffers shared), `model` itself is unchanged."""
    if isinstance(model, nn.Linear) and not isinstance(model, OneDNNLinear):
        return cast(ModelT, OneDNNLinear(model))
    copied = copy.copy(model)
    copied._modules = {
        name: None if child is None else with_onednn_linears(child)
        for name, child in model._modules.items()
    }
    return copied


def with_amx(model: nn.Module) -> tuple[dict, str]:
    """Pack the weights of `model`'s products for AMX (`worker.m2fp.amx`): the fused backbone's
    1x1, direct 3x3 and F(2x2) Winograd convolutions and the `OneDNNLinear`s get their packed weights
    and drop their float32 ones (in place: they are the Predictor's own modules, made by
    `with_fused_backbone`, `with_winograd_fpn` and `with_onednn_linears`); the attentions'
    in-projections and output projections, whose weights `nn.MultiheadAttention` reads itself,
    and any other `nn.Linear`, go into the returned packs for `dense.amx_products`, their
    weights untouched. Returns (packs, "bf16x3 for N linears, M 1x1, D 3x3 and W Winograd F(2x2) convolutions")."""
    packs: dict = {}
    pointwise = direct = winograd_convs = linears = 0
    # nn.MultiheadAttention's forward reads its out_proj's weight itself: those stay as they are.
    read_directly = {
        id(module.out_proj)
        for module in model.modules()
        if isinstance(module, nn.MultiheadAttention)
    }
    for module in model.modules():
        if isinstance(module, FusedConv) and (module.pointwise() or module.three_by_three()):
            pointwise, direct = pointwise + module.pointwise(), direct + module.three_by_three()
            module.pack_for_amx()
        elif isinstance(module, winograd.WinogradConv) and module.tile == 2:
            # F(4x4)'s transforms (constants up to 8) amplify the three products' error to 1e-4 of
            # the output, against 5e-6 for F(2x2) and 1e-5 for F(4x4) on oneDNN's fp32 products,
            # which are as fast there (FPN layer_1 62 vs 64 ms, res3 4.1 vs 4.1): those stay.
            module.pack_for_amx()
            winograd_convs += 1
        elif isinstance(module, OneDNNLinear) and id(module) not in read_directly:
            module.pack_for_amx()
            linears += 1
        elif isinstance(module, nn.Linear):
            packs[dense.weight_key(module.weight)] = amx.PackedWeight(module.weight)
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            for chunk in module.in_proj_weight.chunk(3):  # masked_cross_attention's projections
                packs[dense.weight_key(chunk)] = amx.PackedWeight(chunk)
    described = (
        f"bf16x3 for {linears + len(packs)} linears, {pointwise} 1x1, {direct} 3x3 and "
        f"{winograd_convs} Winograd F(2x2) convolutions"
    )
    return packs, described


def _with_submodule(root: ModelT, path: str, replacement: nn.Module) -> ModelT:
    """A shallow copy of `root` with the submodule at dotted `path` replaced, every module on
    the way copied (copy.copy shares `_modules`, so each copy gets its own dict first)."""
    head, _, rest = path.partition(".")
    copied = copy.copy(root)
    copied._modules = dict(root._modules)
    child = root._modules[head]
    if child is None:
        raise KeyError(path)
    copied._modules[head] = _with_submodule(child, rest, replacement) if rest else replacement
    return copied

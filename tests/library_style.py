"""Small models written the way public model libraries write theirs (not the way that is easiest
to trace): control flow in ``forward``, ``torch.split`` in a block, modules named with ``-``,
functions registered as fx leaves, TensorFlow-style padding computed from ``x.shape``,
space-to-depth stems, keyword inputs and dict outputs, versioned state dicts.

Each reproduces one pattern seen in real library code, at a size that checks in a fraction
of a second. None is copied from a library; the patterns are described in the docstrings.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from families import LayerNorm2d


def conv_bn(cin, cout, k=3, stride=1, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


# -- a multi-scale bottleneck: the channels are split with torch.split and processed in a loop


class MultiScaleBottleneck(nn.Module):
    """Res2Net-style: ``torch.split`` into ``scale`` groups, each convolved and added to the
    next, concatenated back; the first block of a stage pools the last group."""

    def __init__(self, cin, width, scale=3, stride=1, stage=False):
        super().__init__()
        self.conv1 = conv_bn(cin, width * scale, 1)
        self.width, self.nums, self.stage = width, scale - 1, stage
        self.convs = nn.ModuleList(
            [conv_bn(width, width, 3, stride) for _ in range(self.nums)])
        self.pool = nn.AvgPool2d(3, stride, 1) if stage else None
        self.conv3 = nn.Sequential(nn.Conv2d(width * scale, cin * 2 if stage else cin, 1,
                                             bias=False), nn.BatchNorm2d(cin * 2 if stage else cin))
        self.down = (nn.Sequential(nn.Conv2d(cin, cin * 2, 1, stride, bias=False),
                                   nn.BatchNorm2d(cin * 2)) if stage else None)

    def forward(self, x):
        out = self.conv1(x)
        spx = torch.split(out, self.width, 1)
        sp = spx[0]
        for i in range(self.nums):
            sp = spx[i] if i == 0 or self.stage else sp + spx[i]
            sp = self.convs[i](sp)
            out = sp if i == 0 else torch.cat((out, sp), 1)
        last = self.pool(spx[self.nums]) if self.stage else spx[self.nums]
        out = self.conv3(torch.cat((out, last), 1))
        short = x if self.down is None else self.down(x)
        return F.relu(out + short)


class MultiScaleNet(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 2)
        self.layer1 = nn.Sequential(MultiScaleBottleneck(8, 4, stride=2, stage=True),
                                    MultiScaleBottleneck(16, 4))
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layer1(self.stem(x)), 1), 1))


# -- stages that name their blocks with a dash (add_module(f"block{i}-{j}", ...)) -----------


class AnyStage(nn.Sequential):
    def __init__(self, cin, cout, stride, depth, stage_index):
        super().__init__()
        for i in range(depth):
            block = conv_bn(cin if i == 0 else cout, cout, 3, stride if i == 0 else 1)
            self.add_module(f"block{stage_index}-{i}", block)


class DashNamedNet(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 2)
        self.trunk_output = nn.Sequential(OrderedDict(
            [("block1", AnyStage(8, 8, 2, 2, 1)), ("block2", AnyStage(8, 16, 2, 1, 2))]))
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(self.trunk_output(self.stem(x)).mean((2, 3)))


# -- an in-place activation right after the module a feature extractor is cut at -------------


class FeaturesThenInplace(nn.Module):
    """DenseNet-style: ``features = self.features(x)`` followed by ``F.relu(features,
    inplace=True)``: cutting at ``features`` must not see the in-place change."""

    def __init__(self, classes=3):
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 8, 3, 2), nn.Conv2d(8, 8, 3, 2, 1),
                                      nn.BatchNorm2d(8))
        self.classifier = nn.Linear(8, classes)

    def forward(self, x):
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        return self.classifier(torch.flatten(out, 1))


# -- a model that versions its state dict and checks the version when loading ---------------


class VersionedNet(nn.Module):
    """MNASNet-style: ``_version = 2``, and ``_load_from_state_dict`` reads the version PyTorch
    stores in the state dict's ``_metadata`` (and refuses a state dict without it)."""

    _version = 2

    def __init__(self, classes=3):
        super().__init__()
        self.layers = nn.Sequential(conv_bn(3, 8, 3, 2), conv_bn(8, 8, 3, 2))
        self.classifier = nn.Linear(8, classes)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        version = local_metadata.get("version", None)
        if version not in [1, 2]:
            raise ValueError(f"version should be set to 1 or 2 instead of {version}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x):
        return self.classifier(self.layers(x).mean([2, 3]))


# -- TF-ported mobile nets: computed asymmetric ZeroPad2d, "valid"/"same" strings, a pool whose
# kernel is the hidden width (far larger than its input) used as a global pool ----------------


def correct_pad(kernel_size, adjust=True):
    """The padding a TF-ported EfficientNet puts before a strided depthwise convolution."""
    correct = (kernel_size // 2, kernel_size // 2)
    if adjust:
        return (correct[1] - 1, correct[1], correct[0] - 1, correct[0])
    return (correct[1], correct[1], correct[0], correct[0])


class TFPortDepthwise(nn.Module):
    def __init__(self, dim, stride, kernel_size, adjust_padding):
        super().__init__()
        self.stride = stride
        conv_pad = "valid" if self.stride == 2 else "same"
        self.depthwise_conv_pad = nn.ZeroPad2d(padding=correct_pad(kernel_size, adjust_padding))
        self.depthwise_conv = nn.Conv2d(dim, dim, kernel_size, stride, padding=conv_pad,
                                        groups=dim, bias=False)
        self.depthwise_norm = nn.BatchNorm2d(dim, eps=1e-3)
        self.depthwise_act = nn.SiLU()

    def forward(self, hidden_states):
        if self.stride == 2:
            hidden_states = self.depthwise_conv_pad(hidden_states)
        hidden_states = self.depthwise_conv(hidden_states)
        return self.depthwise_act(self.depthwise_norm(hidden_states))


class TFPortNet(nn.Module):
    def __init__(self, classes=3, hidden_dim=64):
        super().__init__()
        self.padding = nn.ZeroPad2d(padding=(0, 1, 0, 1))
        self.convolution = nn.Conv2d(3, 8, 3, 2, padding="valid", bias=False)
        self.blocks = nn.ModuleList([
            TFPortDepthwise(8, 2, 3, True), TFPortDepthwise(8, 1, 5, False),
            TFPortDepthwise(8, 2, 5, False), TFPortDepthwise(8, 2, 3, True)])
        self.top_conv = nn.Conv2d(8, hidden_dim, 1, padding="same", bias=False)
        # the pooler: a kernel of the hidden width, far larger than the map, in ceil mode
        self.pooler = nn.AvgPool2d(hidden_dim, ceil_mode=True)
        self.classifier = nn.Linear(hidden_dim, classes)

    def forward(self, pixel_values):
        x = self.convolution(self.padding(pixel_values))
        for block in self.blocks:
            x = block(x)
        pooled = self.pooler(self.top_conv(x))
        return self.classifier(pooled.reshape(pooled.shape[:2]))


# -- functions a library registers as fx leaves (torch.fx.wrap) -----------------------------


def stochastic_depth(input, p: float, mode: str, training: bool = True):
    """Stochastic depth as a library writes it: the identity in eval mode."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"drop probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0:
        return input
    survival_rate = 1.0 - p
    size = [input.shape[0]] + [1] * (input.ndim - 1) if mode == "row" else [1] * input.ndim
    noise = torch.empty(size, dtype=input.dtype, device=input.device).bernoulli_(survival_rate)
    return input * noise.div_(survival_rate)


torch.fx.wrap("stochastic_depth")


class StochasticDepth(nn.Module):
    def __init__(self, p: float, mode: str = "row") -> None:
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, input):
        return stochastic_depth(input, self.p, self.mode, self.training)


class MBConvWithDrop(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.block = nn.Sequential(conv_bn(c, 2 * c, 1), conv_bn(2 * c, 2 * c, 3, groups=2 * c),
                                   nn.Conv2d(2 * c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.stochastic_depth = StochasticDepth(0.2)

    def forward(self, x):
        return x + self.stochastic_depth(self.block(x))


class WrappedLeafNet(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 8, 3, 2), MBConvWithDrop(8), conv_bn(8, 8, 3, 2),
                                      MBConvWithDrop(8))
        self.classifier = nn.Linear(8, classes)

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


# -- TensorFlow "same" padding computed from x.shape in forward(), three ways ------------------


def get_same_padding(x: int, kernel_size: int, stride: int, dilation: int) -> int:
    return max((math.ceil(x / stride) - 1) * stride + (kernel_size - 1) * dilation + 1 - x, 0)


def pad_same(x, kernel_size, stride, dilation=(1, 1), value=0.0):
    ih, iw = x.size()[-2:]
    pad_h = get_same_padding(ih, kernel_size[0], stride[0], dilation[0])
    pad_w = get_same_padding(iw, kernel_size[1], stride[1], dilation[1])
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=value)


class Conv2dSame(nn.Conv2d):
    """A helper function computes the padding (``max`` and ``math.ceil`` of sizes)."""

    def forward(self, x):
        x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation,
                        self.groups)


class Conv2dDynamicSamePadding(nn.Conv2d):
    """The padding computed inline, and applied only if there is any (a branch on sizes)."""

    def forward(self, x):
        ih, iw = x.size()[-2:]
        kh, kw = self.weight.size()[-2:]
        sh, sw = self.stride
        oh, ow = math.ceil(ih / sh), math.ceil(iw / sw)
        pad_h = max((oh - 1) * self.stride[0] + (kh - 1) * self.dilation[0] + 1 - ih, 0)
        pad_w = max((ow - 1) * self.stride[1] + (kw - 1) * self.dilation[1] + 1 - iw, 0)
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


def apply_tf_padding(features: torch.Tensor, conv_layer: nn.Conv2d) -> torch.Tensor:
    """The padding chosen by branches on the size modulo the stride."""
    in_height, in_width = features.shape[-2:]
    stride_height, stride_width = conv_layer.stride
    kernel_height, kernel_width = conv_layer.kernel_size
    if in_height % stride_height == 0:
        pad_along_height = max(kernel_height - stride_height, 0)
    else:
        pad_along_height = max(kernel_height - (in_height % stride_height), 0)
    if in_width % stride_width == 0:
        pad_along_width = max(kernel_width - stride_width, 0)
    else:
        pad_along_width = max(kernel_width - (in_width % stride_width), 0)
    pad_left = pad_along_width // 2
    pad_top = pad_along_height // 2
    padding = (pad_left, pad_along_width - pad_left, pad_top, pad_along_height - pad_top)
    return nn.functional.pad(features, padding, "constant", 0.0)


class TFPaddedConv(nn.Module):
    def __init__(self, cin, cout, k, stride):
        super().__init__()
        self.convolution = nn.Conv2d(cin, cout, k, stride, bias=False)
        self.normalization = nn.BatchNorm2d(cout)

    def forward(self, features):
        return F.relu6(self.normalization(self.convolution(apply_tf_padding(features,
                                                                           self.convolution))))


class SamePaddingNet(nn.Module):
    """``style``: ``helper`` (Conv2dSame), ``inline`` (Conv2dDynamicSamePadding) or
    ``branches`` (apply_tf_padding)."""

    def __init__(self, style="helper", classes=3):
        super().__init__()
        if style == "branches":
            convs = [TFPaddedConv(3, 8, 3, 2), TFPaddedConv(8, 8, 3, 1), TFPaddedConv(8, 12, 5, 2)]
        else:
            cls = Conv2dSame if style == "helper" else Conv2dDynamicSamePadding
            convs = [cls(3, 8, 3, 2), nn.BatchNorm2d(8), nn.ReLU(), cls(8, 8, 3, 1),
                     cls(8, 12, 5, 2), nn.BatchNorm2d(12), nn.ReLU()]
        self.features = nn.Sequential(*convs)
        self.fc = nn.Linear(12, classes)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


class SizeBranchNet(nn.Module):
    """Python control flow on sizes, as real forward() code has it: a guard on a minimum
    size, a loop over a list computed from the config, an assert and a max() of sizes."""

    def __init__(self, classes=3, min_size=16):
        super().__init__()
        self.min_size = min_size
        self.stages = nn.ModuleList([conv_bn(3, 8, 3, 2), conv_bn(8, 8, 3, 2),
                                     conv_bn(8, 16, 3, 2)])
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        assert x.dim() == 4, f"expected NCHW, got {x.shape}"
        if x.shape[-1] < self.min_size:
            x = F.pad(x, (0, self.min_size - x.shape[-1]))
        for i, stage in enumerate(self.stages):
            if max(x.shape[-2:]) >= 2:
                x = stage(x)
        return self.fc(x.mean((2, 3)))


# -- models that take keywords and return output classes (model-definition libraries) --------


class ModelOutput(OrderedDict):
    """An output class as model-definition libraries write theirs: a dataclass that is also an
    ordered dict of its fields that are not None, registered as a pytree node."""

    def __init_subclass__(cls) -> None:
        import torch.utils._pytree as pytree

        pytree.register_pytree_node(
            cls, lambda o: (list(o.values()), list(o.keys())),
            lambda values, keys: cls(**dict(zip(keys, values))),
            serialized_type_name=f"{cls.__module__}.{cls.__name__}")

    def __post_init__(self):
        for f in self.__dataclass_fields__:
            v = getattr(self, f)
            if v is not None:
                self[f] = v

    def __getitem__(self, k):
        return dict(self.items())[k] if isinstance(k, str) else tuple(self.values())[k]


@dataclass
class BackboneOutput(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple | None = None


@dataclass
class ClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple | None = None


class _Config:
    use_return_dict = True
    output_hidden_states = True


class KeywordBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = _Config()
        self.embedder = conv_bn(3, 8, 3, 2)
        self.stages = nn.ModuleList([conv_bn(8, 8, 3, 2), conv_bn(8, 16, 3, 2)])
        self.pooler = nn.AdaptiveAvgPool2d((1, 1))

    def forward(self, pixel_values=None, output_hidden_states=None, return_dict=None):
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        hidden_state = self.embedder(pixel_values)
        hidden_states = (hidden_state,) if output_hidden_states else None
        for stage in self.stages:
            hidden_state = stage(hidden_state)
            if output_hidden_states:
                hidden_states = hidden_states + (hidden_state,)
        pooled_output = self.pooler(hidden_state)
        if not return_dict:
            return (hidden_state, pooled_output) + (hidden_states or ())
        return BackboneOutput(last_hidden_state=hidden_state, pooler_output=pooled_output,
                              hidden_states=hidden_states)


class KeywordClassifier(nn.Module):
    """``model(pixel_values=x)`` -> ``ClassifierOutput(logits=...)``."""

    def __init__(self, classes=3):
        super().__init__()
        self.backbone = KeywordBackbone()
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16, classes))

    def forward(self, pixel_values=None, labels=None, output_hidden_states=False):
        out = self.backbone(pixel_values, output_hidden_states=output_hidden_states)
        logits = self.classifier(out.pooler_output)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return ClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class TextAndImageModel(nn.Module):
    """The image is not the first parameter: it must be passed by keyword."""

    def __init__(self):
        super().__init__()
        self.vision = KeywordBackbone()

    def forward(self, input_ids=None, pixel_values=None):
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        return {"image_embeds": self.vision(pixel_values).pooler_output, "input_ids": input_ids}


# -- space-to-depth stems: a stride-r window whose taps become channels -----------------------


class SpaceToDepthStem(nn.Module):
    """TResNet-style: ``view`` into blocks, ``permute`` the offsets in front of the channels,
    ``view`` them into channels."""

    def __init__(self, block_size=4):
        super().__init__()
        self.bs = block_size

    def forward(self, x):
        N, C, H, W = x.size()
        x = x.view(N, C, H // self.bs, self.bs, W // self.bs, self.bs)
        x = x.permute(0, 3, 5, 1, 2, 4).contiguous()
        return x.view(N, C * (self.bs ** 2), H // self.bs, W // self.bs)


class Focus(nn.Module):
    """YOLOv5-style: four strided slices concatenated on channels, then a convolution."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = conv_bn(cin * 4, cout, 3)

    def forward(self, x):
        return self.conv(torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2],
                                    x[..., 1::2, 1::2]], 1))


class SpaceToDepthNet(nn.Module):
    """``stem``: ``unshuffle`` (nn.PixelUnshuffle), ``view`` (SpaceToDepthStem) or ``focus``."""

    def __init__(self, stem="unshuffle", classes=3):
        super().__init__()
        if stem == "unshuffle":
            self.stem, c = nn.Sequential(nn.PixelUnshuffle(2), conv_bn(12, 8, 3)), 8
        elif stem == "view":
            self.stem, c = nn.Sequential(SpaceToDepthStem(4), conv_bn(48, 8, 1)), 8
        else:
            self.stem, c = Focus(3, 8), 8
        self.body = nn.Sequential(conv_bn(c, 16, 3, 2), conv_bn(16, 16, 3))
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(self.body(self.stem(x)).mean((2, 3)))


# -- in-place ops: residuals with ``+=`` / ``add_``, activations with ``inplace=True``, layer
# scales with ``mul_``, clamps with ``clamp_``: how residual networks of model-definition
# libraries write their blocks, and what torch.export keeps as ``aten.add_`` and the like


@dataclass
class InplaceConfig:
    num_channels: int = 3
    embedding_size: int = 8
    hidden_sizes: tuple = (8, 16)
    hidden_act: str = "relu"
    layer_scale_init_value: float = 0.5


_ACTIVATIONS = {"relu": lambda: nn.ReLU(inplace=True), "silu": lambda: nn.SiLU(inplace=True),
                "relu6": lambda: nn.ReLU6(inplace=True)}


class InplaceShortCut(nn.Sequential):
    def __init__(self, cin, cout, stride):
        super().__init__(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class InplaceBasicLayer(nn.Module):
    """A residual layer with its sum written in place; ``style`` picks how the library at hand
    writes the in-place steps."""

    def __init__(self, config: InplaceConfig, cin, cout, stride, style):
        super().__init__()
        self.style = style
        self.shortcut = InplaceShortCut(cin, cout, stride)
        self.layer = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                                   nn.BatchNorm2d(cout), _ACTIVATIONS[config.hidden_act](),
                                   nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                   nn.BatchNorm2d(cout))
        self.layer_scale = nn.Parameter(config.layer_scale_init_value * torch.ones(cout))
        self.activation = _ACTIVATIONS[config.hidden_act]()

    def forward(self, hidden_state):
        residual = hidden_state
        hidden_state = self.layer(hidden_state)
        residual = self.shortcut(residual)
        if self.style == "iadd":
            hidden_state += residual
            return self.activation(hidden_state)
        if self.style == "add_":
            hidden_state.add_(residual)
            return F.relu(hidden_state, inplace=True)
        if self.style == "mul_":  # a layer scale, as ConvNeXt-style blocks apply it
            hidden_state.mul_(self.layer_scale.view(1, -1, 1, 1))
            return F.hardswish(hidden_state.add_(residual), inplace=True)
        if self.style == "clamp_":
            return (hidden_state + residual).clamp_(0.0, 6.0)
        raise ValueError(self.style)


class InplaceNet(nn.Module):
    """``model(pixel_values=x)`` -> ``BackboneOutput``; an embedder with an in-place ReLU."""

    def __init__(self, style="iadd", config: InplaceConfig | None = None):
        super().__init__()
        config = config or InplaceConfig()
        self.config = config
        self.embedder = nn.Sequential(
            nn.Conv2d(config.num_channels, config.embedding_size, 3, 2, 1, bias=False),
            nn.BatchNorm2d(config.embedding_size), _ACTIVATIONS[config.hidden_act]())
        sizes = (config.embedding_size, *config.hidden_sizes)
        self.stages = nn.ModuleList([InplaceBasicLayer(config, a, b, 2, style)
                                     for a, b in zip(sizes, sizes[1:])])

    def forward(self, pixel_values=None):
        hidden_state = self.embedder(pixel_values)
        for stage in self.stages:
            hidden_state = stage(hidden_state)
        return BackboneOutput(last_hidden_state=hidden_state)


class AliasedResidual(nn.Module):
    """The changed tensor read again under another name: ``shortcut`` is ``out`` itself, so
    after ``out += ...`` it holds the sum too (eager semantics a trace does not see); and an
    activation whose ``inplace`` is given positionally."""

    def __init__(self):
        super().__init__()
        self.conv = conv_bn(3, 8, 3, 2)
        self.branch = nn.Conv2d(8, 8, 3, 1, 1)

    def forward(self, x):
        out = self.conv(x)
        shortcut = out
        out += self.branch(out)
        out = F.relu(out, True)
        return out * shortcut


class SliceScaledInPlace(nn.Module):
    """A slice of the channels scaled in place (``x[:, :2].mul_(2)``): the change reaches the
    tensor the slice views."""

    def __init__(self):
        super().__init__()
        self.conv = conv_bn(3, 4, 3, 2)
        self.head = nn.Conv2d(4, 2, 3, 2)

    def forward(self, x):
        x = self.conv(x)
        x[:, :2].mul_(2.0)
        return self.head(x)


# -- a TF-ported stem: "same" padding from x.shape, then a ceil-mode max pool -------------------


class CeilPoolSameNet(nn.Module):
    """TF ports compute "same" padding in Python; this one then subsamples with a 1x1 max pool
    of stride 2 in ``ceil_mode`` (an FPN-style extra level). PyTorch's own shape rule for the
    pool decides, at the example size, whether a last window starting past the map is
    dropped: on an even map it is, on an odd one there is none. ``flatten_sizes`` reads the
    pooled map's sizes in Python (``x.reshape(b, c, h * w)``), so the captured graph holds a
    size derived under that decision."""

    def __init__(self, classes=3, flatten_sizes=False):
        super().__init__()
        self.flatten_sizes = flatten_sizes
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8),
                                  nn.ReLU(inplace=True))
        self.pool = nn.MaxPool2d(1, 2, ceil_mode=True)
        self.block = nn.Sequential(Conv2dSame(8, 12, 2, 2), nn.BatchNorm2d(12), nn.ReLU())
        self.fc = nn.Linear(12, classes)

    def forward(self, x):
        x = self.block(self.pool(self.stem(x)))
        if self.flatten_sizes:
            b, c, h, w = x.shape
            return self.fc(x.reshape(b, c, h * w).mean(-1))
        return self.fc(x.mean((2, 3)))


class CropToPooled(nn.Module):
    """Crops its skip branch to the pooled map's size read in Python (the size matching of
    encoder-decoder nets): the crop's size comes from a map the skip branch does not pass
    through."""

    def __init__(self, classes=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.MaxPool2d(1, 2, ceil_mode=True)
        self.block = nn.Sequential(nn.Conv2d(8, 12, 2, 2), nn.BatchNorm2d(12), nn.ReLU())
        self.side = nn.Sequential(nn.Conv2d(8, 12, 4, 4), nn.BatchNorm2d(12), nn.ReLU())
        self.fc = nn.Linear(12, classes)

    def forward(self, x):
        x = self.stem(x)
        pooled = self.pool(x)
        h, w = pooled.shape[-2:]
        skip = self.side(x[:, :, : 2 * h - 1, : 2 * w - 1])
        return self.fc(self.block(pooled).mean((2, 3)) + skip.mean((2, 3)))


# -- a VGG head that keeps its input at least kernel-sized (sizes computed in forward()) ------


class ConvMlpHead(nn.Module):
    """The fully connected layers of a VGG as convolutions; a map smaller than the first
    kernel is pooled up to it first, with an output size computed from ``x.shape``."""

    def __init__(self, cin=16, hidden=24, kernel_size=3):
        super().__init__()
        self.input_kernel_size = kernel_size
        self.fc1 = nn.Conv2d(cin, hidden, kernel_size, bias=True)
        self.act1 = nn.ReLU(True)
        self.fc2 = nn.Conv2d(hidden, hidden, 1, bias=True)
        self.act2 = nn.ReLU(True)

    def forward(self, x):
        if x.shape[-2] < self.input_kernel_size or x.shape[-1] < self.input_kernel_size:
            # keep the input at least kernel-sized
            output_size = (max(self.input_kernel_size, x.shape[-2]),
                           max(self.input_kernel_size, x.shape[-1]))
            x = F.adaptive_avg_pool2d(x, output_size)
        return self.act2(self.fc2(self.act1(self.fc1(x))))


class ComputedPoolNet(nn.Module):
    """``pool``: ``vgg`` (the head above), ``half`` (an adaptive pool to half the map's size,
    computed in Python), ``flatten`` (a pool as large as the example's map, then
    ``x.view(x.size(0), -1)`` as the output)."""

    def __init__(self, pool="vgg", padded=True):
        super().__init__()
        self.pool = pool
        self.features = (nn.Sequential(conv_bn(3, 8, 3, 2), conv_bn(8, 16, 3, 2)) if padded else
                         nn.Sequential(nn.Conv2d(3, 8, 3, 2), nn.BatchNorm2d(8), nn.ReLU(),
                                       nn.Conv2d(8, 16, 3, 2), nn.BatchNorm2d(16), nn.ReLU()))
        self.head = ConvMlpHead() if pool == "vgg" else nn.Conv2d(16, 5, 1)

    def forward(self, x):
        x = self.features(x)
        if self.pool == "half":
            x = F.adaptive_avg_pool2d(x, (x.shape[-2] // 2, x.shape[-1] // 2))
        elif self.pool == "flatten":
            x = F.avg_pool2d(x, 4)
            return self.head(x).view(x.size(0), -1)
        return self.head(x).mean((2, 3))


# -- everything at once, as a ported model-definition library writes it ------------------------


@dataclass
class PortedConfig:
    num_channels: int = 3
    stem_size: int = 8
    hidden_sizes: tuple = (8, 16)
    hidden_act: str = "silu"
    layer_norm_eps: float = 1e-6
    num_labels: int = 4
    use_return_dict: bool = True


class PortedBlock(nn.Module):
    def __init__(self, config: PortedConfig, cin, cout, stride):
        super().__init__()
        self.conv = Conv2dSame(cin, cout, 3, stride, bias=False)
        self.norm = nn.BatchNorm2d(cout)
        self.act = _ACTIVATIONS[config.hidden_act]()
        self.pw = nn.Conv2d(cout, cout, 1)
        self.ln = LayerNorm2d(cout, eps=config.layer_norm_eps)  # through permutes
        self.shortcut = (nn.Identity() if cin == cout and stride == 1 else
                         nn.Sequential(nn.AvgPool2d(stride, stride, ceil_mode=True,
                                                    count_include_pad=False),
                                       nn.Conv2d(cin, cout, 1, bias=False)))

    def forward(self, hidden_states):
        residual = self.shortcut(hidden_states)
        hidden_states = self.act(self.norm(self.conv(hidden_states)))
        hidden_states = self.ln(self.pw(hidden_states))
        hidden_states += residual
        return hidden_states


class PortedNet(nn.Module):
    """A config object, ``forward(pixel_values=..., return_dict=...)`` returning an output
    class, "same" padding computed from the input size, a ceil-mode average pool in the
    shortcut, in-place activations and ``+=`` residuals, a channels-first LayerNorm."""

    def __init__(self, config: PortedConfig | None = None):
        super().__init__()
        config = config or PortedConfig()
        self.config = config
        self.stem = nn.Sequential(Conv2dSame(config.num_channels, config.stem_size, 3, 2),
                                  nn.BatchNorm2d(config.stem_size),
                                  _ACTIVATIONS[config.hidden_act]())
        sizes = (config.stem_size, *config.hidden_sizes)
        self.blocks = nn.ModuleList([PortedBlock(config, a, b, 2)
                                     for a, b in zip(sizes, sizes[1:])])
        self.classifier = nn.Linear(sizes[-1], config.num_labels)

    def forward(self, pixel_values=None, output_hidden_states=False, return_dict=None):
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        hidden_states = self.stem(pixel_values)
        all_hidden = (hidden_states,) if output_hidden_states else None
        for block in self.blocks:
            hidden_states = block(hidden_states)
            if output_hidden_states:
                all_hidden = all_hidden + (hidden_states,)
        pooled = hidden_states.mean(dim=[-2, -1])
        logits = self.classifier(pooled)
        if not return_dict:
            return (logits,) + ((all_hidden,) if all_hidden else ())
        return ClassifierOutput(logits=logits, hidden_states=all_hidden)


# -- a decoder-style block that takes its skip only when one is given, tested the way
# TorchScript-minded libraries test it (``torch.jit.isinstance``): under torch.fx the skip is a
# Proxy, not a Tensor, so the trace leaves the skip out


class OptionalSkip(nn.Module):
    def __init__(self, cin: int, cskip: int, cout: int, merge: str = "cat"):
        super().__init__()
        self.merge = merge
        self.convs = conv_bn(cin + cskip if merge == "cat" else cin, cout)

    def forward(self, x: torch.Tensor, x_e: torch.Tensor | None = None) -> torch.Tensor:
        if x_e is not None and torch.jit.isinstance(x_e, torch.Tensor):
            x = torch.cat([x_e, x], dim=1) if self.merge == "cat" else x + x_e
        return self.convs(x)


class OptionalSkipNet(nn.Module):
    def __init__(self, merge: str = "cat", classes: int = 3):
        super().__init__()
        self.stem = conv_bn(3, 8, stride=2)
        self.body = conv_bn(8, 8)
        self.up = OptionalSkip(8, 8, 8, merge)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        skip = self.stem(x)
        x = self.up(self.body(skip), skip)
        return self.fc(self.pool(x).mean((2, 3)))


# -- a ghost module as GhostNet-style libraries write it: half the channels from a cheap
# depthwise convolution, the concatenation cut back to the channels asked for
# (``out[:, :oup, :, :]``), and the bottleneck's residual added in place through that view


class GhostModule(nn.Module):
    def __init__(self, inp: int, oup: int, ratio: int = 2, relu: bool = True):
        super().__init__()
        self.oup = oup
        init_channels = math.ceil(oup / ratio)
        new_channels = init_channels * (ratio - 1)
        act = (lambda: nn.ReLU(inplace=True)) if relu else nn.Identity
        self.primary_conv = nn.Sequential(
            nn.Conv2d(inp, init_channels, 1, bias=False), nn.BatchNorm2d(init_channels), act())
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(init_channels, new_channels, 3, 1, 1, groups=init_channels, bias=False),
            nn.BatchNorm2d(new_channels), act())

    def forward(self, x):
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        out = torch.cat([x1, x2], dim=1)
        return out[:, :self.oup, :, :]


class GhostBottleneck(nn.Module):
    def __init__(self, chs: int, mid_chs: int):
        super().__init__()
        self.ghost1 = GhostModule(chs, mid_chs)
        self.ghost2 = GhostModule(mid_chs, chs, relu=False)
        self.shortcut = nn.Sequential()

    def forward(self, x):
        shortcut = x
        x = self.ghost1(x)
        x = self.ghost2(x)
        x += self.shortcut(shortcut)
        return x


class GhostNetLike(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv_stem = conv_bn(3, 5, stride=2)
        self.blocks = nn.Sequential(GhostBottleneck(5, 7), nn.MaxPool2d(2), GhostBottleneck(5, 9))
        self.classifier = nn.Linear(5, classes)

    def forward(self, x):
        return self.classifier(self.blocks(self.conv_stem(x)).mean((2, 3)))

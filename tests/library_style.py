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

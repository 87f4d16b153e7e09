"""Small, self-written versions of the structures of common CNN families.

Each reproduces what makes its family hard to densify (where the strides sit, how branches
join, squeeze-excitation, channel shuffles, channels-last blocks, ceil-mode pools), at widths
small enough to check in a fraction of a second. None is copied from a model library.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_bn(cin, cout, k=3, stride=1, groups=1, act: Callable[[], nn.Module] = nn.ReLU):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), act())


# -- AlexNet: 11 x 11 stride-4 stem, max pools, adaptive pool, dropout + FC head -------------

class AlexNetLike(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 11, 4, 2), nn.ReLU(True), nn.MaxPool2d(3, 2),
            nn.Conv2d(8, 12, 5, padding=2), nn.ReLU(True), nn.MaxPool2d(3, 2),
            nn.Conv2d(12, 16, 3, padding=1), nn.ReLU(True),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(True), nn.MaxPool2d(3, 2))
        self.avgpool = nn.AdaptiveAvgPool2d((3, 3))
        self.classifier = nn.Sequential(nn.Dropout(), nn.Linear(16 * 9, 32), nn.ReLU(True),
                                        nn.Dropout(), nn.Linear(32, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# -- ResNet: bottlenecks with the stride in the 3 x 3 (v1.5) or the 1 x 1 (v1); ResNeXt; D ---

class Bottleneck(nn.Module):
    def __init__(self, cin, mid, stride, groups=1, stride_in_1x1=False, avg_down=False):
        super().__init__()
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        cout = mid * 2
        self.c1 = conv_bn(cin, mid, 1, s1)
        self.c2 = conv_bn(mid, mid, 3, s3, groups)
        self.c3 = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        if stride == 1 and cin == cout:
            self.down = nn.Identity()
        elif avg_down:  # ResNet-D: average pool, then a 1 x 1 convolution
            self.down = nn.Sequential(
                nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False),
                nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        else:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.c3(self.c2(self.c1(x))) + self.down(x))


class ResNetLike(nn.Module):
    def __init__(self, classes=5, groups=1, stride_in_1x1=False, deep_stem=False,
                 avg_down=False, width=8):
        super().__init__()
        if deep_stem:
            self.stem = nn.Sequential(conv_bn(3, width, 3, 2), conv_bn(width, width),
                                      conv_bn(width, 2 * width))
            c = 2 * width
        else:
            self.stem = conv_bn(3, 2 * width, 7, 2)
            c = 2 * width
        self.pool = nn.MaxPool2d(3, 2, 1)
        layers = []
        for i, mid in enumerate((width, 2 * width, 4 * width)):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(
                Bottleneck(c, mid, stride, groups, stride_in_1x1, avg_down),
                Bottleneck(mid * 2, mid, 1, groups)))
            c = mid * 2
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.pool(self.stem(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# -- DenseNet: concatenation, 2 x 2 average-pool transitions --------------------------------

class DenseLayer(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, 16, 1),
                                  nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, growth, 3, 1, 1))

    def forward(self, feats):
        return torch.cat([feats, self.body(feats)], 1)


class DenseNetLike(nn.Module):
    def __init__(self, classes=5, growth=4):
        super().__init__()
        c = 8
        blocks: list[nn.Module] = [nn.Conv2d(3, c, 7, 2, 3), nn.BatchNorm2d(c), nn.ReLU(),
                                   nn.MaxPool2d(3, 2, 1)]
        for i in range(3):
            for _ in range(2):
                blocks.append(DenseLayer(c, growth))
                c += growth
            if i < 2:
                blocks += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1),
                           nn.AvgPool2d(2, 2)]
                c //= 2
        blocks += [nn.BatchNorm2d(c), nn.ReLU()]
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(c, classes)

    def forward(self, x):
        out = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(out, 1))


# -- MobileNetV2 / MNASNet: inverted residuals, depthwise, ReLU6 ----------------------------

class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand, k=3, act=nn.ReLU6, se=None):
        super().__init__()
        mid = cin * expand
        layers = [conv_bn(cin, mid, 1, act=act)] if expand != 1 else []
        layers.append(conv_bn(mid, mid, k, stride, groups=mid, act=act))
        if se is not None:
            layers.append(se(mid))
        layers += [nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV2Like(nn.Module):
    def __init__(self, classes=5, k=3, act=nn.ReLU6):
        super().__init__()
        cfg = [(1, 8, 1), (4, 12, 2), (4, 12, 1), (4, 16, 2), (4, 24, 2), (4, 24, 1)]
        layers: list[nn.Module] = [conv_bn(3, 8, 3, 2, act=act)]
        c = 8
        for expand, cout, stride in cfg:
            layers.append(InvertedResidual(c, cout, stride, expand, k, act))
            c = cout
        layers.append(conv_bn(c, 32, 1, act=act))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, classes))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def mnasnet_like(classes=5):
    return MobileNetV2Like(classes, k=5, act=nn.ReLU)


# -- MobileNetV3: squeeze-excitation with hardsigmoid, hardswish, MLP head after global pool --

class SqueezeExcitation(nn.Module):
    def __init__(self, c, act=nn.ReLU, gate=nn.Hardsigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, max(4, c // 4), 1)
        self.fc2 = nn.Conv2d(max(4, c // 4), c, 1)
        self.act, self.gate = act(), gate()

    def forward(self, x):
        return x * self.gate(self.fc2(self.act(self.fc1(self.avgpool(x)))))


class MobileNetV3Like(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        hs = nn.Hardswish
        self.features = nn.Sequential(
            conv_bn(3, 8, 3, 2, act=hs),
            InvertedResidual(8, 8, 2, 1, 3, nn.ReLU, SqueezeExcitation),
            InvertedResidual(8, 12, 2, 4, 3, nn.ReLU),
            InvertedResidual(12, 16, 2, 3, 5, hs, SqueezeExcitation),
            InvertedResidual(16, 16, 1, 3, 5, hs, SqueezeExcitation),
            conv_bn(16, 48, 1, act=hs))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(48, 64), hs(), nn.Dropout(0.2),
                                        nn.Linear(64, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# -- EfficientNet: MBConv with SiLU squeeze-excitation and stochastic depth ------------------

class StochasticDepth(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape[0], 1, 1, 1, device=x.device) >= self.p
        return x * keep / (1 - self.p)


class MBConv(nn.Module):
    def __init__(self, cin, cout, stride, expand, k):
        super().__init__()
        mid = cin * expand
        se = lambda c: SqueezeExcitation(c, nn.SiLU, nn.Sigmoid)  # noqa: E731
        self.block = InvertedResidual(cin, cout, stride, expand, k, nn.SiLU, se).block
        self.residual = stride == 1 and cin == cout
        self.drop = StochasticDepth(0.2)
        del mid

    def forward(self, x):
        y = self.block(x)
        return x + self.drop(y) if self.residual else y


class EfficientNetLike(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 8, 3, 2, act=nn.SiLU), MBConv(8, 8, 1, 1, 3), MBConv(8, 12, 2, 4, 3),
            MBConv(12, 12, 1, 4, 3), MBConv(12, 16, 2, 4, 5), MBConv(16, 24, 2, 4, 3),
            conv_bn(24, 48, 1, act=nn.SiLU))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
                                  nn.Linear(48, classes))

    def forward(self, x):
        return self.head(self.features(x))


# -- RegNetY: grouped bottleneck with squeeze-excitation, stride in the 3 x 3 ---------------

class RegNetYBlock(nn.Module):
    def __init__(self, cin, cout, stride, group_width=4):
        super().__init__()
        self.a = conv_bn(cin, cout, 1)
        self.b = conv_bn(cout, cout, 3, stride, groups=cout // group_width)
        self.se = SqueezeExcitation(cout, nn.ReLU, nn.Sigmoid)
        self.c = nn.Sequential(nn.Conv2d(cout, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.proj = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        short = x if self.proj is None else self.proj(x)
        return F.relu(short + self.c(self.se(self.b(self.a(x)))))


class RegNetYLike(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 2)
        self.trunk = nn.Sequential(RegNetYBlock(8, 8, 2), RegNetYBlock(8, 16, 2),
                                   RegNetYBlock(16, 16, 1), RegNetYBlock(16, 32, 2))
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        return self.fc(self.trunk(self.stem(x)).mean((2, 3)))


# -- ShuffleNetV2: channel split, chunk, shuffle by view/transpose --------------------------

def channel_shuffle(x, groups):
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    return torch.transpose(x, 1, 2).contiguous().view(b, -1, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                conv_bn(cin, half, 1))
        bin_ = cin if stride > 1 else half
        self.branch2 = nn.Sequential(
            conv_bn(bin_, half, 1),
            nn.Conv2d(half, half, 3, stride, 1, groups=half, bias=False), nn.BatchNorm2d(half),
            conv_bn(half, half, 1))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2Like(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.conv1 = conv_bn(3, 8, 3, 2)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.stages = nn.Sequential(ShuffleUnit(8, 16, 2), ShuffleUnit(16, 16, 1),
                                    ShuffleUnit(16, 32, 2), ShuffleUnit(32, 32, 1))
        self.conv5 = conv_bn(32, 64, 1)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        x = self.conv5(self.stages(self.maxpool(self.conv1(x))))
        return self.fc(x.mean([2, 3]))


# -- SqueezeNet: fire modules, ceil-mode max pools, convolutional classifier ----------------

class Fire(nn.Module):
    def __init__(self, cin, squeeze, expand):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.e1 = nn.Conv2d(squeeze, expand, 1)
        self.e3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.e1(x)), F.relu(self.e3(x))], 1)


class SqueezeNetLike(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2), nn.ReLU(True), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(16, 4, 8), Fire(16, 4, 8), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(16, 8, 16), nn.MaxPool2d(3, 2, ceil_mode=True), Fire(32, 8, 16))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(32, classes, 1), nn.ReLU(True),
                                        nn.AdaptiveAvgPool2d((1, 1)))

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


# -- GoogLeNet / Inception: four branches, stride-1 pools, ceil-mode pools, average pools ---

class InceptionBlock(nn.Module):
    def __init__(self, cin, c1, c3, c5, cp, avg_branch=False):
        super().__init__()
        self.b1 = conv_bn(cin, c1, 1)
        self.b2 = nn.Sequential(conv_bn(cin, c3, 1), conv_bn(c3, c3, 3))
        self.b3 = nn.Sequential(conv_bn(cin, c5, 1), conv_bn(c5, c5, 3), conv_bn(c5, c5, 3))
        pool = (nn.AvgPool2d(3, 1, 1) if avg_branch
                else nn.MaxPool2d(3, 1, 1, ceil_mode=True))
        self.b4 = nn.Sequential(pool, conv_bn(cin, cp, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class GoogLeNetLike(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 8, 7, 2), nn.MaxPool2d(3, 2, ceil_mode=True),
                                  conv_bn(8, 16, 3), nn.MaxPool2d(3, 2, ceil_mode=True))
        self.a = InceptionBlock(16, 4, 8, 4, 4)
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.b = InceptionBlock(20, 8, 8, 4, 4, avg_branch=True)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(24, classes)

    def forward(self, x):
        x = self.b(self.pool(self.a(self.stem(x))))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


# -- ConvNeXt: 4 x 4 stride-4 stem, channels-last LayerNorm + Linear + layer scale, LN2d -----

class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of an NCHW map, written the usual way."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ChannelsFirstLayerNorm(nn.Module):
    """The other usual way: statistics over dim 1 by hand."""

    def __init__(self, c, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(c) + 0.5)
        self.bias = nn.Parameter(torch.randn(c) * 0.1)
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvNeXtBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.pwconv1 = nn.Linear(c, 4 * c)
        self.pwconv2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.rand(c) * 0.5 + 0.1)
        self.drop_path = StochasticDepth(0.1)

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y)))) * self.gamma
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class ConvNeXtLike(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 4, 4), LayerNorm2d(8, eps=1e-6))
        self.stage1 = ConvNeXtBlock(8)
        self.down = nn.Sequential(ChannelsFirstLayerNorm(8), nn.Conv2d(8, 16, 2, 2))
        self.stage2 = ConvNeXtBlock(16)
        self.norm = nn.LayerNorm(16, eps=1e-6)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(self.norm(x.mean([-2, -1])))


# -- 1-D and 3-D CNNs -------------------------------------------------------------------------

def cnn1d(classes=5):
    return nn.Sequential(
        nn.Conv1d(2, 8, 7, 2, 3), nn.BatchNorm1d(8), nn.ReLU(), nn.MaxPool1d(3, 2, 1),
        nn.Conv1d(8, 16, 5, 2, 2, dilation=1), nn.BatchNorm1d(16), nn.ELU(),
        nn.AvgPool1d(3, 2, 1, ceil_mode=True, count_include_pad=False),
        nn.Conv1d(16, 16, 3, padding=2, dilation=2), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
        nn.Linear(16, classes))


def cnn3d(classes=5):
    return nn.Sequential(
        nn.Conv3d(1, 6, 3, 2, 1), nn.BatchNorm3d(6), nn.ReLU(), nn.MaxPool3d(2, 2, ceil_mode=True),
        nn.Conv3d(6, 8, 3, 1, 1), nn.BatchNorm3d(8), nn.ReLU(),
        nn.AvgPool3d(2, 2, ceil_mode=True, count_include_pad=False),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(8, classes))


def _vgg():
    from econv_convert.examples import tiny_vgg
    return tiny_vgg(5)


def _resnet_basic():
    from econv_convert.examples import tiny_resnet
    return tiny_resnet(5, 8)


# name -> (builder, example input shape, total stride)
FAMILIES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    "vgg": (_vgg, (1, 3, 64, 64), 16),
    "alexnet": (AlexNetLike, (1, 3, 127, 127), 32),
    "resnet-basic": (_resnet_basic, (1, 3, 64, 64), 16),
    "resnet-bottleneck": (ResNetLike, (1, 3, 64, 64), 16),
    "resnet-v1-stride-in-1x1": (lambda: ResNetLike(stride_in_1x1=True), (1, 3, 64, 64), 16),
    "resnet-d": (lambda: ResNetLike(deep_stem=True, avg_down=True), (1, 3, 64, 64), 16),
    "resnext": (lambda: ResNetLike(groups=4, width=8), (1, 3, 64, 64), 16),
    "densenet": (DenseNetLike, (1, 3, 64, 64), 16),
    "mobilenetv2": (MobileNetV2Like, (1, 3, 64, 64), 16),
    "mnasnet": (mnasnet_like, (1, 3, 64, 64), 16),
    "mobilenetv3": (MobileNetV3Like, (1, 3, 64, 64), 16),
    "efficientnet": (EfficientNetLike, (1, 3, 64, 64), 16),
    "regnety": (RegNetYLike, (1, 3, 64, 64), 16),
    "shufflenetv2": (ShuffleNetV2Like, (1, 3, 64, 64), 16),
    "squeezenet": (SqueezeNetLike, (1, 3, 63, 63), 16),
    "googlenet": (GoogLeNetLike, (1, 3, 64, 64), 16),
    "convnext": (ConvNeXtLike, (1, 3, 64, 64), 8),
    "cnn1d": (cnn1d, (1, 2, 96), 16),
    "cnn3d": (cnn3d, (1, 1, 16, 18, 17), 8),
}


# -- not translation-equivariant on the lattice: must be refused, naming the node -----------

class ViTLike(nn.Module):
    def __init__(self, classes=5, dim=16):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, 8)
        self.pos = nn.Parameter(torch.randn(1, 16, dim) * 0.02)
        self.encoder = nn.TransformerEncoderLayer(dim, 2, 32, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.encoder(tokens).mean(1))


class SwinLike(nn.Module):
    """Window partition by view/permute, attention inside windows."""

    def __init__(self, dim=8, window=4):
        super().__init__()
        self.window = window
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)

    def forward(self, x):
        x = self.patch(x).permute(0, 2, 3, 1)
        b, h, w, c = x.shape
        win = self.window
        x = x.view(b, h // win, win, w // win, win, c).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(-1, win * win, c)
        return self.attn(x, x, x)[0]


class UNetLike(nn.Module):
    def __init__(self, transposed=True):
        super().__init__()
        self.down = nn.Sequential(conv_bn(3, 8), nn.MaxPool2d(2), conv_bn(8, 16))
        self.up = (nn.ConvTranspose2d(16, 8, 2, 2) if transposed
                   else nn.Upsample(scale_factor=2, mode="bilinear"))
        self.out = nn.Conv2d(8 + (8 if transposed else 16), 2, 1)
        self.skip = conv_bn(3, 8)

    def forward(self, x):
        return self.out(torch.cat([self.skip(x), self.up(self.down(x))], 1))


class SizeDependentPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, 2, 1)
        self.pool = nn.AdaptiveAvgPool2d((7, 7))
        self.fc = nn.Linear(4 * 49, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.conv(x)), 1))


# name -> (builder, example shape, what the refusal must say)
REFUSED: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], str]] = {
    "vit": (ViTLike, (1, 3, 32, 32), r"'transpose'.*on merged spatial positions"),
    "swin": (SwinLike, (1, 3, 32, 32), r"'reshape'.*spatial positions into the batch \(a window "
                                       r"partition\)"),
    "unet-transposed": (lambda: UNetLike(True), (1, 3, 32, 32), r"node 'up'.*transposed"),
    "unet-upsample": (lambda: UNetLike(False), (1, 3, 32, 32), r"node 'up'.*upsampling"),
    "adaptive-pool-size-dependent": (SizeDependentPool, (1, 3, 32, 32),
                                     r"node 'pool'.*depend on the input size"),
}

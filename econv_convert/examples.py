"""Small baseline architectures behind the bundled fixtures (``fixtures/make_fixtures.py``).

Each is a classic shape of strided CNN, small enough to densify and verify in a second:

* :func:`patch_classifier`: convolution/pooling stacks and a fully connected head over a fixed
  65 x 65 patch, no padding (the dense model is a per-pixel classifier);
* :func:`tiny_vgg`: padded 3 x 3 convolutions, max pools, an adaptive pool and a three-layer
  fully connected head;
* :func:`tiny_resnet`: a strided stem, a ceil-mode max pool, residual basic blocks with 1 x 1
  stride-2 shortcuts, global average pooling and a linear classifier.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, padding: int = 0) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, padding, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


def patch_classifier(num_classes: int = 3, in_channels: int = 3) -> nn.Module:
    """65 x 65 patch -> class scores; total stride 8."""
    return nn.Sequential(
        *_conv_bn(in_channels, 16, 5), nn.MaxPool2d(2),  # 61 -> 30
        *_conv_bn(16, 32, 3), nn.MaxPool2d(2),  # 28 -> 14
        *_conv_bn(32, 32, 3), nn.MaxPool2d(2),  # 12 -> 6
        nn.Flatten(),
        nn.Linear(32 * 6 * 6, 64), nn.ReLU(inplace=True), nn.Dropout(0.5),
        nn.Linear(64, num_classes),
    )


class TinyVGG(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for i, cout in enumerate((width, 2 * width, 4 * width, 4 * width)):
            layers += _conv_bn(cin, cout, 3, padding=1)
            if i >= 2:
                layers += _conv_bn(cout, cout, 3, padding=1)
            layers.append(nn.MaxPool2d(2, 2))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((4, 4))
        self.classifier = nn.Sequential(
            nn.Linear(cin * 16, 64), nn.ReLU(True), nn.Dropout(),
            nn.Linear(64, 64), nn.ReLU(True), nn.Dropout(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def tiny_vgg(num_classes: int = 10, width: int = 8) -> nn.Module:
    """64 x 64 image -> class scores; total stride 16."""
    return TinyVGG(num_classes, width)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + identity)


class TinyResNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(3, width, 5, 2, 2))
        self.maxpool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        self.layer1 = BasicBlock(width, width, 1)
        self.layer2 = BasicBlock(width, 2 * width, 2)
        self.layer3 = BasicBlock(2 * width, 4 * width, 2)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.maxpool(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


def tiny_resnet(num_classes: int = 10, width: int = 16) -> nn.Module:
    """64 x 64 image -> class scores; total stride 16."""
    return TinyResNet(num_classes, width)


def randomize_batchnorm(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Give every BatchNorm random statistics and affine parameters (a fresh BatchNorm is the
    identity and hides mistakes)."""
    g = generator or torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.3)
    return model


def write_scene(path, size: int, tile: int = 256, seed: int = 0) -> None:
    """A synthetic RGB scene of ``size`` x ``size`` pixels as a tiled, compressed BigTIFF,
    written tile by tile (never whole in memory): patches of colour with noise, for demos and
    benchmarks of ``predict``."""
    import numpy as np
    import tifffile

    rng = np.random.default_rng(seed)

    def tiles():
        for _ in range(0, size, tile):
            for _ in range(0, size, tile):
                base = rng.integers(0, 256, size=(1, 1, 3))
                noise = rng.integers(-40, 40, size=(tile, tile, 3))
                yield np.clip(base + noise, 0, 255).astype(np.uint8)

    tifffile.imwrite(path, tiles(), shape=(size, size, 3), dtype=np.uint8, tile=(tile, tile),
                     compression="zlib", photometric="rgb", bigtiff=True)


def write_slide(path, size: int, glass: float = 0.6, mpp: float = 0.5, tile: int = 256,
                seed: int = 0) -> float:
    """A synthetic slide of ``size`` x ``size`` pixels as an Aperio-style SVS that OpenSlide
    reads (tiled, lossless zlib tiles, ``MPP`` in the description, a 4x-downsampled level):
    bright grey glass with pink tissue in the left ``1 - glass`` of the width, wavy-edged.
    Written tile by tile; returns the tissue fraction."""
    import numpy as np
    import tifffile

    rng = np.random.default_rng(seed)
    edge = (1 - glass) * size

    def region(y0, x0, h, w, f=1):
        yy, xx = np.mgrid[y0:y0 + h * f:f, x0:x0 + w * f:f]
        tissue = xx < edge + 0.03 * size * np.sin(yy / (0.05 * size))
        a = (238 + rng.integers(0, 14, (h, w, 3))).astype(np.uint8)
        pink = np.stack([185 + rng.integers(0, 55, (h, w)), 95 + rng.integers(0, 55, (h, w)),
                         155 + rng.integers(0, 55, (h, w))], -1).astype(np.uint8)
        a[tissue] = pink[tissue]
        return a, tissue

    fraction = [0, 0]

    def tiles(f):
        for y in range(0, size // f, tile):
            for x in range(0, size // f, tile):
                a, tissue = region(y * f, x * f, tile, tile, f)
                if f == 1:
                    fraction[0] += int(tissue.sum())
                    fraction[1] += tissue.size
                yield a

    with tifffile.TiffWriter(path, bigtiff=True) as w:
        for f in (1, 4):
            n = size // f
            desc = (f"Aperio Image Library v12.0.15\r\n{n}x{n} [0,0 {n}x{n}] ({tile}x{tile}) "
                    f"RAW|AppMag = 20|MPP = {mpp * f}|Filename = synthetic")
            w.write(tiles(f), shape=(n, n, 3), dtype=np.uint8, tile=(tile, tile),
                    compression="zlib", photometric="rgb", description=desc, metadata=None)
    return fraction[0] / max(1, fraction[1])


if __name__ == "__main__":  # python -m econv_convert.examples scene|slide OUT SIZE
    import sys

    if len(sys.argv) != 4 or sys.argv[1] not in ("scene", "slide"):
        raise SystemExit("usage: python -m econv_convert.examples scene OUT.tif SIZE\n"
                         "       python -m econv_convert.examples slide OUT.svs SIZE")
    (write_scene if sys.argv[1] == "scene" else write_slide)(sys.argv[2], int(sys.argv[3]))

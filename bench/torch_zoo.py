"""Whole networks for the PyTorch benchmarks, built in this file from ``torch.nn`` (torchvision's compiled
ops do not load in every environment we measure in), and their DO-Conv twins.

Builders take a ``width`` (channels of the first stage) so that the same code runs at the published
sizes and, for smoke tests, at a fraction of them:

- :func:`cifar_resnet20`: the paper's CIFAR ResNet-v1-20 (16/32/64 channels), :mod:`doconv.experiments.models`.
- :func:`resnet` ``(depth, stem)``: ResNet-18 (basic blocks) or ResNet-50 (bottlenecks, stride on the 3x3 as in
  torchvision), with the ImageNet stem (7x7 stride 2 + max pool) or the CIFAR stem (3x3 stride 1, no pool).
- :func:`mobilenet_v2`: MobileNetV2 (inverted residuals, ReLU6, its depthwise 3x3 convs become DO-DConv).
- :func:`tcn`: a 1-D temporal convolution network (keyword spotting on MFCCs): a 3-tap stem, residual blocks of two
  dilated 3-tap ``nn.Conv1d`` (dilations 1, 2, 4, 8), global average pool over time.
- :func:`c3d`: a C3D-style 3-D network (video clips): five 3x3x3 ``nn.Conv3d`` + BN + ReLU, two of stride 2,
  global average pool.

The last two are the whole models of the 1-D / 3-D work, the same architecture in every framework's benchmark;
the PyTorch tests build their tiny forms from here too (``tests/backend_torch/conftest.py``).

:func:`twin` converts a copy with :func:`doconv.torch.convert` and randomises every D, so no layer computes
its identity-initialised kernel and no shortcut for D = I could flatter the timing.
"""

from __future__ import annotations

import torch
from torch import nn

import doconv.torch as dt
from doconv.experiments.models import build_model


def cifar_resnet20(width: int = 16, classes: int = 10) -> nn.Module:
    return build_model("resnet_v1", 20, classes, width=width)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, cout, stride)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, cout, stride)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def _shortcut(cin: int, cout: int, stride: int):
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


RESNET_BLOCKS = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)), 50: (Bottleneck, (3, 4, 6, 3))}


def resnet(depth: int, stem: str = "imagenet", width: int = 64, classes: int = 1000) -> nn.Module:
    """ResNet-18/34/50 (He et al. 2016); ``stem='cifar'``: a 3x3 stride-1 stem without max pool (32x32 inputs)."""
    if depth not in RESNET_BLOCKS:
        raise ValueError(f"depth must be one of {sorted(RESNET_BLOCKS)}, but got depth={depth!r}")
    if stem not in ("imagenet", "cifar"):
        raise ValueError(f"stem must be 'imagenet' or 'cifar', but got stem={stem!r}")
    block, counts = RESNET_BLOCKS[depth]
    if stem == "imagenet":
        layers = [nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                  nn.MaxPool2d(3, 2, 1)]
    else:
        layers = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
    cin = width
    for stage, count in enumerate(counts):
        planes = width * 2 ** stage
        for i in range(count):
            layers.append(block(cin, planes, 2 if i == 0 and stage > 0 else 1))
            cin = planes * block.expansion
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                                         nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(inplace=True), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


#: MobileNetV2's table 2: expansion t, channels c, repeats n, first stride s
MOBILENET_V2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))


def mobilenet_v2(width_mult: float = 1.0, classes: int = 1000) -> nn.Module:
    """MobileNetV2 (Sandler et al. 2018) with channel counts scaled by ``width_mult`` (at least 4)."""
    def ch(c):
        return max(4, int(round(c * width_mult)))
    cin = ch(32)
    layers = [nn.Conv2d(3, cin, 3, 2, 1, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(inplace=True)]
    for t, c, n, s in MOBILENET_V2:
        for i in range(n):
            layers.append(InvertedResidual(cin, ch(c), s if i == 0 else 1, t))
            cin = ch(c)
    last = max(ch(1280), 1280 if width_mult >= 1 else ch(1280))
    layers += [nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(inplace=True),
               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(last, classes)]
    return nn.Sequential(*layers)


class TemporalBlock(nn.Module):
    """Two dilated 3-tap convolutions (BN, ReLU between them), the input added, ReLU: length is kept."""

    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.conv1 = nn.Conv1d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm1d(channels)
        self.conv2 = nn.Conv1d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm1d(channels)
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


def tcn(width: int = 64, inputs: int = 40, classes: int = 12, dilations=(1, 2, 4, 8)) -> nn.Module:
    """A TCN for keyword spotting: input (N, ``inputs`` MFCC channels, time); a 3-tap stem to ``width`` channels,
    one :class:`TemporalBlock` per dilation, global average pool over time, a linear classifier."""
    layers = [nn.Conv1d(inputs, width, 3, padding=1, bias=False), nn.BatchNorm1d(width), nn.ReLU()]
    layers += [TemporalBlock(width, d) for d in dilations]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(width, classes))


def c3d(width: int = 16, inputs: int = 3, classes: int = 10) -> nn.Module:
    """A C3D-style network: input (N, ``inputs``, frames, H, W); 3x3x3 convolutions to width, 2, 2, 4, 4 x width
    channels (the second and fourth of stride 2), each with BN and ReLU, global average pool, a linear classifier."""
    layers, cin = [], inputs
    for factor, stride in ((1, 1), (2, 2), (2, 1), (4, 2), (4, 1)):
        layers += [nn.Conv3d(cin, factor * width, 3, stride, 1, bias=False), nn.BatchNorm3d(factor * width), nn.ReLU()]
        cin = factor * width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(cin, classes))


def randomise_D(model: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Every DO-Conv layer's D' drawn from N(0, std): D is never the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in dt.doconv_layers(model).values():
            if layer.D is not None:
                layer.D.copy_(torch.randn(layer.D.shape, generator=g) * std)
    return model


def twin(plain: nn.Module, W_storage: str = "c-major", seed: int = 0) -> nn.Module:
    """A DO-Conv copy of ``plain`` (``doconv.torch.convert``), D randomised; ``plain`` is left as it is."""
    model, _ = dt.convert(plain, W_storage=W_storage)
    return randomise_D(model, seed)


def count_layers(model: nn.Module) -> int:
    return len({id(m) for m in dt.doconv_layers(model).values()})

"""The CIFAR networks of the paper's Table 1, built from ``nn.Conv2d`` (the baselines).

Plain-20, ResNet-v1 (He et al. 2016a, basic blocks, post-activation) and ResNet-v2 (He et al.
2016b, pre-activation), depth = 6n + 2 for n blocks per stage, as in the CIFAR experiments the
paper follows (Section 4.1, its refs. [15, 16]) and in GluonCV's ``cifar_resnet``. Their DO-Conv
twins are not built here: the protocol converts a copy of the baseline (``doconv.torch.convert``),
so the replacement of the non-pointwise convolutions is the one and only difference.

Module paths name the stages of Table 6, which a DO-Conv stage selection uses::

    stage0            the 3x3 stem conv (ResNet-v2: after a data BatchNorm), width w
    stage1..stage3    n blocks each, widths w, 2w, 4w, stride 1, 2, 2
    head              (v2: BN + ReLU), global average pool, linear classifier

A block's shapes change only in its first conv; the shortcut then is a 1x1 conv with stride 2
(+ BN for v1), GluonCV's "downsample". 1x1 convs are pointwise: DO-Conv never replaces them.
"""

from __future__ import annotations

from typing import Dict, Tuple

from torch import nn

#: --model names and their block types
ARCHITECTURES = ("plain", "resnet_v1", "resnet_v2")
#: Depths of the paper's CIFAR table; any 6n + 2 is accepted.
PAPER_DEPTHS: Dict[str, Tuple[int, ...]] = {"plain": (20,), "resnet_v1": (20, 56, 110), "resnet_v2": (20, 56, 110)}
STAGES = (0, 1, 2, 3)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def downsample(in_channels: int, out_channels: int, stride: int, norm: bool) -> nn.Module:
    conv = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels)) if norm else conv


class BasicBlockV1(nn.Module):
    """conv-BN-ReLU-conv-BN, added to the shortcut, ReLU (ResNet-v1); ``skip=False`` gives Plain."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, skip: bool = True):
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.skip = skip
        changes = stride != 1 or in_channels != out_channels
        self.downsample = downsample(in_channels, out_channels, stride, norm=True) if skip and changes else None

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.skip:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class BasicBlockV2(nn.Module):
    """BN-ReLU-conv-BN-ReLU-conv added to the shortcut (ResNet-v2, pre-activation)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, skip: bool = True):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.relu = nn.ReLU(inplace=True)
        changes = stride != 1 or in_channels != out_channels
        self.downsample = downsample(in_channels, out_channels, stride, norm=False) if changes else None

    def forward(self, x):
        act = self.relu(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(act)
        out = self.conv2(self.relu(self.bn2(self.conv1(act))))
        return out + shortcut


class CifarNet(nn.Module):
    """Plain / ResNet-v1 / ResNet-v2 for small images; see the module docstring for the layout."""

    def __init__(self, arch: str, depth: int, num_classes: int, *, width: int = 16, in_channels: int = 3):
        super().__init__()
        blocks = blocks_per_stage(arch, depth)
        for name, value in (("num_classes", num_classes), ("width", width), ("in_channels", in_channels)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, but got {name}={value!r}")
        self.arch, self.depth = arch, depth
        v2 = arch == "resnet_v2"
        block = BasicBlockV2 if v2 else BasicBlockV1
        stem = [conv3x3(in_channels, width)]
        if v2:  # GluonCV's cifar_resnet v2 normalises the data with an affine-free BN first
            stem.insert(0, nn.BatchNorm2d(in_channels, affine=False))
        else:
            stem += [nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        self.stage0 = nn.Sequential(*stem)
        channels = width
        for index, stride in ((1, 1), (2, 2), (3, 2)):
            out = width * 2 ** (index - 1)
            layers = [block(channels if i == 0 else out, out, stride if i == 0 else 1, skip=arch != "plain")
                      for i in range(blocks)]
            setattr(self, f"stage{index}", nn.Sequential(*layers))
            channels = out
        head = [nn.BatchNorm2d(channels), nn.ReLU(inplace=True)] if v2 else []
        self.head = nn.Sequential(*head, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He init (fan_out) for convs, as torchvision's ResNet; BN weight 1, bias 0; default Linear."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d) and module.affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x):
        for stage in (self.stage0, self.stage1, self.stage2, self.stage3, self.head):
            x = stage(x)
        return x


def blocks_per_stage(arch: str, depth: int) -> int:
    """n for depth = 6n + 2 (each basic block holds two 3x3 convs, plus stem conv and classifier)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"model must be one of {ARCHITECTURES}, but got model={arch!r}")
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n + 2 with n >= 1 (the paper uses {PAPER_DEPTHS[arch]} for {arch}), "
                         f"but got depth={depth!r}")
    return (depth - 2) // 6


def build_model(arch: str, depth: int, num_classes: int, *, width: int = 16, in_channels: int = 3) -> CifarNet:
    """The baseline network; ``width=16`` is the paper's (16/32/64 channels per stage)."""
    return CifarNet(arch, depth, num_classes, width=width, in_channels=in_channels)


def stage_of(module_path: str) -> str:
    """The stage a module path belongs to: its first component (``'stage2.1.conv1'`` -> ``'stage2'``).

    Works for any model whose top-level children are its stages (torchvision: ``layer1``...).
    """
    return module_path.split(".", 1)[0]


def stage_prefixes(stages) -> Tuple[str, ...]:
    """Module-path prefixes of a Table 6 stage selection, e.g. ``(0, 2)`` -> ``('stage0.', 'stage2.')``."""
    out = []
    for stage in stages:
        if stage not in STAGES:
            raise ValueError(f"stages must be drawn from {STAGES}, but got stages={tuple(stages)!r}")
        out.append(f"stage{stage}.")
    if not out:
        raise ValueError("stages must select at least one stage, but got stages=()")
    return tuple(sorted(set(out)))

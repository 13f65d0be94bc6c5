"""Shared helpers of the PyTorch backend tests: layers from the case table, gradients, small model zoos.

pytest runs in importlib mode (no test folder on sys.path), so tests reach these helpers through the
``h`` fixture, which is this module.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import doconv
from doconv.cases import select
from doconv.selfcheck import layer_vjp
from doconv.torch import UNSUPPORTED_FEATURES, DOConv1d, DOConv2d, DOConv3d, set_params

CASES = select(UNSUPPORTED_FEATURES)
DTYPES = ("float32", "float64")
#: The layer class and torch's convolution class of each rank.
LAYERS = {1: DOConv1d, 2: DOConv2d, 3: DOConv3d}
CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def make_layer(case, dtype="float64", seed=0, **kwargs):
    """The case's layer, made as a user makes it (the class of the case's rank, the case's arguments), with the
    case's randomised parameters (D is never the identity)."""
    layer = LAYERS[case.rank](**case.kwargs, dtype=getattr(torch, dtype), **kwargs)
    set_params(layer, case.params(seed, np.float64))
    return layer


def spatial_dims(rank: int) -> tuple:
    """The spatial dimensions of a (N, C, *spatial) tensor or an OIHW kernel: (2,) ... (2, 3, 4)."""
    return tuple(range(2, 2 + rank))


def torch_grads(layer, x: torch.Tensor, u: np.ndarray):
    """(output, {'x', 'W', 'D', 'bias'} gradients) of <u, layer(x)>, D's gradient being that of the delta."""
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out = layer(x)
    out.backward(torch.as_tensor(u, dtype=out.dtype))
    grads = {"x": x.grad, "W": layer.W.grad, "D": None if layer.D is None else layer.D.grad,
             "bias": None if layer.bias is None else layer.bias.grad}
    return out.detach(), {k: v.numpy() for k, v in grads.items() if v is not None}


def reference(case, seed=0):
    """Core forward and VJP in float64 for the case's parameters, input and a random cotangent."""
    p, x = case.params(seed, np.float64), case.input(seed, np.float64)
    out = doconv.forward(x, p, case.config)
    u = np.random.default_rng(seed + 7).normal(size=out.shape)
    return x, out, u, layer_vjp(u, x, p, case.config)


# ---- small model zoos (torchvision has no CPU wheel here; same topology, fewer channels) ------------

class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


def resnet18(width=8, classes=10):
    """ResNet-18's topology (7x7 stem, maxpool, 4 stages of 2 basic blocks) at 1/8 of the width."""
    widths = [width, 2 * width, 4 * width, 8 * width]
    layers = [nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = width
    for i, w in enumerate(widths):
        layers += [BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)]
        cin = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


def mobilenet_v2(classes=10):
    """MobileNet-v2's topology (inverted residuals with depthwise 3x3) at reduced width and depth."""
    settings = [(1, 8, 1, 1), (6, 12, 2, 2), (6, 16, 2, 2), (6, 24, 1, 2)]  # expand, channels, repeats, stride
    layers = [nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6()]
    cin = 8
    for t, c, n, s in settings:
        for i in range(n):
            layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
            cin = c
    layers += [nn.Conv2d(cin, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU6(), nn.AdaptiveAvgPool2d(1),
               nn.Flatten(), nn.Linear(64, classes)]
    return nn.Sequential(*layers)


def randomize_bn(model, seed=0):
    """Non-trivial BatchNorm statistics (identity-like values hide bugs, the DBB lesson)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def bench_zoo():
    """``bench/torch_zoo.py``, where the 1-D and 3-D whole models (``tcn``, ``c3d``) are defined once for the
    benchmark and these tests (pytest's importlib mode puts no bench folder on sys.path)."""
    if "torch_zoo" not in sys.modules:
        path = Path(__file__).resolve().parents[2] / "bench" / "torch_zoo.py"
        spec = importlib.util.spec_from_file_location("torch_zoo", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["torch_zoo"] = module
    return sys.modules["torch_zoo"]


def tiny_tcn():
    """The TCN of the 1-D work at 1/8 of its width: input (N, 40, time)."""
    return bench_zoo().tcn(width=8)


def tiny_c3d():
    """The C3D-style network of the 3-D work at 1/4 of its width: input (N, 3, frames, H, W)."""
    return bench_zoo().c3d(width=4)


@pytest.fixture(params=["resnet18", "mobilenet_v2"])
def zoo_model(request):
    torch.manual_seed(0)
    model = {"resnet18": resnet18, "mobilenet_v2": mobilenet_v2}[request.param]()
    return randomize_bn(model).eval()


@pytest.fixture(scope="session")
def h():
    """The helpers of this conftest (make_layer, reference, torch_grads, resnet18, mobilenet_v2, ...)."""
    return sys.modules[__name__]

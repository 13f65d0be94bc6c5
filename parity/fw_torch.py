"""PyTorch adapter: ``doconv.torch`` through its contract names, autograd and ``torch.optim.SGD``.

The layer sits in ``nn.Sequential(conv=layer)`` so model-level functions (``fold``, ``export_canonical``)
see the module path ``conv``. Inference is ``model.eval()`` under ``torch.no_grad()``.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .frameworks import Framework, Layer, import_backend


class TorchFramework(Framework):
    name = family = "torch"
    official_flavour = "torch"

    def __init__(self):
        self.backend = import_backend("torch", "torch", "doconv.torch")
        import torch
        self.torch = torch
        self.unsupported = frozenset(self.backend.UNSUPPORTED_FEATURES)

    def _t(self, a, layer: Layer):
        return self.torch.from_numpy(np.ascontiguousarray(a, dtype=layer.dtype))

    def build(self, config, dtype, composition="kernel") -> Layer:
        conv = self.backend.layer_from_config(config, dtype=dtype, composition=composition)
        model = self.torch.nn.Sequential(OrderedDict(conv=conv))
        return Layer(model, conv, config, dtype)

    def forward(self, layer, x, *, training=True):
        layer.obj.train(training)
        with self.torch.set_grad_enabled(training):
            return layer.obj(self._t(x, layer)).detach().numpy()

    def _named(self, layer):
        return {name: p for name, p in layer.layer.named_parameters() if p.requires_grad}

    def trainables(self, layer):
        return {name: p.detach().numpy().copy() for name, p in self._named(layer).items()}

    def gradients(self, layer, x, u):
        layer.obj.train(True)
        layer.obj.zero_grad(set_to_none=True)
        xt = self._t(x, layer).requires_grad_(True)
        (layer.obj(xt) * self._t(u, layer)).sum().backward()
        return xt.grad.numpy(), {n: p.grad.numpy().copy() for n, p in self._named(layer).items() if p.grad is not None}

    def perturb(self, layer, deltas):
        with self.torch.no_grad():
            for name, p in self._named(layer).items():
                p.add_(self._t(deltas[name], layer))

    def raw_write(self, layer, deltas):
        for name, p in self._named(layer).items():
            p.data.add_(self._t(deltas[name], layer))  # .data bumps no version counter of the parameter

    def sgd(self, layer, x, u, lr, steps):
        layer.obj.train(True)
        optimizer = self.torch.optim.SGD(layer.obj.parameters(), lr=lr)
        xt, ut = self._t(x, layer), self._t(u, layer)
        for _ in range(steps):
            optimizer.zero_grad()
            (layer.obj(xt) * ut).sum().backward()
            optimizer.step()

    def fold(self, layer):
        folded, _ = self.backend.fold(layer.obj)
        plain = folded.conv
        expected = {1: self.torch.nn.Conv1d, 2: self.torch.nn.Conv2d, 3: self.torch.nn.Conv3d}[layer.config.rank]
        if not isinstance(plain, expected):  # (nn.ConvNd itself, or the FoldedConvNd subclass for per-side pads)
            raise TypeError(f"fold left {type(plain).__name__} at 'conv', expected an nn.{expected.__name__}")
        folded.eval()

        def run(x):
            with self.torch.no_grad():
                return folded(self._t(x, layer)).numpy()
        bias = None if plain.bias is None else plain.bias.detach().numpy()
        return plain.weight.detach().numpy(), bias, run


def frameworks():
    return [TorchFramework()]

"""MXNet Gluon adapter: ``doconv.mxnet`` on the CPU context, channels first (NCW, NCHW, NCDHW: MXNet's CPU
convolutions run no channels-last layout), every rank (``layer_from_config`` picks DOConv1D/2D/3D by it).

The layer sits in a ``gluon.nn.HybridSequential`` (the model-level functions take a network); gradients
come from ``autograd.record`` + ``backward(out_grad=u)``, training from ``gluon.Trainer('sgd')`` with
no momentum and no weight decay; inference is a call outside ``autograd.record`` (predict mode).
This adapter imports no torch: it runs in the separate MXNet environment (see ``doconv-parity export``).
"""

from __future__ import annotations

import warnings

import numpy as np

from .frameworks import Framework, Layer, import_backend


def _official_gluon_supports(config) -> bool:
    return config.rank == 2 and config.S == config.MN  # the official GluonCV layer: 2-D, D_mul = M*N only


class GluonFramework(Framework):
    name = family = "mxnet"
    official_flavour = "gluon"
    official_supports = staticmethod(_official_gluon_supports)

    def __init__(self):
        with warnings.catch_warnings():  # mxnet 1.9.1 with numpy 1.23 warns about np.bool at import
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"mxnet(\.|$)")
            self.backend = import_backend("mxnet", "mxnet", "doconv.mxnet")
            import mxnet as mx
        self.mx = mx
        self.ctx = mx.cpu()
        self.unsupported = frozenset(self.backend.UNSUPPORTED_FEATURES)

    def _nd(self, a, layer: Layer):
        return self.mx.nd.array(np.asarray(a, dtype=layer.dtype), ctx=self.ctx, dtype=layer.dtype)

    def build(self, config, dtype, composition="kernel") -> Layer:
        conv = self.backend.layer_from_config(config, dtype=dtype, composition=composition, ctx=self.ctx)
        net = self.mx.gluon.nn.HybridSequential()
        net.add(conv)
        return Layer(net, conv, config, dtype)

    def forward(self, layer, x, *, training=True):
        if training:
            with self.mx.autograd.train_mode():
                return layer.obj(self._nd(x, layer)).asnumpy()
        return layer.obj(self._nd(x, layer)).asnumpy()

    def _params(self, layer):
        # Keyed by position: Gluon parameter names start with the block's unique prefix.
        return {str(i): p for i, p in enumerate(p for p in layer.layer.collect_params().values()
                                                if p.grad_req != "null")}

    def trainables(self, layer):
        return {name: p.data(self.ctx).asnumpy() for name, p in self._params(layer).items()}

    def _backward(self, layer, x, u):
        with self.mx.autograd.record(train_mode=True):
            out = layer.obj(x)
        out.backward(self._nd(u, layer))

    def gradients(self, layer, x, u):
        xt = self._nd(x, layer)
        xt.attach_grad()
        self._backward(layer, xt, u)
        return xt.grad.asnumpy(), {n: p.grad(self.ctx).asnumpy() for n, p in self._params(layer).items()}

    def perturb(self, layer, deltas):
        for name, p in self._params(layer).items():
            p.set_data(p.data(self.ctx) + self._nd(deltas[name], layer))

    def raw_write(self, layer, deltas):
        for name, p in self._params(layer).items():
            p.data(self.ctx)[:] += self._nd(deltas[name], layer)  # the NDArray in place: no Gluon call sees it

    def sgd(self, layer, x, u, lr, steps):
        trainer = self.mx.gluon.Trainer(self._params(layer), "sgd", {"learning_rate": lr, "momentum": 0.0, "wd": 0.0})
        xt = self._nd(x, layer)
        for _ in range(steps):
            self._backward(layer, xt, u)
            trainer.step(1)

    def fold(self, layer):
        folded, _ = self.backend.fold(layer.obj)
        plain = [folded[i] for i in range(len(folded))]
        want = getattr(self.mx.gluon.nn, f"Conv{layer.config.rank}D")  # the plain convolution of that rank
        if len(plain) != 1 or type(plain[0]) is not want:
            raise TypeError(f"fold gave {[type(b).__name__ for b in plain]}, expected one plain "
                            f"gluon.nn.{want.__name__}")
        conv = plain[0]
        bias = None if conv.bias is None else conv.bias.data(self.ctx).asnumpy()
        return (conv.weight.data(self.ctx).asnumpy(), bias,
                lambda x: folded(self._nd(x, layer)).asnumpy())


def frameworks():
    return [GluonFramework()]

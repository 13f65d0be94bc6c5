"""A framework made of the core itself: the harness's own reference adapter and its test double.

:class:`CoreFramework` stores what a backend stores (W, the trainable delta D' = D - I_fill, bias),
computes with :func:`doconv.forward` and :func:`doconv.selfcheck.layer_vjp` (its "autograd"), and reuses
a composed kernel only inside its :meth:`CoreFramework.cached` scope, as the backends do. Every check passes on it to rounding, and the harness's tests derive deliberately
wrong adapters from it (a transposed D, the official pairing, a dropped bias, 'same' off by one,
a stale cache) to prove that each check can fail, without any framework installed.
"""

from __future__ import annotations

import contextlib
from typing import Dict

import numpy as np

from doconv import DOConvConfig, DOConvParams, compose, conv, forward, load, save
from doconv.layouts import D_to_delta, delta_to_D, from_official
from doconv.selfcheck import layer_vjp

from .frameworks import Framework, Layer

NAME = "conv"


class CoreFramework(Framework):
    """The NumPy core seen as a framework (canonical storage, so the probe finds the identity map)."""

    name = family = "numpy"
    official_flavour = "torch"

    def build(self, config: DOConvConfig, dtype: str, composition: str = "kernel") -> Layer:
        params = DOConvParams(np.zeros(config.W_shape, dtype), None if not config.has_D else
                              np.zeros(config.D_shape, dtype), np.zeros(config.bias_shape, dtype) if config.bias else None)
        layer = Layer(obj={}, layer=None, config=config, dtype=dtype, state={"composition": composition})
        self.set_params(layer, params)
        return layer

    # storage: {"W": W, "D": delta D', "bias": bias}
    def set_params(self, layer: Layer, params: DOConvParams) -> None:
        params.check(layer.config, where=f"{self.name} layer")
        p = params.astype(layer.dtype)
        layer.obj = {k: v.copy() for k, v in (("W", p.W), ("D", D_to_delta(p.D, layer.config)),
                                               ("bias", p.bias)) if v is not None}

    def get_params(self, layer: Layer) -> DOConvParams:
        o = layer.obj
        return DOConvParams(o["W"].copy(), delta_to_D(o.get("D"), layer.config), None if "bias" not in o
                            else o["bias"].copy())

    @contextlib.contextmanager
    def cached(self, layer: Layer):
        layer.state["scope"] = None  # the scope's (kernel, ...) once an inference call composed it
        try:
            yield layer
        finally:
            del layer.state["scope"]

    def forward(self, layer: Layer, x: np.ndarray, *, training: bool = True) -> np.ndarray:
        params, config = self.get_params(layer), layer.config
        x = x.astype(layer.dtype)
        if training and layer.state["composition"] == "feature":
            return forward(x, params, config, composition="feature")
        if training or "scope" not in layer.state or not config.has_D:  # 1x1: W' is W, nothing to cache
            return self.plain_conv(x, self.compose_kernel(params, config), params.bias, config)
        if layer.state["scope"] is None:
            layer.state["scope"] = self.compose_kernel(params, config)
        return self.plain_conv(x, layer.state["scope"], params.bias, config)

    def compose_kernel(self, params: DOConvParams, config: DOConvConfig) -> np.ndarray:
        """W' = D^T o W (paper Eq. 3), the paper's pairing."""
        return compose(params, config)

    def plain_conv(self, x, kernel, bias, config: DOConvConfig) -> np.ndarray:
        """The conventional convolution with the layer's geometry."""
        return conv(x, kernel, bias, stride=config.stride, padding=config.padding, dilation=config.dilation,
                    groups=config.groups, padding_mode=config.padding_mode)

    def trainables(self, layer: Layer) -> Dict[str, np.ndarray]:
        return {k: v.copy() for k, v in layer.obj.items()}

    def gradients(self, layer: Layer, x: np.ndarray, u: np.ndarray):
        grads = layer_vjp(u.astype(layer.dtype), x.astype(layer.dtype), self.get_params(layer), layer.config)
        return grads.pop("x"), grads  # d/dD' = d/dD: D = I_fill + D'

    def perturb(self, layer: Layer, deltas: Dict[str, np.ndarray]) -> None:
        for key, delta in deltas.items():
            layer.obj[key] = layer.obj[key] + delta.astype(layer.dtype)

    def raw_write(self, layer: Layer, deltas: Dict[str, np.ndarray]) -> None:
        for key, delta in deltas.items():
            layer.obj[key] += delta.astype(layer.dtype)  # in place, as a framework's unhooked write

    def sgd(self, layer: Layer, x: np.ndarray, u: np.ndarray, lr: float, steps: int) -> None:
        for _ in range(steps):
            _, grads = self.gradients(layer, x, u)
            self.perturb(layer, {k: -lr * g for k, g in grads.items()})

    def fold(self, layer: Layer):
        params = self.get_params(layer)
        kernel, bias = self.compose_kernel(params, layer.config), params.bias
        return kernel, bias, lambda x: self.plain_conv(x.astype(layer.dtype), kernel, bias, layer.config)

    def export_canonical(self, layer: Layer, path: str) -> None:
        save(path, {NAME: (layer.config, self.get_params(layer))})

    def import_canonical(self, layer: Layer, path: str) -> None:
        layers = load(path)
        if NAME not in layers:
            raise ValueError(f"{path!r} has no layer {NAME!r} (it has {sorted(layers)})")
        config, params = layers[NAME]
        if config != layer.config:
            raise ValueError(f"layer {NAME!r}: file config {config!r} differs from the layer's {layer.config!r}")
        self.set_params(layer, params)

    def import_official(self, layer: Layer, arrays, *, refold: bool = False) -> None:
        self.set_params(layer, from_official(arrays, layer.config, self.official_flavour, refold=refold))


def frameworks():
    """Nothing to select: ``core`` in the framework list means the core's self-check rows."""
    return []


"""Deliberately wrong adapters for the parity harness's own tests: each must be caught by a check.

Every fault is one small, realistic bug, written as a subclass of an honest adapter: the core seen as a
framework (:class:`doconv.parity.fw_core.CoreFramework`, no framework needed) and, where torch is
installed, the real torch backend (:class:`doconv.parity.fw_torch.TorchFramework`).
"""

import contextlib

import numpy as np
import pytest

from doconv import DOConvParams, compose, pairing_index
from doconv.parity.fw_core import CoreFramework


def transposed(D, config):
    """D stored as (C_in, S, MN) and read back with a reshape instead of a transpose."""
    return None if D is None else np.ascontiguousarray(D.transpose(0, 2, 1)).reshape(config.D_shape)


def official_torch_D(D, config):
    """D re-indexed so the paper's composition reads the official PyTorch layer's channel pairing."""
    if D is None:
        return None
    out = D.copy()
    out[pairing_index(config, "paper").ravel()] = D[pairing_index(config, "official-torch").ravel()]
    return out


def swapped_same_pads(config, spatial):
    """'same' with the odd pixel at the start (off by one against TensorFlow's rule)."""
    if config.padding != "same":
        return config.padding
    return tuple((hi, lo) for lo, hi in config.pads(*spatial))


class CoreTransposedD(CoreFramework):
    name = "fault:transposed-D"

    def compose_kernel(self, params, config):
        return compose(DOConvParams(params.W, transposed(params.D, config), params.bias), config)


class CoreOfficialPairing(CoreFramework):
    name = "fault:official-pairing"

    def compose_kernel(self, params, config):
        return compose(params, config, pairing="official-torch")


class CoreDroppedBias(CoreFramework):
    name = "fault:dropped-bias"

    def plain_conv(self, x, kernel, bias, config):
        return super().plain_conv(x, kernel, None, config)


class CoreSameOffByOne(CoreFramework):
    name = "fault:same-off-by-one"

    def plain_conv(self, x, kernel, bias, config):
        import dataclasses
        wrong = dataclasses.replace(config, padding=swapped_same_pads(config, x.shape[2:]))
        return super().plain_conv(x, kernel, bias, wrong)


class CoreStaleCache(CoreFramework):
    name = "fault:stale-cache"

    def forward(self, layer, x, *, training=True):  # an implicit inference cache keyed on the arrays' identities
        if training:
            return super().forward(layer, x, training=True)
        key = tuple(id(v) for v in layer.obj.values())
        if layer.state.get("implicit", (None,))[0] != key:
            layer.state["implicit"] = (key, self.compose_kernel(self.get_params(layer), layer.config))
        return self.plain_conv(x.astype(layer.dtype), layer.state["implicit"][1], self.get_params(layer).bias,
                               layer.config)


class CoreCacheIgnored(CoreFramework):
    name = "fault:cache-ignored"

    def cached(self, layer):  # a scope that caches nothing: the explicit path is not what it claims
        return contextlib.nullcontext(layer)


CORE_FAULTS = {
    # fault class, case ids it shows on, the check that must fail
    "transposed-D": (CoreTransposedD, ["k3", "k5-Dmul+3"], "forward"),
    "official-pairing": (CoreOfficialPairing, ["g3-k3", "dw-x2-k3"], "forward"),
    "dropped-bias": (CoreDroppedBias, ["k3", "g2-k3"], "forward"),
    "same-off-by-one": (CoreSameOffByOne, ["k2x2-same", "k3-s2-same"], "forward"),
    "stale-cache": (CoreStaleCache, ["k3", "g3-k3"], "fresh kernel"),
    "cache-ignored": (CoreCacheIgnored, ["k3", "g3-k3"], "fresh kernel"),
}


def torch_faults():
    """The same bugs wrapped around the real torch backend (empty when torch or doconv.torch is missing)."""
    try:
        from doconv.parity.frameworks import Missing
        from doconv.parity.fw_torch import TorchFramework
        TorchFramework()
    except (ImportError, Missing):
        return {}

    class TorchTransposedD(TorchFramework):
        name = "fault:torch-transposed-D"

        def set_params(self, layer, params):
            super().set_params(layer, DOConvParams(params.W, transposed(params.D, layer.config), params.bias))

    class TorchOfficialPairing(TorchFramework):
        name = "fault:torch-official-pairing"

        def set_params(self, layer, params):
            super().set_params(layer, DOConvParams(params.W, official_torch_D(params.D, layer.config), params.bias))

    class TorchDroppedBias(TorchFramework):
        name = "fault:torch-dropped-bias"

        def forward(self, layer, x, *, training=True):
            out = super().forward(layer, x, training=training)
            b = self.get_params(layer).bias
            return out if b is None else out - b.reshape(1, -1, 1, 1)

    class TorchSameOffByOne(TorchFramework):
        name = "fault:torch-same-off-by-one"

        def forward(self, layer, x, *, training=True):
            import dataclasses
            config = layer.config
            wrong = dataclasses.replace(config, padding=swapped_same_pads(config, x.shape[2:]))
            twin = self.build(wrong, layer.dtype)
            super().set_params(twin, self.get_params(layer))
            return super().forward(twin, x, training=training)

    class TorchStaleCache(TorchFramework):
        name = "fault:torch-stale-cache"

        def forward(self, layer, x, *, training=True):  # an inference memo never invalidated
            if training:
                return super().forward(layer, x, training=True)
            key = x.tobytes()
            if key not in layer.state.setdefault("memo", {}):
                layer.state["memo"][key] = super().forward(layer, x, training=False)
            return layer.state["memo"][key]

    return {
        "torch-transposed-D": (TorchTransposedD, ["k3"], "forward"),
        "torch-official-pairing": (TorchOfficialPairing, ["g3-k3"], "forward"),
        "torch-dropped-bias": (TorchDroppedBias, ["k3"], "forward"),
        "torch-same-off-by-one": (TorchSameOffByOne, ["k2x2-same"], "forward"),
        "torch-stale-cache": (TorchStaleCache, ["k3"], "fresh kernel"),
    }


@pytest.fixture
def use_frameworks(monkeypatch):
    """Make ``doconv-parity`` run exactly the given adapter objects (whatever -f says)."""
    def install(*frameworks):
        import doconv.parity.__main__ as cli
        monkeypatch.setattr(cli, "load_frameworks", lambda names: (list(frameworks), []))
    return install


def pytest_generate_tests(metafunc):
    """``fault``: every wrong adapter (core-based, plus torch-based where torch is installed);
    ``core_fault``: the core-based ones only."""
    if "fault" in metafunc.fixturenames:
        faults = {**CORE_FAULTS, **torch_faults()}
        metafunc.parametrize("fault", [faults[k] for k in sorted(faults)], ids=sorted(faults))
    if "core_fault" in metafunc.fixturenames:
        metafunc.parametrize("core_fault", [CORE_FAULTS[k] for k in sorted(CORE_FAULTS)], ids=sorted(CORE_FAULTS))


@pytest.fixture
def core_faults():
    return CORE_FAULTS

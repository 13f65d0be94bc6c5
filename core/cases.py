"""The one shared table of test cases: the core's tests, every backend's tests and the parity harness.

Each :class:`Case` is a layer config (the constructor arguments as a user writes them, so a backend
can pass ``padding`` on unchanged) plus a channels-first input shape, whose length gives the rank: a
backend builds its 1-D, 2-D or 3-D layer from :attr:`Case.rank` and passes :attr:`Case.kwargs` as they are. :meth:`Case.params` always randomises D
around I_fill: an identity D hides channel-pairing bugs (every D slice would be the same).

Not every framework can express every case: :attr:`Case.features` lists what a case needs beyond
zero padding by ``'same'``/``'valid'``/symmetric ints, and a backend skips the cases whose features
it lacks (Keras has no explicit or non-zero padding, Gluon pads symmetrically with zeros, PyTorch
refuses ``'same'`` with stride > 1), saying so.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, FrozenSet, List, Optional, Tuple

import numpy as np

from .compose import DOConvParams, identity_fill, init_params
from .config import DOConvConfig

#: Features a case may need (see :attr:`Case.features`).
FEATURES = (
    "explicit_padding",    # numeric padding rather than 'same'/'valid'
    "asymmetric_padding",  # per-side pads that differ between top/bottom or left/right
    "padding_mode",        # reflect / replicate / circular
    "same_strided",        # padding='same' with stride > 1 (TensorFlow's rule)
    "same_even_kernel",    # padding='same' whose total pad is odd (the odd pixel at the end)
    "stride_and_dilation", # stride > 1 together with dilation > 1 (Keras refuses it)
    "causal_padding",      # padding='causal' (1-D only; Keras Conv1D's)
    "conv1d",              # a 1-D layer
    "conv3d",              # a 3-D layer
)


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    kwargs: Dict[str, Any]
    input_shape: Tuple[int, ...]

    @property
    def rank(self) -> int:
        """Spatial axes of the layer: 1, 2 or 3 (the input is ``(N, C, *spatial)``)."""
        return len(self.input_shape) - 2

    @property
    def config(self) -> DOConvConfig:
        return DOConvConfig(**self.kwargs, rank=self.rank)

    @property
    def features(self) -> FrozenSet[str]:
        c, raw = self.config, self.kwargs.get("padding", 0)
        out = {1: {"conv1d"}, 2: set(), 3: {"conv3d"}}[self.rank]
        asymmetric = lambda pads: any(lo != hi for lo, hi in pads)  # noqa: E731
        if not isinstance(raw, str):
            out.add("explicit_padding")
            if asymmetric(c.padding):
                out.add("asymmetric_padding")
        elif raw.lower() == "causal":
            out.add("causal_padding")
        elif raw.lower() == "same":
            if max(c.stride) > 1:
                out.add("same_strided")
            if asymmetric(c.pads(*self.input_shape[2:])):
                out.add("same_even_kernel")
        if c.padding_mode != "zeros":
            out.add("padding_mode")
        if max(c.stride) > 1 and max(c.dilation) > 1:
            out.add("stride_and_dilation")
        return frozenset(out)

    def params(self, seed: int = 0, dtype=np.float64, *, d_scale: float = 0.5) -> DOConvParams:
        """Random W and bias, and D = I_fill + N(0, d_scale^2/S) noise: never the identity."""
        rng = np.random.default_rng(seed)
        c = self.config
        p = init_params(c, rng=rng, dtype=np.float64)
        if c.has_D:
            noise = rng.normal(0.0, d_scale / np.sqrt(c.S), size=c.D_shape)
            p.D = identity_fill(c.MN, c.S) + noise
        if c.bias:
            p.bias = rng.normal(0.0, 0.5, size=c.bias_shape)
        return p.astype(dtype)

    def input(self, seed: int = 0, dtype=np.float64) -> np.ndarray:
        return np.random.default_rng(seed + 10_000).normal(size=self.input_shape).astype(dtype)

    def __str__(self) -> str:
        return self.id


def _case(id: str, cin: int, cout: int, k, hw=(7, 9), batch: int = 2, **kw) -> Case:
    return Case(id, dict(in_channels=cin, out_channels=cout, kernel_size=k, **kw), (batch, cin, *hw))


def _case1d(id: str, cin: int, cout: int, k, length: int = 11, **kw) -> Case:
    return _case(f"1d-{id}", cin, cout, k, hw=(length,), **kw)


def _case3d(id: str, cin: int, cout: int, k, dhw=(5, 6, 4), **kw) -> Case:
    return _case(f"3d-{id}", cin, cout, k, hw=dhw, **kw)


#: The table. Ids name what each case exercises; every kernel size, stride, dilation, grouping,
#: D_mul, bias and padding mode the design calls for appears at least once, in each rank.
CASES: List[Case] = [
    _case("k1x1", 4, 6, 1, padding="valid"),
    _case("k1x1-g2-s2", 4, 6, 1, groups=2, stride=2, padding="valid", bias=False),
    _case("k3", 3, 5, 3, padding=1),
    _case("k3-nobias", 3, 5, 3, padding="same", bias=False),
    _case("k3-valid", 4, 4, 3, padding="valid"),
    _case("k3-same", 4, 6, 3, padding="same"),
    _case("k3-s2", 4, 6, 3, stride=2, padding=1),
    _case("k3-s2-same", 4, 6, 3, stride=2, padding="same", hw=(8, 9)),
    _case("k3-d2", 4, 5, 3, dilation=2, padding=2, hw=(9, 8)),
    _case("k3-s2-d2", 4, 5, 3, stride=2, dilation=2, padding=2, hw=(9, 10)),
    _case("k3-s2-d2-same", 4, 5, 3, stride=2, dilation=2, padding="same", hw=(9, 10)),
    _case("k5-Dmul+3", 3, 4, 5, padding="same", D_mul=28, hw=(8, 8)),
    _case("k5-s2-2MN", 3, 4, 5, stride=2, padding=2, D_mul=50, hw=(9, 9)),
    _case("k3x1-2MN", 4, 6, (3, 1), padding=(1, 0), D_mul=6),
    _case("k2x2-same", 3, 4, 2, padding="same", hw=(6, 7)),
    _case("k2x2-valid-Dmul+3", 3, 4, 2, padding="valid", D_mul=7),
    _case("k3-dsep-Dmul4", 4, 6, 3, padding=1, D_mul=4, depthwise_separable=True),
    _case("g2-k3-dsep-Dmul5", 4, 6, 3, groups=2, padding="same", D_mul=5, depthwise_separable=True),
    _case("k1x3-same", 2, 3, (1, 3), padding="same", bias=False),
    _case("dw-k3", 4, 4, 3, groups=4, padding="same"),
    _case("dw-k3-s2-nobias", 6, 6, 3, groups=6, stride=2, padding=1, bias=False),
    _case("dw-x2-k3", 4, 8, 3, groups=4, padding="same"),
    _case("dw-x2-k3-s2-2MN", 3, 6, 3, groups=3, stride=2, padding=1, D_mul=18),
    _case("dw-x3-k5-same", 2, 6, 5, groups=2, padding="same", hw=(8, 8)),
    _case("g2-k3", 4, 6, 3, groups=2, padding=1),
    _case("g3-k3", 6, 9, 3, groups=3, padding="same"),
    _case("g3-k3-s2-Dmul+3", 6, 9, 3, groups=3, stride=2, padding=1, D_mul=12),
    _case("g3-k3-s2-same-2MN", 6, 9, 3, groups=3, stride=2, padding="same", D_mul=18, hw=(8, 7)),
    _case("g2-k5-d2-same", 4, 8, 5, groups=2, dilation=2, padding="same", hw=(10, 9)),
    _case("g2-k2x2-valid-nobias", 4, 4, 2, groups=2, padding="valid", bias=False),
    _case("k3-reflect", 3, 4, 3, padding=1, padding_mode="reflect"),
    _case("k3-replicate-s2", 3, 4, 3, padding=1, padding_mode="replicate", stride=2),
    _case("k3-circular-d2", 3, 4, 3, padding=2, padding_mode="circular", dilation=2, hw=(8, 9)),
    _case("g2-k3-reflect-asym", 4, 6, 3, groups=2, padding=((1, 2), (0, 1)), padding_mode="reflect"),
    _case("k3-zeros-asym", 3, 4, 3, padding=((0, 2), (2, 1))),
    _case("dw-x2-k3-circular-asym", 2, 4, 3, groups=2, padding=((2, 1), (1, 0)), padding_mode="circular"),
    _case("k3-replicate-pair", 3, 3, (3, 5), padding=(1, 2), padding_mode="replicate"),
    # 1-D: MN is the kernel length K
    _case1d("k1", 4, 6, 1, padding="valid"),
    _case1d("k3", 3, 5, 3, padding=1),
    _case1d("k3-same-nobias", 4, 4, 3, padding="same", bias=False),
    _case1d("k4-same", 3, 4, 4, padding="same"),
    _case1d("k3-s2-valid", 4, 6, 3, stride=2, padding="valid"),
    _case1d("k3-s2-same", 4, 6, 3, stride=2, padding="same", length=12),
    _case1d("k3-d4-same", 4, 4, 3, dilation=4, padding="same", length=13),
    _case1d("k3-causal-d2", 3, 5, 3, dilation=2, padding="causal"),
    _case1d("k2-causal-Dmul+3", 3, 4, 2, padding="causal", D_mul=5),
    _case1d("k5-2MN", 3, 4, 5, padding=2, D_mul=10),
    _case1d("k3-dsep-Dmul2", 4, 6, 3, padding=1, D_mul=2, depthwise_separable=True),
    _case1d("dw-k3", 4, 4, 3, groups=4, padding="same"),
    _case1d("dw-x2-k5-s2", 3, 6, 5, groups=3, stride=2, padding=2),
    _case1d("g2-k3-d2", 4, 6, 3, groups=2, dilation=2, padding=2),
    _case1d("k3-reflect", 3, 4, 3, padding=1, padding_mode="reflect"),
    _case1d("k3-replicate-asym", 3, 4, 3, padding=((2, 0),), padding_mode="replicate"),
    _case1d("g2-k3-circular-d2", 4, 4, 3, groups=2, padding=2, padding_mode="circular", dilation=2, bias=False),
    # 3-D: MN is T*M*N
    _case3d("k1", 4, 6, 1, padding="valid"),
    _case3d("k3", 3, 4, 3, padding=1),
    _case3d("k3-same-nobias", 2, 4, 3, padding="same", bias=False),
    _case3d("k2-same", 3, 4, 2, padding="same"),
    _case3d("k3x1x3", 3, 4, (3, 1, 3), padding=(1, 0, 1)),
    _case3d("k1x3x3-s2", 4, 4, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), dhw=(3, 7, 6)),
    _case3d("k3-s2-same", 3, 4, 3, stride=2, padding="same", dhw=(6, 5, 6)),
    _case3d("k3-d2", 2, 3, 3, dilation=2, padding=2, dhw=(5, 6, 5)),
    _case3d("k2-valid-2MN", 3, 4, 2, padding="valid", D_mul=16),
    _case3d("k3-dsep-Dmul9", 3, 4, 3, padding=1, D_mul=9, depthwise_separable=True),
    _case3d("dw-x2-k3", 3, 6, 3, groups=3, padding="same"),
    _case3d("g2-k3-s2", 4, 6, 3, groups=2, stride=2, padding=1, bias=False),
    _case3d("k3-reflect-asym", 2, 3, 3, padding=((1, 0), (1, 2), (0, 1)), padding_mode="reflect"),
    _case3d("k3-circular", 2, 3, 3, padding=1, padding_mode="circular"),
    _case3d("dw-k3-replicate-s2", 3, 3, 3, groups=3, stride=2, padding=1, padding_mode="replicate"),
]

CASE_IDS = [c.id for c in CASES]


def case(id: str) -> Case:
    """Look a case up by id (ValueError listing the ids when it is unknown)."""
    for c in CASES:
        if c.id == id:
            return c
    raise ValueError(f"unknown case id {id!r}; known: {CASE_IDS}")


def select(unsupported: FrozenSet[str] = frozenset(), keyword: Optional[str] = None) -> List[Case]:
    """Cases whose features avoid ``unsupported``, optionally only those whose id contains ``keyword``."""
    return [c for c in CASES if not (c.features & set(unsupported)) and (keyword is None or keyword in c.id)]

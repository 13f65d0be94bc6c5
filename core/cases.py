"""The one shared table of test cases: the core's tests, every backend's tests and the parity harness.

Each :class:`Case` is a layer config (the constructor arguments as a user writes them, so a backend
can pass ``padding`` on unchanged) plus an input shape. :meth:`Case.params` always randomises D
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
)


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    kwargs: Dict[str, Any]
    input_shape: Tuple[int, int, int, int]

    @property
    def config(self) -> DOConvConfig:
        return DOConvConfig(**self.kwargs)

    @property
    def features(self) -> FrozenSet[str]:
        c, raw = self.config, self.kwargs.get("padding", 0)
        out = set()
        if not isinstance(raw, str):
            out.add("explicit_padding")
            (t, b), (l, r) = c.padding
            if t != b or l != r:
                out.add("asymmetric_padding")
        elif raw.lower() == "same":
            if max(c.stride) > 1:
                out.add("same_strided")
            (t, b), (l, r) = c.pads(*self.input_shape[2:])
            if t != b or l != r:
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


#: The table. Ids name what each case exercises; every kernel size, stride, dilation, grouping,
#: D_mul, bias and padding mode the design calls for appears at least once.
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

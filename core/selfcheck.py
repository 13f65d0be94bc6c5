"""Self-check of the specification over the shared case table (``python -m doconv``).

Every check compares two independent routes to the same number and returns its worst error:

- ``kernel=feature``: kernel composition (Fig. 3-b) against feature composition (Fig. 3-a);
- ``fold``: the folded plain convolution against the unfolded layer;
- ``vjp``: the analytic gradients for x, W, D and bias against central finite differences
  along a random direction (float64);
- ``interchange``: a safetensors round trip, which must be bit-exact;
- ``official``: random official TensorFlow-layout arrays imported into the paper's pairing give
  the composed kernel of the official TF arithmetic, re-implemented here from its description
  (2-D cases only: the official code has no 1-D or 3-D layer).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Callable, Dict, Iterable, List

import numpy as np

from . import interchange
from .cases import CASES, Case
from .compose import DOConvParams, compose, compose_vjp, fold
from .layouts import from_official
from .reference import conv, conv_vjp, forward
from .tolerance import max_error, tolerance


@dataclasses.dataclass
class Result:
    case: str
    check: str
    error: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.error <= self.tolerance


def _geometry(config):
    return dict(stride=config.stride, padding=config.padding, dilation=config.dilation,
                groups=config.groups, padding_mode=config.padding_mode)


def check_kernel_feature(case: Case, dtype) -> float:
    c, p, x = case.config, case.params(1, dtype), case.input(1, dtype)
    return max_error(forward(x, p, c, composition="feature"), forward(x, p, c, composition="kernel"))


def check_fold(case: Case, dtype) -> float:
    c, p, x = case.config, case.params(2, dtype), case.input(2, dtype)
    kernel, bias = fold(p, c)
    return max_error(conv(x, kernel, bias, **_geometry(c)), forward(x, p, c, composition="feature"))


def layer_vjp(grad_out, x, params: DOConvParams, config) -> Dict[str, np.ndarray]:
    """Gradients of a DO-Conv layer: the reference conv's VJP chained with the composition's VJP."""
    dx, dkernel, dbias = conv_vjp(grad_out, x, compose(params, config), **_geometry(config))
    dW, dD = compose_vjp(dkernel, params, config)
    grads = {"x": dx, "W": dW, "D": dD, "bias": dbias if params.bias is not None else None}
    return {k: v for k, v in grads.items() if v is not None}


def check_vjp(case: Case, dtype=np.float64, eps: float = 1e-6) -> float:
    """Directional check: <vjp(u), v> = d/dt <u, f(theta + t v)> at t = 0 by central differences."""
    c, p, x = case.config, case.params(3, np.float64), case.input(3, np.float64)
    rng = np.random.default_rng(4)
    u = rng.normal(size=c.output_shape(x.shape))
    grads = layer_vjp(u, x, p, c)
    worst = 0.0
    for name, grad in grads.items():
        v = rng.normal(size=grad.shape)

        def f(t, name=name, v=v):
            q = DOConvParams(p.W, p.D, p.bias)
            xx = x + t * v if name == "x" else x
            if name != "x":
                setattr(q, name, getattr(p, name) + t * v)
            return float(np.sum(u * forward(xx, q, c)))

        numeric = (f(eps) - f(-eps)) / (2 * eps)
        analytic = float(np.sum(grad * v))
        worst = max(worst, abs(numeric - analytic) / max(1.0, abs(analytic)))
    return worst


def check_interchange(case: Case, dtype) -> float:
    c, p = case.config, case.params(5, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "layer.safetensors")
        interchange.save(path, {"net.block.conv": (c, p)})
        (c2, p2), = interchange.load(path).values()
    same = c2 == c and all((a is None and b is None) or (a is not None and b is not None and a.dtype == b.dtype
                                                          and np.array_equal(a, b))
                           for a, b in ((p.W, p2.W), (p.D, p2.D), (p.bias, p2.bias)))
    return 0.0 if same else float("inf")


def official_tf_kernel(kernel, D_delta, config) -> np.ndarray:
    """The official TF layer's arithmetic, from its description: reshape W to (S, C_in, C_out/g),
    einsum 'msi,sio->mio' with D = D' + I_fill, reshape to (M, N, C_in/g, C_out), return OIHW."""
    from .compose import identity_fill
    mn, s = config.MN, config.S
    D = D_delta + identity_fill(mn, s, D_delta.dtype)[:, :, None]
    W = kernel.reshape(s, config.in_channels, -1)
    hwio = np.einsum("msi,sio->mio", D, W).reshape(*config.kernel_size, config.in_per_group, config.out_channels)
    return hwio.transpose(3, 2, 0, 1)


def check_official_tf(case: Case, dtype) -> float:
    c = case.config
    if not c.has_D:
        return 0.0
    rng = np.random.default_rng(6)
    arrays = {"kernel": rng.normal(size=(c.S, c.in_per_group, c.out_channels)).astype(dtype),
              "D": rng.normal(size=(c.MN, c.S, c.in_channels)).astype(dtype)}
    if c.bias:
        arrays["bias"] = rng.normal(size=c.out_channels).astype(dtype)
    ours = compose(from_official(arrays, c, "tf"), c)
    return max_error(ours, official_tf_kernel(arrays["kernel"], arrays["D"], c))


CHECKS: Dict[str, Callable[[Case, type], float]] = {
    "kernel=feature": check_kernel_feature,
    "fold": check_fold,
    "vjp": check_vjp,
    "interchange": check_interchange,
    "official": check_official_tf,
}

#: Finite differences lose about half the digits: a VJP check passes at 1e-6 in float64.
CHECK_TOLERANCE = {"vjp": 1e-6}


def run(cases: Iterable[Case] = CASES, dtypes=("float64", "float32"),
        progress: Callable[[str], None] = lambda _: None) -> List[Result]:
    results = []
    for case in cases:
        for dtype in dtypes:
            for name, check in CHECKS.items():
                if (name == "vjp" and dtype != "float64") or (name == "official" and case.rank != 2):
                    continue
                progress(f"{case.id} {name} {dtype}")
                tol = CHECK_TOLERANCE.get(name, tolerance(dtype))
                results.append(Result(f"{case.id}[{dtype}]", name, check(case, np.dtype(dtype)), tol))
    return results

"""How closely a framework must agree with the core, per dtype, and why.

The error measure is scale-aware: ``max|actual - expected| / max(1, max|expected|)``, so values of
order one are compared absolutely and large ones relatively. Inputs, W and bias are O(1), D is
I_fill plus O(1/sqrt(S)) noise, so outputs are O(sqrt(fan_in)) at most in the shared case table.

- float64 1e-10: every framework computes the same sums in another order; rounding is ~1e-16
  per operation and fan-ins here are < 1000, so 1e-10 leaves six orders of margin and still
  catches any real bug (a wrong pairing or pad moves results by O(1)).
- float32 1e-5: float32 rounding is 6e-8 per operation; oneDNN/Eigen use blocked or Winograd-free
  direct algorithms whose error grows with fan-in (up to ~1e-6 here), so 1e-5 is a 10x margin.
- float16 5e-3 and bfloat16 4e-2: half-precision kernels round W' and the products to 11 / 8
  mantissa bits (2^-11 = 4.9e-4, 2^-8 = 3.9e-3) and accumulate over the fan-in.
"""

from __future__ import annotations

import numpy as np

TOLERANCES = {"float64": 1e-10, "float32": 1e-5, "float16": 5e-3, "bfloat16": 4e-2}


def tolerance(dtype) -> float:
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name not in TOLERANCES:
        raise ValueError(f"no tolerance for dtype {name!r}; known: {sorted(TOLERANCES)}")
    return TOLERANCES[name]


def max_error(actual, expected) -> float:
    """Scale-aware worst error ``max|a - e| / max(1, max|e|)``; inf when the shapes differ."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    if np.iscomplexobj(actual) or np.iscomplexobj(expected):  # compare both parts, never drop one
        actual, expected = actual.astype(np.complex128), expected.astype(np.complex128)
    else:
        actual, expected = actual.astype(np.float64), expected.astype(np.float64)
    if actual.shape != expected.shape:
        return float("inf")
    if expected.size == 0:
        return 0.0
    if not np.all(np.isfinite(actual)):
        return float("inf")
    return float(np.max(np.abs(actual - expected)) / max(1.0, float(np.max(np.abs(expected)))))


def assert_close(actual, expected, dtype, what: str = "value") -> float:
    """Raise AssertionError with the numbers unless ``max_error <= tolerance(dtype)``; returns the error."""
    err, tol = max_error(actual, expected), tolerance(dtype)
    if not err <= tol:
        shapes = f"{np.shape(actual)} vs {np.shape(expected)}"
        raise AssertionError(f"{what}: error {err:.3g} exceeds the {np.dtype(dtype).name if not isinstance(dtype, str) else dtype} "
                             f"tolerance {tol:g} (shapes {shapes})")
    return err

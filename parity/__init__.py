"""doconv.parity: the cross-framework parity report (``doconv-parity``, ``python -m doconv.parity``).

The NumPy core (:mod:`doconv`) is the oracle. Every installed framework -- PyTorch (``doconv.torch``),
the Keras 3 layer (``doconv.tf``) on TensorFlow (``tf``, ``channels_last`` and ``channels_first``), on torch
(``keras/torch``, both layouts) and on JAX (``keras/jax``, ``channels_last``), MXNet Gluon (``doconv.mxnet``)
-- runs the shared case table (:mod:`doconv.cases`: 1-D, 2-D and 3-D layers, kernel sizes, strides,
dilations, every padding form and mode the framework has, DO-Conv / DO-DConv / DO-GConv, D_mul = MN and
> MN, bias on/off, both compositions, float64 and float32) with D always randomised, and is compared with
the core on:
forward output, gradients for input, W, D and bias, the folded kernel and the folded conv's output,
the canonical-file round trip, the official checkpoint layout (2-D; other ranks must refuse it), a fresh
kernel after writes no hook sees and inside the explicit ``cached()`` scope,
and a few SGD steps. Then, for every ordered pair of frameworks, a layer trained in the first is
exported to the canonical file, imported into the second and must give the same outputs
(:mod:`doconv.parity.checks`). The core's own self-check (:mod:`doconv.selfcheck`) runs as the ``core``
rows. MXNet and JAX live in environments of their own, and Keras picks its backend once per process, so
those join through files (``export DIR`` / ``check DIR``); ``nox -s parity`` chains the processes.

Tolerances (:data:`doconv.TOLERANCES`; the error is ``max|a - e| / max(1, max|e|)``, see
:func:`doconv.max_error`), the same for every check and every framework, never tuned to pass:

- **float64: 1e-10.** Every framework computes the same sums in a different order; float64 rounding is
  ~1e-16 per operation and the case table's fan-ins are below 1000, so honest results land near 1e-15
  and 1e-10 leaves five orders of margin, while any real defect (a wrong pairing, a pad on the wrong
  side, a lost bias, a stale kernel) moves results by O(0.1-1).
- **float32: 1e-5.** float32 rounding is 6e-8 per operation; oneDNN / Eigen / MXNet's im2col kernels
  accumulate in blocked orders whose error grows with the fan-in (up to ~1e-6 here), and the SGD check
  carries three steps of it, so 1e-5 is a 10x margin that still sits four orders below a real defect.
- the ``core`` row's ``vjp`` check compares analytic gradients with central finite differences, which
  lose half the digits: 1e-6 in float64 (:data:`doconv.selfcheck.CHECK_TOLERANCE`).

The expected values are computed in float64 from the dtype-rounded parameters and inputs, so a float32
error measures the framework's arithmetic alone. Cross-framework comparisons use the tolerance of the
dtype: both sides carry their own float32 rounding, each well inside it.
"""

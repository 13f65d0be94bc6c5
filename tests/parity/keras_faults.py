"""The Keras adapters on one Keras backend, honest and deliberately wrong, run in a process of their own.

Keras picks its backend once per process, so :mod:`test_keras_backends` runs this file as a script with
``KERAS_BACKEND`` set, once per backend::

    python keras_faults.py SELECTION OUT.json     # SELECTION: tf, keras/torch or keras/jax

It runs the honest adapters (each data format the backend's adapter checks) on a 1-D, a 2-D and a 3-D case, and each fault (one small,
realistic bug, written as a subclass of the backend's honest adapter, as :mod:`conftest` does for torch) on
the case it must show on, and writes every result to OUT.json.
"""

import json
import sys

#: The honest adapters' cases: 1-D causal with dilation, 2-D depthwise with a channel multiplier (the
#: official check runs), 3-D with an even 'same' kernel.
CASES = ("1d-k3-causal-d2", "dw-x2-k3", "3d-k2-same")


def faults(honest):
    """Wrong adapters derived from ``honest`` (a KerasFramework subclass): name -> (class, case, the check that
    must fail)."""
    import numpy as np

    from doconv import DOConvParams

    from conftest import transposed

    class TransposedD(honest):
        def set_params(self, layer, params):
            super().set_params(layer, DOConvParams(params.W, transposed(params.D, layer.config), params.bias))

    class ReshapedLayout(honest):
        """channels_last input made with a reshape instead of moving the channel axis."""

        def _in(self, a, layer):
            a = np.asarray(a, dtype=layer.dtype)
            return self.ops.convert_to_tensor(a.reshape(a.shape[0], *a.shape[2:], a.shape[1]))

    class ForgottenCotangent(honest):
        """The gradient of sum(out) instead of sum(u * out)."""

        def _grads(self, layer, x, u, variables, with_x):
            return super()._grads(layer, x, self.ops.ones_like(u), variables, with_x)

    class StaleMemo(honest):
        """An inference result kept per input, never invalidated."""

        def forward(self, layer, x, *, training=True):
            if training:
                return super().forward(layer, x, training=True)
            memo = layer.state.setdefault("memo", {})
            if x.tobytes() not in memo:
                memo[x.tobytes()] = super().forward(layer, x, training=False)
            return memo[x.tobytes()]

    return {"transposed-D": (TransposedD, "3d-k2-same", "forward"),
            "reshaped-layout": (ReshapedLayout, "1d-k3-causal-d2", "forward"),
            "forgotten-cotangent": (ForgottenCotangent, "dw-x2-k3", "grad x"),
            "stale-memo": (StaleMemo, "3d-k2-same", "fresh kernel")}


def main(selection, out):
    import tempfile

    from doconv.cases import case
    from doconv.parity import checks
    from doconv.parity.fw_tf import KerasJax, KerasTF, KerasTorch

    honest = {cls.family: cls for cls in (KerasTF, KerasTorch, KerasJax)}[selection]
    runs = [(f"honest {fmt}", honest(fmt), CASES) for fmt in honest.data_formats]
    runs += [(name, cls("channels_last"), (case_id,)) for name, (cls, case_id, _) in faults(honest).items()]
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fw, ids in runs:
            tasks, _ = checks.framework_tasks(fw, [case(i) for i in ids], ("float64",), 0, tmp, None)
            report[name] = {"framework": fw.name, "results": [r.to_dict() for t in tasks for r in t.run()]}
    report["faults"] = {name: check for name, (_, _, check) in faults(honest).items()}
    with open(out, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(*sys.argv[1:])

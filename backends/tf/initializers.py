"""The initializers of a DO-Conv layer's variables (any rank), in the layer's storage layout.

- :class:`DeltaInitializer`: the delta D' = D - I_fill (zeros for the paper's identity init);
- :class:`ChannelMajorInitializer`: W from a ``Conv{rank}D``-style ``kernel_initializer``, stored input-channel
  major.
"""

from __future__ import annotations

import numpy as np

from keras import initializers, ops

import doconv


class DeltaInitializer(initializers.Initializer):
    """Initial D' = D - I_fill: zeros for ``'identity'`` (paper default), He-normal D for ``'random'``."""

    def __init__(self, d_init, MN, S, seed=None):
        self.d_init, self.MN, self.S = d_init, MN, S
        self.normal = initializers.RandomNormal(stddev=float(np.sqrt(2.0 / MN)), seed=seed)

    def __call__(self, shape, dtype=None):
        if self.d_init == "identity":
            return ops.zeros(shape, dtype=dtype)
        fill = ops.convert_to_tensor(doconv.identity_fill(self.MN, self.S)[:, :, None], dtype=dtype)
        return self.normal(shape, dtype=dtype) - fill


class ChannelMajorInitializer(initializers.Initializer):
    """``initializer`` called with W's convolution-like shape (S, C_in/g, filters), stored as (C_in/g, S, filters).

    Its result is cast to the variable's dtype (a plain callable may return float64 NumPy, as
    ``Conv2D`` accepts). A convolution-shaped kernel (*kernel_size, C_in/g, filters), e.g. from
    ``keras.initializers.Constant(conv.kernel)``, is accepted when D_mul = M*N: reshaped to
    (M*N, C_in/g, filters), so that at identity D init W' is that kernel (``W[i*N + j] = kernel[i, j]``).
    Any other shape is a ValueError naming ``kernel_initializer`` and the shapes it may return.
    """

    def __init__(self, initializer, kernel_size):
        self.initializer, self.kernel_size = initializer, tuple(kernel_size)

    def __call__(self, shape, dtype=None):
        cin, S, filters = shape
        want, conv_shape = (S, cin, filters), (*self.kernel_size, cin, filters)
        conv_maps = S == int(np.prod(self.kernel_size))  # a conv-shaped kernel is W itself (D_mul = MN)
        call_shape = want
        array = isinstance(self.initializer, initializers.Constant) and np.ndim(self.initializer.value) > 0
        if array:  # Constant broadcasts its value to the shape it is asked for: ask for the value's own shape
            if np.shape(self.initializer.value) not in ((want, conv_shape) if conv_maps else (want,)):
                raise self._shape_error(np.shape(self.initializer.value), want, conv_shape, conv_maps)
            call_shape = np.shape(self.initializer.value)
        value = self.initializer(call_shape, dtype=dtype)
        value = ops.convert_to_tensor(value) if dtype is None else ops.cast(value, dtype)
        got = tuple(value.shape)
        if conv_maps and got == conv_shape:
            value = ops.reshape(value, want)
        elif got != want:
            raise self._shape_error(got, want, conv_shape, conv_maps)
        return ops.transpose(value, (1, 0, 2))

    def _shape_error(self, got, want, conv_shape, conv_maps):
        name = f"Conv{len(self.kernel_size)}D"
        conv = (f" or {name}'s kernel shape {conv_shape}" if conv_maps else
                f" (a {name} kernel of shape {conv_shape} maps onto W only when D_mul = M*N)")
        return ValueError(f"Invalid `kernel_initializer` for DO{name}: it must produce W of shape "
                          f"(D_mul, C_in/groups, filters) = {want}{conv}, but it produced shape {tuple(got)}. "
                          f"Received: kernel_initializer={self.initializer!r}")

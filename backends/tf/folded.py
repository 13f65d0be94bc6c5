"""The fold target: the plain Keras convolution equal to a DO-Conv layer (paper Section 3, "Training and inference").

:func:`plain_layer` takes the layer's core config and canonical parameters, so this module needs nothing of
:mod:`doconv.tf.layer` (which calls it from ``DOConv2D.fold``) nor of :mod:`doconv.tf.model`.
"""

from __future__ import annotations

import keras
import numpy as np

import doconv
from doconv import layouts

#: Marks a ``keras.Sequential`` made by this backend to stand for one layer (the channels_first fold, a
#: converted ``SeparableConv2D``): :func:`doconv.tf.model.convert` / ``fold`` splice it flat into a Sequential.
SPLICE = "_doconv_splice"


def build_shape(data_format: str, channels: int, rank: int = 2) -> tuple:
    """The shape to build a ``rank``-D convolution with ``channels`` input channels (spatial sizes free)."""
    spatial = (None,) * rank
    return (None, *spatial, channels) if data_format == "channels_last" else (None, channels, *spatial)


def spliceable(layers, name: str, channels: int, data_format: str, rank: int = 2):
    """``keras.Sequential(layers)`` named ``name``, built for ``channels`` input channels, marked :data:`SPLICE`."""
    block = keras.Sequential(layers, name=name)
    block.build(build_shape(data_format, channels, rank))
    setattr(block, SPLICE, True)
    return block


def plain_layer(layer, config: doconv.DOConvConfig, params: doconv.DOConvParams):
    """The built ``Conv{rank}D`` (``DepthwiseConv{rank}D`` when ``groups = C_in > 1``) computing what ``layer``
    computes. Keras has no 3-D depthwise layer, and its ``DepthwiseConv1D`` no ``padding='causal'``: there
    DO-DConv folds to the grouped ``Conv{rank}D`` with ``groups = C_in``, the same convolution.

    ``layer`` gives what is not arithmetic (padding, data format, activation, initializers, regularizers,
    constraints, dtype policy, name, trainable); ``config`` and ``params`` (canonical, full D) the kernel
    W', composed by the core (:func:`doconv.fold`; in float32 for dtypes NumPy cannot multiply, such as
    ``bfloat16``, then cast back).

    ``channels_first`` on the TensorFlow backend gives ``Sequential([Permute((2, 3, 1)), <the plain layer
    in channels_last>, Permute((3, 1, 2))])`` named ``<layer>_nhwc`` (in 2-D; the same moves of the channel
    axis in 1-D and 3-D), because a ``channels_first`` Keras
    ``Conv2D`` is not a faithful fold there: TensorFlow's CPU ``Conv2D`` refuses NCHW (float64 with
    ``groups=1``: "Conv2D op only supports NHWC on the CPU"), and Keras' TensorFlow ``ops.add`` turns the
    ``(1, filters, 1, 1)`` bias of a channels_first ``Conv2D`` into an NHWC ``bias_add`` whenever the
    input's static width equals ``filters``, adding the bias along the width.
    """
    c = config
    dtype = params.W.dtype
    if dtype not in (np.float16, np.float32, np.float64):  # ml_dtypes' bfloat16 etc.: NumPy's einsum refuses them
        params = params.astype(np.float32)
    kernel, bias = (None if a is None else a.astype(dtype) for a in doconv.fold(params, c))
    nhwc = layer.data_format == "channels_first" and keras.backend.backend() == "tensorflow"
    data_format = "channels_last" if nhwc else layer.data_format
    rank = c.rank
    common = dict(kernel_size=c.kernel_size, strides=c.stride, padding=layer.padding, data_format=data_format,
                  dilation_rate=c.dilation, activation=layer.activation, use_bias=c.bias,
                  bias_initializer=layer.bias_initializer, bias_regularizer=layer.bias_regularizer,
                  activity_regularizer=layer.activity_regularizer, bias_constraint=layer.bias_constraint,
                  name=layer.name, dtype=layer.dtype_policy, trainable=layer.trainable)
    if c.groups == c.in_channels and c.groups > 1 and rank < 3 and layer.padding != "causal":
        depthwise = getattr(keras.layers, f"DepthwiseConv{rank}D")
        new = depthwise(depth_multiplier=c.out_per_group, depthwise_initializer=layer.kernel_initializer,
                        depthwise_regularizer=layer.kernel_regularizer,
                        depthwise_constraint=layer.kernel_constraint, **common)
        kernel = layouts.oihw_to_depthwise_hwcm(kernel, c.in_channels)
    else:
        conv = getattr(keras.layers, f"Conv{rank}D")
        new = conv(c.out_channels, groups=c.groups, kernel_initializer=layer.kernel_initializer,
                   kernel_regularizer=layer.kernel_regularizer, kernel_constraint=layer.kernel_constraint, **common)
        kernel = layouts.oihw_to_hwio(kernel)
    new.build(build_shape(data_format, c.in_channels, rank))
    new.set_weights([kernel] + ([bias] if c.bias else []))
    if not nhwc:
        return new
    policy = layer.dtype_policy
    # Permute's dims count from 1, the batch axis excluded: channels (1) last, then back to the front
    to_last, to_first = (*range(2, rank + 2), 1), (rank + 1, *range(1, rank + 1))
    return spliceable([keras.layers.Permute(to_last, name=f"{layer.name}_to_nhwc", dtype=policy), new,
                       keras.layers.Permute(to_first, name=f"{layer.name}_to_nchw", dtype=policy)],
                      f"{layer.name}_nhwc", c.in_channels, "channels_first", rank)

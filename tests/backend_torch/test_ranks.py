"""DOConv1d and DOConv3d as drop-ins for nn.Conv1d / nn.Conv3d, and what DOConv2d supports beyond the case table
(cached(), the parametrize retrofit, 'causal' padding, the transposed training route) in 1-D and 3-D.

The case-driven tests of test_layer.py / test_io.py run every 1-D and 3-D case of the shared table against the core
(and torch.compile, autocast and gradcheck on 1-D / 3-D cases too); test_model.py exports 1-D and 3-D models and
trains the whole 1-D and 3-D networks. These compare with torch's own convolutions, D randomised.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import doconv
from doconv.cases import case as get_case
from doconv.torch import (DOConv1d, DOConv3d, FoldedConv1d, FoldedConv3d, cached, convert, fold, get_params,
                          parametrize)
from doconv.torch import functional as DF

#: input spatial size per rank
SPATIAL = {1: (11,), 3: (5, 6, 7)}

#: id -> (1-D arguments, 3-D arguments) of a layer with 4 input and 6 output channels, each accepted by nn.ConvNd
GEOMETRIES = {
    "k3-p1": (dict(kernel_size=3, padding=1), dict(kernel_size=3, padding=1)),
    "per-axis-pads": (dict(kernel_size=5, padding=(2,)), dict(kernel_size=(3, 1, 5), padding=(1, 0, 2))),
    "same-even": (dict(kernel_size=4, padding="same"), dict(kernel_size=(2, 3, 4), padding="same")),
    "valid-s2": (dict(kernel_size=3, stride=2, padding="valid"), dict(kernel_size=3, stride=(1, 2, 2))),
    "d2-g2-nobias": (dict(kernel_size=3, dilation=2, padding=2, groups=2, bias=False),
                     dict(kernel_size=3, dilation=(1, 2, 1), padding=(1, 2, 1), groups=2, bias=False)),
    "reflect": (dict(kernel_size=3, padding=1, padding_mode="reflect"),
                dict(kernel_size=3, padding=1, padding_mode="reflect")),
    "replicate-s2": (dict(kernel_size=3, stride=2, padding=1, padding_mode="replicate"),
                     dict(kernel_size=3, stride=2, padding=1, padding_mode="replicate")),
    "circular-d2": (dict(kernel_size=3, dilation=2, padding=2, padding_mode="circular"),
                    dict(kernel_size=(1, 3, 3), dilation=2, padding=(0, 2, 2), padding_mode="circular")),
    "one-element-tuples": (dict(kernel_size=(3,), stride=(2,), padding=(1,), dilation=(1,)),
                           dict(kernel_size=3, stride=(2,), padding=(1,), dilation=(1,))),
}


def _random_D(layer, seed=0):
    """D' ~ N(0, 0.3): never the identity, so a pairing or tap-order bug shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if layer.D is not None:
            layer.D.copy_(0.3 * torch.randn(layer.D.shape, generator=g, dtype=layer.D.dtype))
    return layer


def _layer(rank, *args, seed=0, **kwargs):
    torch.manual_seed(seed)
    return _random_D({1: DOConv1d, 3: DOConv3d}[rank](*args, **kwargs), seed)


def _plain_copy(layer, conv_class, kwargs):
    """``conv_class(4, 6, **kwargs)`` holding the layer's composed kernel and bias."""
    conv = conv_class(layer.in_channels, layer.out_channels, **kwargs, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(layer.weight)
        if conv.bias is not None:
            conv.bias.copy_(layer.bias)
    return conv


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("rank", [1, 3])
def test_matches_torchs_convolution_batched_and_unbatched(rank, geometry, h):
    """Same attributes as nn.ConvNd made with the same arguments, same outputs and input gradients as it with the
    composed kernel, on batched and unbatched input; fuse() gives exactly that nn.ConvNd."""
    kwargs = GEOMETRIES[geometry][rank // 2]
    layer = _layer(rank, 4, 6, dtype=torch.float64, **kwargs)
    conv = _plain_copy(layer, h.CONVS[rank], kwargs)
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode", "transposed", "output_padding"):
        if rank == 3 and geometry == "one-element-tuples" and name in ("stride", "padding", "dilation"):
            assert getattr(layer, name) == getattr(conv, name) * 3, name  # nn.Conv3d keeps (2,), its conv broadcasts
        else:
            assert getattr(layer, name) == getattr(conv, name), name
    x = torch.randn(2, 4, *SPATIAL[rank], dtype=torch.float64, requires_grad=True)
    out = layer(x)
    want = conv(x)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    u = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, u)
    (want_grad,) = torch.autograd.grad(want, x, u)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer(x[1]), conv(x[1]), rtol=1e-10, atol=1e-10)  # unbatched (C, *spatial)
    fused = layer.fuse()
    assert type(fused) is h.CONVS[rank]
    torch.testing.assert_close(fused(x), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("channels", [DF.MIN_TRANSPOSED_IN_CHANNELS, 3])
@pytest.mark.parametrize("rank", [1, 3])
def test_training_at_stride_1_runs_the_transposed_convolution_of_the_rank(rank, channels, monkeypatch):
    """The c-major training route: conv_transpose1d / conv_transpose3d (not for a few-channel stem, which composes
    and convolves), the same gradients as the composed kernel either way."""
    name = f"conv_transpose{rank}d"
    calls = []
    real = getattr(DF.F, name)
    monkeypatch.setattr(DF.F, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = _layer(rank, channels, 5, 3, padding=1, dtype=torch.float64)
    assert layer.W_storage == "c-major"
    x = torch.randn(2, channels, *SPATIAL[rank], dtype=torch.float64)
    layer(x).square().sum().backward()
    assert len(calls) == int(channels >= DF.MIN_TRANSPOSED_IN_CHANNELS)
    W = layer.W.detach().clone().requires_grad_(True)
    D = layer.D.detach().clone().requires_grad_(True)
    kernel = DF.compose_einsum(W, D + layer.I_fill, layer.config)
    DF.conv_nd(rank)(x, kernel, layer.bias, padding=1).square().sum().backward()
    torch.testing.assert_close(layer.W.grad, W.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.D.grad, D.grad, rtol=1e-10, atol=1e-10)


def test_causal_padding_is_keras_conv1d_s():
    """padding='causal' (1-D only): d*(k-1) zeros on the left, none on the right; the output keeps the length
    and sample t sees only samples <= t. It folds into a FoldedConv1d (nn.Conv1d has no causal padding)."""
    layer = _layer(1, 3, 4, 3, dilation=2, padding="causal", dtype=torch.float64)
    assert layer.padding == "causal" and "padding='causal'" in repr(layer)
    x = torch.randn(2, 3, 10, dtype=torch.float64)
    want = nn.functional.conv1d(nn.functional.pad(x, (4, 0)), layer.weight, layer.bias, dilation=2)
    out = layer(x)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    changed = x.clone()
    changed[..., 6:] += 1.0
    torch.testing.assert_close(layer(changed)[..., :6], out[..., :6], rtol=0, atol=0)  # no look-ahead
    fused = layer.fuse()
    assert type(fused) is FoldedConv1d and isinstance(fused, nn.Conv1d)
    torch.testing.assert_close(fused(x), want, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="padding='causal'.*1-D layer only"):
        DOConv3d(3, 4, 3, padding="causal")


@pytest.mark.parametrize("rank, kwargs", [
    (3, dict(padding=((1, 0), (0, 2), (1, 1)), padding_mode="reflect")),
    (3, dict(stride=2, padding="same")),
    (1, dict(padding=((2, 0),), padding_mode="circular")),
])
def test_pads_nn_conv_lacks_fold_into_a_prepadded_conv(rank, kwargs):
    layer = _layer(rank, 4, 6, (2, 3, 3) if rank == 3 else 3, dtype=torch.float64, **kwargs)
    folded_class = {1: FoldedConv1d, 3: FoldedConv3d}[rank]
    x = torch.randn(2, 4, *SPATIAL[rank], dtype=torch.float64)
    want = torch.as_tensor(doconv.forward(x.numpy(), get_params(layer), layer.config))
    torch.testing.assert_close(layer(x), want, rtol=1e-10, atol=1e-10)
    model, report = fold(nn.Sequential(layer))
    assert type(model[0]) is folded_class and list(model[0].state_dict()) == ["weight", "bias"]
    assert [(r.kind, r.action, r.layer) for r in report] == [(f"DOConv{rank}d", "folded", folded_class.__name__)]
    torch.testing.assert_close(model(x), want, rtol=1e-10, atol=1e-10)
    with pytest.raises(NotImplementedError, match=rf"{folded_class.__name__} \(padding="):
        torch.jit.script(model)


def test_extra_repr_and_state_dict_in_1d_and_3d():
    assert repr(DOConv1d(4, 8, 5, stride=2, padding=2, groups=2, bias=False, padding_mode="reflect", D_mul=7)) == (
        "DOConv1d(4, 8, kernel_size=(5,), stride=(2,), padding=(2,), groups=2, bias=False, padding_mode='reflect', "
        "D_mul=7)")
    assert repr(DOConv3d(4, 8, (1, 3, 3), dilation=(1, 2, 2))) == (
        "DOConv3d(4, 8, kernel_size=(1, 3, 3), stride=(1, 1, 1), dilation=(1, 2, 2), D_mul=9)")
    assert "padding=((1, 0), (0, 0), (2, 2))" in repr(DOConv3d(2, 2, 3, padding=((1, 0), 0, 2)))
    layer = DOConv3d(4, 6, 3, D_mul=30)
    sd = layer.state_dict()
    assert list(sd) == ["W", "D", "bias"] and sd["W"].shape == (6, 4, 30) and sd["D"].shape == (4, 27, 30)
    assert layer.I_fill.shape == (27, 30) and layer.weight.shape == (6, 4, 3, 3, 3)
    assert DOConv1d(4, 6, 1).D is None and DOConv1d(4, 6, 1).weight.shape == (6, 4, 1)


def test_bad_arguments_and_inputs_name_the_rank():
    with pytest.raises(ValueError, match=r"kernel_size.*kernel_size=\(3, 3\)"):
        DOConv1d(4, 6, (3, 3))
    with pytest.raises(ValueError, match=r"padding.*3-D layer.*padding=\(1, 1\)"):
        DOConv3d(4, 6, 3, padding=(1, 1))
    with pytest.raises(ValueError, match=r"input must be 2-D \(C, L\) or 3-D \(N, C, L\), but got input shape "
                                         r"\(1, 4, 5, 5\)"):
        DOConv1d(4, 6, 3)(torch.zeros(1, 4, 5, 5))
    with pytest.raises(ValueError, match=r"in_channels=4 \(input shape \(3, 5, 5, 5\)\)"):
        DOConv3d(4, 6, 3)(torch.zeros(3, 5, 5, 5))
    with pytest.raises(AttributeError, match=r"DOConv3d.weight is the composed kernel"):
        DOConv3d(4, 6, 3).weight = nn.Parameter(torch.zeros(6, 4, 3, 3, 3))
    with pytest.raises(TypeError, match="_DOConvNd is abstract"):
        DOConv1d.__mro__[1](4, 6, 3)


@pytest.mark.parametrize("rank", [1, 3])
def test_cached_composes_once_per_scope(rank, h):
    case = get_case({1: "1d-g2-k3-d2", 3: "3d-dw-x2-k3"}[rank])
    model = nn.Sequential(h.make_layer(case, "float64"))
    calls = []
    original = model[0]._compose
    model[0]._compose = lambda W, D: calls.append(1) or original(W, D)
    x = torch.as_tensor(case.input(0))
    expected = doconv.forward(case.input(0), get_params(model[0]), case.config)
    with torch.no_grad():
        with cached(model):
            for _ in range(3):
                np.testing.assert_allclose(model(x).numpy(), expected, rtol=1e-10, atol=1e-10)
        assert len(calls) == 1
        model(x)
    assert len(calls) == 2  # outside the scope every call composes


@pytest.mark.parametrize("rank", [1, 3])
def test_parametrize_retrofits_conv1d_and_conv3d(rank, h):
    conv = h.CONVS[rank](4, 6, 3, padding=1, groups=2, dtype=torch.float64)
    before = conv.weight.detach().clone()
    parametrize(conv, D_mul=3 ** rank + 2)
    torch.testing.assert_close(conv.weight, before)  # the retrofit keeps the kernel
    layer = _layer(rank, 4, 6, 3, padding=1, groups=2, D_mul=3 ** rank + 2, dtype=torch.float64)
    with torch.no_grad():
        conv.parametrizations.weight.original0.copy_(layer.W)
        conv.parametrizations.weight.original1.copy_(layer.D)
        conv.bias.copy_(layer.bias)
    x = torch.randn(2, 4, *SPATIAL[rank], dtype=torch.float64)
    torch.testing.assert_close(conv(x), layer(x), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="pointwise"):
        parametrize(h.CONVS[rank](2, 2, 1))


@pytest.mark.parametrize("rank", [1, 3])
def test_identity_init_is_the_conv_init(rank, h):
    torch.manual_seed(0)
    mn = 3 ** rank
    layer = h.LAYERS[rank](16, 16, 3, D_mul=2 * mn)
    bound = 1 / math.sqrt(16 * mn)
    assert 0.9 * bound < float(layer.W.detach().abs().max()) <= bound
    assert torch.count_nonzero(layer.D) == 0
    W = layer.W.detach()  # D_mul = 2 MN: I_fill is two identities side by side
    torch.testing.assert_close(layer.weight.detach(), (W[..., :mn] + W[..., mn:]).reshape(layer.weight.shape))


@pytest.mark.parametrize("rank", [1, 3])
def test_convert_and_fold_a_plain_layer_roundtrip_through_the_core(rank, h):
    """convert of one nn.ConvNd, D moved off the identity, fold: the folded conv computes the core's forward."""
    plain = nn.Sequential(h.CONVS[rank](3, 5, 3, stride=2, padding=1, dtype=torch.float64))
    model, report = convert(plain)
    assert [(r.kind, r.action) for r in report] == [(f"Conv{rank}d", "converted")]
    _random_D(model[0], seed=3)
    x = np.random.default_rng(0).normal(size=(2, 3, *SPATIAL[rank]))
    expected = doconv.forward(x, get_params(model[0]), model[0].config)
    folded, _ = fold(model)
    assert type(folded[0]) is h.CONVS[rank]
    with torch.no_grad():
        doconv.assert_close(folded(torch.as_tensor(x)).numpy(), expected, "float64", "folded")

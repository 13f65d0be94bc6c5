"""Export with dynamic sizes (``torch.export``, ONNX in both exporters) and the meta device, in every rank.

The exported programs run at sizes other than the example's and are compared with the NumPy core (D randomised);
the meta device has no values, so there the shapes are compared with the core's ``output_shape``.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn
from torch.export import Dim

import doconv
from doconv.torch import DOConv1d, DOConv2d, DOConv3d, fold, get_params, set_params

LAYERS = {1: DOConv1d, 2: DOConv2d, 3: DOConv3d}

#: id -> DOConv{rank}d arguments after (4, 6): a padding the convolution takes, pads that follow the input size
#: (TF's 'same' at stride 2, padded first), and composition='auto', whose cost model reads the input shape
DYNAMIC_LAYERS = {
    "p1": dict(kernel_size=3, padding=1),
    "same-s2-reflect": dict(kernel_size=3, stride=2, padding="same", padding_mode="reflect"),
    "auto-g2": dict(kernel_size=3, padding=1, groups=2, composition="auto"),
}


def _layer(rank, seed=0, **kwargs):
    """A float32 DOConv{rank}d(4, 6, ...) whose D is not the identity."""
    torch.manual_seed(seed)
    layer = LAYERS[rank](4, 6, **kwargs)
    params = get_params(layer)
    if params.D is not None:
        params.D = params.D + np.random.default_rng(seed).normal(0.0, 0.3, size=params.D.shape).astype(np.float32)
    set_params(layer, params)
    return layer


def _input(batch, sizes, seed=0):
    return torch.randn(batch, 4, *sizes, generator=torch.Generator().manual_seed(seed))


def _assert_core(got, layer, x, what):
    """``got`` (a tensor or an array) against the core's forward of the layer's parameters."""
    expected = doconv.forward(x.numpy().astype(np.float64), get_params(layer).astype(np.float64), layer.config)
    got = got.detach().numpy() if isinstance(got, torch.Tensor) else got
    doconv.assert_close(got, expected, "float32", what)


def _sizes(rank, size):
    """Unequal spatial sizes around ``size``, one per axis (a swapped axis shows)."""
    return tuple(size + axis for axis in range(rank))


@pytest.mark.parametrize("name", DYNAMIC_LAYERS)
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_torch_export_with_dynamic_batch_and_spatial_sizes_matches_the_core(rank, name):
    layer = _layer(rank, **DYNAMIC_LAYERS[name])
    dims = {0: Dim("batch", max=16), **{2 + axis: Dim(f"size{axis}", min=5, max=32) for axis in range(rank)}}
    program = torch.export.export(layer, (_input(2, _sizes(rank, 9)),), dynamic_shapes=(dims,))
    for batch, size in [(2, 9), (1, 8), (5, 13)]:
        x = _input(batch, _sizes(rank, size), seed=batch)
        _assert_core(program.module()(x), layer, x, f"exported program at {tuple(x.shape)}")


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_torch_export_with_dynamic_sizes_of_a_folded_layer(rank):
    """The FoldedConv{rank}d of 'same' at stride 2 pads first, by the pads of each size, as the layer does."""
    layer = _layer(rank, **DYNAMIC_LAYERS["same-s2-reflect"])
    folded = fold(nn.Sequential(layer))[0]
    dims = {0: Dim("batch", max=16), **{2 + axis: Dim(f"size{axis}", min=5, max=32) for axis in range(rank)}}
    program = torch.export.export(folded, (_input(2, _sizes(rank, 9)),), dynamic_shapes=(dims,))
    for batch, size in [(1, 8), (3, 11)]:
        x = _input(batch, _sizes(rank, size), seed=batch)
        _assert_core(program.module()(x), layer, x, f"exported folded layer at {tuple(x.shape)}")


def test_export_of_a_symbolic_input_still_checks_its_rank_and_channels():
    """A symbolic size is never read as an int (that would pin it), but the static sizes are checked, and an
    eager call after the export gets the core's full check of its concrete shape."""
    layer = _layer(2, kernel_size=3)
    batch = ({0: Dim("batch")},)
    with pytest.raises(ValueError, match=r"input has 3 channels but in_channels=4 \(input shape \(s\d+, 3, 8, 8\)"):
        torch.export.export(layer, (torch.randn(2, 3, 8, 8),), dynamic_shapes=batch)
    with pytest.raises(ValueError, match=r"input must be 3-D \(unbatched\) or 4-D \(batched\), but got input shape "
                                         r"\(s\d+, 2, 4, 8, 8\)"):
        torch.export.export(layer, (torch.randn(2, 2, 4, 8, 8),), dynamic_shapes=batch)
    torch.export.export(layer, (torch.randn(2, 4, 8, 8),), dynamic_shapes=batch)
    with pytest.raises(ValueError, match=r"input height 2 padded by \(0, 0\) is smaller than the dilated kernel extent 3"):
        layer(torch.randn(2, 4, 2, 8))


@pytest.mark.parametrize("name", ["p1", "same-s2-reflect"])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_torch_compile_dynamic_builds_one_graph_for_every_size(rank, name):
    """``torch.compile(dynamic=True)`` compiles a stack of layers once, as it does nn.ConvNd's: the layer's input
    check must not become guards on the batch and spatial sizes (a graph per size, and eager mode past the
    recompile limit); every size still matches the core, and wrong channels still get the layer's error."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    torch._dynamo.reset()
    first, second = _layer(rank, **DYNAMIC_LAYERS[name]), LAYERS[rank](6, 6, 3, padding=1)
    with torch.no_grad():
        second.D.normal_(0.0, 0.3)  # D' drawn: D is not the identity
    compiled = torch.compile(nn.Sequential(first, second), backend=counting_backend, dynamic=True)
    for batch, size in [(2, 9), (3, 8), (5, 13), (4, 10), (6, 15)]:  # not 1: torch.compile specializes 0 and 1
        x = _input(batch, _sizes(rank, size), seed=batch)
        hidden = doconv.forward(x.numpy().astype(np.float64), get_params(first).astype(np.float64), first.config)
        expected = doconv.forward(hidden, get_params(second).astype(np.float64), second.config)
        doconv.assert_close(compiled(x).detach().numpy(), expected, "float32", f"compiled at {tuple(x.shape)}")
    # 'same' at stride 2 pads by (size - 1) % 2 per axis: at most one graph per parity, never one per size
    most = 1 if name == "p1" else 2
    assert len(graphs) <= most, f"{len(graphs)} graphs for five input sizes"
    with pytest.raises(ValueError, match=r"input has 3 channels but in_channels=4"):
        compiled(torch.randn(2, 3, *_sizes(rank, 9)))
    torch._dynamo.reset()


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_onnx_export_with_dynamic_axes_runs_at_other_sizes(rank):
    """torch.onnx.export's default (dynamo) exporter, with the batch and every spatial axis dynamic."""
    ort = pytest.importorskip("onnxruntime")
    layer = _layer(rank, **DYNAMIC_LAYERS["same-s2-reflect"])
    axes = {0: "batch", **{2 + axis: f"size{axis}" for axis in range(rank)}}
    buffer = io.BytesIO()
    torch.onnx.export(layer, (_input(2, _sizes(rank, 9)),), buffer, input_names=["x"], dynamic_axes={"x": axes})
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    for batch, size in [(1, 9), (3, 8), (2, 12)]:
        x = _input(batch, _sizes(rank, size), seed=batch)
        (got,) = session.run(None, {"x": x.numpy()})
        _assert_core(got, layer, x, f"ONNX (dynamo) at {tuple(x.shape)}")


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate"])
@pytest.mark.parametrize("folded", [False, True], ids=["unfolded", "folded"])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_legacy_onnx_export_of_same_padding_at_stride_above_1_follows_the_input_size(rank, folded, mode):
    """The TorchScript exporter (``dynamo=False``) records the 'same' pads' arithmetic on the traced sizes: the
    program pads as the layer does at every size, whatever the example, with symmetric (k3 s2 at odd sizes),
    one-sided (k3 s2 at even, k2 s2 at odd sizes) or no pads (k2 s2 at even sizes, k1 s3 where TF's total
    ``max(excess, 0)`` clamps a negative excess). ('circular' is left out: that exporter takes only constant
    circular pads.)"""
    ort = pytest.importorskip("onnxruntime")
    axes = {0: "batch", **{2 + axis: f"size{axis}" for axis in range(rank)}}
    for kernel, stride, example in [(3, 2, 9), (3, 2, 8), (2, 2, 8), (2, 2, 9), (1, 3, 7)]:
        layer = _layer(rank, kernel_size=kernel, stride=stride, padding="same", padding_mode=mode).eval()
        model = fold(nn.Sequential(layer))[0] if folded else layer
        buffer = io.BytesIO()
        torch.onnx.export(model, (_input(1, (example,) * rank),), buffer, dynamo=False, input_names=["x"],
                          dynamic_axes={"x": axes})
        session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
        for size in (example, 7, 8, 10):
            x = _input(2, _sizes(rank, size), seed=size)
            (got,) = session.run(None, {"x": x.numpy()})
            _assert_core(got, layer, x, f"k{kernel} s{stride} exported at {example}, run at {tuple(x.shape)}")


# ---- the meta device -------------------------------------------------------------------------------------------

#: DOConv{rank}d arguments after (4, 6): kernel composition (c-major W, transposed training route), 'same' at
#: stride 2 padded first (ComposeKernel, groups=2), feature composition
META_LAYERS = [dict(kernel_size=3, padding=1),
               dict(kernel_size=3, stride=2, padding="same", padding_mode="reflect", groups=2),
               dict(kernel_size=3, padding=1, composition="feature", bias=False)]


@pytest.mark.parametrize("kwargs", META_LAYERS, ids=["k3-p1", "same-s2-g2", "feature"])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_meta_device_layers_run_train_and_fold(rank, kwargs):
    """Shape inference and model sizing run models on 'meta' (tensors without values), as nn.ConvNd runs there:
    the output, W', the gradients and the folded convolution have the core's shapes, on 'meta'."""
    layer = LAYERS[rank](4, 6, device="meta", **kwargs)
    config = layer.config
    x = torch.empty(2, 4, *_sizes(rank, 8), device="meta", requires_grad=True)
    out = layer(x)
    assert out.is_meta and out.shape == config.output_shape(x.shape)
    out.sum().backward()
    assert x.grad.is_meta and x.grad.shape == x.shape
    assert layer.W.grad.is_meta and layer.W.grad.shape == config.W_shape
    assert layer.D.grad.is_meta and layer.D.grad.shape == config.D_shape
    with torch.no_grad():
        assert layer(x[0]).shape == config.output_shape(x[0].shape, unbatched=True)
    assert layer.weight.is_meta and layer.weight.shape == config.kernel_shape
    with pytest.raises(TypeError, match="input dtype torch.float64 differs from the layer's torch.float32"):
        layer(x.double())
    folded = fold(nn.Sequential(layer))[0][0]
    assert isinstance(folded, nn.modules.conv._ConvNd) and folded.weight.is_meta
    assert folded(x).shape == out.shape

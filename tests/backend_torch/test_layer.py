"""DOConv1d/2d/3d against the NumPy core on the shared case table (every rank), plus their torch integration."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import doconv
from doconv.cases import case as get_case, select
from doconv.torch import UNSUPPORTED_FEATURES, DOConv2d, convert, get_params, layer_config, parametrize, set_params
from doconv.torch import functional as DF

CASES = select(UNSUPPORTED_FEATURES)
DTYPES = ("float32", "float64")


@pytest.mark.parametrize("composition", ["kernel", "feature", "auto"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_and_gradients_match_core(case, dtype, composition, h):
    x, expected, u, grads = h.reference(case)
    layer = h.make_layer(case, dtype, composition=composition)
    out, got = h.torch_grads(layer, torch.as_tensor(x.astype(dtype)), u)
    doconv.assert_close(out.numpy(), expected, dtype, f"{case.id} forward")
    assert set(got) == set(grads)
    for name, value in grads.items():
        doconv.assert_close(got[name], value, dtype, f"{case.id} d{name}")


@pytest.mark.parametrize("case", [c for c in CASES if c.config.has_D], ids=str)
def test_custom_backward_equals_einsum_autograd(case):
    c = case.config
    p = case.params(3, np.float64)
    W, D = (torch.tensor(a, requires_grad=True) for a in (p.W, p.D))
    g = torch.randn(c.kernel_shape, dtype=torch.float64)
    a = DF.compose_kernel(W, D, c)
    da = torch.autograd.grad(a, (W, D), g)
    b = DF.compose_einsum(W, D, c)
    db = torch.autograd.grad(b, (W, D), g)
    np.testing.assert_allclose(a.detach().numpy(), doconv.compose(p, c), atol=1e-12)
    for x, y in zip(da, db):
        np.testing.assert_allclose(x.numpy(), y.numpy(), atol=1e-12)


@pytest.mark.parametrize("case", [c for c in CASES if c.config.has_D and c.config.groups == 1], ids=str)
def test_c_major_compositions_equal_einsum_autograd(case, h):
    """Both layouts ComposeCMajor returns (OIHW for the convolution; reversed taps in (C_in, C_out, MN) for the
    transposed convolution) and their gradients, against autograd through the core's einsum, in every rank."""
    c = case.config
    spatial = h.spatial_dims(c.rank)
    p = case.params(3, np.float64)
    W, D = DF.to_c_major(torch.as_tensor(p.W)).requires_grad_(True), torch.tensor(p.D, requires_grad=True)
    assert DF.c_major(W, 1) and not W.is_contiguous()
    W0, D0 = torch.tensor(p.W, requires_grad=True), torch.tensor(p.D, requires_grad=True)
    ref = DF.compose_einsum(W0, D0, c)                                         # OIHW
    g = torch.randn(c.kernel_shape, dtype=torch.float64)
    want = torch.autograd.grad(ref, (W0, D0), g)
    np.testing.assert_allclose(ref.detach().numpy(), doconv.compose(p, c), atol=1e-12)
    oihw = DF.compose_kernel(W, D, c)
    flipped = DF.ComposeCMajor.apply(W, D, True).reshape(c.in_channels, c.out_channels, *c.kernel_size)
    np.testing.assert_allclose(oihw.detach().numpy(), ref.detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(flipped.detach().numpy(), ref.detach().transpose(0, 1).flip(spatial).numpy(),
                               atol=1e-12)
    for got in (torch.autograd.grad(oihw, (W, D), g),
                torch.autograd.grad(flipped, (W, D), g.transpose(0, 1).flip(spatial))):
        assert got[0].stride() == W.stride()   # dW arrives in W's own (c-major) strides: no copy
        for x, y in zip(got, want):
            np.testing.assert_allclose(x.numpy(), y.numpy(), atol=1e-12)


@pytest.mark.parametrize("large", [False, True], ids=["small-kernel-routes", "large-kernel-routes"])
@pytest.mark.parametrize("case", [c for c in CASES if c.config.has_D], ids=str)
def test_training_composition_equals_einsum_autograd(case, large, h, monkeypatch):
    """ComposeTrain (a training call's composition from the delta D' and I_fill, one autograd node) in each
    layout it serves -- ComposeKernel's (any W), ComposeCMajor's OIHW and reversed taps (c-major W) -- and its
    gradients (dD' = dD), against autograd through the core's einsum of D' + I_fill, in every rank. ``large``:
    the routes taken from LARGE_KERNEL_CHANNELS on (two copies to OIHW; dD by a grouped conv1d, which runs
    for float32 with several threads)."""
    c = case.config
    dtype = torch.float32 if large else torch.float64
    if large:
        monkeypatch.setattr(DF, "LARGE_KERNEL_CHANNELS", 1)
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
    try:
        p = case.params(3, np.float64)
        identity = torch.as_tensor(doconv.identity_fill(c.MN, c.S), dtype=dtype)
        W0 = torch.tensor(p.W, dtype=dtype, requires_grad=True)
        delta0 = (torch.tensor(p.D, dtype=dtype) - identity).requires_grad_(True)
        ref = DF.compose_einsum(W0, delta0 + identity, c)                              # OIHW
        np.testing.assert_allclose(ref.detach().double().numpy(), doconv.compose(p, c),
                                   atol=1e-5 if large else 1e-12)
        g = torch.randn(c.kernel_shape, dtype=dtype)
        want = torch.autograd.grad(ref, (W0, delta0), g)
        spatial = h.spatial_dims(c.rank)
        layouts = [(W0.detach(), None, ref, g)]
        if c.groups == 1:
            Wc = DF.to_c_major(W0.detach())
            layouts += [(Wc, False, ref, g),
                        (Wc, True, ref.transpose(0, 1).flip(spatial), g.transpose(0, 1).flip(spatial))]
        for W_value, transposed, expected, grad in layouts:
            W = (W_value.clone() if transposed is None else DF.to_c_major(W_value)).requires_grad_(True)
            delta = delta0.detach().clone().requires_grad_(True)
            out = DF.ComposeTrain.apply(W, delta, identity, transposed, c.groups).reshape(expected.shape)
            got = torch.autograd.grad(out, (W, delta), grad)
            what = f"{case.id} transposed={transposed}"
            doconv.assert_close(out.detach().numpy(), expected.detach().numpy(), str(dtype)[6:], what)
            assert got[0].stride() == W.stride(), what   # dW in W's own strides
            for x, y, name in zip(got, want, ("dW", "dD'")):
                doconv.assert_close(x.numpy(), y.numpy(), str(dtype)[6:], f"{what} {name}")
    finally:
        if large:
            torch.set_num_threads(threads)


@pytest.mark.parametrize("W_storage", ["c-major", "contiguous"])
@pytest.mark.parametrize("stride", [1, 2])
def test_training_call_records_one_composition_node(stride, W_storage):
    """A training call's kernel hangs off one ComposeTrain node whose inputs are W and D' themselves (I_fill
    added inside it, no separate add in the graph), on the transposed (stride 1) and the OIHW route alike."""
    layer = DOConv2d(8, 8, 3, stride, 1, d_init="random", W_storage=W_storage)
    out = layer(torch.randn(2, 8, 6, 6))
    nodes = [n for n, _ in out.grad_fn.next_functions if n is not None]
    while any(type(n).__name__ == "ViewBackward0" for n in nodes):   # the kernel's reshape to (C_out, C_in, *k)
        nodes = [m for n in nodes for m, _ in n.next_functions if m is not None]
    compose = [n for n in nodes if type(n).__name__ == "ComposeTrainBackward"]
    assert len(compose) == 1, [type(n).__name__ for n in nodes]
    leaves = [n.variable for n, _ in compose[0].next_functions if n is not None]
    assert len(leaves) == 2 and leaves[0] is layer.W and leaves[1] is layer.D


def test_groups_1_layers_store_W_c_major_and_state_dict_shares_it(tmp_path):
    from safetensors.torch import load_file, save_file, save_model
    layer = DOConv2d(4, 6, 3, padding=1, D_mul=12, d_init="random")
    assert layer.W.shape == (6, 4, 12) and layer.W.permute(1, 2, 0).is_contiguous()
    assert DOConv2d(4, 6, 1).W.is_contiguous() and DOConv2d(4, 6, 3, groups=2).W.is_contiguous()
    sd = layer.state_dict()
    assert sd["W"].data_ptr() == layer.W.data_ptr() and torch.equal(sd["W"], layer.W)  # shared, as nn.Conv2d's
    assert layer.state_dict(keep_vars=True)["W"] is layer.W
    with pytest.raises(ValueError, match="contiguous"):  # safetensors' own message: raw save_file wants contiguous
        save_file(sd, tmp_path / "w.safetensors")
    save_model(layer, tmp_path / "model.safetensors")  # makes them contiguous itself
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "w.safetensors")
    other = DOConv2d(4, 6, 3, padding=1, D_mul=12)
    other.load_state_dict(load_file(tmp_path / "w.safetensors"))
    assert torch.equal(other.W, layer.W) and other.W.stride() == layer.W.stride()   # copy_ keeps the layout
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)                  # D round-trips too
    assert other.double().W.stride() == layer.W.stride()
    with torch.device("meta"):
        lazy = DOConv2d(4, 6, 3, padding=1, D_mul=12)
    lazy.load_state_dict(load_file(tmp_path / "w.safetensors"), assign=True)   # the meta-device init flow
    assert torch.equal(lazy.W, layer.W) and lazy.W.stride() == layer.W.stride() and lazy.W_storage == "c-major"
    plain = DOConv2d(4, 6, 3, padding=1, D_mul=12).contiguous_W()
    plain.load_state_dict(sd, assign=True)
    assert plain.W.is_contiguous() and torch.equal(plain.W, layer.W)


def test_W_storage_contiguous_serves_code_that_flattens_parameters(h):
    """LBFGS and parameters_to_vector call param.view(-1): they raise on a c-major W, as on any
    non-contiguous parameter; W_storage='contiguous' (or contiguous_W()) gives the same layer they accept."""
    case = get_case("k3-zeros-asym")
    fast = h.make_layer(case, "float64")
    plain = h.make_layer(case, "float64", W_storage="contiguous")
    assert (fast.W_storage, plain.W_storage) == ("c-major", "contiguous") and plain.W.is_contiguous()
    assert "W_storage='contiguous'" in repr(plain) and "W_storage" not in repr(fast)
    with pytest.raises(RuntimeError, match="view"):
        torch.nn.utils.parameters_to_vector(fast.parameters())
    x = torch.as_tensor(case.input(0))
    results = []
    for layer in (plain, fast.contiguous_W()):
        assert layer.W.is_contiguous()
        before = torch.nn.utils.parameters_to_vector(layer.parameters())
        opt = torch.optim.LBFGS(layer.parameters(), max_iter=3)

        def closure(layer=layer, opt=opt):
            opt.zero_grad()
            loss = layer(x).square().mean()
            loss.backward()
            return loss
        opt.step(closure)
        results.append(torch.nn.utils.parameters_to_vector(layer.parameters()))
        assert not torch.equal(results[-1], before)
    torch.testing.assert_close(results[0], results[1], rtol=1e-9, atol=1e-12)   # same training either way
    with pytest.raises(ValueError, match="W_storage must be one of \\('c-major', 'contiguous'\\), but got W_storage='x'"):
        DOConv2d(2, 2, 3, W_storage="x")
    model, _ = convert(torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3)), W_storage="contiguous")
    assert model[0].W_storage == "contiguous"
    assert convert(torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3)))[0][0].W_storage == "c-major"


@pytest.mark.parametrize("make", [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True),
                                  lambda p: torch.optim.Adam(p, lr=0.01, fused=True),
                                  lambda p: torch.optim.AdamW(p, lr=0.01, foreach=True),
                                  lambda p: torch.optim.RMSprop(p, lr=0.01)], ids=["SGD-fused", "Adam-fused",
                                                                                   "AdamW-foreach", "RMSprop"])
def test_optimizers_train_a_c_major_W_like_a_contiguous_one(make, h):
    case = get_case("k3")
    x = torch.as_tensor(case.input(0))
    trained = []
    for storage in ("c-major", "contiguous"):
        layer = h.make_layer(case, "float64", W_storage=storage)
        opt = make(layer.parameters())
        for _ in range(3):
            opt.zero_grad()
            layer(x).square().mean().backward()
            opt.step()
        assert layer.W_storage == storage
        trained.append([p.detach().clone() for p in layer.parameters()])
    for a, b in zip(*trained):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _spy(monkeypatch, name):
    calls = []
    real = getattr(DF.F, name)
    monkeypatch.setattr(DF.F, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("kwargs, transposed", [
    (dict(in_channels=8, out_channels=5, kernel_size=3, padding=1), True),
    (dict(in_channels=8, out_channels=4, kernel_size=3, padding=((0, 2), (2, 1))), True),
    (dict(in_channels=8, out_channels=4, kernel_size=3, padding=2, padding_mode="circular", dilation=2), True),
    (dict(in_channels=8, out_channels=6, kernel_size=3, stride=2, padding=1), False),
    (dict(in_channels=9, out_channels=9, kernel_size=3, groups=3, padding="same"), False),
    (dict(in_channels=DF.MIN_TRANSPOSED_IN_CHANNELS - 1, out_channels=5, kernel_size=3, padding=1), False),  # a stem
], ids=["k3", "asym", "circular-d2", "s2", "g3", "few-channels"])
def test_training_at_stride_1_runs_conv_transpose2d(kwargs, transposed, monkeypatch):
    layer = _random_D_layer(**kwargs, dtype=torch.float64)
    x = torch.randn(2, kwargs["in_channels"], 7, 9, dtype=torch.float64, requires_grad=True)
    calls = _spy(monkeypatch, "conv_transpose2d")
    out = layer(x)
    (out * out).sum().backward()
    assert len(calls) == int(transposed)
    W = layer.W.detach().clone().requires_grad_(True)  # same values and gradients either route
    D = layer.D.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    want = DF.conv(x2, DF.compose_einsum(W, D + layer.I_fill, layer.config), layer.bias, layer.config)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    (want * want).sum().backward()
    for got, ref in ((layer.W.grad, W.grad), (layer.D.grad, D.grad), (x.grad, x2.grad)):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        layer(x)                                  # inference: the OIHW kernel and conv2d
    assert len(calls) == int(transposed)
    with torch.no_grad():
        layer(x)                                  # inference: the OIHW kernel and conv2d
    assert len(calls) == int(transposed)


@pytest.mark.parametrize("storage, batch, route", [("c-major", 8, "kernel"), ("contiguous", 8, "feature"),
                                                   ("c-major", 2, "feature")])
def test_auto_margin_follows_the_storage(storage, batch, route, monkeypatch):
    # 512@7x7, P = N*49 positions: feature saves 81*C*(C-P) of kernel's 81*C^2 + 9*P*C^2 MACC, i.e. 0.5% at
    # batch 8 (under FAST_KERNEL_MARGIN) and 6.8% at batch 2 (over it); a contiguous W has no margin
    layer = DOConv2d(512, 512, 3, padding=1, W_storage=storage, composition="auto")
    torch.nn.init.normal_(layer.D, std=0.1)
    x = torch.randn(batch, 512, 7, 7)
    features = []
    real = DF.feature_forward
    monkeypatch.setattr(DF, "feature_forward", lambda *a: features.append(1) or real(*a))
    out = layer(x)
    assert len(features) == (route == "feature")
    with torch.no_grad():
        ref = torch.nn.functional.conv2d(x, DF.compose_einsum(layer.W, layer.full_D(), layer.config), layer.bias,
                                         padding=1)
    torch.testing.assert_close(out.detach(), ref, rtol=1e-4, atol=1e-4)


def test_padding_beyond_the_transposed_range_falls_back_to_conv2d(monkeypatch):
    # conv_transpose2d would need padding d*(k-1) - p = -1 here: the layer must use conv2d, same values
    torch.manual_seed(0)
    layer = DOConv2d(8, 5, 3, padding=3, dtype=torch.float64, d_init="random")
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64, requires_grad=True)
    calls = _spy(monkeypatch, "conv_transpose2d")
    out = layer(x)
    assert not calls and out.shape == (2, 5, 10, 10)
    ref = torch.nn.functional.conv2d(x, DF.compose_einsum(layer.W, layer.full_D(), layer.config), layer.bias,
                                     padding=3)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("case_id", ["g3-k3-s2-Dmul+3", "dw-x2-k3-circular-asym", "g2-k3-reflect-asym",
                                     "k3-zeros-asym", "k3-replicate-s2", "1d-g2-k3-d2", "3d-k3-reflect-asym"])
@pytest.mark.parametrize("composition", ["kernel", "feature"])
def test_gradcheck_float64(case_id, composition, h):
    case = get_case(case_id)
    layer = h.make_layer(case, "float64", composition=composition)
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for _, p in layer.named_parameters())
    x = torch.tensor(case.input(4), requires_grad=True)

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7, fast_mode=True)


# ---- module surface -------------------------------------------------------------------------------

def test_state_dict_keys_and_buffers():
    layer = DOConv2d(4, 6, 3, padding=1, D_mul=12)
    sd = layer.state_dict()
    assert list(sd) == ["W", "D", "bias"]
    assert sd["W"].shape == (6, 4, 12) and sd["D"].shape == (4, 9, 12) and sd["bias"].shape == (6,)
    assert "I_fill" in dict(layer.named_buffers()) and layer.I_fill.shape == (9, 12)
    assert [n for n, _ in layer.named_parameters()] == ["W", "D", "bias"]
    pointwise = DOConv2d(4, 6, 1, bias=False)
    assert list(pointwise.state_dict()) == ["W"] and pointwise.D is None


def test_extra_repr_lists_non_defaults_and_D_mul():
    text = repr(DOConv2d(4, 8, 3, stride=2, padding=1, groups=2, bias=False, padding_mode="reflect", D_mul=12))
    assert text == ("DOConv2d(4, 8, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), groups=2, "
                    "bias=False, padding_mode='reflect', D_mul=12)")
    assert "padding=((1, 0), (2, 2))" in repr(DOConv2d(2, 2, 3, padding=((1, 0), (2, 2))))


@pytest.mark.parametrize("padding", [0, 1, (2, 1), "same", "valid"])
def test_attributes_read_as_nn_conv2d_s(padding):
    ours, theirs = DOConv2d(4, 6, 3, padding=padding, dilation=2), nn.Conv2d(4, 6, 3, padding=padding, dilation=2)
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode", "transposed", "output_padding"):
        assert getattr(ours, name) == getattr(theirs, name), name
    rebuilt = nn.Conv2d(ours.in_channels, ours.out_channels, ours.kernel_size, ours.stride, ours.padding,
                        ours.dilation, ours.groups)  # code that copies a conv's geometry
    x = torch.randn(1, 4, 9, 9)
    assert rebuilt(x).shape == ours(x).shape


def test_assigning_weight_is_a_clear_error():
    layer = DOConv2d(4, 6, 3, padding=1)
    with pytest.raises(AttributeError, match=r"DOConv2d.weight is the composed kernel.*fold first"):
        layer.weight = nn.Parameter(torch.zeros(6, 4, 3, 3))
    with pytest.raises(AttributeError, match=r"fold first"):
        torch.nn.utils.fusion.fuse_conv_bn_eval(layer.eval(), nn.BatchNorm2d(6).eval())
    layer.switch_to_deploy()  # a deployed layer holds a real weight, replaceable as nn.Conv2d's
    layer.weight = nn.Parameter(torch.zeros(6, 4, 3, 3))
    assert layer(torch.randn(1, 4, 5, 5)).abs().max() == layer.bias.abs().max()
    assert "composition='auto'" in repr(DOConv2d(2, 2, 3, composition="auto"))
    assert "composition" not in repr(DOConv2d(2, 2, 3))  # 'kernel' is the default


def test_identity_init_composes_to_W_and_has_conv_init_distribution():
    torch.manual_seed(0)
    layer = DOConv2d(64, 64, 3, D_mul=18)
    bound = 1 / math.sqrt(64 * 9)
    assert 0.9 * bound < float(layer.W.detach().abs().max()) <= bound
    assert torch.count_nonzero(layer.D) == 0
    expected = (layer.W[..., :9] + layer.W[..., 9:]).reshape(64, 64, 3, 3)
    torch.testing.assert_close(layer.weight, expected)
    torch.manual_seed(0)
    rand = DOConv2d(64, 64, 3, d_init="random")
    D = rand.full_D()
    assert abs(float(D.detach().std()) - math.sqrt(2 / 9)) < 0.02 and abs(float(D.detach().mean())) < 0.02
    # reproducible from torch's RNG
    torch.manual_seed(0)
    torch.testing.assert_close(DOConv2d(64, 64, 3, d_init="random").D, rand.D)


def test_zoo_init_loop_skips_the_layer_and_weight_is_computed():
    model = nn.Sequential(DOConv2d(3, 4, 3))
    before = model[0].W.detach().clone()
    for m in model.modules():  # the model-zoo pattern: silently nothing for a computed weight
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
    assert not isinstance(model[0], nn.Conv2d)
    with torch.no_grad():
        model[0].weight.zero_()  # writing into the computed kernel changes nothing (documented)
    torch.testing.assert_close(model[0].W, before)
    assert model[0].weight.abs().sum() > 0
    with pytest.raises(AttributeError, match="fold first"):
        model[0].weight = nn.Parameter(torch.zeros(4, 3, 3, 3))


def test_layer_config_and_params_round_trip(h):
    case = get_case("g3-k3-s2-Dmul+3")
    layer = h.make_layer(case, "float64")
    assert layer_config(layer) == case.config
    p, q = case.params(0, np.float64), get_params(layer)
    for name in ("W", "D", "bias"):
        np.testing.assert_allclose(getattr(q, name), getattr(p, name), atol=1e-15)


# ---- errors ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, text", [
    (dict(kernel_size=0), ValueError, "kernel_size"),
    (dict(groups=3), ValueError, "in_channels must be divisible by groups"),
    (dict(padding_mode="mirror"), ValueError, "padding_mode='mirror'"),
    (dict(padding="full"), ValueError, "padding='full'"),
    (dict(D_mul=4), ValueError, "D_mul"),
    (dict(stride=(1, 2, 3)), ValueError, "stride"),
    (dict(composition="fast"), ValueError, "composition='fast'"),
    (dict(d_init="zeros"), ValueError, "d_init='zeros'"),
    (dict(in_channels=2.5), TypeError, "in_channels"),
])
def test_bad_arguments_name_the_argument(kwargs, error, text):
    args = dict(in_channels=4, out_channels=6, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(error, match=repr(text)[1:-1].replace("(", r"\(").replace(")", r"\)")):
        DOConv2d(**args)


def test_bad_inputs_are_clear_errors():
    layer = DOConv2d(4, 6, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match="in_channels=4"):
        layer(torch.zeros(1, 3, 5, 5))
    with pytest.raises(ValueError, match="3-D .* or 4-D"):
        layer(torch.zeros(4, 5))
    with pytest.raises(ValueError, match="reflect"):
        layer(torch.zeros(1, 4, 1, 5))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.zeros(1, 4, 5, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer(np.zeros((1, 4, 5, 5)))
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        DOConv2d(4, 6, 3)(torch.zeros(1, 4, 2, 5))
    with pytest.raises(ValueError, match=r"in_channels=4 \(input shape \(3, 5, 5\)\)"):  # unbatched, as given
        layer(torch.zeros(3, 5, 5))


def test_arguments_nn_conv2d_takes_loosely():
    """bias=None means no bias and kernel_size may be a NumPy array, as for nn.Conv2d."""
    layer = DOConv2d(4, 6, np.array([3, 1]), bias=None)
    conv = torch.nn.Conv2d(4, 6, np.array([3, 1]), bias=None)
    assert layer.bias is None and conv.bias is None
    assert layer.kernel_size == (3, 1) and layer.W.shape == (6, 4, 3)


def test_load_state_dict_and_set_params_name_the_array():
    layer = DOConv2d(4, 6, 3)
    other = DOConv2d(4, 6, 3, D_mul=12).state_dict()
    with pytest.raises(RuntimeError, match="(?s)size mismatch for W.*size mismatch for D"):
        layer.load_state_dict(other)
    bad = get_params(layer)
    bad.D = np.zeros((4, 9, 12))
    with pytest.raises(ValueError, match=r"layer 'net.conv': D has shape \(4, 9, 12\) .* needs \(4, 9, 9\)"):
        set_params(layer, bad, name="'net.conv'")


def test_meta_device_init_then_to_empty_and_reset_parameters():
    """The FSDP / torchtitan pattern: build on 'meta', materialise, reset -- I_fill is rebuilt too."""
    with torch.device("meta"):
        layer = DOConv2d(3, 4, 3, padding=1, d_init="random")
    layer.to_empty(device="cpu")
    torch.manual_seed(0)
    layer.reset_parameters()
    torch.manual_seed(0)
    fresh = DOConv2d(3, 4, 3, padding=1, d_init="random")
    torch.testing.assert_close(layer.I_fill, torch.as_tensor(doconv.identity_fill(9, 9), dtype=torch.float32))
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(layer(x), fresh(x), rtol=0, atol=0)


@pytest.mark.parametrize("W_storage, groups", [("c-major", 1), ("contiguous", 1), ("contiguous", 2)])
def test_complex_gradients_match_autograd_of_the_einsum(W_storage, groups):
    """nn.Conv2d takes complex dtypes; the hand-written VJPs conjugate as autograd does."""
    torch.manual_seed(0)
    layer = DOConv2d(4, 6, 3, padding=1, groups=groups, dtype=torch.complex128, d_init="random",
                     W_storage=W_storage, composition="kernel")
    x = torch.randn(2, 4, 5, 5, dtype=torch.complex128)
    u = torch.randn(2, 6, 5, 5, dtype=torch.complex128)
    (layer(x) * u.conj()).real.sum().backward()
    W = layer.W.detach().clone().requires_grad_(True)
    D = layer.D.detach().clone().requires_grad_(True)
    kernel = DF.compose_einsum(W, D + layer.I_fill, layer.config)
    out = torch.nn.functional.conv2d(x, kernel, layer.bias, padding=1, groups=groups)
    (out * u.conj()).real.sum().backward()
    torch.testing.assert_close(layer.W.grad, W.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.D.grad, D.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("groups", [1, 2])
def test_depthwise_separable_D_mul_below_MN(groups, h):
    """D_mul < M*N only on purpose (``depthwise_separable=True``, as in the core and the MXNet layer)."""
    with pytest.raises(ValueError, match=r"D_mul must be >= M\*N = 9.*depthwise_separable=True"):
        DOConv2d(4, 6, 3, D_mul=4)
    case = doconv.cases.Case("dsep", dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, groups=groups,
                                          D_mul=4, depthwise_separable=True), (2, 4, 6, 7))
    layer = h.make_layer(case, "float64")
    assert "depthwise_separable=True" in repr(layer)
    x, expected, u, grads = h.reference(case)
    out, got = h.torch_grads(layer, torch.tensor(x), u)
    doconv.assert_close(out.numpy(), expected, "float64", "forward")
    for name in ("x", "W", "D"):
        doconv.assert_close(got[name], grads[name], "float64", f"d{name}")


# ---- dtype/device moves, autocast ----------------------------------------------------------------

def test_to_double_half_like_conv2d(h):
    case = get_case("g2-k3-reflect-asym")
    layer = h.make_layer(case, "float32").double()
    assert layer.W.dtype == layer.D.dtype == layer.I_fill.dtype == torch.float64
    x, expected, _, _ = h.reference(case)
    p = get_params(layer)
    assert p.W.dtype == np.float64
    doconv.assert_close(layer(torch.tensor(x)).detach().numpy(), doconv.forward(x, p, case.config), "float64")
    half = layer.half()
    assert half.I_fill.dtype == torch.float16
    out = half(torch.tensor(x, dtype=torch.float16))
    doconv.assert_close(out.float().detach().numpy(), expected, "float16")
    assert list(layer.to("cpu", torch.float32).state_dict()) == ["W", "D", "bias"]


@pytest.mark.parametrize("case_id", ["k3-s2-d2", "g3-k3", "k3-d2", "1d-dw-x2-k5-s2", "1d-k3", "3d-k3-d2",
                                     "3d-g2-k3-s2"])
def test_autocast_bfloat16(case_id, h):
    case = get_case(case_id)
    layer = h.make_layer(case, "float32")
    x, expected, _, _ = h.reference(case)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.tensor(x, dtype=torch.float32))
    assert out.dtype == torch.bfloat16
    doconv.assert_close(out.float().detach().numpy(), expected, "bfloat16")
    out.float().sum().backward()
    assert layer.W.grad.dtype == torch.float32 and layer.D.grad is not None


# ---- torch.compile, torch.func ---------------------------------------------------------------------

# ComposeKernel; c-major through the transposed conv; 1-D causal; 3-D ComposeKernel and c-major
@pytest.mark.parametrize("case_id", ["g3-k3-s2-same-2MN", "k3-zeros-asym", "1d-k3-causal-d2", "3d-g2-k3-s2", "3d-k3"])
def test_torch_compile_fullgraph_forward_and_backward(case_id, h):
    torch._dynamo.reset()  # each case compiles the one forward anew: keep the earlier ones off its recompile limit
    case = get_case(case_id)
    layer = h.make_layer(case, "float32")
    x, expected, u, grads = h.reference(case)
    compiled = torch.compile(layer, fullgraph=True, backend="inductor")
    out, got = h.torch_grads(compiled, torch.tensor(x, dtype=torch.float32), u)
    doconv.assert_close(out.numpy(), expected, "float32", "compiled forward")
    for name in ("W", "D", "x"):
        doconv.assert_close(got[name], grads[name], "float32", f"compiled d{name}")
    # 'auto' and eval mode compile without graph breaks too
    layer.composition = "auto"
    with torch.no_grad():
        out = torch.compile(layer.eval(), fullgraph=True, backend="eager")(torch.tensor(x, dtype=torch.float32))
    doconv.assert_close(out.numpy(), expected, "float32", "compiled eval forward")


@pytest.mark.parametrize("case_id, dtype", [("dw-x2-k3", "float64"), ("k3", "float32"), ("k3-s2", "float32")])
def test_functional_call_and_vmap_over_inputs(case_id, dtype, h):
    case = get_case(case_id)
    layer = h.make_layer(case, dtype)
    x, expected, _, _ = h.reference(case)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    x = x.astype(dtype)
    out = torch.func.vmap(lambda xi: torch.func.functional_call(layer, params, (xi,)))(torch.tensor(x))
    doconv.assert_close(out.numpy(), expected, dtype)
    # per-sample gradients: vmap(grad) over the batch, summed = the batch gradient of the core
    def loss(p, xi):
        return torch.func.functional_call(layer, p, (xi[None],)).sum()
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, torch.tensor(x))
    full = doconv.selfcheck.layer_vjp(np.ones_like(expected), x, case.params(0), case.config)
    for name in ("W", "D"):
        doconv.assert_close(per_sample[name].sum(0).numpy(), full[name], dtype, f"per-sample d{name}")


# ---- parametrize retrofit ----------------------------------------------------------------------------

@pytest.mark.parametrize("case_id", ["k3", "g3-k3-s2-Dmul+3", "dw-x2-k3", "k3-circular-d2"])
def test_parametrize_matches_doconv2d(case_id, h):
    case = get_case(case_id)
    c = case.config
    conv = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, (c.padding[0][0], c.padding[1][0])
                     if c.padding not in ("same", "valid") else c.padding, c.dilation, c.groups, c.bias,
                     c.padding_mode, dtype=torch.float64)
    before = conv.weight.detach().clone()
    parametrize(conv, D_mul=c.D_mul)
    torch.testing.assert_close(conv.weight, before)  # the retrofit keeps the kernel
    layer = h.make_layer(case, "float64")
    with torch.no_grad():
        conv.parametrizations.weight.original0.copy_(layer.W)
        conv.parametrizations.weight.original1.copy_(layer.D)
        if c.bias:
            conv.bias.copy_(layer.bias)
    x = torch.tensor(case.input(0))
    doconv.assert_close(conv(x).detach().numpy(), layer(x).detach().numpy(), "float64")
    with pytest.raises(ValueError, match="already parametrized"):
        parametrize(conv)


def test_parametrize_rejects_pointwise():
    with pytest.raises(ValueError, match="1x1"):
        parametrize(nn.Conv2d(2, 2, 1))


# ---- fold of one layer --------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=str)
def test_fuse_and_switch_to_deploy_keep_outputs(case, h):
    layer = h.make_layer(case, "float64")
    x, expected, _, _ = h.reference(case)
    conv = layer.fuse()
    assert isinstance(conv, h.CONVS[case.rank])
    assert sum(p.numel() for p in conv.parameters()) == math.prod(case.config.kernel_shape) + (
        case.config.out_channels if case.config.bias else 0)
    doconv.assert_close(conv(torch.tensor(x)).detach().numpy(), expected, "float64", "fused")
    layer.switch_to_deploy()
    layer.switch_to_deploy()  # idempotent
    assert list(layer.state_dict()) == ["weight", "bias"][: 1 + case.config.bias]
    doconv.assert_close(layer(torch.tensor(x)).detach().numpy(), expected, "float64", "deployed")
    doconv.assert_close(layer.fuse()(torch.tensor(x)).detach().numpy(), expected, "float64", "fused deployed")
    assert "deployed=True" in repr(layer)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_accepts_every_conv_argument_with_its_default(rank, h):
    """A drop-in: every parameter of nn.Conv{rank}d is a parameter of DOConv{rank}d, same position and default."""
    import inspect
    ours = list(inspect.signature(h.LAYERS[rank]).parameters.values())
    theirs = list(inspect.signature(h.CONVS[rank]).parameters.values())
    for mine, p in zip(ours, theirs):
        assert (mine.name, mine.default, mine.kind) == (p.name, p.default, p.kind)
    assert len(ours) >= len(theirs)


@pytest.mark.parametrize("W_storage", ["c-major", "contiguous"])
def test_ema_updates_through_state_dict_reach_the_parameters(W_storage):
    """timm's ModelEmaV2 / ultralytics' ModelEMA write the EMA into ``ema.state_dict()`` values in place."""
    torch.manual_seed(0)
    model = DOConv2d(3, 4, 3, W_storage=W_storage)
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        for e, m in zip(ema.state_dict().values(), model.state_dict().values()):
            e.mul_(0.5).add_(m, alpha=0.5)
    for (name, e), m in zip(ema.named_parameters(), model.parameters()):
        torch.testing.assert_close(e - m, torch.full_like(m, -0.5), msg=name)


def test_same_seed_same_init_whatever_the_storage():
    torch.manual_seed(0)
    a = DOConv2d(3, 8, 3, d_init="random")
    torch.manual_seed(0)
    b = DOConv2d(3, 8, 3, d_init="random", W_storage="contiguous")
    assert torch.equal(a.W, b.W) and torch.equal(a.D, b.D)
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-6, atol=1e-7)  # two product orders, same values


@pytest.mark.parametrize("W_storage, groups, training", [("c-major", 1, True), ("c-major", 1, False),
                                                          ("contiguous", 1, True), ("contiguous", 2, True)])
def test_forward_mode_ad_through_W_and_D(W_storage, groups, training):
    """torch.func.jvp (and so jacfwd / hessian) with respect to the parameters, against the einsum."""
    torch.manual_seed(0)
    layer = DOConv2d(4, 6, 3, padding=1, groups=groups, dtype=torch.float64, d_init="random",
                     W_storage=W_storage, composition="kernel").train(training)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    tangents = {k: torch.randn_like(v) for k, v in params.items()}

    def ours(p):
        return torch.func.functional_call(layer, p, (x,))

    def reference(p):
        kernel = DF.compose_einsum(p["W"], p["D"] + layer.I_fill, layer.config)
        return torch.nn.functional.conv2d(x, kernel, p["bias"], padding=1, groups=groups)
    out, tangent = torch.func.jvp(ours, (params,), (tangents,))
    want, want_tangent = torch.func.jvp(reference, (params,), (tangents,))
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(tangent, want_tangent, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["W", "D"])
def test_a_parametrization_of_W_or_D_runs_once_per_forward(name):
    calls = []

    class Count(nn.Module):
        def forward(self, W):
            calls.append(1)
            return W
    for training in (True, False):
        layer = DOConv2d(3, 4, 3, padding=1).train(training)  # composition='auto': the route is chosen too
        torch.nn.utils.parametrize.register_parametrization(layer, name, Count())
        calls.clear()
        layer(torch.randn(1, 3, 6, 6))
        assert len(calls) == 1, (training, len(calls))


def _random_D_layer(*args, **kwargs):
    torch.manual_seed(0)
    layer = DOConv2d(*args, **kwargs)
    with torch.no_grad():
        layer.D.normal_(0.0, 0.3)
    return layer


@pytest.mark.parametrize("flow", ["to_empty", "skip_init", "assign"])
def test_I_fill_survives_every_materialisation(flow):
    """I_fill is not saved, so whatever leaves buffers uninitialised or on 'meta' must rebuild it."""
    source = _random_D_layer(4, 6, 3, padding=1)
    if flow == "skip_init":
        layer = torch.nn.utils.skip_init(DOConv2d, 4, 6, 3, padding=1)
        layer.load_state_dict(source.state_dict())
    else:
        layer = DOConv2d(4, 6, 3, padding=1, device="meta")
        if flow == "to_empty":
            layer.to_empty(device="cpu")
        layer.load_state_dict(source.state_dict(), assign=flow == "assign")
    assert layer.I_fill.device.type == "cpu"
    torch.testing.assert_close(layer.I_fill, torch.as_tensor(doconv.identity_fill(9, 9), dtype=torch.float32))
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(layer(x), source(x), rtol=0, atol=0)
    torch.testing.assert_close(layer.half().I_fill, source.I_fill.half(), rtol=0, atol=0)


def test_layers_made_under_inference_mode_run():
    """Layers made under inference_mode run there and, under no_grad, outside it."""
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with torch.inference_mode():
        layer = _random_D_layer(4, 6, 3, padding=1, groups=2, dtype=torch.float64)
        want = torch.nn.functional.conv2d(x, DF.compose_einsum(layer.W, layer.D + layer.I_fill, layer.config),
                                          layer.bias, padding=1, groups=2)
        torch.testing.assert_close(layer(x), want)
        torch.testing.assert_close(layer.float().double()(x), want)
        with torch.no_grad():
            layer.W.mul_(2.0)
        torch.testing.assert_close(layer(x) - layer.bias[:, None, None], 2 * (want - layer.bias[:, None, None]))
    with torch.no_grad():  # outside inference mode (as for nn.Conv2d, autograd cannot save inference tensors)
        torch.testing.assert_close(layer(x) - layer.bias[:, None, None], 2 * (want - layer.bias[:, None, None]))


def test_fx_symbolic_trace_says_what_to_do_and_a_leaf_tracer_works():
    model = nn.Sequential(_random_D_layer(3, 4, 3, padding=1), nn.ReLU())
    with pytest.raises(TypeError, match=r"fold the model first .*leaf_modules"):
        torch.fx.symbolic_trace(model)

    class Leaf(torch.fx.Tracer):
        def is_leaf_module(self, m, name):
            return isinstance(m, DOConv2d) or super().is_leaf_module(m, name)

    traced = torch.fx.GraphModule(model, Leaf().trace(model))
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
    torch.fx.symbolic_trace(doconv.torch.fold(model)[0])  # folded: plain convs, traced as usual


def test_one_element_tuples_as_nn_conv2d_takes_them():
    """nn.Conv2d(stride=(2,), padding=(1,), dilation=(2,)) builds and runs (its conv broadcasts them)."""
    layer = _random_D_layer(3, 4, 3, stride=(2,), padding=[1], dilation=(2,))
    assert (layer.stride, layer.padding, layer.dilation) == ((2, 2), (1, 1), (2, 2))
    conv = nn.Conv2d(3, 4, 3, stride=(2,), padding=(1,), dilation=(2,))
    with torch.no_grad():
        conv.weight.copy_(layer.weight)
        conv.bias.copy_(layer.bias)
    x = torch.randn(1, 3, 9, 9)
    torch.testing.assert_close(layer(x), conv(x))
    converted, _ = convert(nn.Sequential(conv))
    torch.testing.assert_close(converted(x), conv(x))


def test_fuse_keeps_each_parameters_requires_grad():
    """Bias-only fine-tuning: a frozen W and D fold into a frozen weight, the bias keeps training (and back)."""
    layer = DOConv2d(3, 4, 3)
    layer.W.requires_grad_(False)
    layer.D.requires_grad_(False)
    assert (layer.fuse().weight.requires_grad, layer.fuse().bias.requires_grad) == (False, True)
    layer.D.requires_grad_(True)  # W' = D^T o W still trains through D
    layer.bias.requires_grad_(False)
    assert (layer.fuse().weight.requires_grad, layer.fuse().bias.requires_grad) == (True, False)
    layer.switch_to_deploy()
    assert (layer.weight.requires_grad, layer.bias.requires_grad) == (True, False)

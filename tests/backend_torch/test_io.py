"""Canonical interchange round trips and the official PyTorch checkpoint import."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from torch import nn

import doconv
from doconv.cases import case as get_case, select
from doconv.torch import (UNSUPPORTED_FEATURES, DOConv2d, export_canonical, get_params, import_canonical,
                          import_official, layer_from_config, set_params)

CASES = select(UNSUPPORTED_FEATURES)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_canonical_round_trip(tmp_path, h, dtype):
    """Exact in float64; in float32 D = I_fill + D' is rounded once on the way out (<= 1 ulp of 1)."""
    source = DOConv2d(6, 9, 3, groups=3, stride=2, padding=1, D_mul=12, dtype=dtype)
    h.set_params(source, get_case("g3-k3-s2-Dmul+3").params(1))
    model = nn.Sequential(nn.Identity(), nn.Sequential(source))
    export_canonical(model, tmp_path / "m.safetensors")
    stored = doconv.load(tmp_path / "m.safetensors")
    assert list(stored) == ["1.0"] and stored["1.0"][0] == source.config
    target = nn.Sequential(nn.Identity(), nn.Sequential(DOConv2d(6, 9, 3, groups=3, stride=2, padding=1, D_mul=12,
                                                                 dtype=dtype)))
    import_canonical(target, tmp_path / "m.safetensors")
    for key, value in model.state_dict().items():
        atol = 0 if dtype == torch.float64 or key != "1.0.D" else 2 ** -23
        torch.testing.assert_close(target.state_dict()[key], value, rtol=0, atol=atol)
    bare = DOConv2d(6, 9, 3, groups=3, stride=2, padding=1, D_mul=12)
    export_canonical(bare, tmp_path / "bare.safetensors")
    assert list(doconv.load(tmp_path / "bare.safetensors")) == ["self"]


def test_canonical_import_errors_name_the_layer(tmp_path):
    model = nn.Sequential(DOConv2d(4, 4, 3), DOConv2d(4, 4, 3))
    export_canonical(model, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=r"lacks \['1'\], model layers missing from the file \[\]"):
        import_canonical(nn.Sequential(DOConv2d(4, 4, 3)), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="layer '1'.*D_mul=12"):
        import_canonical(nn.Sequential(DOConv2d(4, 4, 3), DOConv2d(4, 4, 3, D_mul=12)), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=r"lacks \[\], model layers missing from the file \['2'\]"):
        import_canonical(nn.Sequential(DOConv2d(4, 4, 3), DOConv2d(4, 4, 3), DOConv2d(4, 4, 3)),
                         tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=r"no DO-Conv layer \(DOConv1d/2d/3d\)"):
        export_canonical(nn.Conv2d(2, 2, 3), tmp_path / "x.safetensors")


def test_canonical_explicit_same_padding_loads_into_same_layer(tmp_path):
    """A file written with padding=1 (as Gluon/Keras write 'same') loads into padding='same' and back."""
    case = get_case("g3-k3-s2-Dmul+3")
    source = DOConv2d(6, 9, 3, groups=3, padding=1, D_mul=12, dtype=torch.float64)
    target = DOConv2d(6, 9, 3, groups=3, padding="same", D_mul=12, dtype=torch.float64)
    params = case.params(2, "float64")
    set_params(source, params)
    export_canonical(source, tmp_path / "explicit.safetensors")
    import_canonical(target, tmp_path / "explicit.safetensors")
    x = torch.tensor(case.input(0))
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
    np.testing.assert_array_equal(get_params(target).D, params.D)
    with pytest.raises(ValueError, match="layer 'self'.*padding"):  # 'same' at stride 2 is not padding=1
        import_canonical(DOConv2d(6, 9, 3, groups=3, stride=2, padding="same", D_mul=12),
                         tmp_path / "explicit.safetensors")


# ---- official PyTorch checkpoints --------------------------------------------------------------------

def official_torch_kernel(arrays, config):
    """The official PyTorch layer's arithmetic, re-implemented from its description: D = D' + d_diag,
    W reshaped to (C_out/g, C_in, S), W'[o, i, m] = sum_s D[i, m, s] W[o, i, s], reshaped to OIHW."""
    D = arrays["D"] + arrays["d_diag"]
    W = arrays["W"].reshape(config.out_channels // config.groups, config.in_channels, config.S)
    return np.einsum("ims,ois->oim", D, W).reshape(config.kernel_shape)


def _official_arrays(config, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {"W": rng.normal(size=config.W_shape), "D": 0.3 * rng.normal(size=config.D_shape),
              "d_diag": doconv.identity_D(config)}
    if config.bias:
        arrays["bias"] = rng.normal(size=config.out_channels)
    return arrays


@pytest.mark.parametrize("case", [c for c in CASES if c.config.has_D], ids=str)
def test_official_import_gives_the_official_outputs(case, h):
    c = case.config
    arrays = _official_arrays(c)
    if case.rank != 2:  # the official code has DOConv2d only: a 1-D / 3-D layer says so and stays as it was
        layer = h.make_layer(case)
        before = copy.deepcopy(layer.state_dict())
        with pytest.raises(ValueError, match=rf"^layer 'self' is a DOConv{case.rank}d: official DO-Conv checkpoints "
                                             rf"hold 2-D layers only .* rank={case.rank} .*canonical file"):
            import_official(layer, {k: torch.as_tensor(v) for k, v in arrays.items()})
        for key, value in layer.state_dict().items():
            assert torch.equal(value, before[key]), key
        return
    x = case.input(0)
    expected = doconv.conv2d(x, official_torch_kernel(arrays, c), arrays.get("bias"), stride=c.stride,
                             padding=c.padding, dilation=c.dilation, groups=c.groups, padding_mode=c.padding_mode)
    layer = layer_from_config(c, dtype="float64")
    permutable = c.groups == 1 or c.out_per_group == 1
    if not permutable:
        with pytest.raises(ValueError, match="refold=True"):
            import_official(layer, arrays)
        if c.S < c.MN:  # refolding needs D_mul >= M*N
            with pytest.raises(ValueError, match="cannot hold an arbitrary kernel"):
                import_official(layer, arrays, refold=True)
            return
    import_official(layer, {k: torch.as_tensor(v) for k, v in arrays.items()}, refold=not permutable)
    doconv.assert_close(layer(torch.tensor(x)).detach().numpy(), expected, "float64", f"{case.id} official")
    if permutable and c.groups > 1:  # D really is permuted, not reset
        assert not np.allclose(get_params(layer).D, doconv.identity_D(c))


def test_official_import_errors():
    layer = DOConv2d(4, 4, 3)
    arrays = _official_arrays(layer.config)
    del arrays["W"]
    with pytest.raises(ValueError, match="missing 'W'"):
        import_official(layer, arrays)
    arrays = _official_arrays(layer.config)
    arrays["D"] = arrays["D"][:, :4]
    with pytest.raises(ValueError, match="'D' has shape"):
        import_official(layer, arrays)


def test_canonical_import_checks_every_layer_before_writing(tmp_path):
    model = nn.Sequential(DOConv2d(3, 4, 3), DOConv2d(4, 4, 3))
    export_canonical(model, tmp_path / "m.safetensors")
    target = nn.Sequential(DOConv2d(3, 4, 3), DOConv2d(4, 4, 3))
    target[1].switch_to_deploy()
    before = {key: value.clone() for key, value in target.state_dict().items()}
    with pytest.raises(ValueError, match="layer '1' is deployed"):
        import_canonical(target, tmp_path / "m.safetensors")
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_layer_from_config_names_an_unknown_dtype():
    from doconv.torch import layer_from_config
    with pytest.raises(TypeError, match="dtype must be a torch.dtype or its name, but got dtype='float46'"):
        layer_from_config(doconv.DOConvConfig(2, 2, 3), dtype="float46")


# ---- checkpoints that cannot load wrongly ------------------------------------------------------------

def _official_model_state(model, seed=0):
    """A whole model's checkpoint as the official code writes it: every DOConv2d as W, D (delta), d_diag."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, DOConv2d):
            arrays = _official_arrays(module.config, seed + len(state))
            state.update({f"{name}.{k}": torch.as_tensor(v, dtype=torch.float64) for k, v in arrays.items()})
    state.update({k: v for k, v in model.state_dict().items() if not k.split(".")[-1] in ("W", "D", "bias")
                  or k.startswith("1.")})  # the BatchNorm's own tensors
    return state


def _grouped_model():
    torch.manual_seed(0)
    model = nn.Sequential(DOConv2d(4, 6, 3, padding=1, groups=2, dtype=torch.float64),
                          nn.BatchNorm2d(6, dtype=torch.float64),
                          DOConv2d(6, 6, 3, padding=1, groups=3, bias=False, dtype=torch.float64)).eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2)
    return model


def _official_outputs(model, state, x):
    """The official model's output: each layer's official kernel (:func:`official_torch_kernel`), the BN."""
    out = torch.as_tensor(x)
    for name, module in model.named_children():
        if isinstance(module, DOConv2d):
            c = module.config
            arrays = {k[len(name) + 1:]: v.numpy() for k, v in state.items() if k.startswith(name + ".")}
            out = torch.as_tensor(doconv.conv2d(out.numpy(), official_torch_kernel(arrays, c), arrays.get("bias"),
                                                stride=c.stride, padding=c.padding, groups=c.groups))
        else:
            with torch.no_grad():
                out = module(out)
    return out.numpy()


@pytest.mark.parametrize("strict", [True, False])
def test_load_state_dict_refuses_a_plain_weight_beside_a_D(strict):
    """A file with a plain conv's 'weight' and a DO-Conv layer's 'D' but no 'W' is neither: read as a plain
    checkpoint it would set D' = 0 over the file's D. Refused, naming the keys; the layer keeps its state."""
    layer = DOConv2d(4, 6, 3, padding=1)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    mixed = {"weight": torch.randn(6, 4, 3, 3), "D": torch.randn(4, 9, 9), "bias": torch.randn(6)}
    with pytest.raises(RuntimeError, match=r"plain convolution's 'weight' beside a DO-Conv layer's 'D' but no 'W'"):
        layer.load_state_dict(mixed, strict=strict)
    for key, value in layer.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


@pytest.mark.parametrize("strict", [True, False])
def test_load_state_dict_refuses_an_official_checkpoint(strict):
    model = _grouped_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = _official_model_state(model)
    with pytest.raises(RuntimeError, match=r"'0\.d_diag'.*import_official\(model, state_dict\)"):
        model.load_state_dict(state, strict=strict)
    for key in ("0.W", "0.D", "2.W", "2.D"):
        torch.testing.assert_close(model.state_dict()[key], before[key], rtol=0, atol=0)
    renamed = {k.replace("d_diag", "D_diag"): v for k, v in state.items()}
    with pytest.raises(RuntimeError, match="'D_diag'.*import_official"):
        DOConv2d(4, 6, 3, padding=1, groups=2, dtype=torch.float64).load_state_dict(
            {k[2:]: v for k, v in renamed.items() if k.startswith("0.")}, strict=strict)


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.module."])
def test_import_official_takes_a_whole_models_state_dict(prefix):
    model = _grouped_model()
    state = _official_model_state(model)
    x = np.random.default_rng(1).normal(size=(2, 4, 7, 6))
    expected = _official_outputs(model, state, x)
    wrapped = {prefix + k: v for k, v in state.items()}
    with pytest.raises(ValueError, match="layer '0'.*refold=True"):  # grouped with 3 rows per group
        import_official(model, wrapped)
    assert import_official(model, wrapped, refold=True) == ["0", "2"]
    with torch.no_grad():
        doconv.assert_close(model(torch.as_tensor(x)).numpy(), expected, "float64", "official model")
    torch.testing.assert_close(model[1].running_var, state["1.running_var"], rtol=0, atol=0)


def test_import_official_names_a_layer_the_checkpoint_lacks():
    model = _grouped_model()
    state = {k: v for k, v in _official_model_state(model).items() if not k.startswith("2.")}
    with pytest.raises(ValueError, match="no tensors for layer '2'"):
        import_official(model, state, refold=True)


@pytest.mark.parametrize("D_mul", [None, 12])
def test_a_plain_convolution_checkpoint_loads_into_the_converted_model(D_mul):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 8, 3, stride=2, bias=False), nn.Conv2d(8, 8, 1)).eval()
    with torch.no_grad():
        plain[1].running_mean.normal_()
    twin, _ = doconv.torch.convert(copy.deepcopy(plain), D_mul=D_mul, d_init="random")  # D != identity
    before = get_params(twin[0])
    assert not np.allclose(before.D, doconv.identity_D(twin[0].config))
    for p in plain.parameters():
        torch.nn.init.normal_(p)  # the checkpoint differs from what convert copied
    twin.load_state_dict(plain.state_dict())
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), plain(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(get_params(twin[0]).D, doconv.identity_D(twin[0].config))


def test_a_plain_checkpoint_of_the_wrong_shape_or_rank_is_refused():
    layer = DOConv2d(4, 6, 3, padding=1)
    with pytest.raises(RuntimeError, match=r"size mismatch for weight: .*shape \(6, 4, 5, 5\).*\(6, 4, 3, 3\)"):
        layer.load_state_dict(nn.Conv2d(4, 6, 5).state_dict())
    low_rank = DOConv2d(4, 6, 3, D_mul=4, depthwise_separable=True)
    with pytest.raises(RuntimeError, match="D_mul=4 < M\\*N=9"):
        low_rank.load_state_dict(nn.Conv2d(4, 6, 3).state_dict())


def test_import_into_a_model_without_doconv_layers_says_convert_first(tmp_path):
    export_canonical(DOConv2d(4, 4, 3), tmp_path / "m.safetensors")
    plain = nn.Sequential(nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match=r"no DO-Conv layer .*convert it first \(doconv.torch.convert"):
        import_canonical(plain, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="convert it first"):
        import_official(plain, {"0.W": torch.zeros(4, 4, 9)})


def test_non_finite_weights_export_and_import_only_when_asked(tmp_path):
    layer = DOConv2d(4, 4, 3, dtype=torch.float64)
    set_params(layer, doconv.init_params(layer.config, d_init="random", rng=np.random.default_rng(1)))
    with torch.no_grad():
        layer.W[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite.*allow_nonfinite=True"):
        export_canonical(layer, tmp_path / "nan.safetensors")
    export_canonical(layer, tmp_path / "nan.safetensors", allow_nonfinite=True)
    target = DOConv2d(4, 4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="non-finite"):
        import_canonical(target, tmp_path / "nan.safetensors")
    assert import_canonical(target, tmp_path / "nan.safetensors", allow_nonfinite=True) == ["self"]
    assert torch.isnan(target.W[0, 0, 0]) and torch.equal(target.D, layer.D)


def test_import_canonical_not_strict_loads_the_layers_the_file_holds(tmp_path):
    source = nn.Sequential(DOConv2d(3, 5, 3, padding=1, dtype=torch.float64))
    set_params(source[0], get_case("k3").params(4))
    export_canonical(source, tmp_path / "one.safetensors")
    target = nn.Sequential(DOConv2d(3, 5, 3, padding=1, dtype=torch.float64), DOConv2d(5, 4, 3, dtype=torch.float64))
    kept = get_params(target[1])
    with pytest.raises(ValueError, match=r"model layers missing from the file \['1'\]"):
        import_canonical(target, tmp_path / "one.safetensors")
    assert import_canonical(target, tmp_path / "one.safetensors", strict=False) == ["0"]
    np.testing.assert_array_equal(get_params(target[0]).D, get_params(source[0]).D)
    np.testing.assert_array_equal(get_params(target[1]).W, kept.W)


@pytest.mark.parametrize("wrap", ["DataParallel", "compile"])
def test_import_official_and_canonical_see_through_wrappers(wrap, tmp_path):
    model = _grouped_model()
    wrapped = nn.DataParallel(model) if wrap == "DataParallel" else torch.compile(model)
    state = _official_model_state(model)
    x = np.random.default_rng(2).normal(size=(2, 4, 7, 6))
    expected = _official_outputs(model, state, x)
    assert import_official(wrapped, {"module." + k: v for k, v in state.items()}, refold=True) == ["0", "2"]
    with torch.no_grad():
        doconv.assert_close(model(torch.as_tensor(x)).numpy(), expected, "float64", "through the wrapper")
    export_canonical(wrapped, tmp_path / "w.safetensors")
    assert sorted(doconv.load(tmp_path / "w.safetensors")) == ["0", "2"]  # the model's own paths
    assert import_canonical(_grouped_model(), tmp_path / "w.safetensors") == ["0", "2"]


def test_import_official_takes_official_1x1_layers_into_the_kept_convs():
    torch.manual_seed(0)
    model, _ = doconv.torch.convert(nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, dtype=torch.float64),
                                                  nn.Conv2d(8, 6, 1, dtype=torch.float64)))
    c = model[0].config
    state = {f"0.{k}": torch.as_tensor(v) for k, v in _official_arrays(c, 3).items()}
    rng = np.random.default_rng(4)
    W1, b1 = rng.normal(size=(6, 8, 1)), rng.normal(size=6)  # the official 1x1 layer: W (C_out, C_in, 1), no D
    state.update({"1.W": torch.as_tensor(W1), "1.bias": torch.as_tensor(b1)})
    assert import_official(model, state) == ["0"]
    x = np.random.default_rng(5).normal(size=(2, 4, 5, 5))
    arrays = {k[2:]: v.numpy() for k, v in state.items() if k.startswith("0.")}
    hidden = doconv.conv2d(x, official_torch_kernel(arrays, c), arrays["bias"], padding=c.padding)
    expected = np.einsum("nchw,oc->nohw", hidden, W1[..., 0]) + b1[None, :, None, None]
    with torch.no_grad():
        doconv.assert_close(model(torch.as_tensor(x)).numpy(), expected, "float64", "official 1x1")


# ---- 1-D and 3-D layers: the same files and checkpoints as 2-D ---------------------------------------

@pytest.mark.parametrize("case_id", ["1d-g2-k3-d2", "1d-k3-causal-d2", "3d-g2-k3-s2", "3d-k3-reflect-asym"])
def test_canonical_round_trip_and_layer_from_config_in_1d_and_3d(case_id, tmp_path, h):
    case = get_case(case_id)
    model = nn.Sequential(nn.Identity(), h.make_layer(case, seed=2))
    path = tmp_path / "m.safetensors"
    export_canonical(model, path)
    stored = doconv.load(path)
    assert list(stored) == ["1"] and stored["1"][0] == case.config and stored["1"][0].rank == case.rank
    rebuilt = layer_from_config(stored["1"][0], dtype="float64", d_init="random")
    assert type(rebuilt) is h.LAYERS[case.rank]
    target = nn.Sequential(nn.Identity(), rebuilt)
    assert import_canonical(target, path) == ["1"]
    p, q = case.params(2), get_params(target[1])
    for name in ("W", "D", "bias"):
        np.testing.assert_array_equal(getattr(q, name), getattr(p, name))
    x = case.input(1)
    doconv.assert_close(target(torch.as_tensor(x)).detach().numpy(), doconv.forward(x, p, case.config), "float64")
    c = case.config  # the same channels and groups in another rank: not the file's layer
    wrong = nn.Sequential(nn.Identity(), h.LAYERS[4 - case.rank](c.in_channels, c.out_channels, 3, groups=c.groups))
    with pytest.raises(ValueError, match="layer '1'.*rank"):
        import_canonical(wrong, path)


@pytest.mark.parametrize("rank", [1, 3])
def test_a_plain_conv1d_or_conv3d_checkpoint_loads_as_convert_converts(rank, h):
    torch.manual_seed(0)
    plain = nn.Sequential(h.CONVS[rank](4, 6, 3, padding=1, groups=2), h.CONVS[rank](6, 8, 3, stride=2, bias=False))
    twin, _ = doconv.torch.convert(copy.deepcopy(plain), d_init="random")  # D != identity
    assert [type(m) for m in twin] == [h.LAYERS[rank]] * 2
    for p in plain.parameters():
        torch.nn.init.normal_(p)  # the checkpoint differs from what convert copied
    twin.load_state_dict(plain.state_dict())
    x = torch.randn(2, 4, *(7,) * rank)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), plain(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(get_params(twin[0]).D, doconv.identity_D(twin[0].config))
    shape = "(6, 4" + ", 3" * 2 + ")"
    with pytest.raises(RuntimeError, match=rf"size mismatch for weight: .*shape {re.escape(shape)}"):
        h.LAYERS[rank](4, 6, 3).load_state_dict(nn.Conv2d(4, 6, 3).state_dict())  # a 2-D kernel: refused

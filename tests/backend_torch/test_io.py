"""Canonical interchange round trips and the official PyTorch checkpoint import."""

from __future__ import annotations

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
    with pytest.raises(ValueError, match="no DOConv2d"):
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
def test_official_import_gives_the_official_outputs(case):
    c = case.config
    arrays = _official_arrays(c)
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

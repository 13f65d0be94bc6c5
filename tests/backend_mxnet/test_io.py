"""doconv.mxnet.io: the backend contract (get/set_params, layer_from_config), the canonical interchange file and
the official GluonCV DO-Conv parameters (one layer, or a whole net by block path), each checked against the core.

The official layer (yangyanli/DO-Conv, do_conv_gluoncv.py) keeps the conv's own ``weight`` (C_out, C_in/g, M, N)
as W with D_mul = M*N and trains a delta ``D`` (MN, MN, C_in). Its arithmetic, re-implemented here from that
description: move the weight to (M, N, C_in/g, C_out), read it as (MN, C_in, C_out/g), compose
``W'[m, i, o] = sum_s (D + I)[m, s, i] * W[s, i, o]``, read that back as (M, N, C_in/g, C_out) and return to OIHW.
"""

import numpy as np
import pytest

import doconv
from doconv.mxnet import (UNSUPPORTED_FEATURES, DOConv2D, convert, export_canonical, get_params, import_canonical,
                          import_official, layer_config, layer_from_config, set_params)
from doconv.mxnet._mx import gluon, mx

#: The official code is 2-D with D_mul = M*N only.
CASES = [c for c in doconv.cases.select(UNSUPPORTED_FEATURES) if c.rank == 2 and c.config.D_mul == c.config.MN]


def official_gluon_kernel(weight, D_delta, config):
    m, n = config.kernel_size
    mn = m * n
    w = weight.transpose(2, 3, 1, 0).reshape(mn, config.in_channels, -1)
    D = D_delta + np.eye(mn)[:, :, None]
    return np.einsum("msi,sio->mio", D, w).reshape(m, n, config.in_per_group, config.out_channels) \
        .transpose(3, 2, 0, 1)


@pytest.mark.parametrize("prefixed", [False, True], ids=["plain", "gluon-prefixed"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_official_gluon_parameters_give_the_official_outputs(case, prefixed):
    c = case.config
    rng = np.random.default_rng(21)
    arrays = {"weight": rng.normal(size=c.kernel_shape)}
    if c.has_D:
        arrays["D"] = rng.normal(0, 0.3, size=(c.MN, c.MN, c.in_channels))
    if c.bias:
        arrays["bias"] = rng.normal(size=c.out_channels)
    layer = layer_from_config(c, dtype="float64")
    assert import_official(layer, {("doconv2d0_" + k if prefixed else k): v for k, v in arrays.items()}) == \
        [doconv.ROOT_NAME]
    kernel = official_gluon_kernel(arrays["weight"], arrays["D"], c) if c.has_D else arrays["weight"]
    x = case.input(21, np.float64)
    want = doconv.conv2d(x, kernel, arrays.get("bias"), stride=c.stride, padding=c.padding, dilation=c.dilation,
                         groups=c.groups)
    got = layer(mx.nd.array(x, dtype="float64")).asnumpy()
    doconv.assert_close(got, want, "float64", f"{case.id} official import")


def test_official_import_errors_name_the_problem():
    c = doconv.DOConvConfig(4, 6, 3, padding=1)
    layer = layer_from_config(c)
    with pytest.raises(ValueError, match="missing 'D'"):
        import_official(layer, {"weight": np.zeros(c.kernel_shape), "bias": np.zeros(6)})
    with pytest.raises(ValueError, match=r"'D' has shape \(9, 9, 3\), expected \(9, 9, 4\)"):
        import_official(layer, {"weight": np.zeros(c.kernel_shape), "D": np.zeros((9, 9, 3)), "bias": np.zeros(6)})
    wide = layer_from_config(doconv.DOConvConfig(4, 6, 3, padding=1, D_mul=12))
    with pytest.raises(ValueError, match="only D_mul = M\\*N"):
        import_official(wide, {"weight": np.zeros(c.kernel_shape)})


def _official_net_arrays(rng):
    """A whole official net's parameters as save_parameters names them: two official DO-Conv layers around a
    BatchNorm, under block paths."""
    convs = {"0": doconv.DOConvConfig(3, 6, 3, padding=1), "2.conv": doconv.DOConvConfig(6, 4, 3, groups=2)}
    arrays = {}
    for path, c in convs.items():
        arrays[f"{path}.weight"] = rng.normal(size=c.kernel_shape)
        arrays[f"{path}.D"] = rng.normal(0, 0.3, size=(c.MN, c.MN, c.in_channels))
        arrays[f"{path}.bias"] = rng.normal(size=c.out_channels)
    for key in ("gamma", "beta", "running_mean"):
        arrays[f"1.{key}"] = rng.normal(size=6)
    arrays["1.running_var"] = rng.uniform(0.5, 2, size=6)
    return convs, arrays


class _Wrapped(gluon.HybridBlock):
    def __init__(self, conv):
        super().__init__()
        with self.name_scope():
            self.conv = conv

    def hybrid_forward(self, F, x):
        return self.conv(x)


def _converted_net():
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(6, 3, padding=1, in_channels=3), gluon.nn.BatchNorm(in_channels=6),
            _Wrapped(gluon.nn.Conv2D(4, 3, groups=2, in_channels=6)))
    net.initialize()
    return convert(net)[0]


def test_a_whole_official_net_imports_by_block_path():
    rng = np.random.default_rng(4)
    convs, arrays = _official_net_arrays(rng)
    net = _converted_net()
    names = import_official(net, {k: mx.nd.array(v) for k, v in arrays.items()})
    assert names == ["0", "2.conv"]
    x = rng.normal(size=(2, 3, 7, 7))
    want = x
    for path in ("0", "1", "2.conv"):
        if path == "1":
            a = {k: arrays[f"1.{k}"][None, :, None, None] for k in ("gamma", "beta", "running_mean", "running_var")}
            want = (want - a["running_mean"]) / np.sqrt(a["running_var"] + 1e-5) * a["gamma"] + a["beta"]
            continue
        c = convs[path]
        kernel = official_gluon_kernel(arrays[f"{path}.weight"], arrays[f"{path}.D"], c)
        want = doconv.conv2d(want, kernel, arrays[f"{path}.bias"], stride=c.stride, padding=c.padding, groups=c.groups)
    got = net(mx.nd.array(x)).asnumpy()  # inference: BatchNorm uses the running statistics
    doconv.assert_close(got, want, "float32", "a whole official net")


@pytest.mark.parametrize("flaw, match", [
    ("extra", r"keys that name no parameter \['3.weight'\], parameters without a key \[\]"),
    ("missing-bn", r"keys that name no parameter \[\], parameters without a key \['1.beta'\]"),
    ("missing-layer", r"arrays has no entry for layer '2.conv' \(no key starts with '2.conv.'\)"),
    ("bad-shape", r"arrays\['1.gamma'\] has shape \(5,\), but the parameter .*gamma' has shape \(6,\)"),
    ("bad-D", r"layer '0': .*'D' has shape \(9, 9, 2\), expected \(9, 9, 3\)"),
])
def test_a_whole_official_net_that_does_not_match_changes_nothing(flaw, match):
    _, arrays = _official_net_arrays(np.random.default_rng(5))
    if flaw == "extra":
        arrays["3.weight"] = np.zeros(3)
    elif flaw == "missing-bn":
        del arrays["1.beta"]
    elif flaw == "missing-layer":
        arrays = {k: v for k, v in arrays.items() if not k.startswith("2.conv.")}
    elif flaw == "bad-shape":
        arrays["1.gamma"] = np.zeros(5)
    else:
        arrays["0.D"] = np.zeros((9, 9, 2))
    net = _converted_net()
    before = {k: p.data().asnumpy() for k, p in net.collect_params().items()}
    with pytest.raises(ValueError, match=match):
        import_official(net, arrays)
    for k, p in net.collect_params().items():
        np.testing.assert_array_equal(p.data().asnumpy(), before[k], err_msg=k)


@pytest.mark.parametrize("rank", [1, 3])
def test_import_official_refuses_1d_and_3d_layers_naming_them(rank):
    """Official checkpoints hold 2-D layers only: a 1-D or 3-D layer, bare or in a net, is a clear error."""
    config = doconv.DOConvConfig(4, 6, 3, padding=1, rank=rank)
    layer = layer_from_config(config)
    arrays = {"weight": np.zeros(config.kernel_shape), "D": np.zeros((config.MN, config.MN, 4)), "bias": np.zeros(6)}
    before = get_params(layer)
    name = f"DOConv{rank}D"
    with pytest.raises(ValueError, match=rf"^layer '{doconv.ROOT_NAME}' is a {name}: official DO-Conv checkpoints "
                                         rf"hold 2-D layers only .* rank={rank} .*canonical file"):
        import_official(layer, arrays)
    np.testing.assert_array_equal(get_params(layer).W, before.W)
    deferred = getattr(doconv.mxnet, name)(6, 3, padding=1)  # in_channels=0: refused for its rank before its C_in
    with pytest.raises(ValueError, match=rf"^layer '{doconv.ROOT_NAME}' is a {name}: official .* rank={rank} "):
        import_official(deferred, arrays)
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Conv2D(4, 3, in_channels=4), getattr(gluon.nn, f"Conv{rank}D")(6, 3, in_channels=4))
    net.initialize()
    net, _ = convert(net)
    with pytest.raises(ValueError, match=rf"^layer '1' is a {name}: official DO-Conv checkpoints hold 2-D layers only "
                                         rf".* rank={rank} "):
        import_official(net, {})


def test_import_official_refuses_what_is_no_mapping():
    with pytest.raises(TypeError, match="arrays must be a mapping of names to arrays, but got list"):
        import_official(_converted_net(), [np.zeros(3)])


# ---- the contract and the canonical file ----------------------------------------------------------------

def test_canonical_params_round_trip_and_identity_init(h):
    case = doconv.cases.case("g3-k3-s2-Dmul+3")
    layer, params = h.build(case, "float64", seed=4)
    back = get_params(layer)
    for name in ("W", "D", "bias"):
        np.testing.assert_array_equal(getattr(back, name), getattr(params, name))
    assert layer_config(layer) == doconv.DOConvConfig(**{**case.kwargs, "padding": ((1, 1), (1, 1))})
    fresh = layer_from_config(case.config, dtype="float64")
    assert np.all(fresh.D.data().asnumpy() == 0)  # the stored delta D' is zero at identity init
    np.testing.assert_array_equal(get_params(fresh).D, doconv.identity_D(case.config))


def test_set_params_names_layer_array_and_shapes():
    layer = layer_from_config(doconv.DOConvConfig(4, 6, 3, padding=1))
    bad = doconv.DOConvParams(np.zeros((6, 4, 9)), np.zeros((4, 9, 8)), np.zeros(6))
    with pytest.raises(ValueError, match=r"layer .*: D has shape \(4, 9, 8\) .* needs \(4, 9, 9\)"):
        set_params(layer, bad)


def test_layer_from_config_refuses_what_gluon_cannot_pad():
    for kwargs, match in ((dict(padding=((0, 1), (1, 1))), "symmetrically"),
                          (dict(padding=1, padding_mode="reflect"), "zeros only"),
                          (dict(padding="same", stride=2), "depends on the input size"),
                          (dict(kernel_size=2, padding="same"), "symmetrically"),
                          (dict(padding="causal", dilation=2, rank=1), r"symmetrically, .* needs per-side pads "
                                                                       r"\(\(4, 0\),\)"),
                          (dict(padding=((1, 1), (0, 0), (2, 1)), rank=3), "symmetrically"),
                          (dict(padding="same", stride=(1, 2, 1), rank=3), "depends on the input size")):
        with pytest.raises(ValueError, match=match):
            layer_from_config(doconv.DOConvConfig(**{"in_channels": 2, "out_channels": 2, "kernel_size": 3, **kwargs}))


@pytest.mark.parametrize("case_id", ["1d-k3-d4-same", "k3-same", "3d-k2-valid-2MN", "3d-k3-same-nobias"])
def test_layer_from_config_picks_the_layer_of_the_configs_rank(case_id, h):
    """``layer_from_config`` builds DOConv1D / 2D / 3D by ``config.rank``, 'same' / 'valid' as symmetric ints; its
    config and parameters come back as they went in, and it computes the core's output."""
    case = doconv.cases.case(case_id)
    layer, params = h.build(case, "float64", seed=2)
    assert type(layer).__name__ == f"DOConv{case.rank}D" and layer.rank == case.rank
    assert layer_config(layer) == case.config.resolved()
    assert len(layer.padding) == case.rank and all(isinstance(p, int) for p in layer.padding)
    back = get_params(layer)
    for name in ("W", "D", "bias"):
        np.testing.assert_array_equal(getattr(back, name), getattr(params, name))
    x = case.input(2, np.float64)
    doconv.assert_close(layer(mx.nd.array(x, dtype="float64")).asnumpy(), doconv.forward(x, params, case.config),
                        "float64", case_id)


@pytest.mark.parametrize("rank", [1, 3])
def test_canonical_export_import_of_1d_and_3d_nets(tmp_path, rank, h):
    """A converted Conv1D / Conv3D net writes the core's interchange file with its rank in each layer's config;
    another converted net loads it exactly; a net of another rank refuses it."""
    def converted():
        net = gluon.nn.HybridSequential()
        conv = getattr(gluon.nn, f"Conv{rank}D")
        net.add(conv(4, 3, padding=1, in_channels=3, groups=1), conv(6, 3, strides=2, groups=2, in_channels=4))
        net.initialize(mx.init.Xavier())
        return convert(net)[0]
    twin = converted()
    h.randomise_D(twin, 2)
    path = tmp_path / f"net{rank}d.safetensors"
    export_canonical(twin, path)
    stored = doconv.load(path)
    assert sorted(stored) == ["0", "1"] and {config.rank for config, _ in stored.values()} == {rank}
    np.testing.assert_array_equal(stored["1"][1].D, get_params(twin[1]).D)
    other = converted()
    assert import_canonical(other, path) == ["0", "1"]
    x = mx.nd.array(np.random.default_rng(1).normal(size=(2, 3) + (7,) * rank))
    np.testing.assert_array_equal(other(x).asnumpy(), twin(x).asnumpy())
    doconv.assert_close(other(x).asnumpy(), h.core_chain(other, x.asnumpy()), "float32", "imported")
    flat = gluon.nn.HybridSequential()
    flat.add(gluon.nn.Conv2D(4, 3, padding=1, in_channels=3), gluon.nn.Conv2D(6, 3, strides=2, groups=2, in_channels=4))
    flat.initialize()
    flat, _ = convert(flat)
    with pytest.raises(ValueError, match="the model's layer is"):
        import_canonical(flat, path)


@pytest.mark.parametrize("padding, dilation", [("same", (1, 1)), ("same", (2, 1)), ("valid", (1, 1))])
def test_import_canonical_accepts_string_padding_resolved_to_gluon_pads(tmp_path, padding, dilation):
    """A torch/keras file may record padding='same'/'valid': it is the Gluon layer with the equal explicit pads."""
    written = doconv.DOConvConfig(6, 4, 3, padding=padding, dilation=dilation, bias=True)
    params = doconv.init_params(written, rng=np.random.default_rng(3))
    params.D = params.D + np.random.default_rng(4).normal(0, 0.2, size=params.D.shape)
    path = tmp_path / "keras.safetensors"
    doconv.save(path, {doconv.ROOT_NAME: (written, params)})  # a bare layer, as torch and keras write it
    layer = DOConv2D(4, 3, padding=(0, 0) if padding == "valid" else dilation, dilation=dilation, in_channels=6)
    layer.initialize()
    import_canonical(layer, path)
    x = np.random.default_rng(5).normal(size=(2, 6, 9, 8)).astype("float32")
    got = layer(mx.nd.array(x)).asnumpy()
    doconv.assert_close(got, doconv.forward(x, params, written), "float32")

    shifted = DOConv2D(4, 3, padding=(1, 0), dilation=dilation, in_channels=6)
    shifted.initialize()
    with pytest.raises(ValueError, match="the model's layer is"):
        import_canonical(shifted, path)


def test_a_bare_layer_is_named_root_in_canonical_files(tmp_path):
    """A bare layer's Gluon name comes from a global counter; files name it doconv.ROOT_NAME, as PyTorch does."""
    a = DOConv2D(4, 3, in_channels=3)
    a.initialize()
    a.D.set_data(mx.nd.array(np.random.default_rng(0).normal(0, 0.3, size=a.D.shape)))
    export_canonical(a, tmp_path / "bare.safetensors")
    assert list(doconv.load(tmp_path / "bare.safetensors")) == [doconv.ROOT_NAME]
    b = DOConv2D(4, 3, in_channels=3)  # another name (doconv2dN+1) in the same process
    b.initialize()
    import_canonical(b, tmp_path / "bare.safetensors")
    x = mx.nd.array(np.random.default_rng(1).normal(size=(1, 3, 6, 6)))
    np.testing.assert_array_equal(b(x).asnumpy(), a(x).asnumpy())


def test_import_canonical_into_a_model_without_doconv_layers_says_convert_first(tmp_path, h):
    """The plain model a file was exported from a converted twin of: refused (naming convert) and left as it was;
    converted, it loads the file's W' exactly."""
    def plain():
        net = gluon.nn.HybridSequential()
        net.add(gluon.nn.Conv2D(4, 3, padding=1, in_channels=3), gluon.nn.Conv2D(5, 3, in_channels=4))
        net.initialize(mx.init.Xavier())
        return net
    twin, _ = convert(plain())
    h.randomise_D(twin, 0)
    export_canonical(twin, tmp_path / "twin.safetensors")
    net = plain()
    before = [p.data().asnumpy() for p in net.collect_params().values()]
    with pytest.raises(ValueError, match=r"model has no DO-Conv layer .*HybridSequential.*: convert it first "
                                         r"\(doconv.mxnet.convert\(model\)\)"):
        import_canonical(net, tmp_path / "twin.safetensors")
    for p, b in zip(net.collect_params().values(), before):
        np.testing.assert_array_equal(p.data().asnumpy(), b)
    with pytest.raises(ValueError, match="convert it first"):
        import_canonical(gluon.nn.Conv2D(4, 3, in_channels=3), tmp_path / "twin.safetensors")
    net, _ = convert(net)
    assert import_canonical(net, tmp_path / "twin.safetensors") == ["0", "1"]
    x = mx.nd.array(np.random.default_rng(1).normal(size=(1, 3, 6, 6)))
    np.testing.assert_array_equal(net(x).asnumpy(), twin(x).asnumpy())
    doconv.assert_close(net(x).asnumpy(), h.core_chain(net, x.asnumpy()), "float32", "converted, then imported")


def test_exporting_an_unconverted_net_says_convert_first(tmp_path, h):
    net = h.small_net()
    with pytest.raises(ValueError, match=r"model has no DO-Conv layer to export \(HybridSequential holds none\): "
                                         r"convert it first \(doconv.mxnet.convert\(model\)\)"):
        export_canonical(net, tmp_path / "empty.safetensors")
    assert not (tmp_path / "empty.safetensors").exists()
    with pytest.raises(ValueError, match="convert it first"):
        import_official(net, {})


def test_import_canonical_strict_and_nonfinite(tmp_path, h):
    net, _ = convert(h.small_net())
    h.randomise_D(net, 4)
    path = tmp_path / "net.safetensors"
    export_canonical(net, path)
    bigger = gluon.nn.HybridSequential()
    bigger.add(*[b for b in h.small_net()][:6], gluon.nn.Conv2D(4, 3, padding=1, in_channels=4))
    bigger, _ = convert(bigger)
    with pytest.raises(ValueError, match=r"model layers missing from the file \['6'\]"):
        import_canonical(bigger, path)
    assert import_canonical(bigger, path, strict=False) == ["0", "1"]
    for name in ("0", "1"):
        doconv.assert_close(bigger[int(name)].weight.data().asnumpy(), net[int(name)].weight.data().asnumpy(),
                            "float32", name)
    with pytest.raises(TypeError, match="strict must be True or False, but got strict='no'"):
        import_canonical(bigger, path, strict="no")

    net[0].W.data()[:] = np.nan
    with pytest.raises(ValueError, match="(?i)nan"):
        export_canonical(net, tmp_path / "nan.safetensors")
    export_canonical(net, tmp_path / "nan.safetensors", allow_nonfinite=True)
    other, _ = convert(h.small_net())
    with pytest.raises(ValueError, match="(?i)nan"):
        import_canonical(other, tmp_path / "nan.safetensors")
    assert not np.isnan(other[0].W.data().asnumpy()).any()  # nothing written
    assert import_canonical(other, tmp_path / "nan.safetensors", allow_nonfinite=True) == ["0", "1"]
    assert np.isnan(other[0].W.data().asnumpy()).all()

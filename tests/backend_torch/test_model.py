"""convert / fold on ResNet-18- and MobileNet-v2-shaped models, ONNX and torch.export of the folded model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import doconv
from doconv.torch import DOConv1d, DOConv2d, DOConv3d, convert, fold, get_params


def _perturb(model, seed=1):
    """Move every DO-Conv layer (any rank) away from identity init (D' and W), as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in doconv.torch.doconv_layers(model).values():
            if m.D is not None:
                m.D.add_(0.2 * torch.randn(m.D.shape, generator=g, dtype=m.D.dtype))
            m.W.add_(0.05 * torch.randn(m.W.shape, generator=g, dtype=m.W.dtype))
    return model


def _count(model):
    return sum(p.numel() for p in model.parameters())


def _convert_then_fold(model, x, *, convert_atol, fold_tol):
    """convert (the outputs kept within ``convert_atol``), move every D and W off identity init, fold (the outputs
    of the moved twin kept within ``fold_tol``); returns (converted, its report, folded, its report)."""
    with torch.no_grad():
        before = model(x)
    converted, report = convert(model)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), before, rtol=0, atol=convert_atol)
    _perturb(converted)
    with torch.no_grad():
        trained = converted(x)
    folded, rows = fold(converted)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), trained, rtol=fold_tol, atol=fold_tol)
    return converted, report, folded, rows


def test_convert_keeps_outputs_and_fold_restores_the_model(zoo_model):
    x = torch.randn(2, 3, 32, 32)
    converted, report, folded, _ = _convert_then_fold(zoo_model, x, convert_atol=1e-6, fold_tol=1e-5)
    spatial = [n for n, m in zoo_model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    assert [r.path for r in report if r.action == "converted"] == spatial
    assert all(r.reason.startswith("pointwise") for r in report if r.action == "kept")
    assert isinstance(zoo_model.get_submodule(spatial[0]), nn.Conv2d)  # not in place by default
    assert "| path | kind | action |" in str(report) and f"{len(spatial)} converted, " in str(report)
    assert not any(isinstance(m, DOConv2d) for m in folded.modules())
    assert _count(folded) == _count(zoo_model)
    assert any(isinstance(m, DOConv2d) for m in converted.modules())  # fold copied too


def test_convert_trains_D(zoo_model):
    converted, _ = convert(zoo_model.train())
    loss = converted(torch.randn(2, 3, 32, 32)).square().mean()
    loss.backward()
    layers = [m for m in converted.modules() if isinstance(m, DOConv2d)]
    assert all(m.D.grad is not None and m.D.grad.abs().sum() > 0 for m in layers)


def test_include_exclude_inplace_and_D_mul():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 5)))
    out, report = convert(model, include="1.*", exclude=["1.1"], D_mul=12, inplace=True)
    assert out is model
    assert isinstance(model[0], nn.Conv2d) and isinstance(model[1][1], nn.Conv2d)
    assert isinstance(model[1][0], DOConv2d) and model[1][0].D_mul == 12
    assert [(r.path, r.action, r.reason) for r in report if r.action != "converted"] == \
        [("0", "kept", "not included"), ("1.1", "kept", "excluded")]
    assert [r.path for r in report if r.action == "converted"] == ["1.0"]
    _, report = convert(model, include=lambda name, m: m.kernel_size == (5, 5))
    assert [r.path for r in report if r.action == "converted"] == ["1.1"]
    with pytest.raises(ValueError, match="D_mul must be >= M\\*N = 25"):
        convert(model, D_mul=12)
    with pytest.raises(TypeError, match="include"):
        convert(model, include=[3])
    with pytest.raises(TypeError, match="model"):
        convert("resnet")
    for function in (convert, fold):  # a truthy string would silently change the model in place
        with pytest.raises(TypeError, match="inplace must be True or False, but got inplace='no'"):
            function(model, inplace="no")
    assert isinstance(model[1][0], DOConv2d) and isinstance(model[1][1], nn.Conv2d)


def test_convert_skips_conv_subclasses_and_keeps_padding_forms():
    class Custom(nn.Conv2d):
        pass

    model = nn.Sequential(Custom(3, 3, 3), nn.Conv2d(3, 3, 4, padding="same", padding_mode="reflect"),
                          nn.Conv2d(3, 3, 3, padding="valid", dtype=torch.float64).float())
    converted, report = convert(model)
    assert [r.action for r in report] == ["skipped", "converted", "converted"]
    x = torch.randn(1, 3, 9, 10)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=0, atol=1e-6)


def test_random_d_init_changes_outputs_but_keeps_W():
    conv = nn.Conv2d(3, 4, 3)
    converted, _ = convert(nn.Sequential(conv), d_init="random")
    layer = converted[0]
    torch.testing.assert_close(layer.W.reshape(4, 3, 3, 3), conv.weight)
    assert layer.D.abs().sum() > 0


def test_fold_returns_a_report_and_keeps_per_side_padding():
    model = nn.Sequential(DOConv2d(3, 4, 3, padding=((0, 2), (1, 0)), padding_mode="reflect"),
                          DOConv2d(4, 4, 3, stride=2, padding="same"))
    _perturb(model)
    folded, report = fold(model)
    assert [r.action for r in report] == ["folded", "folded"] and "2 folded;" in str(report)
    x = torch.randn(1, 3, 9, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-6)


def _shared_twice(conv):
    return nn.Sequential(conv, nn.ReLU(), conv, nn.ReLU(), nn.Conv2d(conv.out_channels, 2, 1))


def _core_shared_twice(model, x):
    """The core's float64 forward of ``_shared_twice``: the same DO-Conv parameters at both uses."""
    p, cfg = get_params(model[0]), model[0].config
    h = np.maximum(doconv.forward(x.numpy(), p, cfg), 0)
    h = np.maximum(doconv.forward(h, p, cfg), 0)
    head = model[4]
    return np.einsum("nchw,oc->nohw", h, head.weight.detach().numpy()[:, :, 0, 0]) + \
        head.bias.detach().numpy()[None, :, None, None]


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_convert_and_fold_keep_a_shared_conv_shared(inplace):
    """A conv used at two paths (weight tying) becomes one DOConv2d at both, then one folded conv."""
    torch.manual_seed(0)
    model = _shared_twice(nn.Conv2d(3, 3, 3, padding=1, dtype=torch.float64)).double()
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
    converted, report = convert(model, inplace=inplace)
    assert (converted is model) == inplace
    assert isinstance(converted[0], DOConv2d) and converted[2] is converted[0]
    if not inplace:
        assert type(model[0]) is nn.Conv2d and model[2] is model[0]
    assert [(r.path, r.action, r.shared_with) for r in report] == \
        [("0", "converted", ""), ("2", "converted", "0"), ("4", "kept", "")]
    assert "same module as '0'" in report[1].reason
    layer_size = sum(p.numel() for p in converted[0].parameters())
    assert f"1 converted, 1 kept; parameters of the changed layers 84 -> {layer_size}; 1 more path(s)" in str(report)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), before, rtol=0, atol=1e-12)
    _perturb(converted, seed=5)  # D randomised, once: the two paths hold one layer
    expected = _core_shared_twice(converted, x)
    with torch.no_grad():
        np.testing.assert_allclose(converted(x).numpy(), expected, rtol=1e-10, atol=1e-10)
    folded, rows = fold(converted, inplace=inplace)
    assert type(folded[0]) is nn.Conv2d and folded[2] is folded[0]
    assert [(r.path, r.action, r.shared_with) for r in rows] == [("0", "folded", ""), ("2", "folded", "0")]
    assert "1 folded; parameters" in str(rows) and "1 more path(s)" in str(rows)
    with torch.no_grad():
        np.testing.assert_allclose(folded(x).numpy(), expected, rtol=1e-10, atol=1e-10)


def test_fold_keeps_a_shared_DOConv2d_shared():
    model = nn.Sequential(DOConv2d(3, 3, 3, padding=1), nn.ReLU())
    model.append(model[0])
    _perturb(model, seed=6)
    x = torch.randn(1, 3, 6, 6)
    folded, _ = fold(model)
    assert type(folded[0]) is nn.Conv2d and folded[2] is folded[0]
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-6)


def test_shared_conv_selected_at_one_path_only_is_refused():
    model = _shared_twice(nn.Conv2d(3, 3, 3, padding=1))
    for kwargs in ({"exclude": "2"}, {"include": ["0", "4"]}, {"include": lambda name, m: name == "2"}):
        with pytest.raises(ValueError, match=r"layer at '0' is also used at '2' \(one shared layer\)"):
            convert(model, inplace=True, **kwargs)
    assert type(model[0]) is nn.Conv2d and model[2] is model[0]
    _, report = convert(model, exclude=["0", "2"])
    assert [(r.path, r.reason) for r in report] == [("0", "excluded"), ("2", "excluded; same module as '0' (shared)"),
                                                   ("4", "pointwise: DO-Conv has no D")]


def test_layer_errors_name_the_path_and_leave_the_model_unchanged():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Sequential(nn.Conv2d(8, 8, 5)))
    with pytest.raises(ValueError, match=r"^layer '1\.0': D_mul must be >= M\*N = 25 for kernel_size=\(5, 5\), "
                                         r"but got D_mul=9"):
        convert(model, D_mul=9, inplace=True)
    assert all(type(m) is nn.Conv2d for m in (model[0], model[1][0]))  # nothing converted before the error


def test_include_exclude_are_checked_up_front():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 5)))
    for argument, value in (("include", 3), ("exclude", 2.5), ("include", [b"0"]), ("exclude", [None])):
        with pytest.raises(TypeError, match=rf"{argument} must be None, a glob pattern.*but got {argument}="
                                            rf"{value!r}".replace("[", r"\[").replace("]", r"\]")):
            convert(model, **{argument: value})
    # an iterator is read once, not used up by the first module
    _, report = convert(model, include=iter(["0", "1.1"]))
    assert [r.path for r in report if r.action == "converted"] == ["0", "1.1"]
    # a pattern that matches no module path is a typo: refused, the model left alone
    with pytest.raises(ValueError, match=r"^exclude pattern\(s\) \['1\.l'\] match no module path.*'1\.0'"):
        convert(model, exclude=["1.1", "1.l"], inplace=True)
    with pytest.raises(ValueError, match=r"include pattern\(s\) \['layr1\.\*'\] match no.*"
                                         r"exclude pattern\(s\) \['x'\] match no"):
        convert(model, include="layr1.*", exclude="x", inplace=True)
    assert all(type(m) is nn.Conv2d for m in (model[0], model[1][0], model[1][1]))
    _, report = convert(model, include="1", exclude="*")  # '1' is the nn.Sequential: matches a path
    assert [r.action for r in report] == ["kept"] * 3


@pytest.mark.parametrize("model", [nn.Linear(2, 2), nn.Sequential(nn.Conv2d(2, 2, 1))], ids=["no-conv", "1x1"])
@pytest.mark.parametrize("option, value, error", [
    ("composition", "bogus", ValueError), ("d_init", "x", ValueError), ("W_storage", "y", ValueError),
    ("D_mul", "z", TypeError), ("D_mul", True, TypeError), ("D_mul", 2.0, TypeError), ("D_mul", 0, ValueError)])
def test_options_are_checked_even_without_a_conv_to_convert(model, option, value, error):
    with pytest.raises(error, match=rf"^{option} must be .*but got {option}={value!r}$"):
        convert(model, **{option: value})
    assert convert(model, D_mul=12, d_init="random", composition="feature", W_storage="contiguous")[1] is not None


def _folded_example(rank=2):
    """Three layers of ``rank``: 'same' / per-side pads (and 'causal' in 1-D, stride-2 'same' in 3-D), padding modes,
    groups, which fold into nn.ConvNd and FoldedConvNd alike."""
    torch.manual_seed(0)
    if rank == 1:
        model = nn.Sequential(DOConv1d(3, 8, 3, padding="causal", dilation=2), nn.ReLU(),
                              DOConv1d(8, 8, 3, groups=4, padding="same"), nn.ReLU(),
                              DOConv1d(8, 4, 5, stride=2, padding=((1, 2),), padding_mode="reflect"))
        x = torch.randn(2, 3, 17)
    elif rank == 2:
        model = nn.Sequential(DOConv2d(3, 8, 3, padding=1), nn.ReLU(), DOConv2d(8, 8, 3, groups=4, padding="same"),
                              nn.ReLU(), DOConv2d(8, 4, 3, padding=((1, 0), (0, 1)), padding_mode="reflect"))
        x = torch.randn(2, 3, 10, 11)
    else:
        model = nn.Sequential(DOConv3d(3, 8, 3, padding=1), nn.ReLU(),
                              DOConv3d(8, 8, 3, groups=4, stride=2, padding="same"), nn.ReLU(),
                              DOConv3d(8, 4, (1, 3, 3), padding=((0, 0), (1, 0), (0, 1)), padding_mode="replicate"))
        x = torch.randn(2, 3, 5, 9, 8)
    _perturb(model)
    return model.eval(), x


@pytest.mark.parametrize("folded", [True, False], ids=["folded", "unfolded"])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_model_exports_to_onnx_and_runs_in_onnxruntime(tmp_path, folded, rank):
    ort = pytest.importorskip("onnxruntime")
    model, x = _folded_example(rank)
    with torch.no_grad():
        expected = model(x).numpy()
    path = tmp_path / "model.onnx"
    torch.onnx.export(fold(model)[0] if folded else model, (x,), str(path), input_names=["x"], output_names=["y"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x.numpy()})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_torch_export_of_folded_and_unfolded_models(rank):
    model, x = _folded_example(rank)
    with torch.no_grad():
        expected = model(x)
    for candidate in (fold(model)[0], model):
        program = torch.export.export(candidate, (x,))
        torch.testing.assert_close(program.module()(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning")
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_jit_trace_records_the_composition_and_saves(tmp_path, mode):
    """A trace is a graph of W and D (no cached constant, no Python call), survives save/load, and
    follows later updates of W, D in place, as a traced nn.Conv2d follows its weight."""
    model, x = _folded_example()
    model = model.train(mode == "train")
    with doconv.torch.cached(model):
        with torch.no_grad():
            model(x)  # a scope's kernel filled before tracing must not become a constant of the trace
        traced = torch.jit.trace(model, x)
    path = tmp_path / "traced.pt"
    torch.jit.save(traced, str(path))
    x2 = torch.randn(3, 3, 10, 11)
    torch.testing.assert_close(torch.jit.load(str(path))(x2), model(x2), rtol=1e-5, atol=1e-5)
    _perturb(model, seed=2)
    torch.testing.assert_close(traced(x2), model(x2), rtol=1e-5, atol=1e-5)


def test_jit_script_says_to_fold_first():
    model, _ = _folded_example()
    with pytest.raises(NotImplementedError, match=r"fold the model first"):
        torch.jit.script(model)
    with pytest.raises(NotImplementedError, match=r"FoldedConv2d \(padding=\(\(1, 0\), \(0, 1\)\)"):
        torch.jit.script(fold(model)[0])
    scripted = torch.jit.script(fold(model[:3])[0])  # plain nn.Conv2d's script as usual
    x = torch.randn(2, 3, 10, 11)
    torch.testing.assert_close(scripted(x), model[:3](x), rtol=1e-5, atol=1e-5)


def test_convert_keeps_a_parameter_shared_by_two_convs_tied():
    """Two modules holding one weight Parameter (weight tying across strides): one W and one D after convert."""
    torch.manual_seed(0)
    a, b = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, stride=2, padding=1)
    b.weight = a.weight
    model = nn.Sequential(a, nn.ReLU(), b)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
    converted, report = convert(model)
    first, second = converted[0], converted[2]
    assert second.W is first.W and second.D is first.D and second.bias is not first.bias
    assert "W/D tied to '0'" in report[1].reason
    torch.testing.assert_close(converted(x), before, rtol=0, atol=1e-6)
    converted(x).square().sum().backward()  # both uses add to one gradient
    torch.optim.SGD(converted.parameters(), lr=0.1).step()
    assert second.W is first.W
    a, b = nn.Conv2d(2, 6, 3, padding=1), nn.Conv2d(6, 6, 3, groups=3, padding=1)  # one (6, 2, 3, 3) weight
    b.weight = a.weight
    with pytest.raises(ValueError, match=r"layer '1' shares its weight with '0', but their DOConv2d D shapes differ "
                                         r"\(\(6, 9, 9\) vs \(2, 9, 9\)\)"):
        convert(nn.Sequential(a, b))


def test_convert_and_fold_keep_each_parameters_requires_grad():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    model[0].weight.requires_grad_(False)  # a frozen kernel, its bias trained
    model[1].bias.requires_grad_(False)    # a trained kernel, its bias frozen
    converted, _ = convert(model)
    assert {n: p.requires_grad for n, p in converted.named_parameters()} == {
        "0.W": False, "0.D": False, "0.bias": True, "1.W": True, "1.D": True, "1.bias": False}
    assert {n: p.requires_grad for n, p in fold(converted)[0].named_parameters()} == {
        n: p.requires_grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_convert_and_fold_keep_hooks(inplace):
    """Forward pre-hooks, forward hooks and backward hooks move with the layer, and their handles still work."""
    conv = nn.Conv2d(3, 4, 3, padding=1)
    seen = []
    pre = conv.register_forward_pre_hook(lambda m, args: (2 * args[0],))
    conv.register_forward_hook(lambda m, args, out: seen.append(("forward", type(m).__name__)))
    conv.register_full_backward_hook(lambda m, gin, gout: seen.append(("backward", type(m).__name__)))
    model = nn.Sequential(conv)
    x = torch.randn(1, 3, 5, 5, requires_grad=True)
    converted, _ = convert(model, inplace=inplace)
    _perturb(converted)
    with torch.no_grad():
        want = converted[0].fuse()._conv_forward(2 * x, converted[0].weight, converted[0].bias)  # no hooks run
    seen.clear()
    converted(x).sum().backward()
    assert seen == [("forward", "DOConv2d"), ("backward", "DOConv2d")]
    folded, _ = fold(converted, inplace=inplace)
    seen.clear()
    torch.testing.assert_close(folded(x), want)  # the pre-hook doubled the input
    assert seen == [("forward", "Conv2d")]
    if inplace:  # the handle taken on the original conv removes the hook from its replacements
        pre.remove()
        torch.testing.assert_close(folded(2 * x), want)


def test_convert_skips_weight_norm_and_spectral_norm_convs():
    """Their pre-hook recomputes weight on every call; converting would silently drop the normalisation."""
    model = nn.Sequential(nn.utils.weight_norm(nn.Conv2d(3, 4, 3)), nn.Conv2d(4, 4, 3))
    _, report = convert(model, inplace=True)  # (torch cannot deepcopy a weight_norm module)
    assert [(r.path, r.action) for r in report] == [("0", "skipped"), ("1", "converted")]
    assert report[0].reason.startswith("weight_norm hook")
    _, report = convert(nn.Sequential(nn.utils.spectral_norm(nn.Conv2d(3, 4, 3))))
    assert report[0].action == "skipped" and report[0].reason.startswith("spectral_norm hook")


def test_convert_skips_pruned_convs_and_asks_for_inplace_when_it_cannot_copy():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    nn.utils.prune.l1_unstructured(model[0], "weight", 0.5)
    with pytest.raises(ValueError, match=r"Sequential cannot be deep-copied .*: pass inplace=True"):
        convert(model)
    x = torch.randn(1, 3, 7, 7)
    with torch.no_grad():
        before = model(x)
    converted, report = convert(model, inplace=True)
    assert [(r.action, r.reason.split(":")[0]) for r in report] == [("skipped", "prune hook"), ("converted", "")]
    with torch.no_grad():  # the pruned conv keeps its mask, the other computes what it did
        torch.testing.assert_close(converted(x), before, rtol=0, atol=1e-6)


def test_convert_refuses_D_mul_below_M_N_saying_why():
    with pytest.raises(ValueError, match=r"layer '0': D_mul must be >= M\*N = 9 .*convert keeps each "
                                         r"convolution's kernel in W\[\.\.\., :M\*N\]"):
        convert(nn.Sequential(nn.Conv2d(3, 4, 3)), D_mul=4)


def test_inplace_convert_with_untieable_weights_changes_nothing():
    a, b = nn.Conv2d(4, 4, 3), nn.Conv2d(8, 4, 3, groups=2)  # one (4, 4, 3, 3) weight, D shapes differ
    b.weight = a.weight
    model = nn.Sequential(a, b)
    with pytest.raises(ValueError, match="layer '1' shares its weight with '0'"):
        convert(model, inplace=True)
    assert model[0] is a and model[1] is b


# ---- 1-D and 3-D models ---------------------------------------------------------------------------------

def test_convert_reports_every_rank_and_keeps_transposed_and_pointwise_convs(h):
    class Custom(nn.Conv3d):
        pass

    model = nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.Conv1d(4, 4, 1), nn.ConvTranspose1d(4, 4, 3),
                          nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 4, 3, stride=2), nn.Conv3d(3, 4, (1, 3, 3)),
                          nn.Conv3d(4, 4, 1), nn.ConvTranspose3d(4, 4, 2), Custom(4, 4, 3))
    converted, report = convert(model)
    rows = [(r.path, r.kind, r.action, r.reason.split(":")[0]) for r in report]
    assert rows == [("0", "Conv1d", "converted", ""), ("1", "Conv1d 1", "kept", "pointwise"),
                    ("2", "ConvTranspose1d", "kept", "transposed convolution"), ("3", "Conv2d", "converted", ""),
                    ("4", "ConvTranspose2d", "kept", "transposed convolution"), ("5", "Conv3d", "converted", ""),
                    ("6", "Conv3d 1x1x1", "kept", "pointwise"), ("7", "ConvTranspose3d", "kept",
                                                                 "transposed convolution"),
                    ("8", "Custom", "skipped", "nn.Conv3d subclass")]
    assert [type(converted[i]).__name__ for i in (0, 3, 5)] == ["DOConv1d", "DOConv2d", "DOConv3d"]
    assert converted[5].D_mul == 9 and converted[2] is not model[2] and type(converted[2]) is nn.ConvTranspose1d
    _, report = convert(model, include=lambda name, m: isinstance(m, nn.Conv3d))  # a callable sees every rank
    assert [r.path for r in report if r.action == "converted"] == ["5"]
    with pytest.raises(ValueError, match=r"^layer '5': D_mul must be >= M\*N = 9 for kernel_size=\(1, 3, 3\)"):
        convert(model, D_mul=8, exclude="3")  # (the Conv2d, 3x3, would be refused first)


@pytest.mark.parametrize("rank", [1, 3])
def test_shared_and_tied_convs_of_every_rank_stay_shared(rank, h):
    torch.manual_seed(0)
    conv = h.CONVS[rank](3, 3, 3, padding=1, dtype=torch.float64)
    other = h.CONVS[rank](3, 3, 3, stride=2, padding=1, dtype=torch.float64)
    other.weight = conv.weight
    model = nn.Sequential(conv, nn.ReLU(), conv, other)
    x = torch.randn(2, 3, *(6,) * rank, dtype=torch.float64)
    converted, report, folded, rows = _convert_then_fold(model, x, convert_atol=1e-12, fold_tol=1e-10)
    assert converted[2] is converted[0] and converted[3].W is converted[0].W and converted[3].D is converted[0].D
    assert [r.path for r in report] == ["0", "2", "3"] and "W/D tied to '0'" in report[2].reason
    assert folded[2] is folded[0] and type(folded[0]) is h.CONVS[rank]
    assert [(r.kind, r.shared_with) for r in rows] == [(f"DOConv{rank}d", ""), (f"DOConv{rank}d", "0"),
                                                       (f"DOConv{rank}d", "")]


@pytest.mark.parametrize("name, shape", [("tcn", (4, 40, 24)), ("c3d", (2, 3, 4, 12, 12))])
def test_whole_1d_and_3d_models_convert_train_fold_and_export(name, shape, tmp_path, h):
    """The tiny TCN (Conv1d, dilations 1-8) and C3D (Conv3d, strides 2) of the 1-D / 3-D work: convert is exact at
    identity init, a few SGD steps move D, fold is exact for the trained twin, and the folded model exported to
    ONNX computes the same in onnxruntime."""
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    plain = h.randomize_bn({"tcn": h.tiny_tcn, "c3d": h.tiny_c3d}[name]()).eval()
    convs = [n for n, m in plain.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv3d))]
    x = torch.randn(*shape)
    with torch.no_grad():
        before = plain(x)
    twin, report = convert(plain)
    assert [r.path for r in report if r.action == "converted"] == convs and len(convs) == {"tcn": 9, "c3d": 5}[name]
    with torch.no_grad():
        torch.testing.assert_close(twin(x), before, rtol=0, atol=1e-5)
    D0 = {path: layer.D.detach().clone() for path, layer in doconv.torch.doconv_layers(twin).items()}
    opt = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    target = torch.randint(0, 10, (shape[0],))
    twin.train()
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(twin(x), target).backward()
        opt.step()
    twin.eval()
    for path, layer in doconv.torch.doconv_layers(twin).items():
        assert (layer.D - D0[path]).abs().max() > 1e-6, path  # D trained
    with torch.no_grad():
        trained = twin(x)
    assert (trained - before).abs().max() > 1e-4  # training changed the model
    folded, rows = fold(twin)
    assert all(r.action == "folded" for r in rows) and _count(folded) == _count(plain)
    assert not doconv.torch.doconv_layers(folded)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), trained, rtol=1e-5, atol=1e-5)
        expected = folded(x).numpy()
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(folded, (x,), str(path), input_names=["x"], output_names=["y"])
    (got,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def _stale_warnings(record):
    return [w for w in record if "built before convert" in str(w.message)]


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("optimizer", ["SGD", "Adam"])
def test_an_optimizer_built_before_convert_warns_at_its_first_step(optimizer, inplace):
    """It holds the replaced convs' weights, which no longer run: the DO-Conv layers would not train, silently.
    It warns once, naming itself and what to do; the weights it holds stay as they were (nothing trained)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1), nn.Conv2d(4, 4, 1))
    stale = getattr(torch.optim, optimizer)(model.parameters(), lr=0.1)
    converted, _ = convert(model, inplace=inplace)
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning) as record:
        for _ in range(3):
            stale.zero_grad()
            converted(x).square().mean().backward()
            stale.step()
    warned = _stale_warnings(record)
    assert len(warned) == 1, [str(w.message) for w in record]
    # the two 3x3 convs' weight and bias were replaced; the 1x1 conv was kept (it runs and trains)
    assert f"this {optimizer} steps 4 parameter(s) of convolutions that doconv.torch.convert replaced" in str(
        warned[0].message) and "Build the optimizer after convert" in str(warned[0].message)


def test_optimizers_built_after_convert_and_the_original_still_trained_do_not_warn(recwarn):
    """An optimizer over the converted model's parameters, and one over the original model that keeps training
    beside its converted copy (a teacher): neither is stale."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    original = torch.optim.SGD(model.parameters(), lr=0.1)
    converted, _ = convert(model)
    fresh = torch.optim.SGD(converted.parameters(), lr=0.1)
    x = torch.randn(2, 3, 8, 8)
    before = [p.detach().clone() for p in converted.parameters()]
    for _ in range(2):
        for net, opt in ((converted, fresh), (model, original)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    assert not _stale_warnings(recwarn.list)
    assert all(not torch.equal(b, p) for b, p in zip(before, converted.parameters()))  # W, D and bias trained

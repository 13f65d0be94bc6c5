"""Freshness: every write path reaches the next forward, and ``doconv.torch.cached`` is the only reuse.

Each write-path test calls the model for inference *before* the write (where an implicit cache would fill)
and compares the output after it with :func:`doconv.forward` of the parameters read back, D randomised;
then the same inside a :func:`doconv.torch.cached` scope, and again after the scope and another write.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from torch import nn

import doconv
from doconv.cases import case as get_case
from doconv.torch import DOConv2d, cached, get_params
from doconv.torch import functional as DF

CASE = get_case("g2-k3")  # grouped, D randomised by the case table


def _model(seed=0, dtype="float32"):
    """A conv, BN-free so the layer's output is the model's: ``model[0]`` is the DOConv2d."""
    layer = DOConv2d(4, 6, 3, padding=1, groups=2, dtype=getattr(torch, dtype))
    doconv.torch.set_params(layer, CASE.params(seed, np.float64))
    return nn.Sequential(layer)


def _x(dtype="float32"):
    return torch.as_tensor(CASE.input(0).astype(dtype))


def _expected(model):
    layer = model[0]
    return doconv.forward(CASE.input(0), get_params(layer), layer.config)


def _infer(model, x):
    with torch.no_grad():
        return model(x).numpy()


def _counting(layer):
    """Count the layer's compositions (``_compose``, which every composing path goes through)."""
    calls = []
    original = layer._compose
    layer._compose = lambda W, D: calls.append(1) or original(W, D)
    return calls


def _sgd_step(model, make):
    opt = make(list(model.parameters()))
    model(_x()).square().mean().backward()
    opt.step()
    opt.zero_grad()


def _compiled_step(model, _):
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(_x()).square().mean().backward()
    torch.compile(opt.step)()


def _copy_under_no_grad(model, other):
    with torch.no_grad():
        for p, q in zip(model.parameters(), other.parameters()):
            p.copy_(q)


def _data_in_place(model, other):
    for p, q in zip(model.parameters(), other.parameters()):
        p.data.mul_(0.5).add_(q.data, alpha=0.5)


def _data_assigned(model, other):
    for p, q in zip(model.parameters(), other.parameters()):
        p.data = q.data.clone()


def _load_state_dict(model, other):
    model.load_state_dict(other.state_dict())


def _load_state_dict_assign(model, other):
    model.load_state_dict({k: v.clone() for k, v in other.state_dict().items()}, assign=True)


def _timm_ema_v2(model, other, decay=0.5):
    """timm ModelEmaV2.update: state_dict values, ``copy_`` under no_grad."""
    with torch.no_grad():
        for ema_v, model_v in zip(model.state_dict().values(), other.state_dict().values()):
            ema_v.copy_(ema_v * decay + (1.0 - decay) * model_v)


def _timm_ema_v3(model, other, decay=0.5):
    """timm ModelEmaV3.update (foreach path): ``torch._foreach_lerp_`` on the parameters."""
    with torch.no_grad():
        torch._foreach_lerp_(list(model.parameters()), list(other.parameters()), weight=1.0 - decay)


def _dino_teacher(model, other, momentum=0.5):
    """DINO / mean teacher / BYOL: a frozen teacher updated through ``.data``."""
    model.requires_grad_(False)
    with torch.no_grad():
        for pk, pq in zip(model.parameters(), other.parameters()):
            pk.data.mul_(momentum).add_((1 - momentum) * pq.detach().data)


WRITES = {
    "SGD-foreach": lambda m, o: _sgd_step(m, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True)),
    "AdamW-fused": lambda m, o: _sgd_step(m, lambda ps: torch.optim.AdamW(ps, lr=0.1, fused=True)),
    "SGD-fused": lambda m, o: _sgd_step(m, lambda ps: torch.optim.SGD(ps, lr=0.1, fused=True)),
    "copy_-no_grad": _copy_under_no_grad,
    "data-in-place": _data_in_place,
    "data-assigned": _data_assigned,
    "load_state_dict": _load_state_dict,
    "load_state_dict-assign": _load_state_dict_assign,
    "timm-ModelEmaV2": _timm_ema_v2,
    "timm-ModelEmaV3": _timm_ema_v3,
    "dino-teacher": _dino_teacher,
}


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("write", list(WRITES), ids=str)
def test_every_write_reaches_the_next_forward(write, mode):
    model, other = _model(0).train(mode == "train"), _model(3)
    x = _x()
    _infer(model, x)  # where an implicit cache would fill
    WRITES[write](model, other)
    doconv.assert_close(_infer(model, x), _expected(model), "float32", f"{write}: after the write")
    with cached(model):
        doconv.assert_close(_infer(model, x), _expected(model), "float32", f"{write}: in a scope")
    _data_in_place(model, _model(5))  # after the scope: nothing of it is left
    doconv.assert_close(_infer(model, x), _expected(model), "float32", f"{write}: after the scope")


def test_teacher_in_train_mode_with_grad_enabled_follows_data_updates():
    """The DINO loop as written: teacher in train mode, grad mode on, parameters frozen."""
    teacher, student = _model(0), _model(3)
    x = _x()
    for step in range(3):
        teacher(x)  # grad mode on, train mode: the parameters need no gradient
        _dino_teacher(teacher, student)
        doconv.assert_close(teacher(x).detach().numpy(), _expected(teacher), "float32", f"step {step}")


def test_compiled_optimizer_step_reaches_the_next_forward():
    model = _model(0)
    _infer(model, _x())
    _compiled_step(model, None)
    doconv.assert_close(_infer(model, _x()), _expected(model), "float32", "after a compiled step")


def test_averaged_model_follows_every_update():
    model, student = _model(0), _model(3)
    averaged = torch.optim.swa_utils.AveragedModel(model)
    x = _x()
    _infer(averaged, x)
    for seed in (3, 4):
        _copy_under_no_grad(model, _model(seed))
        averaged.update_parameters(model)
        doconv.assert_close(_infer(averaged.module, x), _expected(averaged.module), "float32", f"seed {seed}")


def test_functional_call_uses_the_tensors_passed():
    model = _model(0)
    layer, x = model[0], _x()
    _infer(model, x)
    for i in range(5):
        W = torch.randn(layer.W.shape, generator=torch.Generator().manual_seed(i))
        D = 0.3 * torch.randn(layer.D.shape, generator=torch.Generator().manual_seed(i + 10))
        for scope in (False, True):
            with cached(model) if scope else torch.no_grad(), torch.no_grad():
                got = torch.func.functional_call(layer, {"W": W, "D": D, "bias": layer.bias}, (x,))
            want = nn.functional.conv2d(x, DF.compose_einsum(W, D + layer.I_fill, layer.config), layer.bias,
                                        padding=1, groups=2)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---- the explicit scope --------------------------------------------------------------------------------

def test_scope_composes_once_for_inference_and_afresh_for_training():
    model = _model(0)
    layer, x = model[0], _x()
    calls = _counting(layer)
    for _ in range(3):
        _infer(model, x)
    assert len(calls) == 3  # outside a scope: every call composes
    with cached(model):
        outs = [_infer(model, x) for _ in range(3)]
        assert len(calls) == 4
        layer.requires_grad_(False)
        model(x)  # grad mode on, parameters frozen: no gradient needed, the scope's kernel
        assert len(calls) == 4
        layer.requires_grad_(True)
        out = model(x)  # a training call composes afresh and is differentiable
        out.sum().backward()
        assert layer.W.grad is not None and layer.D.grad is not None
    assert all(np.array_equal(o, outs[0]) for o in outs)
    doconv.assert_close(outs[0], _expected(model), "float32", "the scope's kernel")
    assert layer._kernel_cache.entry is None


def test_scope_training_gradients_match_the_core(h):
    case = get_case("g3-k3")
    layer = h.make_layer(case, "float64")
    x, expected, u, grads = h.reference(case)
    with cached(layer):
        with torch.no_grad():
            layer(torch.tensor(x))  # fills the scope's kernel
        out, got = h.torch_grads(layer, torch.tensor(x), u)
    doconv.assert_close(out.numpy(), expected, "float64", "forward")
    for name in ("x", "W", "D", "bias"):
        doconv.assert_close(got[name], grads[name], "float64", f"d{name}")


def test_scope_is_dropped_on_exit_on_exception_and_when_nested():
    model = _model(0)
    layer, x = model[0], _x()
    with pytest.raises(RuntimeError, match="boom"):
        with cached(model):
            _infer(model, x)
            assert layer._kernel_cache.entry is not None
            raise RuntimeError("boom")
    assert layer._kernel_cache.entry is None and layer._kernel_cache.depth == 0
    with cached(model):
        with cached(layer):
            _infer(model, x)
        assert layer._kernel_cache.entry is not None  # the outer scope still holds it
    assert layer._kernel_cache.entry is None


def test_a_promise_broken_inside_the_scope_shows_until_it_ends():
    """What the scope means: inside it W and D are not read again. After it, they are."""
    model = _model(0)
    x = _x()
    layer = model[0]
    with cached(model):
        before = _infer(model, x)
        layer.W.data.mul_(2.0)
        layer.D.data.add_(0.3)  # the bias is no part of the kernel: a write to it shows at once
        np.testing.assert_array_equal(_infer(model, x), before)
        model[0].invalidate_cache()
        doconv.assert_close(_infer(model, x), _expected(model), "float32", "after invalidate_cache")
        _data_in_place(model, _model(4))
    doconv.assert_close(_infer(model, x), _expected(model), "float32", "after the scope")


def test_scope_kernel_never_pickled_copied_or_moved():
    model = _model(0)
    x = _x()
    plain = io.BytesIO()
    torch.save(model, plain)
    with cached(model):
        _infer(model, x)
        scoped = io.BytesIO()
        torch.save(model, scoped)
        clone = copy.deepcopy(model)
        assert clone[0]._kernel_cache.entry is None and clone[0]._kernel_cache.depth == 0
        model.double()
        assert model[0]._kernel_cache.entry is None
        doconv.assert_close(_infer(model, _x("float64")), _expected(model), "float64", "after double()")
    assert abs(len(scoped.getvalue()) - len(plain.getvalue())) < 64
    loaded = torch.load(io.BytesIO(scoped.getvalue()), weights_only=False)
    assert loaded[0]._kernel_cache.entry is None and loaded[0]._kernel_cache.depth == 0


def test_inference_mode_inside_the_scope_then_a_frozen_layer_with_input_gradients():
    model = _model(0).eval()
    with cached(model):
        with torch.inference_mode():
            model(_x())
        model.requires_grad_(False)
        x = _x().requires_grad_(True)
        model(x).sum().backward()  # the scope's kernel is a normal tensor, so conv may save it
    assert x.grad is not None


def test_trace_and_compile_inside_a_scope_do_not_keep_its_kernel():
    model = _model(0).eval()
    x = _x()
    with cached(model):
        _infer(model, x)
        with torch.no_grad():
            traced = torch.jit.trace(model, x)
        compiled = torch.compile(model)
        with torch.no_grad():
            compiled(x)
    _data_in_place(model, _model(3))
    with torch.no_grad():
        doconv.assert_close(traced(x).numpy(), _expected(model), "float32", "trace made in a scope")
        doconv.assert_close(compiled(x).numpy(), _expected(model), "float32", "compiled in a scope")


def test_cached_refuses_a_non_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, but got list"):
        with cached([_model(0)]):
            pass


def test_eval_mode_with_grad_never_uses_a_stale_kernel(h):
    """Fine-tuning with frozen BN: eval() and gradients, after inference calls."""
    case = get_case("k3")
    layer = h.make_layer(case, "float64").eval()
    x, expected, u, grads = h.reference(case)
    with torch.no_grad():
        layer(torch.tensor(x))
    _, got = h.torch_grads(layer, torch.tensor(x), u)
    doconv.assert_close(got["D"], grads["D"], "float64", "dD in eval mode")
    doconv.assert_close(got["W"], grads["W"], "float64", "dW in eval mode")


@pytest.mark.parametrize("write", ["set_params", "load_state_dict", "reset_parameters", "import_canonical"])
def test_doconv_own_writers_drop_a_scope_kernel(write, tmp_path):
    """Writes doconv makes itself reach the next call even inside a scope (evaluating several checkpoints in
    one ``with cached(model)``): they drop the scope's kernel."""
    model, other = _model(0), _model(3)
    doconv.torch.export_canonical(other, tmp_path / "other.safetensors")
    x = _x()
    with cached(model):
        _infer(model, x)
        if write == "set_params":
            doconv.torch.set_params(model[0], get_params(other[0]))
        elif write == "load_state_dict":
            model.load_state_dict(other.state_dict())
        elif write == "reset_parameters":
            model[0].d_init = "random"
            model[0].reset_parameters()
        else:
            doconv.torch.import_canonical(model, tmp_path / "other.safetensors")
        doconv.assert_close(_infer(model, x), _expected(model), "float32", f"{write} inside a scope")

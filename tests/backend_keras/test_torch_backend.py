"""What only the torch backend has: the variables are torch Parameters that torch code writes past Keras
(``load_state_dict``, ``.data``, in-place ops), and grad mode."""

import pytest
from doconv_keras_testing import BACKEND, from_layout, make_layer, to_layout

import doconv
import doconv.tf as dtf
import keras
from doconv import cases

pytestmark = pytest.mark.skipif(BACKEND != "torch", reason="torch backend only")


@pytest.mark.parametrize("case_id", ["g3-k3", "k3-same", "dw-x2-k3", "1d-k3-causal-d2", "3d-k3"])
def test_torch_writes_past_keras_are_seen(case_id):
    import torch
    case = cases.case(case_id)
    layer, params = make_layer(case)  # D randomised
    c, x = case.config, case.input(0, "float32")
    model = keras.Sequential([keras.Input(to_layout(x, "channels_last").shape[1:]), layer])

    def check(what):
        want = doconv.forward(x, dtf.get_params(layer), c)
        doconv.assert_close(from_layout(model.predict(to_layout(x, "channels_last"), verbose=0), "channels_last"),
                            want, "float32", f"{case_id} {what}: predict")
        with dtf.cached(model), torch.no_grad():
            y = model(to_layout(x, "channels_last"), training=False)
        doconv.assert_close(from_layout(y, "channels_last"), want, "float32", f"{case_id} {what}: scope")

    state = {k: v.clone() for k, v in model.state_dict().items()}
    dtf.set_params(layer, case.params(3, "float32"))
    check("other params")
    model.load_state_dict(state)  # Parameter.copy_() behind Keras' assign
    doconv.assert_close(dtf.get_params(layer).W, params.W, "float32", "load_state_dict")
    check("load_state_dict")
    writes = {".data in place": lambda: layer.W.value.data.mul_(0.5).add_(0.3),
              ".data = ...": lambda: setattr(layer.W.value, "data", layer.W.value.data * -1.0)}
    if layer.D is not None:
        writes["in place under no_grad"] = lambda: layer.D.value.mul_(-1.0)
    for name, write in writes.items():
        with torch.no_grad():
            write()
        check(name)


def test_calls_in_grad_mode_compose_inside_a_scope_and_train():
    import torch
    case = cases.case("k3-same")
    layer, _ = make_layer(case)
    x = to_layout(case.input(0, "float32"), "channels_last")
    with dtf.cached(layer):
        with torch.no_grad():
            layer(x, training=False)
        y = layer(x, training=False)  # grad mode: composes, and differentiates
        assert y.requires_grad
        y.sum().backward()
    assert all(v.value.grad is not None and v.value.grad.abs().max() > 0 for v in layer.trainable_variables)

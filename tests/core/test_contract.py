"""The layer contract: choices, LayerSpec, the conversion report, convert's planning, the Backend protocol."""

import types

import pytest

from doconv import DOConvConfig
from doconv.contract import (ACTIONS, Backend, Candidate, ConversionReport, LayerSpec, ReportRow, check_choice,
                             check_D_mul, missing_names, plan)


def test_check_choice_names_argument_allowed_values_and_value():
    assert check_choice("feature", "composition", ("kernel", "feature")) == "feature"
    with pytest.raises(ValueError, match=r"composition must be one of \('kernel', 'feature'\), but got "
                                         r"composition='Kernel'"):
        check_choice("Kernel", "composition", ("kernel", "feature"))
    with pytest.raises(ValueError, match="but got d_init=None"):
        check_choice(None, "d_init", ("identity",))


def test_layer_spec_checks_without_in_channels_and_binds_later():
    spec = LayerSpec(6, 3, padding=1, groups=3, D_mul=12)
    assert spec.kernel_size == (3, 3) and spec.D_mul == 12
    assert spec.bind(9) == DOConvConfig(9, 6, 3, padding=1, groups=3, D_mul=12)
    assert LayerSpec.of(spec.bind(9)) == spec
    with pytest.raises(ValueError, match="D_mul"):
        LayerSpec(6, 3, D_mul=4)  # < M*N without depthwise_separable
    with pytest.raises(ValueError, match="groups"):
        LayerSpec(5, 3, groups=2)  # out_channels not divisible
    with pytest.raises(ValueError, match="in_channels"):
        spec.bind(8)  # groups=3 does not divide 8
    assert LayerSpec(6, 3, D_mul=None).D_mul == 9


def test_layer_spec_of_1d_and_3d_layers():
    spec = LayerSpec(4, 5, padding="causal", dilation=2, rank=1)
    assert (spec.kernel_size, spec.dilation, spec.D_mul) == ((5,), (2,), 5)
    assert spec.bind(3) == DOConvConfig(3, 4, 5, padding="causal", dilation=2, rank=1)
    assert LayerSpec.of(spec.bind(3)) == spec
    spec3 = LayerSpec(6, (3, 1, 3), groups=2, padding=(1, 0, 1), rank=3)
    assert spec3.D_mul == 9 and spec3.bind(4).kernel_shape == (6, 2, 3, 1, 3)
    with pytest.raises(ValueError, match="kernel_size must be an int or 3 ints"):
        LayerSpec(6, (3, 3), rank=3)


def test_check_D_mul_as_a_model_wide_option():
    assert check_D_mul(None) is None and check_D_mul(4) == 4
    for bad in (0, -1, 2.5, "9"):
        with pytest.raises((TypeError, ValueError), match=rf"D_mul must be a positive int or None .*D_mul={bad!r}"):
            check_D_mul(bad)


def _candidates():
    shared = object()
    return [Candidate("stem", "a"), Candidate("layer1.0", shared), Candidate("layer1.1", "b", reason="1x1"),
            Candidate("head", "c"), Candidate("layer2.0", shared), Candidate("odd", "d", reason="subclass",
                                                                             action="skipped")]


def test_plan_applies_include_exclude_own_reasons_and_sharing():
    decisions = plan(_candidates(), exclude="head")
    assert [(d.path, d.first, d.reason, d.action, d.shared_with) for d in decisions] == [
        ("stem", "stem", None, "converted", ""), ("layer1.0", "layer1.0", None, "converted", ""),
        ("layer1.1", "layer1.1", "1x1", "kept", ""), ("head", "head", "excluded", "kept", ""),
        ("layer2.0", "layer1.0", None, "converted", "layer1.0"), ("odd", "odd", "subclass", "skipped", "")]
    decisions = plan(_candidates(), include=["stem", "layer*"])
    assert [d.reason for d in decisions] == [None, None, "1x1", "not included", None, "not included"]
    decisions = plan(_candidates(), include=lambda path, obj: path == "stem")
    assert [d.action for d in decisions] == ["converted"] + ["kept"] * 5


def test_plan_refuses_typos_and_half_selected_shared_layers():
    with pytest.raises(ValueError, match=r"exclude pattern\(s\) \['haed'\] match no layer path"):
        plan(_candidates(), exclude="haed")
    with pytest.raises(ValueError, match=r"'layer1.0' is also used at 'layer2.0'.*select all of its paths"):
        plan(_candidates(), exclude="layer2.*")
    with pytest.raises(TypeError, match="include must be None, a glob pattern"):
        plan(_candidates(), include=3)


def test_report_rows_table_and_data():
    report = ConversionReport([
        ReportRow("stem", "Conv2d", "converted", "DO-Conv(3, 8, kernel_size=(3, 3))", 216, 656, 9),
        ReportRow("fc", "Linear", "kept", params_before=10, params_after=10, reason="not a convolution"),
        ReportRow("stem2", "Conv2d", "converted", "DO-Conv(3, 8)", 216, 656, 9, shared_with="stem"),
    ])
    text = str(report)
    assert text.splitlines()[0] == "| path | kind | action | layer | params before | params after | D_mul | note |"
    assert "| stem | Conv2d | converted | DO-Conv(3, 8, kernel_size=(3, 3)) | 216 | 656 | 9 |  |" in text
    assert text.splitlines()[-1] == ("1 converted, 1 kept; parameters of the changed layers 216 -> 656; "
                                     "1 more path(s) reach a layer listed above (shared, counted once)")
    assert report.to_dicts()[1] == {"path": "fc", "kind": "Linear", "action": "kept", "layer": "",
                                    "params_before": 10, "params_after": 10, "D_mul": None,
                                    "reason": "not a convolution", "shared_with": ""}
    assert [r.path for r in report.rows("converted")] == ["stem"]
    with pytest.raises(ValueError, match=rf"action must be one of {ACTIONS!r}".replace("(", r"\(").replace(")", r"\)")):
        ReportRow("x", "Conv2d", "swapped")
    assert str(ConversionReport()).endswith("no convolution; parameters of the changed layers 0 -> 0")


def test_backend_protocol_names_what_is_missing():
    complete = types.SimpleNamespace(UNSUPPORTED_FEATURES=frozenset(), **{
        name: (lambda *a, **k: None) for name in ("layer_from_config", "layer_config", "get_params", "set_params",
                                                  "convert", "fold", "export_canonical", "import_canonical",
                                                  "import_official", "cached")})
    assert isinstance(complete, Backend) and missing_names(complete) == []
    del complete.cached
    assert not isinstance(complete, Backend) and missing_names(complete) == ["cached"]


def test_check_convert_D_mul_says_what_convert_needs():
    from doconv.contract import check_convert_D_mul
    check_convert_D_mul(None, (3, 3))
    check_convert_D_mul(9, (3, 3))
    check_convert_D_mul(1, (1, 1))
    with pytest.raises(ValueError, match=r"D_mul must be >= M\*N = 15 for kernel_size=\(3, 5\), but got D_mul=9: "
                                         r"convert keeps each convolution's kernel"):
        check_convert_D_mul(9, [3, 5])

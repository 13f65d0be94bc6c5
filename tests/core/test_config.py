"""DOConvConfig: every bad argument is rejected with its name and value; shapes and padding arithmetic."""

import dataclasses
import itertools
import math
import re

import pytest
from hypothesis import given, strategies as st

import doconv
from doconv import DOConvConfig

GOOD = dict(in_channels=4, out_channels=6, kernel_size=3)


@pytest.mark.parametrize("override, name, exc", [
    (dict(in_channels=0), "in_channels", ValueError),
    (dict(in_channels=2.0), "in_channels", TypeError),
    (dict(out_channels=-1), "out_channels", ValueError),
    (dict(out_channels=True), "out_channels", TypeError),
    (dict(groups=0), "groups", ValueError),
    (dict(groups=3), "in_channels", ValueError),               # 4 % 3
    (dict(in_channels=6, groups=3, out_channels=4), "out_channels", ValueError),
    (dict(kernel_size=0), "kernel_size", ValueError),
    (dict(kernel_size=(3, 3, 3)), "kernel_size", ValueError),
    (dict(kernel_size="3"), "kernel_size", TypeError),
    (dict(kernel_size=(3, 1.5)), "kernel_size", TypeError),
    (dict(stride=0), "stride", ValueError),
    (dict(dilation=(1, 0)), "dilation", ValueError),
    (dict(padding=-1), "padding", ValueError),
    (dict(padding="full"), "padding", ValueError),
    (dict(padding=((1, 2), (3,))), "padding", ValueError),
    (dict(padding=1.5), "padding", TypeError),
    (dict(padding_mode="mirror"), "padding_mode", ValueError),
    (dict(bias="yes"), "bias", TypeError),
    (dict(D_mul=8), "D_mul", ValueError),                      # < M*N = 9
    (dict(D_mul=0), "D_mul", ValueError),
    (dict(D_mul=9.0), "D_mul", TypeError),
    (dict(kernel_size=1, D_mul=4), "D_mul", ValueError),       # 1x1: no D
    (dict(depthwise_separable="no"), "depthwise_separable", TypeError),
    (dict(depthwise_separable=2), "depthwise_separable", TypeError),
    (dict(kernel_size=b"\x03\x03"), "kernel_size", TypeError),  # bytes are a sequence of ints, not a pair
    (dict(stride=bytearray(b"\x01\x01")), "stride", TypeError),
    (dict(padding=b"\x01\x01"), "padding", TypeError),
])
def test_bad_arguments_name_argument_and_value(override, name, exc):
    kwargs = {**GOOD, **override}
    with pytest.raises(exc) as info:
        DOConvConfig(**kwargs)
    message = str(info.value)
    assert name in message
    # the message quotes the offending value (or the group count it conflicts with)
    value = override.get(name, override.get("groups"))
    assert re.search(re.escape(str(value)), message), message


def test_D_mul_below_MN_explains_why_and_separable_mode_opts_in():
    with pytest.raises(ValueError, match=r"D_mul must be >= M\*N = 9.*cannot express every conventional kernel"):
        DOConvConfig(4, 6, 3, D_mul=4)
    config = DOConvConfig(4, 6, 3, D_mul=4, depthwise_separable=True)
    assert config.S == 4 and config.D_shape == (4, 9, 4)


def test_bias_accepts_numpy_and_integer_booleans():
    import numpy as np
    assert DOConvConfig(2, 2, 3, bias=np.True_).bias is True and DOConvConfig(2, 2, 3, bias=0).bias is False


def test_flags_read_alike():
    """bias and depthwise_separable take the same forms (bool, NumPy bool, 0/1) and store a plain bool."""
    import numpy as np
    for value, expected in ((np.True_, True), (np.False_, False), (1, True), (0, False)):
        config = DOConvConfig(4, 6, 3, D_mul=4, bias=value, depthwise_separable=value) if expected else \
            DOConvConfig(4, 6, 3, bias=value, depthwise_separable=value)
        assert config.bias is expected and config.depthwise_separable is expected
    with pytest.raises(TypeError, match=r"inplace must be True or False, but got inplace='yes'"):
        doconv.standardize_flag("yes", "inplace")


def test_numpy_arrays_stand_for_pairs():
    """nn.Conv2d takes kernel_size=np.array([3, 1]); so does the config, for every pair and for padding."""
    import numpy as np
    config = DOConvConfig(4, 6, np.array([3, 1]), stride=np.array([2, 1]), padding=np.array([1, 0]),
                          dilation=np.arange(1, 3))
    assert config == DOConvConfig(4, 6, (3, 1), stride=(2, 1), padding=(1, 0), dilation=(1, 2))
    assert all(type(v) is int for v in config.kernel_size + config.stride + config.dilation)
    with pytest.raises(TypeError, match=r"kernel_size=array\(\[3\. , 1\.5\]\)"):
        DOConvConfig(4, 6, np.array([3.0, 1.5]))
    with pytest.raises(ValueError, match=r"kernel_size=array\(\[3, 3, 3\]\) of length 3"):
        DOConvConfig(4, 6, np.array([3, 3, 3]))


def test_unbatched_output_shape_quotes_the_shape_given():
    config = DOConvConfig(4, 6, 3, stride=2)
    assert config.output_shape((4, 9, 7), unbatched=True) == (6, 4, 3)
    assert config.output_shape((2, 4, 9, 7), unbatched=True) == (2, 6, 4, 3)
    with pytest.raises(ValueError, match=r"in_channels=4 \(input shape \(5, 9, 7\)\)"):
        config.output_shape((5, 9, 7), unbatched=True)
    with pytest.raises(ValueError, match=r"input must be 4-D \(N, C, H, W\), but got input shape \(4, 9, 7\)"):
        config.output_shape((4, 9, 7))
    with pytest.raises(ValueError, match=r"3-D \(C, H, W\) or 4-D .* input shape \(9, 7\)"):
        config.output_shape((9, 7), unbatched=True)
    with pytest.raises(ValueError, match=r"sizes >= 0, but got input shape \(-3, 4, 9, 7\)"):
        config.output_shape((-3, 4, 9, 7))  # (the cost model would count negative multiply-adds)
    assert config.output_shape((0, 4, 9, 7)) == (0, 6, 4, 3)


def test_defaults_and_shapes():
    c = DOConvConfig(6, 9, (3, 5), groups=3, D_mul=20)
    assert c.MN == 15 and c.S == 20 and c.in_per_group == 2 and c.out_per_group == 3
    assert c.W_shape == (9, 2, 20) and c.D_shape == (6, 15, 20) and c.kernel_shape == (9, 2, 3, 5)
    assert c.kind == "DO-GConv" and DOConvConfig(4, 8, 3, groups=4).kind == "DO-DConv"
    assert DOConvConfig(4, 8, 3).D_mul == 9 and DOConvConfig(4, 8, 1).D_shape is None
    assert DOConvConfig(4, 8, 3, bias=False).bias_shape is None


@pytest.mark.parametrize("padding, expected", [
    (1, ((1, 1), (1, 1))), ((1, 2), ((1, 1), (2, 2))), (((0, 1), (2, 3)), ((0, 1), (2, 3))),
    ("VALID", "valid"), ("same", "same"),
])
def test_padding_forms(padding, expected):
    assert DOConvConfig(2, 2, 3, padding=padding).padding == expected


@pytest.mark.parametrize("size, k, s, d", [(7, 3, 1, 1), (8, 3, 2, 1), (9, 2, 2, 1), (10, 5, 3, 2), (5, 4, 1, 1),
                                           (6, 1, 2, 1), (3, 5, 4, 1)])
def test_same_padding_is_tensorflows_rule(size, k, s, d):
    """Output ceil(size/stride); total pad from TF's formula; the odd pixel goes at the end."""
    lo, hi = doconv.same_pads(size, k, s, d)
    out = -(-size // s)
    assert (size + lo + hi - d * (k - 1) - 1) // s + 1 == out
    assert hi - lo in (0, 1)
    assert lo + hi == max((out - 1) * s + d * (k - 1) + 1 - size, 0)


def test_same_pads_equal_tensorflows_formula_on_a_grid():
    """``same_pads`` is written without a branch on the size (so a traced size records it); it is TF's formula,
    ceiling and clamp included, at every size from 0, odd and even, and stride above the kernel extent."""
    for size, k, s, d in itertools.product(range(0, 26), range(1, 6), range(1, 5), range(1, 3)):
        out = math.ceil(size / s)
        total = max((out - 1) * s + d * (k - 1) + 1 - size, 0)
        assert doconv.same_pads(size, k, s, d) == (total // 2, total - total // 2), (size, k, s, d)


def test_output_shape_checks_input():
    c = DOConvConfig(3, 4, 3, stride=2, padding=1)
    assert c.output_shape((2, 3, 7, 9)) == (2, 4, 4, 5)
    with pytest.raises(ValueError, match="5 channels but in_channels=3"):
        c.output_shape((2, 5, 7, 9))
    with pytest.raises(ValueError, match="4-D"):
        c.output_shape((3, 7, 9))
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        DOConvConfig(3, 4, 3, dilation=3).output_shape((1, 3, 5, 9))
    with pytest.raises(ValueError, match="reflect"):
        DOConvConfig(3, 4, 3, padding=3, padding_mode="reflect").output_shape((1, 3, 3, 9))


@given(st.integers(1, 4), st.integers(1, 3), st.sampled_from([1, 2, 3]), st.sampled_from(["same", 0, ((1, 0), (2, 1))]),
       st.sampled_from(doconv.PADDING_MODES), st.booleans())
def test_dict_round_trip(k, stride, groups, padding, mode, bias):
    c = DOConvConfig(2 * groups, 3 * groups, k, stride=stride, padding=padding, groups=groups,
                     padding_mode=mode, bias=bias, D_mul=None if k == 1 else k * k + 1)
    assert DOConvConfig.from_dict(c.to_dict()) == c


def test_from_dict_rejects_unknown_and_missing_fields():
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['colour'\]"):
        DOConvConfig.from_dict({**GOOD, "colour": "red"})
    with pytest.raises(ValueError, match="missing"):
        DOConvConfig.from_dict({"in_channels": 2})


def test_repr_shows_non_defaults():
    assert repr(DOConvConfig(4, 6, 3)) == "DOConvConfig(4, 6, kernel_size=(3, 3))"
    assert "groups=2" in repr(DOConvConfig(4, 6, 3, groups=2)) and "D_mul=12" in repr(DOConvConfig(4, 6, 3, D_mul=12))


def test_resolved_makes_input_independent_padding_explicit():
    assert DOConvConfig(2, 2, 3, padding="same").resolved() == DOConvConfig(2, 2, 3, padding=1)
    assert DOConvConfig(2, 2, 2, padding="same").resolved().padding == ((0, 1), (0, 1))
    assert DOConvConfig(2, 2, 3, padding="same", dilation=2).resolved() == DOConvConfig(2, 2, 3, padding=2, dilation=2)
    assert DOConvConfig(2, 2, 3, padding="valid").resolved() == DOConvConfig(2, 2, 3, padding=0)
    strided = DOConvConfig(2, 2, 3, padding="same", stride=2)
    assert strided.resolved() == strided and strided.resolved() != DOConvConfig(2, 2, 3, padding=1, stride=2)
    for h in range(5, 12):  # 'same' at stride 1 resolves to the pads of every input size
        assert DOConvConfig(2, 2, (2, 5), padding="same").resolved().padding == \
            DOConvConfig(2, 2, (2, 5), padding="same").pads(h, h + 1)


def test_circular_padding_wraps_once_at_most_and_sizes_are_ints():
    config = DOConvConfig(1, 1, 3, padding=2, padding_mode="circular")
    assert config.output_shape((1, 1, 2, 2)) == (1, 1, 4, 4)  # pad == size: one wrap, as torch allows
    with pytest.raises(ValueError, match=r"padding_mode='circular' needs each pad <= the input height 1"):
        config.output_shape((1, 1, 1, 5))
    with pytest.raises(TypeError, match=r"input shape must hold ints, but got input shape \(1, 1, 5.9, 5\)"):
        config.output_shape((1, 1, 5.9, 5))


@pytest.mark.parametrize("rank, padding, expected", [
    (1, 2, ((2, 2),)), (1, (2,), ((2, 2),)), (1, ((1, 3),), ((1, 3),)), (1, "CAUSAL", "causal"),
    (3, 1, ((1, 1),) * 3), (3, (0, 1, 2), ((0, 0), (1, 1), (2, 2))), (3, (1, (0, 2), 1), ((1, 1), (0, 2), (1, 1))),
    (3, "same", "same"),
])
def test_padding_forms_of_every_rank(rank, padding, expected):
    config = DOConvConfig(2, 3, 3, padding=padding, rank=rank)
    assert config.padding == expected and config.kernel_size == (3,) * rank and config.stride == (1,) * rank


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "rank must be one of (1, 2, 3)"),
    (dict(rank="2"), "rank must be one of"),
    (dict(rank=1, kernel_size=(3, 3)), "kernel_size must be an int, but got kernel_size=(3, 3)"),
    (dict(rank=3, stride=(1, 2)), "stride must be an int or 3 ints, but got stride=(1, 2) of length 2"),
    (dict(rank=1, padding=(1, 2)), "per-side pads are written ((left, right),)"),
    (dict(rank=3, padding=((1, 1), (1, 1))), "for a 3-D layer"),
    (dict(rank=2, padding="causal"), "'causal' pads a 1-D layer only"),
    (dict(rank=1, D_mul=2), "D_mul must be >= M*N = 3"),
])
def test_rank_mismatches_name_the_argument(kwargs, message):
    with pytest.raises((TypeError, ValueError)) as err:
        DOConvConfig(**{"in_channels": 2, "out_channels": 2, "kernel_size": 3, **kwargs})
    assert message in str(err.value)


def test_1d_and_3d_shapes_and_geometry():
    c1 = DOConvConfig(3, 4, 5, stride=2, dilation=2, padding="causal", rank=1)
    assert (c1.MN, c1.kernel_shape, c1.D_shape) == (5, (4, 3, 5), (3, 5, 5))
    assert c1.pads(20) == ((8, 0),) and c1.output_shape((2, 3, 20)) == (2, 4, 10)
    assert c1.output_shape((3, 20), unbatched=True) == (4, 10)
    assert c1.resolved().padding == ((8, 0),) and c1.resolved() == dataclasses.replace(c1, padding=((8, 0),))
    c3 = DOConvConfig(4, 6, (3, 1, 2), stride=(1, 2, 2), padding="same", groups=2, D_mul=7, rank=3)
    assert (c3.MN, c3.kernel_shape, c3.W_shape, c3.D_shape) == (6, (6, 2, 3, 1, 2), (6, 2, 7), (4, 6, 7))
    assert c3.pads(5, 7, 7) == ((1, 1), (0, 0), (0, 1)) and c3.output_shape((1, 4, 5, 7, 7)) == (1, 6, 5, 4, 4)
    with pytest.raises(ValueError, match=r"input must be 5-D \(N, C, D, H, W\), but got input shape \(4, 5, 7, 8\)"):
        c3.output_shape((4, 5, 7, 8))
    with pytest.raises(ValueError, match="input depth 2 padded by"):
        DOConvConfig(1, 1, 3, rank=3).output_shape((1, 1, 2, 5, 5))
    assert "rank=3" in repr(c3) and "rank" not in repr(DOConvConfig(1, 1, 3))


def test_rank_survives_the_dict_and_a_dict_without_rank_is_2d():
    c1 = DOConvConfig(3, 4, 5, padding=((1, 3),), rank=1)
    assert c1.to_dict()["rank"] == 1 and DOConvConfig.from_dict(c1.to_dict()) == c1
    old = {k: v for k, v in DOConvConfig(3, 4, 3, padding=1).to_dict().items() if k != "rank"}
    assert DOConvConfig.from_dict(old) == DOConvConfig(3, 4, 3, padding=1)

"""Cost model, the case table, the no-framework rule and the self-check entry point."""

import subprocess
import sys

import pytest

import doconv
from doconv import DOConvConfig
from doconv.cases import CASES, FEATURES, case, select


def test_cost_formulas_of_section_3():
    c = DOConvConfig(64, 128, 3, padding=1, D_mul=12)
    cost = doconv.composition_cost(c, (2, 64, 10, 10))
    hw = 2 * 10 * 10
    assert cost.kernel_macc == 12 * 9 * 64 * 128 + hw * 128 * 64 * 9
    assert cost.feature_macc == hw * 12 * 9 * 64 + hw * 128 * 64 * 12
    assert cost.kernel_bytes == 128 * 64 * 9 * 4 and cost.feature_bytes == hw * 64 * 12 * 4
    assert cost.cheaper == "kernel"   # the paper: kernel composition is typically cheaper


def test_cost_formulas_in_1d_and_3d_count_output_positions_and_patch_length():
    c1 = DOConvConfig(8, 16, 5, padding="causal", rank=1)
    cost = doconv.composition_cost(c1, (2, 8, 30))
    assert cost.kernel_macc == 5 * 5 * 8 * 16 + 60 * 16 * 8 * 5 and cost.feature_bytes == 60 * 8 * 5 * 4
    c3 = DOConvConfig(4, 6, (3, 1, 3), stride=(1, 2, 2), padding=(1, 0, 1), D_mul=11, rank=3)
    cost = doconv.composition_cost(c3, (1, 4, 5, 8, 8))   # output 5 x 4 x 4
    assert cost.feature_macc == 80 * 11 * 9 * 4 + 80 * 6 * 4 * 11 and cost.kernel_bytes == 6 * 4 * 9 * 4


def test_auto_prefers_feature_when_it_is_cheaper():
    # depthwise-separable mode (Section 3): D_mul = 1 < MN makes feature composition cheaper
    c = DOConvConfig(32, 32, 3, padding=1, D_mul=1, depthwise_separable=True)
    assert doconv.choose_composition(c, (8, 32, 16, 16)) == "feature"
    # grouped cost uses C_in/g
    g = DOConvConfig(8, 8, 3, groups=4, padding=1)
    assert doconv.composition_cost(g, (1, 8, 4, 4)).kernel_macc == 9 * 9 * 2 * 8 + 16 * 8 * 2 * 9


def test_auto_margin_is_the_share_of_kernel_macc_feature_must_save():
    c = DOConvConfig(512, 512, 3, padding=1)
    # kernel - feature = 81 * C * (C - P) for S = MN; P = N*H*W: feature wins for P < C
    shape = (8, 512, 7, 7)                        # P = 392
    cost = doconv.composition_cost(c, shape)
    saving = 1 - cost.feature_macc / cost.kernel_macc
    assert 0 < saving < 0.05
    assert doconv.choose_composition(c, shape) == "feature"
    assert doconv.choose_composition(c, shape, margin=saving * 0.99) == "feature"
    assert doconv.choose_composition(c, shape, margin=saving * 1.01) == "kernel"
    assert doconv.choose_composition(c, (1, 512, 7, 7), margin=0.05) == "feature"   # P = 49
    for bad in (-0.1, 1.0, 2):
        with pytest.raises(ValueError, match=f"margin must be in \\[0, 1\\), but got margin={bad}"):
            doconv.choose_composition(c, shape, margin=bad)


def test_case_table_covers_the_design():
    configs = [c.config for c in CASES]
    assert {c.kernel_size for c in configs} >= {(1, 1), (3, 3), (5, 5), (3, 1), (2, 2)}
    assert {c.stride for c in configs} >= {(1, 1), (2, 2)} and {c.dilation for c in configs} >= {(1, 1), (2, 2)}
    kinds = {(c.kind, c.out_per_group) for c in configs}
    assert ("DO-Conv", 5) in kinds and ("DO-DConv", 1) in kinds and ("DO-DConv", 2) in kinds and ("DO-GConv", 3) in kinds
    assert {c.S - c.MN for c in configs if c.has_D} >= {0, 3} and any(c.S == 2 * c.MN for c in configs if c.has_D)
    assert {c.bias for c in configs} == {True, False} and {c.padding_mode for c in configs} == set(doconv.PADDING_MODES)
    assert len(set(c.id for c in CASES)) == len(CASES)
    assert set().union(*(c.features for c in CASES)) == set(FEATURES)
    # every framework keeps grouped, depthwise and larger-D_mul cases after filtering
    keras_like = select(frozenset({"explicit_padding", "padding_mode", "stride_and_dilation"}))
    assert {c.config.kind for c in keras_like} == {"DO-Conv", "DO-DConv", "DO-GConv"}
    assert any(c.config.S > c.config.MN for c in keras_like)


@pytest.mark.parametrize("rank", [1, 3])
def test_case_table_covers_the_design_in_1d_and_3d(rank):
    table = [c for c in CASES if c.rank == rank]
    assert all(c.id.startswith(f"{rank}d-") for c in table) and len(table) >= 14
    configs = [c.config for c in table]
    assert any(c.MN == 1 for c in configs)                                      # no D
    assert any(k % 2 == 0 for c in configs for k in c.kernel_size)              # even sizes
    assert rank == 1 or any(1 in c.kernel_size and c.MN > 1 for c in configs)  # a 1-wide axis
    assert {max(c.stride) for c in configs} == {1, 2} and {max(c.dilation) for c in configs} >= {1, 2}
    raw = [c.kwargs.get("padding", 0) for c in table]
    assert {"same", "valid"} <= set(r for r in raw if isinstance(r, str))
    assert any(not isinstance(r, str) for r in raw)
    assert any(any(lo != hi for lo, hi in c.padding) for c in configs if not isinstance(c.padding, str))
    assert {c.padding_mode for c in configs} == set(doconv.PADDING_MODES)
    kinds = {(c.kind, c.out_per_group > 1) for c in configs}
    assert {("DO-Conv", True), ("DO-GConv", True), ("DO-DConv", True)} <= kinds
    assert {c.S - c.MN for c in configs if c.has_D} >= {0} and any(c.S >= 2 * c.MN for c in configs if c.has_D)
    assert any(c.depthwise_separable and c.S < c.MN for c in configs)
    assert {c.bias for c in configs} == {True, False}
    assert rank == 3 or "causal" in raw
    assert all(c.config.rank == rank and len(c.input_shape) == rank + 2 for c in table)
    assert all(f"conv{rank}d" in c.features for c in table)


def test_case_params_randomise_D():
    for c in CASES:
        p = c.params(0)
        if p.D is not None:
            assert abs(p.D - doconv.identity_D(c.config)).max() > 0.1, c.id
            # different input channels get different D slices: an identity D would hide pairing bugs
            assert abs(p.D[0] - p.D[-1]).max() > 0.1 or c.config.in_channels == 1
    with pytest.raises(ValueError, match="unknown case id 'nope'"):
        case("nope")


def test_the_core_imports_no_framework():
    code = ("import sys, doconv, doconv.selfcheck, doconv.cases, doconv.layouts, doconv.interchange, doconv.testing\n"
            "bad = {'torch', 'tensorflow', 'keras', 'mxnet', 'jax', 'gluoncv'} & set(sys.modules)\n"
            "assert not bad, bad\nprint('clean')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "clean" in out.stdout, out.stderr


def test_self_check_entry_point_passes_and_prints_a_summary():
    out = subprocess.run([sys.executable, "-m", "doconv", "-k", "g3"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "kernel=feature" in out.stdout and "PASS" in out.stdout and "FAIL" not in out.stdout

"""The parity harness itself: honest adapters pass, each deliberately wrong adapter is caught and reported."""

import json
import os

import numpy as np
import pytest

from doconv.cases import case
from doconv.parity import checks
from doconv.parity import frameworks as fws
from doconv.parity.__main__ import main
from doconv.parity.fw_core import CoreFramework



def run(fw, case_ids, dtypes=("float64",), tmp="/tmp", artifacts=None):
    tasks, done = checks.framework_tasks(fw, [case(i) for i in case_ids], dtypes, 0, str(tmp), artifacts)
    return [r for t in tasks for r in t.run()], done


def by_check(results):
    out = {}
    for r in results:
        out.setdefault(r.check, []).append(r)
    return out


def test_honest_core_adapter_passes_every_check(tmp_path):
    ids = ["k1x1-g2-s2", "k3-nobias", "k3-s2-same", "k5-Dmul+3", "dw-x2-k3", "g3-k3-s2-Dmul+3", "k3-reflect",
           "g2-k3-reflect-asym"]
    results, _ = run(CoreFramework(), ids, ("float64", "float32"), tmp_path)
    assert set(by_check(results)) == set(checks.CHECK_ORDER) - {"cross"}
    bad = [r for r in results if not r.passed]
    assert not bad, bad[:3]
    assert max(r.error for r in results if r.dtype == "float64") < 1e-12


def test_1d_and_3d_cases_pass_every_check_and_the_summary_counts_each_rank(tmp_path):
    from doconv.parity import report
    ids = ["1d-k3-causal-d2", "1d-dw-x2-k5-s2", "k3-s2-same", "3d-g2-k3-s2", "3d-k3-reflect-asym"]
    results, _ = run(CoreFramework(), ids, ("float64",), tmp_path)
    assert not [r for r in results if not r.passed]
    rows = {row["check"]: row for row in report.summarize(results)}
    assert rows["forward"]["cases_by_rank"] == {"1d": 2, "2d": 1, "3d": 2}
    assert rows["official"]["cases_by_rank"] == {"1d": 2, "2d": 1, "3d": 2}  # other ranks: the refusal is checked


class AcceptsOfficialInAnyRank(CoreFramework):
    """Takes 2-D official arrays into a 1-D/3-D layer without a word (guessing a layout)."""

    name = "numpy-official-any-rank"

    def import_official(self, layer, arrays, *, refold=False):
        if layer.config.rank == 2:
            return super().import_official(layer, arrays, refold=refold)


def test_an_official_import_into_another_rank_must_be_refused(tmp_path):
    results, _ = run(AcceptsOfficialInAnyRank(), ["1d-k3", "3d-k3"], ("float64",), tmp_path)
    official = [r for r in results if r.check == "official"]
    assert official and not any(r.passed for r in official)
    assert all(r.passed for r in results if r.check != "official")


class StoredTransposed(CoreFramework):
    """Stores W as (S, C_in/g, C_out) and D' as (MN, S, C_in), like the official TF layer: the probe must see it."""

    name = "numpy-tf-layout"

    def set_params(self, layer, params):
        super().set_params(layer, params)
        layer.obj["W"] = layer.obj["W"].transpose(2, 1, 0).copy()
        if "D" in layer.obj:
            layer.obj["D"] = layer.obj["D"].transpose(1, 2, 0).copy()

    def _canonical(self, layer):
        o = dict(layer.obj)
        o["W"] = o["W"].transpose(2, 1, 0)
        if "D" in o:
            o["D"] = o["D"].transpose(2, 0, 1)
        return o

    def get_params(self, layer):
        saved = layer.obj
        layer.obj = self._canonical(layer)
        try:
            return super().get_params(layer)
        finally:
            layer.obj = saved

    def gradients(self, layer, x, u):
        dx, grads = super().gradients(layer, x, u)
        grads["W"] = grads["W"].transpose(2, 1, 0)
        if "D" in grads:
            grads["D"] = grads["D"].transpose(1, 2, 0)
        return dx, grads


def test_probe_maps_any_storage_layout(tmp_path):
    fw = StoredTransposed()
    config = case("g3-k3-s2-Dmul+3").config
    mapping = checks.probe_layout(fw, config, "float64")
    assert {k: v[0] for k, v in mapping.items()} == {"W": "W", "D": "D", "bias": "bias"}
    results, _ = run(fw, ["g3-k3-s2-Dmul+3", "dw-x2-k3"], tmp=tmp_path)
    assert all(r.passed for r in results), [r for r in results if not r.passed][:3]


def test_probe_refuses_a_storage_it_cannot_map():
    class Dup(CoreFramework):
        def trainables(self, layer):
            out = super().trainables(layer)
            out["W2"] = out["W"].copy()  # W stored twice
            return out
    with pytest.raises(ValueError, match="exactly once"):
        checks.probe_layout(Dup(), case("k3").config, "float32")


def test_each_fault_is_caught(fault, tmp_path):
    cls, ids, check = fault
    results, _ = run(cls(), ids, tmp=tmp_path)
    failed = [r for r in by_check(results)[check] if not r.passed]
    assert failed, f"{cls.name}: the {check!r} check did not fail"
    assert all(r.error > 100 * r.tolerance for r in failed)  # a real defect, far outside rounding


def test_each_fault_is_reported_with_a_failing_exit_status(core_fault, tmp_path, use_frameworks, capsys):
    cls, ids, check = core_fault
    use_frameworks(cls())
    out = tmp_path / "report.json"
    status = main(["-f", "torch", "-k", ids[0], "--dtype", "float64", "--json", str(out), "--no-progress"])
    assert status == 1
    data = json.loads(out.read_text())
    assert data["passed"] is False
    row = next(r for r in data["summary"] if r["check"] == check)
    assert row["failed"] >= 1 and row["framework"] == cls.name
    assert f"FAIL {cls.name} {check} {ids[0]}" in capsys.readouterr().out


def test_faults_leave_the_cases_they_cannot_affect_alone(tmp_path, core_faults):
    """Specificity: the official pairing equals the paper's for groups=1; 'same' pads only matter when odd."""
    for cls, ids in ((core_faults["official-pairing"][0], ["k3", "dw-k3"]),
                     (core_faults["same-off-by-one"][0], ["k3-same", "k3-valid"])):
        results, _ = run(cls(), ids, tmp=tmp_path)
        assert all(r.passed for r in results), [r for r in results if not r.passed][:3]


def test_honest_run_exits_zero_and_writes_json(tmp_path, use_frameworks):
    use_frameworks(CoreFramework())
    out = tmp_path / "r.json"
    assert main(["-k", "g3-k3-s2", "--json", str(out), "--no-progress"]) == 0
    data = json.loads(out.read_text())
    assert data["passed"] and {r["framework"] for r in data["results"]} == {"core", "numpy"}
    assert {r["check"] for r in data["summary"]} >= {"forward", "grad D", "official", "fresh kernel", "sgd",
                                                     "kernel=feature", "vjp"}


# ---- framework selection -------------------------------------------------------------------------------

def test_selection_unknown_name_is_an_error(monkeypatch):
    with pytest.raises(ValueError, match="unknown framework.*'jax'"):
        fws.parse_selection("torch,jax")
    monkeypatch.setenv(fws.ENV_VAR, "tf, torch")
    assert fws.selection() == ("tf", "torch")
    assert fws.selection("mxnet") == ("mxnet",)  # the option wins
    monkeypatch.delenv(fws.ENV_VAR)
    assert fws.selection() == fws.DEFAULT
    with pytest.raises(SystemExit) as exc:
        main(["-f", "jax"])
    assert exc.value.code == 2


def test_missing_framework_is_a_warning_with_the_install_hint(monkeypatch, capsys):
    with pytest.raises(fws.Missing, match="not installed") as exc:
        fws.import_backend("mxnet", "doconv_no_such_framework", "doconv.mxnet")
    assert "doconv[mxnet]" in exc.value.hint
    import types
    import sys
    monkeypatch.setitem(sys.modules, "doconv_fake_backend", types.ModuleType("doconv_fake_backend"))
    with pytest.raises(fws.Missing, match="does not provide UNSUPPORTED_FEATURES"):
        fws.import_backend("torch", "numpy", "doconv_fake_backend")

    def only_missing(names):
        return [], [fws.Missing("mxnet", "mxnet is not installed", fws.KNOWN["mxnet"][1])]
    import doconv.parity.__main__ as cli
    monkeypatch.setattr(cli, "load_frameworks", only_missing)
    with pytest.warns(UserWarning, match="skipping mxnet"):
        assert main(["-f", "core,mxnet", "-k", "k3-valid", "--no-progress"]) == 0
    assert "doconv[mxnet]" in capsys.readouterr().out
    with pytest.warns(UserWarning):
        assert main(["-f", "core,mxnet", "-k", "k3-valid", "--no-progress", "--strict"]) == 1


# ---- export / check across environments -------------------------------------------------------------------

class Alpha(CoreFramework):
    name = family = "alpha"


class Beta(CoreFramework):
    name = family = "beta"


class BetaReadsTransposed(Beta):
    """Reads the canonical file's D transposed: only other frameworks' files reveal it in the cross check."""

    def import_canonical(self, layer, path):
        super().import_canonical(layer, path)
        layer.obj["D"] = layer.obj["D"].transpose(0, 2, 1).reshape(layer.obj["D"].shape).copy()


@pytest.mark.parametrize("beta, passes", [(Beta, True), (BetaReadsTransposed, False)])
def test_export_then_check_in_another_environment(beta, passes, tmp_path, use_frameworks):
    exchange = str(tmp_path / "exchange")
    args = ["-k", "g3-k3", "--dtype", "float32", "--no-progress"]
    use_frameworks(Alpha())
    assert main(["export", exchange, *args]) == 0              # environment 1
    use_frameworks(beta())
    assert main(["export", exchange, *args]) == (0 if passes else 1)   # environment 2: alpha -> beta
    use_frameworks(Alpha())
    out = tmp_path / "all.json"
    assert main(["check", exchange, *args, "--json", str(out)]) == (0 if passes else 1)  # beta -> alpha
    data = json.loads(out.read_text())
    pairs = {r["framework"] for r in data["results"] if r["check"] == "cross"}
    assert pairs == {"alpha→beta", "beta→alpha"}
    assert {r["framework"] for r in data["results"]} >= {"alpha", "beta", "core"}
    failed = {r["framework"] for r in data["results"] if not r["passed"]}
    assert failed == (set() if passes else {"alpha→beta", "beta"})  # beta's own interchange check fails too
    assert os.path.isfile(os.path.join(exchange, "artifacts", "alpha", "manifest.json"))


def test_sgd_moves_D_away_from_identity():
    """The cross check needs D' != 0: three SGD steps move it by much more than any tolerance."""
    ctx = checks.Context(case("g3-k3"), "float64", 0)
    trained = checks.core_sgd(ctx)
    assert np.max(np.abs(trained.D - ctx.p64.D)) > 1e-2


def test_a_source_exported_again_makes_its_earlier_cross_results_stale(tmp_path, use_frameworks):
    """beta checked alpha's artifacts in its export; alpha then exports again (new artifacts). A check must not
    report beta's old alpha→beta rows as if they were about the new artifacts: left out with a warning naming
    the pair when beta is not in the check, run again when it is (once, and then reported once)."""
    exchange = str(tmp_path / "exchange")
    args = ["-f", "torch", "-k", "g3-k3-s2-same-2MN", "--dtype", "float64", "--no-progress"]
    for fw in (Alpha, Beta, Alpha):  # alpha, beta (runs alpha→beta), alpha again (runs beta→alpha)
        use_frameworks(fw())
        assert main(["export", exchange, *args]) == 0
    out = tmp_path / "all.json"
    use_frameworks(Alpha())
    with pytest.warns(UserWarning, match=r"left out alpha→beta: checked against artifacts exported again since"):
        assert main(["check", exchange, *args, "--json", str(out)]) == 0
    assert {r["framework"] for r in json.loads(out.read_text())["results"] if r["check"] == "cross"} == {"beta→alpha"}
    use_frameworks(Beta())
    assert main(["check", exchange, *args, "--json", str(out)]) == 0  # beta runs alpha→beta on the new artifacts
    cross = [r["framework"] for r in json.loads(out.read_text())["results"] if r["check"] == "cross"]
    assert sorted(cross) == ["alpha→beta", "beta→alpha"]

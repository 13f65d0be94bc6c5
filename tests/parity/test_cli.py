"""The command line's handling of bad input: a usage error (exit 2, a message naming the option and the
value) before the run, never a traceback after it; a report that cannot be written never costs the table."""

import json
import os

import pytest

import doconv.parity.__main__ as cli
from doconv.parity import checks, report
from doconv.parity.__main__ import main
from doconv.parity.fw_core import CoreFramework

QUICK = ["-k", "k3-valid", "--dtype", "float64", "--no-progress"]


@pytest.fixture
def no_run(monkeypatch):
    """Fail the test if the run starts: these errors must be found before it."""
    def started(names):
        raise AssertionError("the run started before the bad input was reported")
    monkeypatch.setattr(cli, "load_frameworks", started)


def usage_error(capsys, argv):
    """main(argv) must exit 2 with argparse's usage error; its message (stderr)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "doconv-parity: error:" in err and "Traceback" not in err
    return err


# ---- --json --------------------------------------------------------------------------------------------------

def test_json_into_a_missing_folder_is_refused_before_the_run_and_creates_nothing(tmp_path, no_run, capsys):
    target = tmp_path / "no" / "such" / "r.json"
    err = usage_error(capsys, [*QUICK, "--json", str(target)])
    assert "--json" in err and str(target) in err and "does not exist" in err
    assert not (tmp_path / "no").exists()


def test_json_onto_a_directory_is_refused_before_the_run(tmp_path, no_run, capsys):
    folder = tmp_path / "out"
    folder.mkdir()
    err = usage_error(capsys, [*QUICK, "--json", str(folder)])
    assert "--json" in err and str(folder) in err and "is a directory" in err
    assert os.listdir(tmp_path) == ["out"] and os.listdir(folder) == []  # no stray 'out.tmp'


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_json_where_no_file_can_be_created_is_refused_before_the_run(no_run, capsys):
    err = usage_error(capsys, [*QUICK, "--json", "/proc/x.json"])  # refused even to root
    assert "--json" in err and "/proc/x.json" in err


def test_json_failing_after_the_run_still_prints_the_table(tmp_path, monkeypatch, capsys):
    """Should the path go bad during the run, the table comes first, then the error; no temporary file stays."""
    monkeypatch.setattr(cli, "load_frameworks", lambda names: ([CoreFramework()], []))
    monkeypatch.setattr(report, "json_path_problem", lambda path: None)  # the up-front check let it through
    folder = tmp_path / "out"
    folder.mkdir()
    status = main(["-f", "torch", *QUICK, "--json", str(folder)])
    out, err = capsys.readouterr()
    assert status == 2
    assert "forward" in out and "PASS" in out and "sgd" in out  # the whole table
    assert "--json" in err and str(folder) in err and "Traceback" not in err
    assert os.listdir(tmp_path) == ["out"] and os.listdir(folder) == []


def test_json_write_removes_its_temporary_file_on_failure(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(OSError):
        report.write_json(str(folder), {"a": 1})
    assert os.listdir(tmp_path) == ["out"]
    with pytest.raises(OSError):
        report.write_json(str(tmp_path / "missing" / "r.json"), {"a": 1})  # parents are not created
    assert not (tmp_path / "missing").exists()
    report.write_json(str(tmp_path / "r.json"), {"a": 1})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1} and len(os.listdir(tmp_path)) == 2


# ---- export / check DIR --------------------------------------------------------------------------------------

def test_check_of_a_missing_dir_is_an_error_and_does_not_create_it(tmp_path, no_run, capsys):
    typo = tmp_path / "exchnage"
    err = usage_error(capsys, ["check", str(typo), *QUICK])
    assert str(typo) in err and "does not exist" in err
    assert not typo.exists()


def test_check_of_an_empty_dir_says_to_export_first(tmp_path, no_run, capsys):
    err = usage_error(capsys, ["check", str(tmp_path), *QUICK])
    assert "holds no exported runs" in err and f"doconv-parity export {tmp_path}" in err
    assert os.listdir(tmp_path) == []


@pytest.fixture
def exchange(tmp_path, monkeypatch):
    """A DIR that one environment exported to."""
    folder = tmp_path / "exchange"
    monkeypatch.setattr(cli, "load_frameworks", lambda names: ([CoreFramework()], []))
    assert main(["export", str(folder), "-f", "torch", *QUICK]) == 0
    return folder


@pytest.mark.parametrize("content", ["{}", "garbage", '{"format": "doconv-parity-report", "version": 1}',
                                     '{"format": "doconv-parity-report", "version": 1, "results": [{"x": 1}], '
                                     '"missing": [], "skipped": {}}'])
def test_check_with_a_foreign_file_in_results_names_it(content, exchange, no_run, capsys):
    foreign = exchange / "results" / "notes.json"
    foreign.write_text(content)
    err = usage_error(capsys, ["check", str(exchange), *QUICK])
    assert str(foreign) in err


def test_a_damaged_manifest_is_named_before_the_run(exchange, no_run, capsys):
    manifest = exchange / "artifacts" / "numpy" / "manifest.json"
    assert manifest.is_file()
    manifest.write_text("garbage")
    for command in ("check", "export"):
        err = usage_error(capsys, [command, str(exchange), *QUICK])
        assert str(manifest) in err


def test_check_after_export_still_works(exchange, monkeypatch, capsys):
    class Other(CoreFramework):
        name = family = "other"
    monkeypatch.setattr(cli, "load_frameworks", lambda names: ([Other()], []))
    assert main(["check", str(exchange), "-f", "torch", *QUICK]) == 0
    assert "numpy→other" in capsys.readouterr().out
    assert sorted(os.listdir(exchange / "results")) == ["check-other.json", "export-numpy.json"]


def test_export_to_a_regular_file_is_refused_before_the_run(tmp_path, no_run, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    err = usage_error(capsys, ["export", str(afile), *QUICK])
    assert "export" in err and str(afile) in err and "not a directory" in err
    assert afile.read_text() == "x"


def test_export_accepts_json_inside_the_dir_it_creates(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "load_frameworks", lambda names: ([CoreFramework()], []))
    folder = tmp_path / "new"
    assert main(["export", str(folder), "-f", "torch", *QUICK, "--json", str(folder / "all.json")]) == 0
    assert json.loads((folder / "all.json").read_text())["passed"] is True


# ---- --seed, -f --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, why", [("-1", "non-negative"), ("x", "not an integer")])
def test_seed_must_be_a_non_negative_integer(value, why, no_run, capsys):
    err = usage_error(capsys, ["-f", "torch", *QUICK, "--seed", value])
    assert "--seed" in err and repr(value) in err and why in err


@pytest.mark.parametrize("value", [",", " , ,", "", "  "])  # -f "$FW" with FW unset must not run everything
def test_frameworks_naming_no_framework_is_a_usage_error(value, no_run, capsys):
    err = usage_error(capsys, ["-f", value, *QUICK])
    assert "-f/--frameworks" in err and repr(value) in err and "no framework" in err


def test_environment_naming_no_framework_names_the_variable(monkeypatch, no_run, capsys):
    monkeypatch.setenv(cli.ENV_VAR, ",")
    err = usage_error(capsys, QUICK)
    assert cli.ENV_VAR in err and "','" in err


@pytest.mark.parametrize("field, value", [("error", "-inf"), ("error", -5.0), ("tolerance", 0), ("tolerance", "inf")])
def test_check_refuses_results_that_could_only_pass_by_damage(field, value, exchange, no_run, capsys):
    """A negative error (or a tolerance <= 0 or infinite) is no max_error: the check must not read it as PASS."""
    path = next((exchange / "results").glob("*.json"))
    data = json.loads(path.read_text())
    data["results"][0][field] = value
    path.write_text(json.dumps(data))
    err = usage_error(capsys, ["check", str(exchange), *QUICK])
    assert str(path) in err and "damaged" in err


def test_manifest_is_replaced_atomically(exchange, monkeypatch):
    """A failure while writing a manifest leaves the previous one (a truncated one would block the DIR)."""
    manifest = exchange / "artifacts" / "numpy" / "manifest.json"
    before = manifest.read_text()
    monkeypatch.setattr(checks.json, "dump", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        checks.write_manifest(str(exchange / "artifacts"), CoreFramework(), {}, 0)
    assert manifest.read_text() == before and not [p for p in manifest.parent.iterdir() if p.suffix == ".tmp"]


def test_quick_cases_exist_and_cover_every_rank():
    from doconv.cases import case
    assert {case(i).rank for i in cli.QUICK} == {1, 2, 3}  # case() raises on an unknown id

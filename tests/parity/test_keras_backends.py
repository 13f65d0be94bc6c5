"""The Keras layer on each Keras backend in the parity report: the ``keras/torch`` and ``keras/jax`` columns are
known and selected, each runs in a process of its own and joins the others through the exchange folder (the
chain ``nox -s parity`` runs), and the harness catches a broken adapter on every backend."""

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import types

import pytest

from doconv.parity import checks, report
from doconv.parity import frameworks as fws
from doconv.parity.__main__ import main
from doconv.parity.fw_core import CoreFramework

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
KERAS = {"tf": ("tensorflow", "tensorflow"), "keras/torch": ("torch", "torch"), "keras/jax": ("jax", "jax")}


def installed(*modules):
    return all(importlib.util.find_spec(m) is not None for m in modules)


def in_own_process(keras_backend, *args, timeout=900):
    """Run ``python *args`` with Keras on ``keras_backend`` (None: KERAS_BACKEND unset)."""
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env.update({"TF_CPP_MIN_LOG_LEVEL": "2"}, **({"KERAS_BACKEND": keras_backend} if keras_backend else {}))
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode in (0, 1), done.stderr[-3000:]
    return done


# ---- selection -------------------------------------------------------------------------------------------------

def test_every_keras_backend_is_known_and_selected_by_default():
    for name in KERAS:
        assert name in fws.KNOWN and name in fws.DEFAULT
        module, _, factory = fws.KNOWN[name][0].partition(":")
        assert callable(getattr(importlib.import_module(module), factory))  # imports no framework
        hint = fws.KNOWN[name][1]
        assert name == "tf" or (f"KERAS_BACKEND={KERAS[name][0]}" in hint and f"-f {name}" in hint)
    assert fws.parse_selection("keras/jax, TF,keras/torch") == ("keras/jax", "tf", "keras/torch")


@pytest.mark.parametrize("label, family", [("tf/NHWC", "tf"), ("keras/torch/NCHW", "keras/torch"),
                                           ("keras/jax/NHWC", "keras/jax"), ("torch", "torch"), ("numpy", "numpy"),
                                           ("keras/other", "keras/other")])
def test_family_of_a_row_label(label, family):
    assert fws.family_of(label) == family


def test_report_orders_keras_backends_after_tf_and_before_mxnet():
    labels = ["mxnet", "keras/jax/NHWC", "torch", "keras/torch/NCHW", "tf/NHWC", "core",
              "keras/jax/NHWC→torch", "torch→keras/torch/NHWC", "mxnet→keras/jax/NCHW"]
    results = [checks.Result(label, "cross" if "→" in label else "forward", "k3", "float64", 0.0, 1e-10)
               for label in labels]
    rows = [row["framework"] for row in report.summarize(results)]
    assert rows == ["core", "torch", "tf/NHWC", "keras/torch/NCHW", "keras/jax/NHWC", "mxnet",
                    "torch→keras/torch/NHWC", "keras/jax/NHWC→torch", "mxnet→keras/jax/NCHW"]


def test_a_keras_backend_this_process_does_not_run_is_missing_with_its_command():
    """Keras cannot switch backends: the adapter of another one is reported missing, never run on the wrong one."""
    keras = pytest.importorskip("keras")
    running = keras.config.backend()
    other = next((name for name, (backend, module) in KERAS.items() if backend != running and installed(module)),
                 None)
    if other is None:
        pytest.skip(f"no other Keras backend than {running!r} is installed")
    ready, missing = fws.load_frameworks([other])
    assert not ready and [m.name for m in missing] == [other]
    assert f"Keras runs on {running!r} in this process" in missing[0].reason
    assert missing[0].hint == fws.KNOWN[other][1]


@pytest.mark.skipif(not installed("keras", "tensorflow", "torch"), reason="needs Keras, TensorFlow and torch")
def test_the_first_keras_framework_selected_sets_the_backend_and_the_next_is_missing(tmp_path):
    """With KERAS_BACKEND unset, ``-f keras/torch,tf`` runs Keras on torch and reports tf missing (and the other
    order the reverse): one process, one Keras backend, never a silent mix."""
    out = tmp_path / "r.json"
    in_own_process(None, "-m", "doconv.parity", "-f", "keras/torch,tf", "-k", "1d-k3-causal-d2", "--dtype",
                   "float64", "--no-progress", "--json", str(out))
    data = json.loads(out.read_text())
    assert data["passed"] and data["environment"]["keras_backend"] == "torch"
    assert {side for r in data["results"] for side in r["framework"].split("→")} == {"keras/torch/NHWC",
                                                                                     "keras/torch/NCHW"}
    assert [m["name"] for m in data["missing"]] == ["tf"] and "Keras runs on 'torch'" in data["missing"][0]["reason"]


# ---- each backend's adapters against the core, and the faults they must show ----------------------------------

@pytest.mark.parametrize("selection", list(KERAS))
def test_keras_adapters_pass_and_each_fault_is_caught(selection, tmp_path):
    backend, module = KERAS[selection]
    if not installed("keras", module):
        pytest.skip(f"{selection} needs keras and {module}")
    out = tmp_path / "faults.json"
    in_own_process(backend, os.path.join(HERE, "keras_faults.py"), selection, str(out))
    data = json.loads(out.read_text())
    formats = [name.split()[1] for name in data if name.startswith("honest ")]
    assert formats == (["channels_last"] if selection == "keras/jax" else ["channels_last", "channels_first"])
    for fmt, label in (("channels_last", "NHWC"), ("channels_first", "NCHW"))[:len(formats)]:
        honest = data[f"honest {fmt}"]
        assert honest["framework"] == f"{selection}/{label}"
        results = honest["results"]
        assert {r["check"] for r in results} == set(checks.CHECK_ORDER) - {"cross"}
        assert {r["case"] for r in results} == {"1d-k3-causal-d2", "dw-x2-k3", "3d-k2-same"}
        assert all(r["passed"] for r in results), [r for r in results if not r["passed"]][:3]
    for fault, check in data["faults"].items():
        failed = [r for r in data[fault]["results"] if r["check"] == check and not r["passed"]]
        assert failed, f"{selection}: fault {fault!r} passed the {check!r} check"
        assert all(r["error"] == "inf" or float(r["error"]) > 100 * r["tolerance"] for r in failed)


# ---- the chain: one process per environment or Keras backend, joined through DIR -----------------------------

class Alpha(CoreFramework):
    name = family = "alpha"


class Beta(CoreFramework):
    name = family = "beta"


class Gamma(CoreFramework):
    name = family = "gamma"


def test_the_chain_checks_every_ordered_pair_exactly_once(tmp_path, use_frameworks):
    """Three processes export in turn, then each but the last checks (``nox -s parity``'s order): every pair is
    run once, a check never repeats a pair an export already ran, and the last report combines all."""
    exchange = str(tmp_path / "exchange")
    args = ["-f", "torch", "-k", "g3-k3-s2-same-2MN", "--dtype", "float64", "--no-progress"]  # -f: no core rows
    chain = (Alpha, Beta, Gamma)
    for fw in chain:
        use_frameworks(fw())
        assert main(["export", exchange, *args]) == 0
    out = tmp_path / "all.json"
    for fw in chain[:-1]:
        use_frameworks(fw())
        last = fw is chain[-2]
        assert main(["check", exchange, *args, *(["--json", str(out)] if last else [])]) == 0
    cross = [(r["framework"], r["case"], r["dtype"]) for r in json.loads(out.read_text())["results"]
             if r["check"] == "cross"]
    names = [fw.name for fw in chain]
    pairs = [f"{a}→{b}" for a in names for b in names if a != b]
    assert sorted(cross) == sorted((pair, "g3-k3-s2-same-2MN", "float64") for pair in pairs)
    assert sorted(os.listdir(os.path.join(exchange, "results"))) == [
        "check-alpha.json", "check-beta.json", "export-alpha.json", "export-beta.json", "export-gamma.json"]


def test_result_files_of_a_keras_backend_have_a_plain_name(tmp_path, use_frameworks):
    class SlashName(CoreFramework):
        name, family = "keras/torch/NHWC", "keras/torch"
    use_frameworks(SlashName())
    exchange = tmp_path / "exchange"
    assert main(["export", str(exchange), "-f", "torch", "-k", "g3-k3-s2-same-2MN", "--dtype", "float64",
                 "--no-progress"]) == 0
    assert os.listdir(exchange / "results") == ["export-keras_torch.json"]
    assert os.listdir(exchange / "artifacts") == ["keras_torch_NHWC"]


class FakeSession:
    """What the parity session asks of nox, recorded instead of run."""

    def __init__(self, tmp):
        self.tmp, self.posargs, self.runs = str(tmp), [], []

    def create_tmp(self):
        return self.tmp

    def run(self, *args, env=None, success_codes=(0,), external=False):
        self.runs.append((args, dict(env or {}), list(success_codes)))


def load_noxfile(monkeypatch):
    """The noxfile with a stand-in ``nox`` module (nox lives outside the test environments)."""
    def decorator(*args, **kwargs):
        return args[0] if args and callable(args[0]) else (lambda f: f)
    fake = types.ModuleType("nox")
    fake.options, fake.session, fake.parametrize = types.SimpleNamespace(), decorator, decorator
    monkeypatch.setitem(sys.modules, "nox", fake)
    spec = importlib.util.spec_from_file_location("doconv_noxfile", os.path.join(ROOT, "noxfile.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nox_parity_session_chains_every_framework(tmp_path, monkeypatch):
    """The README's one command: every default framework is exported by a process of its own Keras backend; every
    exporter but the last checks; the last check is strict, writes the JSON report and decides the result."""
    session = FakeSession(tmp_path)
    load_noxfile(monkeypatch).parity(session)
    parity = [(args[args.index("doconv.parity") + 1:], env, codes) for args, env, codes in session.runs
              if "doconv.parity" in args]
    exports = [(args, env) for args, env, _ in parity if args[0] == "export"]
    checked = [(args, env, codes) for args, env, codes in parity if args[0] == "check"]
    selected = lambda args: args[args.index("-f") + 1].split(",")  # noqa: E731
    assert sorted(n for args, _ in exports for n in selected(args)) == sorted(fws.DEFAULT)
    for args, env, *_ in exports + checked:  # Keras runs on the backend each Keras framework needs
        assert all(env.get("KERAS_BACKEND") == KERAS[n][0] for n in selected(args) if n in KERAS)
    order = [selected(args) for args, _ in exports]
    assert [selected(args) for args, _, _ in checked] == [[n for n in names if n != "core"] for names in order[:-1]]
    *first, (last, _, codes) = checked
    assert "--strict" in last and "--json" in last and codes == [0]
    assert all("--strict" not in args for args, _, _ in first)

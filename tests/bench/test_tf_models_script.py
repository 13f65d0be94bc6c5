"""``bench/tf_models.py`` runs end to end in its smallest form (``--tiny``, ResNet-20, one round): every table
is printed and the JSON holds every arm. No timing is asserted (the machine is shared); the script itself
refuses to time a twin whose output disagrees with its folded network."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tensorflow", reason="the Keras benchmark needs TensorFlow")

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "tf_models.py"


def test_tf_models_quickest_form(tmp_path):
    path = tmp_path / "models.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--models", "resnet20", "--reps", "1",
                           "--json", str(path)], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"tf_models.py exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    out = proc.stdout
    for header in ("SGD training step (GradientTape in one tf.function):", "Eval inference, training batch:",
                   "Training-step peak memory (max RSS",
                   "| model | batch, input | arm | median ms | ratio | ratio p25-p75 | ratio to | load |",
                   "| model | batch, input | arm | build peak MiB | training peak MiB | peak ratio | peak - built MiB "
                   "| ratio | load |"):
        assert header in out, header
    result = json.loads(path.read_text())
    assert set(result["train"]["resnet20"]) == {"plain, tf.function", "DO-Conv, tf.function", "plain, XLA",
                                                "DO-Conv, XLA"}
    assert set(result["eval"]["resnet20"]) == {"plain, predict_on_batch", "DO-Conv default, predict_on_batch",
                                               "DO-Conv folded, predict_on_batch", "plain, eager",
                                               "DO-Conv in cached(), eager"}
    for rows in (result["train"]["resnet20"], result["eval"]["resnet20"]):
        assert all(r["median_ms"] > 0 and rows[r["base"]]["ratio"] == 1.0 for r in rows.values())
    memory = result["memory"]["resnet20"]
    assert set(memory) == {"plain", "DO-Conv"}
    assert all(r["peak_MiB"] > r["built_MiB"] > 0 for r in memory.values())

"""Run from outside the checkout after `pip install .` or `pip install -e .`: every folder maps into doconv.*."""

import importlib.util
import os
import sys

root, mode = os.path.abspath(sys.argv[1]), sys.argv[2]
expected = {"doconv": "core", "doconv.torch": "backends/torch", "doconv.tf": "backends/tf",
            "doconv.mxnet": "backends/mxnet", "doconv.parity": "parity", "doconv.experiments": "experiments"}
import doconv  # noqa: E402  (the core needs numpy and safetensors only)

for name, folder in expected.items():
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin, f"{name} is not importable after a {mode} install"
    origin = os.path.realpath(spec.origin)
    tail = os.path.join(*name.split("."), "__init__.py")
    if mode == "editable":
        want = os.path.realpath(os.path.join(root, folder, "__init__.py"))
        assert origin == want, f"{name} resolves to {origin}, expected {want}"
    else:
        source = os.path.realpath(os.path.join(root, folder))
        assert origin.endswith(tail) and not origin.startswith(source + os.sep), f"{name} resolves to {origin}"
for entry in sys.path:
    assert os.path.basename(os.path.normpath(entry)) != "backends", f"sys.path holds {entry}"
spec = importlib.util.find_spec("torch")
assert spec is None or not os.path.realpath(spec.origin or "").startswith(os.path.join(root, "backends")), \
    f"'torch' resolves into the checkout: {spec.origin}"
print(f"{mode} install: " + ", ".join(f"{n} -> {expected[n]}" for n in expected))

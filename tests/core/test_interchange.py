"""The canonical interchange file: bit-exact round trips, and clear errors for every kind of damage."""

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import doconv
from doconv import DOConvConfig, DOConvParams
from doconv.cases import CASES
from doconv.interchange import VERSION, config_digest
from doconv.testing import config_strategy, random_params


def layers(dtype=np.float32):
    return {f"features.{i}.conv": (c.config, c.params(i, dtype)) for i, c in enumerate(CASES)}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        (ca, pa), (cb, pb) = a[name], b[name]
        assert ca == cb
        for key in ("W", "D", "bias"):
            x, y = getattr(pa, key), getattr(pb, key)
            assert (x is None) == (y is None), (name, key)
            if x is not None:
                assert x.dtype == y.dtype and np.array_equal(x, y), (name, key)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    path = tmp_path / "model.safetensors"
    original = layers(dtype)
    doconv.save(path, original)
    assert_same(doconv.load(path), original)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config_strategy())
def test_round_trip_of_random_configs(tmp_path, drawn):
    config, _ = drawn
    path = tmp_path / "one.safetensors"
    doconv.save(path, {"a.b": (config, random_params(config, 3))})
    assert_same(doconv.load(path), {"a.b": (config, random_params(config, 3))})


def rewrite_header(path, edit):
    """Rewrite the safetensors header of ``path`` through ``edit(header_dict)``."""
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    open(path, "wb").write(len(blob).to_bytes(8, "little") + blob + raw[8 + n:])


def edit_doconv(fn):
    """An edit of the "doconv" header after which its config digests are recomputed (the tensors' are kept),
    so that the check after the digests is the one a test sees."""
    def edit(header):
        meta = json.loads(header["__metadata__"]["doconv"])
        fn(meta)
        if isinstance(meta.get("sha256"), dict):
            meta["sha256"] = {name: {**meta["sha256"].get(name, {}), "config": config_digest(config)}
                              for name, config in meta["layers"].items()}
        header["__metadata__"]["doconv"] = json.dumps(meta)
    return edit


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "m.safetensors"
    doconv.save(path, {"conv1": (CASES[2].config, CASES[2].params(0)), "g": (CASES[23].config, CASES[23].params(1))})
    return path


@pytest.mark.parametrize("edit, message", [
    (edit_doconv(lambda m: m.update(version=VERSION + 1)), f"format version {VERSION + 1}, newer than .*upgrade"),
    (edit_doconv(lambda m: m.update(version=VERSION + 1, extras={})), "newer than"),  # newer versions add fields
    (edit_doconv(lambda m: m.update(version=0)), "unknown format version 0; this doconv reads versions 1 to"),
    (edit_doconv(lambda m: m.update(version=True)), "unknown format version True"),
    (edit_doconv(lambda m: m.update(version=float(VERSION))), f"unknown format version {float(VERSION)}"),
    (edit_doconv(lambda m: m["layers"].update({"": m["layers"]["conv1"]})), "a layer has an empty name"),
    (edit_doconv(lambda m: m.update(colour="red")), r"unknown header field\(s\) \['colour'\] for version 2"),
    (edit_doconv(lambda m: m.update(format="other")), "format must be 'doconv-interchange'"),
    (edit_doconv(lambda m: m.update(pairing="official-torch")), "unknown pairing"),
    (edit_doconv(lambda m: m["layers"]["conv1"].update(groups=7)), "layer 'conv1': bad config.*divisible by groups"),
    (edit_doconv(lambda m: m["layers"]["conv1"].update(speed=1)), r"layer 'conv1': bad config.*\['speed'\]"),
    (edit_doconv(lambda m: m["layers"]["conv1"].update(D_mul=10)), "layer 'conv1': tensor 'W' has shape"),
    (edit_doconv(lambda m: m["layers"].pop("g")), r"tensor\(s\) \['g.D', 'g.W', 'g.bias'\] belong to no layer"),
    (edit_doconv(lambda m: m["layers"].update(extra=m["layers"]["conv1"])), "layer 'extra': tensor 'W' is missing"),
    (lambda h: h.pop("__metadata__"), "no 'doconv' metadata"),
    (lambda h: h["__metadata__"].update(doconv="{not json"), "not valid JSON"),
    (lambda h: h["__metadata__"].update(doconv=h["__metadata__"]["doconv"].replace(
        '"layers": {', '"layers": {"conv1": {}, ', 1)), r"duplicate key\(s\) \['conv1'\]"),  # the last would win
    (lambda h: h["__metadata__"].update(doconv="[" * 5000 + "]" * 5000), "nested too deeply"),
    (lambda h: h["g.bias"].update(dtype="F8_E4M3", shape=[h["g.bias"]["data_offsets"][1] - h["g.bias"]["data_offsets"][0]]),
     "a dtype NumPy cannot read"),
])
def test_damaged_header_gives_a_clear_error(saved, edit, message):
    rewrite_header(saved, edit)
    with pytest.raises(ValueError, match=message):
        doconv.load(saved)


def test_truncated_or_garbage_file(saved, tmp_path):
    data = open(saved, "rb").read()
    open(saved, "wb").write(data[:-10])
    with pytest.raises(ValueError, match="damaged or not a safetensors file"):
        doconv.load(saved)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match="damaged"):
        doconv.load(junk)
    with pytest.raises(FileNotFoundError):
        doconv.load(tmp_path / "absent.safetensors")


def test_save_checks_shapes_and_never_leaves_a_partial_file(tmp_path):
    path = tmp_path / "keep.safetensors"
    good = {"a": (CASES[2].config, CASES[2].params(0))}
    doconv.save(path, good)
    before = path.read_bytes()
    c = DOConvConfig(3, 5, 3)
    bad = DOConvParams(np.zeros((5, 3, 8)), np.zeros((3, 9, 9)), np.zeros(5))
    with pytest.raises(ValueError, match=r"layer 'a': W has shape \(5, 3, 8\)"):
        doconv.save(path, {"a": (c, bad)})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.safetensors"]
    with pytest.raises(TypeError, match="expected a pair \\(DOConvConfig, DOConvParams\\)"):
        doconv.save(path, {"a": (c.to_dict(), bad)})
    with pytest.raises(ValueError, match="non-empty strings"):
        doconv.save(path, {"": good["a"]})


def test_load_matching_checks_layers_and_compares_resolved_configs(tmp_path):
    path = tmp_path / "m.safetensors"
    torch_style = DOConvConfig(4, 6, 3, padding=1)
    keras_style = DOConvConfig(4, 6, 3, padding="same")
    params = doconv.init_params(torch_style, rng=0)
    doconv.save(path, {"a": (torch_style, params)})
    got = doconv.load_matching(path, {"a": keras_style})
    np.testing.assert_array_equal(got["a"].W, params.W)
    with pytest.raises(ValueError, match="layer 'a': the file holds"):
        doconv.load_matching(path, {"a": DOConvConfig(4, 6, 3, padding=1, stride=2)})
    with pytest.raises(ValueError, match=r"layers the model lacks \['a'\]"):
        doconv.load_matching(path, {"b": torch_style})
    with pytest.raises(ValueError, match=r"missing from the file \['b'\]"):
        doconv.load_matching(path, {"a": torch_style, "b": torch_style})
    assert set(doconv.load_matching(path, {"a": torch_style, "b": torch_style}, strict=False)) == {"a"}


def test_save_takes_any_name_the_folder_takes_and_names_a_missing_folder(tmp_path):
    config = DOConvConfig(2, 3, 3)
    params = doconv.init_params(config, rng=0)
    long = tmp_path / ("x" * 240 + ".safetensors")  # 252 characters: the temporary name must not grow from it
    doconv.save(long, {"l": (config, params)})
    assert list(doconv.load(long)) == ["l"] and sorted(p.name for p in tmp_path.iterdir()) == [long.name]
    missing = tmp_path / "absent" / "m.safetensors"
    with pytest.raises(FileNotFoundError, match=r"cannot write .*absent/m.safetensors.*does not exist"):
        doconv.save(missing, {"l": (config, params)})


def test_save_gives_the_mode_open_would_and_writes_through_symlinks(tmp_path):
    import os
    config = DOConvConfig(2, 3, 3)
    params = doconv.init_params(config, rng=0)
    path = tmp_path / "a.safetensors"
    umask = os.umask(0o022)
    try:
        doconv.save(path, {"l": (config, params)})
    finally:
        os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o644  # mkstemp alone would give 0600
    os.chmod(path, 0o640)
    doconv.save(path, {"l": (config, params)})
    assert os.stat(path).st_mode & 0o777 == 0o640  # a replaced file keeps its mode
    link = tmp_path / "link.safetensors"
    link.symlink_to(path)
    doconv.save(link, {"m": (config, params)})
    assert link.is_symlink() and list(doconv.load(path)) == ["m"]
    with pytest.raises(IsADirectoryError):
        doconv.load(tmp_path)


def test_files_hold_floating_tensors_only(tmp_path):
    from safetensors.numpy import save_file
    config = DOConvConfig(2, 3, 3)
    params = doconv.init_params(config, rng=0)
    with pytest.raises(TypeError, match=r"layer 'l': W has dtype int64"):
        doconv.save(tmp_path / "x", {"l": (config, doconv.DOConvParams(params.W.astype(np.int64), params.D,
                                                                       params.bias))})
    path = tmp_path / "int.safetensors"
    doconv.save(path, {"l": (config, params)})
    tensors = {k: v for k, v in doconv.load(path)["l"][1].__dict__.items() if v is not None}
    header = __import__("safetensors").safe_open(str(path), "numpy").metadata()
    save_file({f"l.{k}": (v.astype(np.int8) if k == "W" else v) for k, v in tensors.items()}, str(path), header)
    with pytest.raises(ValueError, match=r"layer 'l': tensor 'W' has dtype int8"):
        doconv.load(path)

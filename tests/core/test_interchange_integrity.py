"""Files that cannot lie: SHA-256 digests, non-finite values, and the rules each format version brings."""

import hashlib
import json

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import doconv
from doconv import DOConvParams
from doconv.cases import CASES
from doconv.interchange import VERSION, config_digest, tensor_digest

SEEDS = range(6)


def random_layers(rng, dtype=None):
    """Three random layers of the case table (random D, never the identity) with random dtypes and names."""
    picks = rng.choice(len(CASES), size=3, replace=False)
    dtypes = [np.float16, np.float32, np.float64]
    return {f"block{i}.{rng.integers(100)}.conv": (CASES[k].config,
                                                    CASES[k].params(int(rng.integers(1 << 30)),
                                                                    dtype or dtypes[rng.integers(3)]))
            for i, k in enumerate(picks)}


def tensor_names(layers):
    return [(name, key) for name, (_, p) in layers.items() for key in ("W", "D", "bias") if getattr(p, key) is not None]


def read(path):
    """The file's tensors and metadata, as safetensors gives them."""
    with safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def data_region(path, tensor):
    """The absolute byte range of ``tensor``'s data: an 8-byte little-endian header length, the JSON
    header, then the data, at ``data_offsets`` relative to the header's end."""
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    start, end = json.loads(raw[8:8 + n])[tensor]["data_offsets"]
    return 8 + n + start, 8 + n + end


def with_nonfinite(rng, array):
    """A copy of ``array`` with a random number of NaN, +inf and -inf at random places; how many."""
    out = array.copy()
    count = int(rng.integers(1, min(4, out.size) + 1))
    flat = out.reshape(-1)
    flat[rng.choice(out.size, size=count, replace=False)] = rng.choice([np.nan, np.inf, -np.inf], size=count)
    return out, count


def replaced(params, key, value):
    fields = {k: getattr(params, k) for k in ("W", "D", "bias")}
    fields[key] = value
    return DOConvParams(**fields)


def assert_bit_equal(loaded, layers):
    assert loaded.keys() == layers.keys()
    for name, (config, params) in layers.items():
        assert loaded[name][0] == config
        for key in ("W", "D", "bias"):
            a, b = getattr(loaded[name][1], key), getattr(params, key)
            assert (a is None) == (b is None), (name, key)
            if a is not None:
                assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), (name, key)


def test_the_digest_is_the_documented_formula_and_covers_dtype_and_shape():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 3, 9)).astype(np.float32)
    expected = hashlib.sha256(b"float32 [4, 3, 9]\n" + a.astype("<f4").tobytes()).hexdigest()
    assert tensor_digest(a) == expected
    assert tensor_digest(a.astype(">f4")) == expected  # the bytes a file stores, whatever the byte order in memory
    assert tensor_digest(a.reshape(12, 9)) != expected  # same bytes, another shape
    assert tensor_digest(a.view(np.int32)) != expected  # same bytes, another dtype
    config = CASES[3].config.to_dict()
    assert config_digest(config) == config_digest(json.loads(json.dumps(config)))  # tuples, key order: no matter


@pytest.mark.parametrize("seed", SEEDS)
def test_a_flipped_bit_in_any_tensor_is_named_as_damage(tmp_path, seed):
    rng = np.random.default_rng(seed)
    layers = random_layers(rng)
    path = tmp_path / "m.safetensors"
    doconv.save(path, layers)
    assert_bit_equal(doconv.load(path), layers)
    names = tensor_names(layers)
    name, key = names[rng.integers(len(names))]
    start, end = data_region(path, f"{name}.{key}")
    raw = bytearray(path.read_bytes())
    raw[rng.integers(start, end)] ^= 1 << int(rng.integers(8))
    path.write_bytes(bytes(raw))
    message = rf"is damaged: layer '{name}', tensor '{key}' has SHA-256 [0-9a-f]{{16}}\.\.\., but the metadata records"
    with pytest.raises(ValueError, match=message):
        doconv.load(path)
    with pytest.raises(ValueError, match=message):  # no keyword turns the check off
        doconv.load(path, allow_nonfinite=True)


@pytest.mark.parametrize("seed", SEEDS)
def test_an_edited_digest_or_an_unsigned_config_edit_is_damage(tmp_path, seed):
    rng = np.random.default_rng(seed)
    layers = random_layers(rng)
    path = tmp_path / "m.safetensors"
    doconv.save(path, layers)
    tensors, metadata = read(path)
    names = tensor_names(layers)
    name, key = names[rng.integers(len(names))]
    header = json.loads(metadata["doconv"])
    digest = header["sha256"][name][key]
    header["sha256"][name][key] = digest[:-1] + ("0" if digest[-1] != "0" else "1")
    save_file(tensors, str(path), {"doconv": json.dumps(header)})
    with pytest.raises(ValueError, match=rf"damaged: layer '{name}', tensor '{key}' has SHA-256 {digest[:16]}"):
        doconv.load(path)

    header = json.loads(metadata["doconv"])  # a stride changed in the header (one bit flips '1' into '3')
    name = list(layers)[rng.integers(len(layers))]
    header["layers"][name]["stride"] = [3, 3]
    save_file(tensors, str(path), {"doconv": json.dumps(header)})
    with pytest.raises(ValueError, match=f"damaged: layer '{name}', its config has SHA-256"):
        doconv.load(path)

    header = json.loads(metadata["doconv"])
    del header["sha256"][name]["W"]
    save_file(tensors, str(path), {"doconv": json.dumps(header)})
    with pytest.raises(ValueError, match=f"damaged: layer '{name}', tensor 'W' has no SHA-256"):
        doconv.load(path)
    header = json.loads(metadata["doconv"])
    del header["sha256"][name]
    save_file(tensors, str(path), {"doconv": json.dumps(header)})
    with pytest.raises(ValueError, match="damaged: 'sha256' names layers"):
        doconv.load(path)


@pytest.mark.parametrize("seed", SEEDS)
def test_a_nan_written_into_a_tensor_is_refused_unless_asked_for(tmp_path, seed):
    rng = np.random.default_rng(seed)
    layers = random_layers(rng)
    path = tmp_path / "m.safetensors"
    doconv.save(path, layers)
    tensors, metadata = read(path)
    name = list(layers)[rng.integers(len(layers))]
    tensors[f"{name}.W"], count = with_nonfinite(rng, tensors[f"{name}.W"])

    save_file(tensors, str(path), metadata)  # the old metadata: its digest no longer matches
    for allow in (False, True):
        with pytest.raises(ValueError, match=f"damaged: layer '{name}', tensor 'W' has SHA-256"):
            doconv.load(path, allow_nonfinite=allow)

    header = json.loads(metadata["doconv"])  # written on purpose: digests that match
    header["sha256"][name]["W"] = tensor_digest(tensors[f"{name}.W"])
    save_file(tensors, str(path), {"doconv": json.dumps(header)})
    with pytest.raises(ValueError, match=rf"layer '{name}': tensor 'W' holds {count} non-finite value\(s\) of "
                                         rf"{tensors[f'{name}.W'].size} \(.*\); pass allow_nonfinite=True"):
        doconv.load(path)
    got = doconv.load(path, allow_nonfinite=True)
    assert got[name][1].W.tobytes() == tensors[f"{name}.W"].tobytes()
    configs = {n: c for n, (c, _) in layers.items()}
    with pytest.raises(ValueError, match=f"layer '{name}': tensor 'W' holds {count} non-finite"):
        doconv.load_matching(path, configs)
    assert doconv.load_matching(path, configs, allow_nonfinite=True)[name].W.tobytes() == tensors[f"{name}.W"].tobytes()


@pytest.mark.parametrize("seed", SEEDS)
def test_save_refuses_non_finite_values_unless_asked_and_leaves_the_file_alone(tmp_path, seed):
    rng = np.random.default_rng(seed)
    layers = random_layers(rng)
    path = tmp_path / "m.safetensors"
    doconv.save(path, layers)
    before = path.read_bytes()
    names = tensor_names(layers)
    name, key = names[rng.integers(len(names))]
    config, params = layers[name]
    bad, count = with_nonfinite(rng, getattr(params, key))
    layers[name] = (config, replaced(params, key, bad))
    with pytest.raises(ValueError, match=rf"layer '{name}': {key} holds {count} non-finite value\(s\) of {bad.size}"
                                         r" \(.*\); .*allow_nonfinite=True"):
        doconv.save(path, layers)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    doconv.save(path, layers, allow_nonfinite=True)
    with pytest.raises(ValueError, match=f"layer '{name}': tensor '{key}' holds {count} non-finite"):
        doconv.load(path)
    assert_bit_equal(doconv.load(path, allow_nonfinite=True), layers)


def test_the_three_kinds_of_non_finite_value_are_counted(tmp_path):
    config, params = CASES[2].config, CASES[2].params(4, np.float32)
    W = params.W.copy()
    W.reshape(-1)[:6] = [np.nan, np.nan, np.inf, -np.inf, -np.inf, -np.inf]
    with pytest.raises(ValueError, match=rf"W holds 6 non-finite value\(s\) of {W.size} \(2 NaN, 1 \+inf, 3 -inf\)"):
        doconv.save(tmp_path / "x.safetensors", {"l": (config, replaced(params, "W", W))})


def save_version_1(path, layers):
    """A file as version 1 of the format wrote it: the same tensors, no digests in the header."""
    tensors = {f"{name}.{key}": np.ascontiguousarray(getattr(p, key))
               for name, (_, p) in layers.items() for key in ("W", "D", "bias") if getattr(p, key) is not None}
    header = {"format": "doconv-interchange", "version": 1, "pairing": "paper",
              "layers": {name: c.to_dict() for name, (c, _) in layers.items()}}
    save_file(tensors, str(path), metadata={"doconv": json.dumps(header)})


@pytest.mark.parametrize("seed", SEEDS)
def test_version_1_files_load_without_digests_but_with_the_non_finite_rule(tmp_path, seed):
    rng = np.random.default_rng(seed)
    layers = random_layers(rng)
    path = tmp_path / "v1.safetensors"
    save_version_1(path, layers)
    assert_bit_equal(doconv.load(path), layers)
    configs = {n: c for n, (c, _) in layers.items()}
    got = doconv.load_matching(path, configs)
    assert all(got[n].W.tobytes() == p.W.tobytes() for n, (_, p) in layers.items())

    name = list(layers)[rng.integers(len(layers))]  # no digest to catch a flipped bit: it loads as stored
    start, end = data_region(path, f"{name}.W")
    raw = bytearray(path.read_bytes())
    raw[rng.integers(start, end)] ^= 1 << int(rng.integers(8))
    path.write_bytes(bytes(raw))
    assert doconv.load(path, allow_nonfinite=True)[name][1].W.tobytes() != layers[name][1].W.tobytes()

    config, params = layers[name]
    bad, count = with_nonfinite(rng, params.W)
    layers[name] = (config, replaced(params, "W", bad))
    save_version_1(path, layers)
    with pytest.raises(ValueError, match=f"layer '{name}': tensor 'W' holds {count} non-finite"):
        doconv.load(path)
    assert_bit_equal(doconv.load(path, allow_nonfinite=True), layers)

    tensors, metadata = read(path)  # a version 1 header knows no digests
    header = json.loads(metadata["doconv"])
    header["sha256"] = {}
    save_file(tensors, str(path), {"doconv": json.dumps(header)})
    with pytest.raises(ValueError, match=r"unknown header field\(s\) \['sha256'\] for version 1"):
        doconv.load(path)


def test_files_are_written_as_the_current_version_with_every_digest(tmp_path):
    layers = random_layers(np.random.default_rng(7))
    path = tmp_path / "m.safetensors"
    doconv.save(path, layers)
    tensors, metadata = read(path)
    header = json.loads(metadata["doconv"])
    assert header["version"] == VERSION == 2
    assert header["sha256"] == {name: {"config": config_digest(c.to_dict()),
                                       **{key: tensor_digest(tensors[f"{name}.{key}"])
                                          for key in ("W", "D", "bias") if getattr(p, key) is not None}}
                                for name, (c, p) in layers.items()}


def test_big_endian_arrays_are_stored_as_their_values(tmp_path):
    config, params = CASES[5].config, CASES[5].params(2, np.float64)
    big = DOConvParams(*(None if a is None else a.astype(">f8") for a in (params.W, params.D, params.bias)))
    path = tmp_path / "be.safetensors"
    doconv.save(path, {"l": (config, big)})
    _, got = doconv.load(path)["l"]
    assert np.array_equal(got.W, params.W) and np.array_equal(got.D, params.D)

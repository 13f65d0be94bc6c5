"""The canonical interchange file: a whole model's DO-Conv layers, readable without any framework.

A ``safetensors`` file (no pickle anywhere). For a layer named ``name`` (a PyTorch module path, a
Keras layer name, a Gluon block path; a bare PyTorch or Gluon layer, the model itself, is
:data:`ROOT_NAME`, and a one-layer file loads into any bare layer) the tensors are ``name.W``,
``name.D`` (the *full* D, in the canonical layout and the paper's pairing) and ``name.bias``; absent
ones are simply not stored. Each tensor keeps its own dtype (float16, float32 or float64; a backend
casts them to its layer's). The header's metadata holds one JSON document under the key ``"doconv"``::

    {"format": "doconv-interchange", "version": 2, "pairing": "paper",
     "layers": {name: DOConvConfig.to_dict(), ...},
     "sha256": {name: {"config": hex, "W": hex, "D": hex, "bias": hex}, ...}}

A tensor's digest is the SHA-256 of the line ``"<dtype> <shape>\\n"`` (e.g. ``float32 [8, 4, 9]``)
followed by its little-endian bytes; a config's is the SHA-256 of its JSON with sorted keys and no
spaces (:func:`tensor_digest`, :func:`config_digest`). The rules, by the file's version:

- version 2 (what :func:`save` writes): every config and tensor must match its digest, else the file is damaged.
- version 1 (no ``"sha256"``): there are no digests to check; every other rule applies.
- a version above :data:`VERSION` was written by a newer doconv: refused, asking for an upgrade.
- any version: a tensor holding NaN or +-inf is refused unless the caller passes
  ``allow_nonfinite=True``; :func:`save` follows the same rule, so it never writes a file that a
  default :func:`load` refuses.

Writing is atomic (a temporary file, flushed to disk, renamed over the target), so a crash never
leaves half a file. Reading checks everything and raises ``ValueError`` naming the layer and the
problem: a damaged or truncated file, a digest that does not match, an unknown version or field, a
duplicate key, a missing or unexpected tensor, a wrong shape or dtype, non-finite values.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from typing import Dict, Mapping, Optional, Tuple

import numpy as np

from .compose import DOConvParams
from .config import DOConvConfig

FORMAT = "doconv-interchange"
#: The version :func:`save` writes; :func:`load` reads every version from 1 up to it.
VERSION = 2
#: The header fields of each version (a later version may add fields: they are checked after the version).
HEADER_KEYS = {1: {"format", "version", "pairing", "layers"},
               2: {"format", "version", "pairing", "layers", "sha256"}}
TENSORS = ("W", "D", "bias")
#: The dtypes a file may hold (NumPy reads no bfloat16: store float32 instead).
DTYPES = ("float16", "float32", "float64")
#: The name of a bare PyTorch or Gluon layer (a model that is one DO-Conv layer; Gluon's own names come
#: from a process-wide counter). Keras writes a bare layer under its layer name.
ROOT_NAME = "self"

Layers = Mapping[str, Tuple[DOConvConfig, DOConvParams]]


def tensor_digest(array: np.ndarray) -> str:
    """SHA-256 (hex) of ``"<dtype> <shape>\\n"`` and the array's little-endian bytes: a tensor read back
    with another dtype or shape, or with any byte changed, has another digest."""
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    digest = hashlib.sha256(f"{array.dtype.name} {list(array.shape)}\n".encode())
    digest.update(array.data)
    return digest.hexdigest()


def config_digest(config: dict) -> str:
    """SHA-256 (hex) of a config dict as JSON with sorted keys and no spaces (how the header's JSON
    parses back does not change it)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _nonfinite(array: np.ndarray) -> Optional[str]:
    """None for a finite array, else how many values are NaN, +inf and -inf (out of how many)."""
    finite = np.isfinite(array)
    if finite.all():
        return None
    counts = {"NaN": np.isnan(array).sum(), "+inf": np.isposinf(array).sum(), "-inf": np.isneginf(array).sum()}
    parts = ", ".join(f"{int(n)} {kind}" for kind, n in counts.items() if n)
    return f"{int(array.size - finite.sum())} non-finite value(s) of {array.size} ({parts})"


def save(path, layers: Layers, *, allow_nonfinite: bool = False) -> None:
    """Write ``{name: (config, params)}`` to ``path`` (shapes are checked against each config first).

    ValueError for a tensor holding NaN or +-inf unless ``allow_nonfinite=True`` (the same rule as
    :func:`load`, which then needs the same keyword to read the file back).
    """
    from safetensors.numpy import save_file

    if not isinstance(layers, Mapping):
        raise TypeError(f"layers must be a mapping {{name: (config, params)}}, but got {type(layers).__name__}")
    tensors: Dict[str, np.ndarray] = {}
    configs = {}
    digests = {}
    for name, entry in layers.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"layer names must be non-empty strings, but got {name!r}")
        if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], DOConvConfig)
                and isinstance(entry[1], DOConvParams)):
            raise TypeError(f"layer {name!r}: expected a pair (DOConvConfig, DOConvParams), but got {entry!r:.200}")
        config, params = entry
        params.check(config, where=f"layer {name!r}")
        configs[name] = config.to_dict()
        digests[name] = {"config": config_digest(configs[name])}
        for key in TENSORS:
            value = getattr(params, key)
            if value is not None:
                value = np.ascontiguousarray(value)
                if value.dtype.name not in DTYPES:
                    raise TypeError(f"layer {name!r}: {key} has dtype {value.dtype}; a file holds {DTYPES}")
                bad = None if allow_nonfinite else _nonfinite(value)
                if bad:
                    raise ValueError(f"layer {name!r}: {key} holds {bad}; a file holds finite values unless "
                                     f"allow_nonfinite=True (and then loads only with allow_nonfinite=True)")
                tensors[f"{name}.{key}"] = value
                digests[name][key] = tensor_digest(value)
    header = {"format": FORMAT, "version": VERSION, "pairing": "paper", "layers": configs, "sha256": digests}
    path = os.path.realpath(os.fspath(path))  # through a symlink, not over it
    if os.path.isdir(path):
        raise IsADirectoryError(f"path {path!r} is a directory")
    with replacing(path) as tmp:
        save_file(tensors, tmp, metadata={"doconv": json.dumps(header)})


@contextlib.contextmanager
def replacing(path: str):
    """Write a file atomically: yields a temporary path beside ``path``; when the block succeeds it is
    flushed to disk and renamed over ``path`` with the replaced file's permissions (else those
    ``open(path, 'w')`` gives), and on any failure it is removed, leaving ``path`` as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {path!r}: its folder {folder!r} does not exist")
    while True:  # a short name of its own, so that any name the folder takes for ``path`` fits
        tmp = os.path.join(folder, f".doconv-{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            break
        except FileExistsError:
            continue
    try:
        mode = os.stat(tmp).st_mode & 0o7777  # 0666 less the umask, read without touching the umask
        yield tmp  # (the writer may replace tmp by a file of its own, e.g. mode 0600)
        with contextlib.suppress(FileNotFoundError):
            mode = os.stat(path).st_mode & 0o7777
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _unique_keys(pairs):
    """``object_pairs_hook`` of the header's JSON: a key given twice (the last would silently win) is refused."""
    keys = [key for key, _ in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"duplicate key(s) {duplicates}")
    return dict(pairs)


def _header(where: str, metadata: Mapping[str, str]) -> dict:
    """The ``"doconv"`` header, checked field by field for the rules of its version."""
    if "doconv" not in metadata:
        raise ValueError(f"{where} has no 'doconv' metadata: not a DO-Conv interchange file")
    try:
        header = json.loads(metadata["doconv"], object_pairs_hook=_unique_keys)
    except RecursionError:
        raise ValueError(f"{where}: its 'doconv' metadata is nested too deeply to be a DO-Conv header") from None
    except ValueError as err:  # JSONDecodeError is a ValueError, and so is a duplicate key
        raise ValueError(f"{where}: its 'doconv' metadata is not valid JSON ({err})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        got = header.get("format") if isinstance(header, dict) else header
        raise ValueError(f"{where}: format must be {FORMAT!r}, but got {got!r}")
    version = header.get("version")
    if type(version) is int and version > VERSION:  # (type: not True, not 2.0)
        raise ValueError(f"{where} has format version {version}, newer than this doconv reads (versions 1 to "
                         f"{VERSION}): upgrade doconv to read it")
    if type(version) is not int or version not in HEADER_KEYS:
        raise ValueError(f"{where}: unknown format version {version!r}; this doconv reads versions 1 to {VERSION}")
    unknown = sorted(set(header) - HEADER_KEYS[version])
    if unknown:
        raise ValueError(f"{where}: unknown header field(s) {unknown} for version {version}; "
                         f"known: {sorted(HEADER_KEYS[version])}")
    if header.get("pairing") != "paper":
        raise ValueError(f"{where}: unknown pairing {header.get('pairing')!r}; expected 'paper'")
    if not isinstance(header.get("layers"), dict):
        raise ValueError(f"{where}: 'layers' must map layer names to configs")
    if version >= 2:
        digests = header.get("sha256")
        if not (isinstance(digests, dict) and all(isinstance(d, dict) for d in digests.values())):
            raise ValueError(f"{where} is damaged: 'sha256' must map layer names to {{part: digest}}")
        if set(digests) != set(header["layers"]):
            raise ValueError(f"{where} is damaged: 'sha256' names layers {sorted(digests)}, 'layers' names "
                             f"{sorted(header['layers'])}")
    return header


def _check_digest(where: str, name: str, part: str, recorded, found: str) -> None:
    if recorded is None:
        raise ValueError(f"{where} is damaged: layer {name!r}, {part} has no SHA-256 in the metadata")
    if recorded != found:
        raise ValueError(f"{where} is damaged: layer {name!r}, {part} has SHA-256 {found[:16]}..., but the "
                         f"metadata records {str(recorded)[:16]}...")


def load(path, *, allow_nonfinite: bool = False) -> Dict[str, Tuple[DOConvConfig, DOConvParams]]:
    """Read a file written by :func:`save`: ``{name: (config, params)}`` in canonical layout.

    Version 2 files are checked against their SHA-256 digests; a tensor holding NaN or +-inf is a
    ValueError unless ``allow_nonfinite=True`` (the module docstring has the rules per version).
    """
    from safetensors import safe_open

    path = os.fspath(path)
    where = f"interchange file {path!r}"
    if os.path.isdir(path):
        raise IsADirectoryError(f"{where} is a directory")
    try:
        with safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as err:  # safetensors raises its own error types for damaged headers/bodies
        if "bfloat16" in str(err) or isinstance(err, AttributeError):  # numpy has no float8_e4m3fn, ...
            raise ValueError(f"{where} holds tensors of a dtype NumPy cannot read ({err}); a file holds {DTYPES} "
                             f"(convert them to float32)") from None
        raise ValueError(f"{where} is damaged or not a safetensors file: {err}") from None
    header = _header(where, metadata)
    digests = header.get("sha256")  # None in a version 1 file
    out = {}
    used = set()
    for name, config_dict in header["layers"].items():
        if not name:
            raise ValueError(f"{where}: a layer has an empty name (save refuses them)")
        recorded = digests[name] if digests is not None else None
        if recorded is not None:  # a damaged config would otherwise read as a wrong one
            _check_digest(where, name, "its config", recorded.get("config"), config_digest(config_dict))
        try:
            config = DOConvConfig.from_dict(config_dict)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}, layer {name!r}: bad config: {err}") from None
        arrays = {}
        for key, shape in (("W", config.W_shape), ("D", config.D_shape), ("bias", config.bias_shape)):
            full = f"{name}.{key}"
            if shape is None:
                continue
            if full not in tensors:
                raise ValueError(f"{where}, layer {name!r}: tensor {key!r} is missing (expected shape {shape})")
            value = tensors[full]
            if value.shape != tuple(shape):
                raise ValueError(f"{where}, layer {name!r}: tensor {key!r} has shape {value.shape}, "
                                 f"expected {tuple(shape)} for {config!r}")
            if value.dtype.name not in DTYPES:
                raise ValueError(f"{where}, layer {name!r}: tensor {key!r} has dtype {value.dtype}, "
                                 f"expected one of {DTYPES}")
            if recorded is not None:
                _check_digest(where, name, f"tensor {key!r}", recorded.get(key), tensor_digest(value))
            bad = None if allow_nonfinite else _nonfinite(value)
            if bad:
                raise ValueError(f"{where}, layer {name!r}: tensor {key!r} holds {bad}; pass "
                                 f"allow_nonfinite=True to load it anyway")
            arrays[key] = value
            used.add(full)
        if recorded is not None:
            extra = sorted(set(recorded) - {"config"} - set(arrays))
            if extra:
                raise ValueError(f"{where} is damaged: layer {name!r} has digests for tensor(s) {extra} that "
                                 f"its config does not have")
        out[name] = (config, DOConvParams(arrays["W"], arrays.get("D"), arrays.get("bias")))
    extra = sorted(set(tensors) - used)
    if extra:
        raise ValueError(f"{where}: tensor(s) {extra} belong to no layer in the header")
    return out


def load_matching(path, configs: Mapping[str, DOConvConfig], *, strict: bool = True,
                  bare: bool = False, allow_nonfinite: bool = False) -> Dict[str, DOConvParams]:
    """Read ``path`` for a model whose DO-Conv layers have ``configs`` (``{name: config}``): ``{name: params}``.

    What every backend's ``import_canonical`` needs. ValueError when the file holds a layer the model
    lacks, when (``strict``) a model layer is absent from the file, or when a layer's config differs
    from the model's. Configs are compared by :meth:`DOConvConfig.resolved`, so a file written by
    PyTorch with ``padding=1`` loads into a Keras layer with ``padding='same'`` (the same layer).
    ``bare=True``: the model is one bare layer, and a file of one layer matches it whatever that layer's
    name (:data:`ROOT_NAME` from PyTorch or Gluon, a layer name from Keras). ``allow_nonfinite`` is
    :func:`load`'s.
    """
    bad = {name: type(c).__name__ for name, c in configs.items() if not isinstance(c, DOConvConfig)}
    if bad:
        raise TypeError(f"configs must map layer names to DOConvConfig, but got {bad}")
    stored = load(path, allow_nonfinite=allow_nonfinite)
    where = f"interchange file {os.fspath(path)!r}"
    if bare and len(stored) == 1 and len(configs) == 1:
        stored = {next(iter(configs)): next(iter(stored.values()))}
    extra = sorted(set(stored) - set(configs))
    absent = sorted(set(configs) - set(stored))
    if extra or (strict and absent):
        raise ValueError(f"{where} does not match the model: layers the model lacks {extra}, "
                         f"model layers missing from the file {absent if strict else []} "
                         f"(the model has {sorted(configs)})")
    out = {}
    for name, (config, params) in stored.items():
        if config.resolved() != configs[name].resolved():
            raise ValueError(f"{where}, layer {name!r}: the file holds {config!r} but the model's layer is "
                             f"{configs[name]!r}")
        out[name] = params
    return out

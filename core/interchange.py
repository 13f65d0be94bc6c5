"""The canonical interchange file: a whole model's DO-Conv layers, readable without any framework.

A ``safetensors`` file (no pickle anywhere). For a layer named ``name`` (a PyTorch module path, a
Keras layer name, a Gluon block path; a bare PyTorch or Gluon layer, the model itself, is
:data:`ROOT_NAME`, and a one-layer file loads into any bare layer) the tensors are ``name.W``,
``name.D`` (the *full* D, in the canonical layout and the paper's pairing) and ``name.bias``; absent
ones are simply not stored.
The header's metadata holds one JSON document under the key ``"doconv"``::

    {"format": "doconv-interchange", "version": 1, "pairing": "paper",
     "layers": {name: DOConvConfig.to_dict(), ...}}

Writing is atomic (a temporary file, flushed to disk, renamed over the target), so a crash never
leaves half a file. Reading checks everything and raises ``ValueError`` naming the layer and the
problem: an unknown version or field, a duplicate key, a missing or unexpected tensor, a wrong shape
or dtype, a damaged or truncated file. Values are not judged: NaN or Inf load as stored, and each
tensor keeps its own dtype (float16, float32 or float64; a backend casts them to its layer's).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from typing import Dict, Mapping, Tuple

import numpy as np

from .compose import DOConvParams
from .config import DOConvConfig

FORMAT = "doconv-interchange"
VERSION = 1
HEADER_KEYS = {"format", "version", "pairing", "layers"}
TENSORS = ("W", "D", "bias")
#: The dtypes a file may hold (NumPy reads no bfloat16: store float32 instead).
DTYPES = ("float16", "float32", "float64")
#: The name of a bare PyTorch or Gluon layer (a model that is one DO-Conv layer; Gluon's own names come
#: from a process-wide counter). Keras writes a bare layer under its layer name.
ROOT_NAME = "self"

Layers = Mapping[str, Tuple[DOConvConfig, DOConvParams]]


def save(path, layers: Layers) -> None:
    """Write ``{name: (config, params)}`` to ``path`` (shapes are checked against each config first)."""
    from safetensors.numpy import save_file

    if not isinstance(layers, Mapping):
        raise TypeError(f"layers must be a mapping {{name: (config, params)}}, but got {type(layers).__name__}")
    tensors: Dict[str, np.ndarray] = {}
    configs = {}
    for name, entry in layers.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"layer names must be non-empty strings, but got {name!r}")
        if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], DOConvConfig)
                and isinstance(entry[1], DOConvParams)):
            raise TypeError(f"layer {name!r}: expected a pair (DOConvConfig, DOConvParams), but got {entry!r:.200}")
        config, params = entry
        params.check(config, where=f"layer {name!r}")
        configs[name] = config.to_dict()
        for key in TENSORS:
            value = getattr(params, key)
            if value is not None:
                value = np.ascontiguousarray(value)
                if value.dtype.name not in DTYPES:
                    raise TypeError(f"layer {name!r}: {key} has dtype {value.dtype}; a file holds {DTYPES}")
                tensors[f"{name}.{key}"] = value
    header = {"format": FORMAT, "version": VERSION, "pairing": "paper", "layers": configs}
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


def load(path) -> Dict[str, Tuple[DOConvConfig, DOConvParams]]:
    """Read a file written by :func:`save`: ``{name: (config, params)}`` in canonical layout."""
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
    if "doconv" not in metadata:
        raise ValueError(f"{where} has no 'doconv' metadata: not a DO-Conv interchange file")
    try:
        header = json.loads(metadata["doconv"], object_pairs_hook=_unique_keys)
    except RecursionError:
        raise ValueError(f"{where}: its 'doconv' metadata is nested too deeply to be a DO-Conv header") from None
    except ValueError as err:  # JSONDecodeError is a ValueError, and so is a duplicate key
        raise ValueError(f"{where}: its 'doconv' metadata is not valid JSON ({err})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{where}: format must be {FORMAT!r}, but got {header.get('format') if isinstance(header, dict) else header!r}")
    if type(header.get("version")) is not int or header.get("version") != VERSION:  # not True, not 1.0
        raise ValueError(f"{where}: unknown format version {header.get('version')!r}; this doconv reads version {VERSION}")
    unknown = sorted(set(header) - HEADER_KEYS)  # (after the version: a newer version may add fields)
    if unknown:
        raise ValueError(f"{where}: unknown header field(s) {unknown}; known: {sorted(HEADER_KEYS)}")
    if header.get("pairing") != "paper":
        raise ValueError(f"{where}: unknown pairing {header.get('pairing')!r}; expected 'paper'")
    layers = header.get("layers")
    if not isinstance(layers, dict):
        raise ValueError(f"{where}: 'layers' must map layer names to configs")
    out = {}
    used = set()
    for name, config_dict in layers.items():
        if not name:
            raise ValueError(f"{where}: a layer has an empty name (save refuses them)")
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
            if tensors[full].shape != tuple(shape):
                raise ValueError(f"{where}, layer {name!r}: tensor {key!r} has shape {tensors[full].shape}, "
                                 f"expected {tuple(shape)} for {config!r}")
            if tensors[full].dtype.name not in DTYPES:
                raise ValueError(f"{where}, layer {name!r}: tensor {key!r} has dtype {tensors[full].dtype}, "
                                 f"expected one of {DTYPES}")
            arrays[key] = tensors[full]
            used.add(full)
        out[name] = (config, DOConvParams(arrays["W"], arrays.get("D"), arrays.get("bias")))
    extra = sorted(set(tensors) - used)
    if extra:
        raise ValueError(f"{where}: tensor(s) {extra} belong to no layer in the header")
    return out


def load_matching(path, configs: Mapping[str, DOConvConfig], *, strict: bool = True,
                  bare: bool = False) -> Dict[str, DOConvParams]:
    """Read ``path`` for a model whose DO-Conv layers have ``configs`` (``{name: config}``): ``{name: params}``.

    What every backend's ``import_canonical`` needs. ValueError when the file holds a layer the model
    lacks, when (``strict``) a model layer is absent from the file, or when a layer's config differs
    from the model's. Configs are compared by :meth:`DOConvConfig.resolved`, so a file written by
    PyTorch with ``padding=1`` loads into a Keras layer with ``padding='same'`` (the same layer).
    ``bare=True``: the model is one bare layer, and a file of one layer matches it whatever that layer's
    name (:data:`ROOT_NAME` from PyTorch or Gluon, a layer name from Keras).
    """
    bad = {name: type(c).__name__ for name, c in configs.items() if not isinstance(c, DOConvConfig)}
    if bad:
        raise TypeError(f"configs must map layer names to DOConvConfig, but got {bad}")
    stored = load(path)
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

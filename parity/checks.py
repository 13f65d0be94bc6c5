"""The checks: every framework layer against the core, and every framework against every other one.

Per (framework, case, dtype), with D randomised around I_fill (:meth:`doconv.cases.Case.params`); the
expected values are the core's, computed in float64 from the same (dtype-rounded) parameters and input:

==================  ===============================================================================
``forward``         training-mode output, for kernel and feature composition (paper Fig. 3-b / 3-a)
``grad x/W/D/bias`` the framework's autograd of ``sum(u * out)`` against :func:`doconv.selfcheck.layer_vjp`;
                    the gradient w.r.t. the stored delta D' is compared with dL/dD (D = I_fill + D')
``fold kernel``     the backend's ``fold`` gives the plain conv's kernel W' = D^T o W and the bias
``fold forward``    that plain conv's output
``interchange``     ``export_canonical`` -> ``doconv.load`` gives the layer's config and arrays;
                    ``import_canonical`` into a fresh layer gives them back and the same output
``official``        random arrays in the official code's layout (``import_official``) give the official
                    layer's output (its composed kernel in its own channel pairing); where the paper's
                    pairing cannot express it, ``refold=False`` must refuse and ``refold=True`` must match
``fresh kernel``    inference output after a write no hook can see (``raw_write``: torch ``.data``, the
                    Keras backend variable, an MXNet NDArray in place) and after ``set_params``; inside
                    the backend's ``cached()`` scope the kernel is composed once (a W/D write made there,
                    breaking the scope's promise, is not seen where M*N > 1; a 1x1 kernel is W itself)
                    and leaving the scope forgets it
``sgd``             a few steps of the framework's SGD optimizer against the same steps done by the core
==================  ===============================================================================

Cross-framework (``cross``): the layer trained by ``sgd`` in framework A (so D' is not zero) is written
with A's ``export_canonical`` and read into framework B; B's output must equal A's on A's input.

Tolerances are :func:`doconv.tolerance` of the dtype (see :mod:`doconv.parity`), never per check, except
that the core's own finite-difference VJP check keeps its documented 1e-6 (:mod:`doconv.selfcheck`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import traceback
import uuid
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from doconv import DOConvConfig, DOConvParams, compose, conv, forward, load, max_error, tolerance
from doconv.cases import CASES, Case
from doconv.compose import identity_fill
from doconv.interchange import replacing
from doconv.layouts import official_params, official_shapes, to_paper_pairing
from doconv import selfcheck
from doconv.selfcheck import layer_vjp

from .frameworks import Framework, Layer

COMPOSITIONS = ("kernel", "feature")
#: SGD protocol of the ``sgd`` / ``cross`` checks: plain SGD, no momentum, no weight decay.
SGD_LR, SGD_STEPS = 0.5, 3
CHECK_ORDER = ("forward", "grad x", "grad W", "grad D", "grad bias", "fold kernel", "fold forward", "interchange",
               "official", "fresh kernel", "sgd", "cross")
PAIRING_OF = {"torch": "official-torch", "tf": "official-tf", "gluon": "official-gluon"}


@dataclasses.dataclass
class Result:
    """One comparison: ``error`` is :func:`doconv.max_error` (inf when it raised, with the message in ``note``)."""

    framework: str
    check: str
    case: str
    dtype: str
    error: float
    tolerance: float
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.error <= self.tolerance  # NaN and inf fail

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["error"] = self.error if math.isfinite(self.error) else str(self.error)
        out["passed"] = self.passed
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Result":
        data = {k: v for k, v in data.items() if k != "passed"}
        data["error"] = float(data["error"])
        if data["error"] < 0:  # max_error is >= 0, inf when the check raised, NaN when it compared NaNs
            raise ValueError(f"result {data!r} has a negative error")
        tol = data.get("tolerance")
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < math.inf:
            raise ValueError(f"result {data!r} has no positive finite tolerance")
        return cls(**data)


class Context:
    """The inputs of one (case, dtype): parameters, input, output cotangent, and the float64 references."""

    def __init__(self, case: Case, dtype: str, seed: int):
        self.case, self.dtype, self.config = case, dtype, case.config
        self.params = case.params(seed, dtype)
        self.x = case.input(seed, dtype)
        out_shape = self.config.output_shape(self.x.shape)
        rng = np.random.default_rng(seed + 20_000)
        # Scaled so that sum(u * out) has O(1) gradients whatever the output size.
        self.u = (rng.normal(size=out_shape) / math.sqrt(np.prod(out_shape))).astype(dtype)
        self.p64 = self.params.astype(np.float64)
        self.x64, self.u64 = self.x.astype(np.float64), self.u.astype(np.float64)
        self.tol = tolerance(dtype)
        self.rng = np.random.default_rng(seed + 30_000)
        self._expected = None

    @property
    def expected(self) -> np.ndarray:
        if self._expected is None:
            self._expected = forward(self.x64, self.p64, self.config)
        return self._expected


def params_error(actual: DOConvParams, expected: DOConvParams) -> float:
    """Worst :func:`doconv.max_error` over W, D and bias (inf when one is present and the other is not)."""
    worst = 0.0
    for key in ("W", "D", "bias"):
        a, e = getattr(actual, key), getattr(expected, key)
        if (a is None) != (e is None):
            return float("inf")
        if a is not None:
            worst = max(worst, max_error(a, e))
    return worst


def same_geometry(a: DOConvConfig, b: DOConvConfig, spatial) -> bool:
    """Equal configs once padding is resolved to per-side pads for this input size.

    Gluon has only symmetric int padding, so its layer records ``'same'`` at stride 1 as the pads it
    means; that is the same layer for every input size (odd kernels) or for this one.
    """
    return dataclasses.replace(a, padding=a.pads(*spatial)) == dataclasses.replace(b, padding=b.pads(*spatial))


# ---- mapping the framework's stored variables to canonical W, D, bias --------------------------------

def probe_layout(fw: Framework, config: DOConvConfig, dtype: str) -> Dict[str, Tuple[str, np.ndarray]]:
    """How each stored variable maps to the canonical arrays: ``{variable: (canonical name, flat indices)}``.

    Sets W, D' and bias to distinct integer codes through ``set_params`` and reads the stored variables
    back: each stored element names the canonical element it holds. Works for any storage layout a
    backend chooses (transposes, reshapes, HWIO...) and checks that every canonical element is stored
    exactly once. Integer codes are exact in float32 (< 2^24), and D' = (I_fill + code) - I_fill is too.
    """
    sizes = {"W": int(np.prod(config.W_shape)), "D": int(np.prod(config.D_shape)) if config.has_D else 0,
             "bias": config.out_channels if config.bias else 0}
    offsets, start = {}, 1
    for key in ("W", "D", "bias"):
        offsets[key] = start
        start += sizes[key]
    code = lambda key, shape: (offsets[key] + np.arange(sizes[key])).reshape(shape).astype(dtype)  # noqa: E731
    params = DOConvParams(code("W", config.W_shape),
                          None if not config.has_D else code("D", config.D_shape) + identity_fill(config.MN, config.S, dtype),
                          code("bias", config.bias_shape) if config.bias else None)
    layer = fw.build(config, dtype)
    fw.set_params(layer, params)
    mapping, seen = {}, []
    for var, value in fw.trainables(layer).items():
        codes = np.rint(np.asarray(value, dtype=np.float64)).astype(np.int64).ravel()
        owners = {key for key in offsets if sizes[key] and np.all((codes >= offsets[key]) &
                                                                     (codes < offsets[key] + sizes[key]))}
        if len(owners) != 1:
            raise ValueError(f"{fw.name}: stored variable {var!r} (shape {np.shape(value)}) does not hold the "
                             f"elements of exactly one of W, D', bias after set_params")
        owner = owners.pop()
        mapping[var] = (owner, codes - offsets[owner])
        seen.append((owner, codes - offsets[owner]))
    for key in ("W", "D", "bias"):
        idx = np.concatenate([i for k, i in seen if k == key] or [np.zeros(0, np.int64)])
        if sizes[key] and not np.array_equal(np.sort(idx), np.arange(sizes[key])):
            raise ValueError(f"{fw.name}: the trainable variables do not store each element of {key} exactly once")
    return mapping


def to_canonical(raw: Dict[str, np.ndarray], mapping, config: DOConvConfig) -> Dict[str, np.ndarray]:
    """Stored-layout arrays (gradients or updates) -> canonical W, D, bias via :func:`probe_layout`."""
    shapes = {"W": config.W_shape, "D": config.D_shape, "bias": config.bias_shape}
    out = {}
    for var, (owner, index) in mapping.items():
        if var not in raw:
            raise ValueError(f"no gradient/value for stored variable {var!r} (got {sorted(raw)})")
        flat = out.setdefault(owner, np.zeros(int(np.prod(shapes[owner]))))
        flat[index] = np.asarray(raw[var], dtype=np.float64).ravel()
    return {k: v.reshape(shapes[k]) for k, v in out.items()}


# ---- the per-case checks ------------------------------------------------------------------------------

def _built(fw: Framework, ctx: Context, composition: str = "kernel") -> Layer:
    layer = fw.build(ctx.config, ctx.dtype, composition)
    fw.set_params(layer, ctx.params)
    return layer


def check_forward_and_grads(fw: Framework, ctx: Context, mapping, composition: str) -> Dict[str, float]:
    layer = _built(fw, ctx, composition)
    errors = {"forward": max_error(fw.forward(layer, ctx.x), ctx.expected)}
    dx, raw = fw.gradients(layer, ctx.x, ctx.u)
    grads = to_canonical(raw, mapping, ctx.config)
    grads["x"] = dx
    for name, want in layer_vjp(ctx.u64, ctx.x64, ctx.p64, ctx.config).items():
        errors[f"grad {name}"] = max_error(grads[name], want) if name in grads else float("inf")
    return errors


def check_fold(fw: Framework, ctx: Context) -> Dict[str, float]:
    kernel, bias, plain = fw.fold(_built(fw, ctx))
    want_bias = ctx.p64.bias
    bias_err = (0.0 if bias is None and want_bias is None else float("inf") if (bias is None) != (want_bias is None)
                else max_error(bias, want_bias))
    return {"fold kernel": max(max_error(kernel, compose(ctx.p64, ctx.config)), bias_err),
            "fold forward": max_error(plain(ctx.x), ctx.expected)}


def check_interchange(fw: Framework, ctx: Context, tmp: str) -> float:
    path = os.path.join(tmp, "interchange.safetensors")
    fw.export_canonical(_built(fw, ctx), path)
    (config, params), = load(path).values()
    if not same_geometry(config, ctx.config, ctx.x.shape[2:]):
        raise AssertionError(f"exported config {config!r} differs from {ctx.config!r}")
    fresh = fw.build(ctx.config, ctx.dtype)
    fw.import_foreign(fresh, path)  # a fresh layer has a fresh name in Keras and Gluon
    return max(params_error(params, ctx.p64), params_error(fw.get_params(fresh), ctx.p64),
               max_error(fw.forward(fresh, ctx.x), ctx.expected))


def official_arrays(config: DOConvConfig, flavour: str, rng, dtype: str) -> Dict[str, np.ndarray]:
    """Random arrays in the official layout (deltas of D random too), identity ``d_diag`` as official torch saves."""
    arrays = {k: rng.normal(size=shape).astype(dtype) for k, shape in official_shapes(config, flavour).items()}
    if "D" in arrays:
        arrays["D"] *= np.asarray(0.5 / math.sqrt(config.S), dtype)
    if "d_diag" in arrays:
        arrays["d_diag"] = np.broadcast_to(identity_fill(config.MN, config.S, dtype), config.D_shape).copy()
    return arrays


def check_official(fw: Framework, ctx: Context) -> Optional[float]:
    flavour, config = fw.official_flavour, ctx.config
    if flavour is None:
        return None
    if config.rank != 2:  # the official code has 2-D layers only: an import must be refused, never guessed
        flat = dataclasses.replace(config, rank=2, kernel_size=(1, config.MN), stride=1, dilation=1, padding=0)
        try:
            fw.import_official(fw.build(config, ctx.dtype), official_arrays(flat, flavour, ctx.rng, ctx.dtype))
        except ValueError:
            return 0.0  # refused, with a ValueError: what the check asks of another rank
        raise AssertionError(f"import_official accepted 2-D official arrays into a {config.rank}-D layer")
    if not fw.official_supports(config):
        return None
    arrays = official_arrays(config, flavour, ctx.rng, ctx.dtype)
    theirs = official_params(arrays, config, flavour).astype(np.float64)
    pairing = PAIRING_OF[flavour]
    expected = conv(ctx.x64, compose(theirs, config, pairing=pairing), theirs.bias, stride=config.stride,
                    padding=config.padding, dilation=config.dilation, groups=config.groups,
                    padding_mode=config.padding_mode)
    layer = fw.build(config, ctx.dtype)
    try:
        to_paper_pairing(theirs, config, pairing)
        expressible = True
    except ValueError:
        expressible = False
    if not expressible:
        try:
            fw.import_official(layer, arrays, refold=False)
        except ValueError:
            pass
        else:
            raise AssertionError("import_official(refold=False) accepted a grouped official layer whose pairing "
                                 "the paper's cannot express (its D/W split would silently change the layer)")
        if config.S < config.MN:  # refolding writes their W' into W: a rank-S (D_mul < M*N) layer cannot
            try:
                fw.import_official(layer, arrays, refold=True)
            except ValueError:
                return None  # refused clearly: nothing to compare
            raise AssertionError("import_official(refold=True) accepted a D_mul < M*N layer, which cannot hold "
                                 "the official composed kernel")
    fw.import_official(layer, arrays, refold=not expressible)
    return max_error(fw.forward(layer, ctx.x), expected)


def check_fresh_kernel(fw: Framework, ctx: Context, mapping) -> float:
    layer = _built(fw, ctx)
    errors = [max_error(fw.forward(layer, ctx.x, training=False), ctx.expected)]
    p = ctx.p64

    def moved(scale, keys):
        """Random deltas of the stored variables named by ``keys``, and the canonical params they give."""
        deltas = {k: (scale * (mapping[k][0] in keys) * ctx.rng.normal(size=np.shape(v))).astype(ctx.dtype)
                  for k, v in fw.trainables(layer).items()}
        canonical = to_canonical(deltas, mapping, ctx.config)
        return deltas, DOConvParams(*(None if getattr(p, k) is None else getattr(p, k) + canonical[k]
                                      for k in ("W", "D", "bias")))

    deltas, p = moved(0.25, ("W", "D", "bias"))
    fw.raw_write(layer, deltas)  # the default path composes from the parameters as they are now
    fresh = forward(ctx.x64, p, ctx.config)
    errors.append(max_error(fw.forward(layer, ctx.x, training=False), fresh))
    with fw.cached(layer):
        errors.append(max_error(fw.forward(layer, ctx.x, training=False), fresh))
        deltas, p = moved(0.25, ("W", "D"))
        fw.raw_write(layer, deltas)  # breaks the scope's promise: the scope's kernel must be the one used ...
        # ... where there is one to cache (1x1: W' is W) and the framework's scope serves inference calls
        # (Keras on JAX traces every call, so its scope holds nothing and the write is seen)
        held = ctx.config.has_D and fw.scope_serves_inference
        scoped = fresh if held else forward(ctx.x64, p, ctx.config)
        errors.append(max_error(fw.forward(layer, ctx.x, training=False), scoped))
    errors.append(max_error(fw.forward(layer, ctx.x, training=False), forward(ctx.x64, p, ctx.config)))
    other = ctx.case.params(ctx.rng.integers(1 << 30), ctx.dtype)
    fw.set_params(layer, other)
    errors.append(max_error(fw.forward(layer, ctx.x, training=False), forward(ctx.x64, other.astype(np.float64),
                                                                               ctx.config)))
    return max(errors)


def core_sgd(ctx: Context, lr: float = SGD_LR, steps: int = SGD_STEPS) -> DOConvParams:
    """What ``steps`` plain SGD steps on ``sum(u * out)`` must give (float64; D' moves as D does)."""
    p = ctx.p64
    for _ in range(steps):
        grads = layer_vjp(ctx.u64, ctx.x64, p, ctx.config)
        p = DOConvParams(*(None if getattr(p, k) is None else getattr(p, k) - lr * grads[k]
                           for k in ("W", "D", "bias")))
    return p


def check_sgd(fw: Framework, ctx: Context) -> Tuple[float, Layer]:
    layer = _built(fw, ctx)
    fw.sgd(layer, ctx.x, ctx.u, SGD_LR, SGD_STEPS)
    want = core_sgd(ctx)
    err = max(params_error(fw.get_params(layer), want),
              max_error(fw.forward(layer, ctx.x, training=False), forward(ctx.x64, want, ctx.config)))
    return err, layer


# ---- artifacts: the trained layers every other framework must read --------------------------------------

def dirname(framework: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", framework)


def write_artifact(root: str, fw: Framework, ctx: Context, layer: Layer) -> None:
    """``root/<framework>/<dtype>/<case>.safetensors`` (the backend's export) and ``.io.safetensors`` (x, output)."""
    from safetensors.numpy import save_file
    folder = os.path.join(root, dirname(fw.name), ctx.dtype)
    os.makedirs(folder, exist_ok=True)
    fw.export_canonical(layer, os.path.join(folder, f"{ctx.case.id}.safetensors"))
    y = np.ascontiguousarray(fw.forward(layer, ctx.x, training=False))
    save_file({"x": np.ascontiguousarray(ctx.x), "y": y}, os.path.join(folder, f"{ctx.case.id}.io.safetensors"))


def write_manifest(root: str, fw: Framework, done: Dict[str, List[str]], seed: int) -> None:
    folder = os.path.join(root, dirname(fw.name))
    os.makedirs(folder, exist_ok=True)
    cases = {c.id: {"config": c.config.to_dict(), "input_shape": list(c.input_shape)} for c in CASES}
    # export_id: a report that read these artifacts records it, so a later export over them shows its results stale
    manifest = {"format": "doconv-parity-artifacts", "version": 1, "framework": fw.name, "family": fw.family,
                "export_id": uuid.uuid4().hex, "seed": seed, "sgd": {"lr": SGD_LR, "steps": SGD_STEPS}, "trained": done,
                "cases": {i: cases[i] for ids in done.values() for i in ids}}
    with replacing(os.path.join(folder, "manifest.json")) as tmp, open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)


def _read_manifest(path: str) -> dict:
    """One manifest written by :func:`write_manifest`; anything else is a ValueError naming ``path``."""
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path!r} is not a readable doconv-parity-artifacts manifest: {err}") from None
    ok = (isinstance(manifest, dict) and manifest.get("format") == "doconv-parity-artifacts"
          and manifest.get("version") == 1 and isinstance(manifest.get("framework"), str)
          and isinstance(manifest.get("cases"), dict) and isinstance(manifest.get("trained"), dict)
          and all(isinstance(ids, list) for ids in manifest["trained"].values()))
    if not ok:
        raise ValueError(f"{path!r} is not a doconv-parity-artifacts version 1 manifest")
    return manifest


def read_manifests(root: str) -> List[dict]:
    """Every framework's manifest under ``root`` (a damaged or foreign one is a ValueError naming the file)."""
    out = []
    if os.path.isdir(root):
        for name in sorted(os.listdir(root)):
            path = os.path.join(root, name, "manifest.json")
            if os.path.isfile(path):
                manifest = _read_manifest(path)
                manifest["folder"] = os.path.join(root, name)
                out.append(manifest)
    return out


def check_cross(target: Framework, manifest: dict, case: Case, dtype: str) -> float:
    """Framework ``manifest['framework']``'s trained layer, read into ``target``, gives the same output."""
    from safetensors.numpy import load_file
    recorded = manifest["cases"][case.id]
    if (not same_geometry(DOConvConfig.from_dict(recorded["config"]), case.config, case.input_shape[2:])
            or tuple(recorded["input_shape"]) != case.input_shape):
        raise AssertionError(f"case {case.id!r} was exported with a different definition {recorded}: the two "
                             f"environments run different doconv versions")
    folder = os.path.join(manifest["folder"], dtype)
    io = load_file(os.path.join(folder, f"{case.id}.io.safetensors"))
    layer = target.build(case.config, dtype)
    target.import_foreign(layer, os.path.join(folder, f"{case.id}.safetensors"))
    return max_error(target.forward(layer, io["x"], training=False), io["y"])


# ---- tasks ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Task:
    label: str
    run: Callable[[], List[Result]]


def _guard(framework: str, checks: Sequence[str], case: str, dtype: str, tol: float, body) -> List[Result]:
    """Run ``body`` (-> {check: error}); an exception fails every check it was to produce, with its message."""
    try:
        return [Result(framework, check, case, dtype, error, tol) for check, error in body().items()
                if error is not None]
    except Exception as err:  # noqa: BLE001 -- a crashing adapter is a failed check, reported, never fatal
        where = traceback.extract_tb(err.__traceback__)[-1]
        first = next((line for line in str(err).splitlines() if line.strip()), "")
        note = f"{type(err).__name__}: {first} ({os.path.basename(where.filename)}:{where.lineno})"
        return [Result(framework, check, case, dtype, float("inf"), tol, note[:500]) for check in checks]


def framework_tasks(fw: Framework, cases: Iterable[Case], dtypes: Sequence[str], seed: int, tmp: str,
                    artifacts: Optional[str], compositions: Sequence[str] = COMPOSITIONS) -> Tuple[List[Task], dict]:
    """One task per (case, dtype) running every check; trained layers go to ``artifacts`` when given."""
    tasks, done = [], {}
    for dtype in (d for d in dtypes if d in fw.dtypes):
        for case in (c for c in cases if not (c.features & fw.unsupported)):
            def run(case=case, dtype=dtype) -> List[Result]:
                ctx = Context(case, dtype, seed)
                results, mapping = [], {}
                grads = [f"grad {k}" for k, present in (("x", True), ("W", True), ("D", ctx.config.has_D),
                                                       ("bias", ctx.config.bias)) if present]
                guard = lambda checks, body: results.extend(  # noqa: E731
                    _guard(fw.name, checks, case.id, dtype, ctx.tol, body))
                guard(grads, lambda: mapping.update(probe_layout(fw, ctx.config, dtype)) or {})
                for composition in compositions:
                    guard(["forward", *grads], lambda c=composition: check_forward_and_grads(fw, ctx, mapping, c))
                guard(["fold kernel", "fold forward"], lambda: check_fold(fw, ctx))
                guard(["interchange"], lambda: {"interchange": check_interchange(fw, ctx, tmp)})
                guard(["official"], lambda: {"official": check_official(fw, ctx)})
                guard(["fresh kernel"], lambda: {"fresh kernel": check_fresh_kernel(fw, ctx, mapping)})

                def sgd():
                    err, layer = check_sgd(fw, ctx)
                    if artifacts is not None:
                        write_artifact(artifacts, fw, ctx, layer)
                        done.setdefault(dtype, []).append(case.id)
                    return {"sgd": err}
                guard(["sgd"], sgd)
                return results
            tasks.append(Task(f"{fw.name} {case.id} [{dtype}]", run))
    return tasks, done


def cross_tasks(target: Framework, manifests: Sequence[dict], cases: Iterable[Case],
                dtypes: Sequence[str]) -> List[Task]:
    """One task per (source manifest, case, dtype) that ``target`` supports and the source trained."""
    wanted = {c.id: c for c in cases if not (c.features & target.unsupported)}
    tasks = []
    for manifest in manifests:
        source = manifest["framework"]
        if source == target.name:
            continue
        for dtype, ids in manifest["trained"].items():
            if dtype not in dtypes or dtype not in target.dtypes:
                continue
            for case_id in (i for i in ids if i in wanted):
                def run(manifest=manifest, source=source, case=wanted[case_id], dtype=dtype) -> List[Result]:
                    return _guard(f"{source}→{target.name}", ["cross"], case.id, dtype, tolerance(dtype),
                                  lambda: {"cross": check_cross(target, manifest, case, dtype)})
                tasks.append(Task(f"{source}→{target.name} {case_id} [{dtype}]", run))
    return tasks


def core_tasks(cases: Iterable[Case], dtypes: Sequence[str]) -> List[Task]:
    """The core's self-check (:mod:`doconv.selfcheck`, formerly ``python -m doconv``) as report rows."""
    tasks = []
    for case in cases:
        def run(case=case) -> List[Result]:
            return [Result("core", r.check, case.id, r.case.rsplit("[", 1)[1].rstrip("]"), r.error, r.tolerance)
                    for r in selfcheck.run([case], tuple(dtypes))]
        tasks.append(Task(f"core {case.id}", run))
    return tasks

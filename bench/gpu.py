"""One-command GPU benchmark of doconv.torch: whole ImageNet-shaped networks and the CPU-tuned routes.

On one GPU it finishes in a few minutes. It needs a CUDA build of torch and doconv importable (from the
repository root, ``pip install --no-deps -e .``), then::

    python bench/gpu.py --json gpu.json                 # the full run, on cuda
    python bench/gpu.py --tiny --device cpu --json x.json   # the same code on tiny shapes (seconds)

Sections (``--sections``, all by default):

1. **Training** (``training``, ``memory``): ResNet-18 and ResNet-50 (ImageNet stem, 224x224, batch 64),
   bf16 autocast, channels_last, SGD with momentum. Arms: the plain network, its DO-Conv twin
   (``doconv.torch.convert``, D randomised) with W stored ``c-major`` (the default) and ``contiguous``.
   Time per step (CUDA events), interleaved and shuffled per round, median of the per-round ratios to the
   plain network with p25-p75; then each arm alone for ``torch.cuda.max_memory_allocated`` (what the
   arm's model, optimizer and step hold).
2. **Inference** (``inference``) at batch 1 (same autocast and memory format, ``torch.no_grad()``): plain,
   the twin as it is (every call composes), inside ``doconv.torch.cached(twin)`` and folded
   (``doconv.torch.fold``).
3. **Routes** (``routes``): the choices tuned on CPU, measured on this device for ResNet's 3x3 stride-1 shapes:
   - W storage, one layer's training step (forward + backward, input gradient included): c-major
     (trains through ``conv_transpose2d`` of the reversed taps), c-major forced through compose +
     ``conv2d``, contiguous (compose + ``conv2d``), and ``nn.Conv2d`` for scale;
   - the composition alone, forward + backward (in the parameters' precision, as the layer runs it);
   - the dD product of the c-major backward, (C_in, S, C_out) x (C_in, C_out, MN): ``bmm`` against the
     grouped ``conv1d`` that the CPU float32 path uses.
   A verdict line per comparison says which is faster here, and the JSON's ``route_choice`` holds them.

``--tiny`` runs the same code with 1/8-width networks, tiny images and batches and few rounds (a smoke test,
also on CPU); the device is CUDA when available, else CPU (``--device`` forces one). On CPU there is no
allocator peak counter: memory columns read ``n/a`` (``bench/torch_models.py`` measures CPU peak RSS).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from contextlib import nullcontext
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_zoo as zoo  # noqa: E402
from harness import interleaved, summarise  # noqa: E402  (rounds and paired ratios, shared with the CPU benchmarks)

import doconv.torch as dt  # noqa: E402
import doconv.torch.functional as DF  # noqa: E402
from doconv import DOConvConfig  # noqa: E402
from doconv.torch import DOConv2d  # noqa: E402

#: Sizes of a full run and of ``--tiny``: network width, training batch, image size, rounds, calls per timing.
CONFIGS = {
    "full": {"width": 64, "batch": 64, "size": 224, "reps": 15, "warmup": 3, "infer_inner": 5,
             "route_batch": 64, "route_shapes": [[64, 56], [128, 28], [256, 14], [512, 7]], "route_inner": 5},
    "tiny": {"width": 8, "batch": 2, "size": 32, "reps": 2, "warmup": 1, "infer_inner": 1,
             "route_batch": 2, "route_shapes": [[8, 8], [16, 4]], "route_inner": 1},
}
NETWORKS = {"resnet18": 18, "resnet50": 50}
#: training arm -> W storage of its network (None: the plain network)
TRAIN_ARMS = {"plain": None, "DO-Conv c-major": "c-major", "DO-Conv contiguous": "contiguous"}
INFER_ARMS = ("plain", "DO-Conv default", "DO-Conv in cached()", "DO-Conv folded")
KEYS = ("device", "torch", "config", "training", "memory", "inference", "routes", "route_choice", "checks")


class Bench:
    """Device, autocast and timing shared by every section."""

    def __init__(self, device: torch.device, amp: bool, channels_last: bool):
        self.device, self.amp = device, amp
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp else nullcontext()

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, fn: Callable[[], None], inner: int) -> float:
        """Seconds per call of ``fn``, over ``inner`` back-to-back calls (CUDA events on a GPU)."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / inner
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) / inner

    def interleaved(self, tasks: Dict[str, Callable[[], None]], reps: int, warmup: int, inner: int = 1,
                    seed: int = 0) -> Dict[str, List[float]]:
        """:func:`harness.interleaved`, each call timed by :meth:`timed` over ``inner`` calls."""
        return interleaved(tasks, reps, warmup, seed, timed=lambda fn: self.timed(fn, inner))

    def to(self, model: nn.Module) -> nn.Module:
        return model.to(self.device, memory_format=self.memory_format)

    def images(self, batch: int, size: int, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, 3, size, size, generator=g).to(self.device, memory_format=self.memory_format)
        return x, torch.randint(0, 1000, (batch,), generator=g).to(self.device)


def network(depth: int, width: int, storage=None) -> nn.Module:
    """The plain ResNet (seeded), or its twin with W stored ``storage``."""
    torch.manual_seed(0)
    plain = zoo.resnet(depth, "imagenet", width, 1000)
    return plain if storage is None else zoo.twin(plain, storage)


def training_step(bench: Bench, model: nn.Module, x, y) -> Callable[[], None]:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        with bench.autocast():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return step


# ---- 1. training --------------------------------------------------------------------------------------

def training_model(bench: Bench, cfg: dict, name: str, arm: str) -> nn.Module:
    """Network ``name`` as training arm ``arm``, on the device; a twin whose W lost its storage in the move is
    an error (it would time the other storage)."""
    storage = TRAIN_ARMS[arm]
    model = bench.to(network(NETWORKS[name], cfg["width"], storage))
    if storage is not None:
        found = {layer.W_storage for layer in dt.doconv_layers(model).values()}
        if found != {storage}:
            raise RuntimeError(f"{name} {arm} on {bench.device}: W storage {found}, expected {storage!r}")
    return model


def training(bench: Bench, cfg: dict) -> Dict[str, dict]:
    out = {}
    x, y = bench.images(cfg["batch"], cfg["size"])
    for name in NETWORKS:
        tasks = {arm: training_step(bench, training_model(bench, cfg, name, arm), x, y) for arm in TRAIN_ARMS}
        out[name] = summarise(bench.interleaved(tasks, cfg["reps"], cfg["warmup"]), "plain")
        del tasks
        gc.collect()
    return out


def memory(bench: Bench, cfg: dict) -> Dict[str, dict]:
    """``max_memory_allocated`` of each arm alone (model, gradients, momentum and a step's activations)."""
    out = {}
    x, y = bench.images(cfg["batch"], cfg["size"])
    for name in NETWORKS:
        rows = out[name] = {}
        for arm in TRAIN_ARMS:
            if bench.device.type != "cuda":
                rows[arm] = {"max_allocated_MiB": None, "ratio": None}
                continue
            gc.collect()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(bench.device)
            torch.cuda.reset_peak_memory_stats(bench.device)
            step = training_step(bench, training_model(bench, cfg, name, arm), x, y)
            for _ in range(2):
                step()
            bench.sync()
            rows[arm] = {"max_allocated_MiB": (torch.cuda.max_memory_allocated(bench.device) - base) / 2**20}
            del step
        if bench.device.type == "cuda":
            for row in rows.values():
                row["ratio"] = row["max_allocated_MiB"] / rows["plain"]["max_allocated_MiB"]
    gc.collect()
    return out


# ---- 2. inference ---------------------------------------------------------------------------------------

def inference(bench: Bench, cfg: dict) -> Dict[str, dict]:
    out = {}
    x, _ = bench.images(1, cfg["size"])
    for name, depth in NETWORKS.items():
        plain = bench.to(network(depth, cfg["width"])).eval()
        twin = bench.to(network(depth, cfg["width"], "c-major")).eval()
        scoped = bench.to(network(depth, cfg["width"], "c-major")).eval()
        folded = bench.to(dt.fold(twin)[0]).eval()
        models = {"plain": plain, "DO-Conv default": twin, "DO-Conv in cached()": scoped, "DO-Conv folded": folded}

        def task(model):
            def run():
                with torch.no_grad(), bench.autocast():
                    model(x)
            return run
        with dt.cached(scoped):
            times = bench.interleaved({k: task(m) for k, m in models.items()}, cfg["reps"], cfg["warmup"],
                                      cfg["infer_inner"])
        out[name] = summarise(times, "plain")
    return out


# ---- 3. routes --------------------------------------------------------------------------------------------

def _layer(channels: int, storage: str, device) -> DOConv2d:
    layer = DOConv2d(channels, channels, 3, padding=1, bias=False, W_storage=storage, device=device)
    with torch.no_grad():
        layer.D.normal_(0, 0.05)
    return layer


def route_layers(bench: Bench, channels: int) -> Dict[str, tuple]:
    """One 3x3 stride-1 layer four ways, ``{name: (call, parameters)}``; the DO-Conv ones hold the same W and D."""
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(bench.device, memory_format=bench.memory_format)
    cmajor = _layer(channels, "c-major", bench.device)
    contiguous = _layer(channels, "contiguous", bench.device)
    dt.set_params(contiguous, dt.get_params(cmajor))
    if not (DF.c_major(cmajor.W, 1) and contiguous.W.is_contiguous()):
        raise RuntimeError(f"W storage not as asked on {bench.device}: c-major strides {cmajor.W.stride()}, "
                           f"contiguous strides {contiguous.W.stride()}")

    def cmajor_conv2d(x):  # the c-major W through compose + conv2d instead of conv_transpose2d
        return DF.conv(x, DF.compose_kernel(cmajor.W, cmajor.full_D(), cmajor.config), None, cmajor.config)
    return {"nn.Conv2d": (conv, list(conv.parameters())),
            "c-major, conv_transpose2d (default)": (cmajor, list(cmajor.parameters())),
            "c-major, compose + conv2d": (cmajor_conv2d, list(cmajor.parameters())),
            "contiguous, compose + conv2d": (contiguous, list(contiguous.parameters()))}


def routes(bench: Bench, cfg: dict):
    rows, checks = {}, {}
    batch = cfg["route_batch"]
    for channels, size in cfg["route_shapes"]:
        key = f"{channels}@{size}x{size}"
        fns = route_layers(bench, channels)
        g = torch.Generator().manual_seed(2)
        x = torch.randn(batch, channels, size, size, generator=g).to(bench.device, memory_format=bench.memory_format)
        x.requires_grad_(True)
        # the routes compute one correlation: checked here in fp32, with grad enabled so that each takes the
        # route it trains through
        ref = fns["c-major, compose + conv2d"][0](x).detach()
        checks[key] = {name: (fn(x).detach() - ref).abs().max().item() / ref.abs().max().item()
                       for name, (fn, _) in fns.items() if name != "nn.Conv2d"}
        cot = torch.randn(ref.shape, generator=g).to(bench.device)

        def train_task(fn, params):
            def run():
                with bench.autocast():
                    out = fn(x)
                out.backward(cot.to(out.dtype))
                x.grad = None
                for p in params:
                    p.grad = None
            return run
        layer_rows = summarise(bench.interleaved({k: train_task(*f) for k, f in fns.items()}, cfg["reps"],
                                                 cfg["warmup"], cfg["route_inner"]), "nn.Conv2d")
        compose_rows = summarise(bench.interleaved(composition_tasks(channels, bench.device), cfg["reps"],
                                                   cfg["warmup"], cfg["route_inner"]), "ComposeCMajor OIHW")
        product_rows = summarise(bench.interleaved(product_tasks(channels, bench.device), cfg["reps"],
                                                   cfg["warmup"], cfg["route_inner"]), "bmm")
        rows[key] = {"layer training step": layer_rows, "composition fwd+bwd": compose_rows,
                     "dD product": product_rows}
    return rows, checks


def composition_tasks(channels: int, device) -> Dict[str, Callable[[], None]]:
    c = DOConvConfig(channels, channels, 3, padding=1)
    g = torch.Generator().manual_seed(3)
    W = torch.randn(c.W_shape, generator=g).to(device)
    D = (torch.eye(9) + 0.05 * torch.randn(c.D_shape, generator=g)).to(device).requires_grad_(True)
    Wc = DF.to_c_major(W).requires_grad_(True)
    W = W.requires_grad_(True)
    grad = torch.randn(c.kernel_shape, generator=g).to(device)
    impls = {"ComposeCMajor OIHW": (lambda: DF.ComposeCMajor.apply(Wc, D, False), Wc, grad.reshape(
                 channels, channels, 9)),
             "ComposeCMajor reversed taps": (lambda: DF.ComposeCMajor.apply(Wc, D, True), Wc,
                                             grad.reshape(channels, channels, 9)),
             "ComposeKernel (contiguous W)": (lambda: DF.ComposeKernel.apply(W, D, 1), W,
                                              grad.reshape(channels, channels, 9)),
             "einsum (autograd)": (lambda: DF.compose_einsum(W, D, c), W, grad)}

    def task(fn, W_, g_):
        def run():
            torch.autograd.grad(fn(), (W_, D), g_)
        return run
    return {name: task(*impl) for name, impl in impls.items()}


def product_tasks(channels: int, device) -> Dict[str, Callable[[], None]]:
    """dD = X G per input channel, X (C_in, S, C_out), G (C_in, C_out, MN), as bmm and as grouped conv1d."""
    g = torch.Generator().manual_seed(4)
    cin = cout = channels
    X = torch.randn(cin, 9, cout, generator=g).to(device)
    G = torch.randn(cin, cout, 9, generator=g).to(device)

    def conv1d():
        F.conv1d(G.reshape(1, cin * cout, -1), X.reshape(cin * 9, cout, 1), groups=cin)
    return {"bmm": lambda: torch.bmm(X, G), "grouped conv1d": conv1d}


def choose(route_rows: Dict[str, dict], training_rows: Dict[str, dict]) -> Dict[str, dict]:
    """Which side of each CPU-tuned choice is faster here, summed over the route shapes."""
    def total(section, arm):
        return sum(r[section][arm]["median_ms"] for r in route_rows.values())
    pairs = {"W storage (layer training step)": ("layer training step", "c-major, conv_transpose2d (default)",
                                                 "contiguous, compose + conv2d"),
             "c-major training route": ("layer training step", "c-major, conv_transpose2d (default)",
                                        "c-major, compose + conv2d"),
             "dD product": ("dD product", "grouped conv1d", "bmm")}
    out = {}
    for label, (section, cpu_choice, other) in pairs.items():
        a, b = total(section, cpu_choice), total(section, other)
        out[label] = {"cpu_choice": cpu_choice, "other": other, "cpu_choice_ms": a, "other_ms": b,
                      "faster": cpu_choice if a <= b else other, "ratio_cpu_choice_to_other": a / b}
    for name, rows in training_rows.items():
        a, b = rows["DO-Conv c-major"]["median_ms"], rows["DO-Conv contiguous"]["median_ms"]
        out[f"W storage ({name} training step)"] = {
            "cpu_choice": "c-major", "other": "contiguous", "cpu_choice_ms": a, "other_ms": b,
            "faster": "c-major" if a <= b else "contiguous", "ratio_cpu_choice_to_other": a / b}
    return out


# ---- output -------------------------------------------------------------------------------------------------

def _ratio_table(title: str, first: str, section: Dict[str, dict]) -> str:
    lines = [f"\n{title}\n", f"| {first} | arm | median ms | ratio | ratio p25-p75 |", "|---|---|---:|---:|---|"]
    for name, rows in section.items():
        for arm, r in rows.items():
            lines.append(f"| {name} | {arm} | {r['median_ms']:.3f} | {r['ratio']:.3f} | "
                         f"{r['ratio_p25']:.3f}-{r['ratio_p75']:.3f} |")
    return "\n".join(lines)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        cudnn = torch.backends.cudnn.version()
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}, cuDNN {cudnn})"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="1/8-width networks, tiny shapes and batches, 2 rounds")
    parser.add_argument("--device", help="'cuda', 'cuda:1', 'cpu' (default: cuda when available, else cpu)")
    parser.add_argument("--json", default="gpu_bench.json", help="where to write the results (default %(default)s)")
    parser.add_argument("--reps", type=int, help="timed rounds per comparison (default: 15, --tiny 2)")
    parser.add_argument("--no-amp", action="store_true", help="float32 instead of bf16 autocast")
    parser.add_argument("--no-channels-last", action="store_true", help="NCHW activations instead of channels_last")
    parser.add_argument("--sections", default="training,memory,inference,routes")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device!r} asks for CUDA, but torch.cuda.is_available() is False")
    cfg = dict(CONFIGS["tiny" if args.tiny else "full"])
    if args.reps:
        cfg["reps"] = args.reps
    sections = args.sections.split(",")
    known = ("training", "memory", "inference", "routes")
    if any(s not in known for s in sections):
        parser.error(f"--sections must be drawn from {', '.join(known)}, but got {args.sections!r}")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    elif args.tiny:
        torch.set_num_threads(min(os.cpu_count() or 1, 2))
    bench = Bench(device, amp=not args.no_amp, channels_last=not args.no_channels_last)
    t0 = time.time()
    result = {key: {} for key in KEYS}
    result.update(device=describe(device), torch=torch.__version__,
                  config={**cfg, "tiny": args.tiny, "amp": "bf16" if bench.amp else "fp32",
                          "channels_last": not args.no_channels_last})
    print(f"# doconv.torch on {result['device']}, torch {torch.__version__}, "
          f"{result['config']['amp']} autocast, channels_last={not args.no_channels_last}, "
          f"{cfg['reps']} interleaved rounds after {cfg['warmup']} warm-up")
    size = f"{cfg['size']}x{cfg['size']}"
    if "training" in sections:
        result["training"] = training(bench, cfg)
        print(_ratio_table(f"Training step, batch {cfg['batch']}, {size} (ratio to plain):", "network",
                           result["training"]), flush=True)
    if "memory" in sections:
        result["memory"] = memory(bench, cfg)
        lines = [f"\nTraining-step memory, batch {cfg['batch']} (torch.cuda.max_memory_allocated, each arm alone):\n",
                 "| network | arm | MiB | ratio |", "|---|---|---:|---:|"]
        for name, rows in result["memory"].items():
            for arm, r in rows.items():
                mib = "n/a" if r["max_allocated_MiB"] is None else f"{r['max_allocated_MiB']:.0f}"
                ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.3f}"
                lines.append(f"| {name} | {arm} | {mib} | {ratio} |")
        print("\n".join(lines), flush=True)
    if "inference" in sections:
        result["inference"] = inference(bench, cfg)
        print(_ratio_table(f"Inference, batch 1, {size}, no_grad (ratio to plain):", "network",
                           result["inference"]), flush=True)
    if "routes" in sections:
        result["routes"], result["checks"] = routes(bench, cfg)
        for section, base in (("layer training step", "nn.Conv2d"), ("composition fwd+bwd", "ComposeCMajor OIHW"),
                              ("dD product", "bmm")):
            print(_ratio_table(f"Route: {section}, 3x3 stride 1, batch {cfg['route_batch']} (ratio to {base}):",
                               "C@HxW", {k: v[section] for k, v in result["routes"].items()}), flush=True)
        print("\nRoute outputs, max |difference| / max |output| against c-major compose + conv2d (fp32): " +
              "; ".join(f"{k}: " + ", ".join(f"{n} {e:.1e}" for n, e in v.items())
                        for k, v in result["checks"].items()))
        result["route_choice"] = choose(result["routes"], result.get("training") or {})
        lines = ["\nWhich is faster on this device (route shapes summed; networks per step):\n",
                 "| choice | CPU-tuned | other | ms (CPU-tuned) | ms (other) | ratio | faster here |",
                 "|---|---|---|---:|---:|---:|---|"]
        for label, r in result["route_choice"].items():
            lines.append(f"| {label} | {r['cpu_choice']} | {r['other']} | {r['cpu_choice_ms']:.3f} | "
                         f"{r['other_ms']:.3f} | {r['ratio_cpu_choice_to_other']:.3f} | {r['faster']} |")
        print("\n".join(lines))
    result["seconds"] = time.time() - t0
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{result['seconds']:.0f} s; results in {args.json}")


if __name__ == "__main__":
    main()

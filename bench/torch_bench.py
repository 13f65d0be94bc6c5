"""Benchmark of doconv.torch.DOConv2d against nn.Conv2d and the official layer's arithmetic (CPU).

A stack of 4 layers (3x3, padding 1, ReLU between), ``torch.set_num_threads(2)``, all variants in
one process and interleaved (one run of each per round), median of ``--reps`` rounds after warm-up;
ratios are to ``nn.Conv2d`` with the same shapes. Prints Markdown tables:

1. batch-1 eval inference and the SGD training step at batch 8, per variant;
2. the composition alone (forward and forward+backward) per 3x3 layer, per implementation;
3. bytes kept for backward plus parameters and gradients in a training step (the peak-memory proxy).

Usage: ``python bench/torch_bench.py [--reps 15] [--compile]``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Callable, Dict

import torch
from torch import nn

import doconv.torch.functional as DF
from doconv import DOConvConfig, identity_fill
from doconv.torch import DOConv2d, fold

SHAPES = ((256, 14), (512, 7))


class OfficialArithmetic(nn.Module):
    """The official PyTorch layer's forward, re-implemented from its description: every call forms
    D = D' + d_diag (a stored (C_in, MN, S) tensor), reshapes W (C_out, C_in/g, S) to (C_out/g, C_in, S),
    composes with ``einsum('ims,ois->oim')`` and convolves (no cache, eval or not)."""

    def __init__(self, channels: int):
        super().__init__()
        c = self.config = DOConvConfig(channels, channels, 3, padding=1)
        self.W = nn.Parameter(torch.randn(c.W_shape) / (9 * channels) ** 0.5)
        self.D = nn.Parameter(torch.zeros(c.D_shape))
        self.register_buffer("d_diag", torch.as_tensor(identity_fill(9, 9), dtype=torch.float32).expand(c.D_shape)
                             .contiguous())
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        c = self.config
        W = self.W.reshape(c.out_channels // c.groups, c.in_channels, c.S)
        kernel = torch.einsum("ims,ois->oim", self.D + self.d_diag, W).reshape(c.kernel_shape)
        return nn.functional.conv2d(x, kernel, self.bias, 1, 1)


def stack(make: Callable[[int], nn.Module], channels: int) -> nn.Module:
    layers = []
    for i in range(4):
        layers += [make(channels)] + ([nn.ReLU()] if i < 3 else [])
    return nn.Sequential(*layers)


def variants(channels: int, compositions) -> Dict[str, nn.Module]:
    torch.manual_seed(0)
    out = {"nn.Conv2d": stack(lambda c: nn.Conv2d(c, c, 3, padding=1), channels),
           "official arithmetic": stack(OfficialArithmetic, channels)}
    for comp in compositions:
        model = stack(lambda c: DOConv2d(c, c, 3, padding=1, composition=comp), channels)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, DOConv2d):
                    m.D.normal_(0, 0.1)
        out[f"DOConv2d {comp}"] = model
    out["DOConv2d folded"] = fold(out[f"DOConv2d {compositions[0]}"])[0]
    return out


def interleaved(tasks: Dict[str, Callable[[], None]], reps: int, warmup: int = 3) -> Dict[str, float]:
    """Median seconds of each task, the tasks run round-robin so load changes hit all of them.

    Each round runs the tasks in a fresh (seeded) random order: the task that follows a cache-evicting
    one (the official arithmetic allocates and writes tens of MB) pays ~20% at batch-1 eval, and a fixed
    order charged that to whichever variant came next.
    """
    times = {k: [] for k in tasks}
    order, rng = list(tasks), random.Random(0)
    for r in range(warmup + reps):
        rng.shuffle(order)
        for name in order:
            task = tasks[name]
            t0 = time.perf_counter()
            task()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def inference_task(model, x):
    model.eval()

    def run():
        with torch.no_grad():
            model(x)
    return run


def training_task(model, x):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def run():
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()
    return run


def saved_bytes(model, x) -> int:
    """Bytes of tensors autograd keeps for backward (distinct storages) + parameters + gradients."""
    model.train()
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).square().mean()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values()) + 2 * params


def composition_tasks(channels: int, with_compile: bool) -> Dict[str, Callable[[], None]]:
    c = DOConvConfig(channels, channels, 3, padding=1)
    W = torch.randn(c.W_shape, requires_grad=True)
    D = (torch.eye(9) + 0.1 * torch.randn(c.D_shape)).requires_grad_(True)
    g = torch.randn(c.kernel_shape)
    Wc = DF.to_c_major(W).requires_grad_(True)    # the layer's own layout for groups=1
    impls = {"einsum (autograd)": (DF.compose_einsum, W, g),
             "ComposeKernel (custom backward, contiguous W)": (DF.compose_kernel, W, g),
             "ComposeCMajor OIHW (c-major W; inference, stride 2)": (DF.compose_kernel, Wc, g),
             "ComposeCMajor reversed taps (c-major W; training at stride 1)":
                 (lambda W, D, c: DF.ComposeCMajor.apply(W, D, True), Wc, g.reshape(Wc.shape[0], -1, 9))}
    if with_compile:
        impls["torch.compile(einsum)"] = (torch.compile(DF.compose_einsum, dynamic=False), W, g)
    tasks = {"copy W (bound)": lambda: W.detach().clone()}
    for name, (fn, W_, g_) in impls.items():
        def fwd(fn=fn, W_=W_):
            with torch.no_grad():
                fn(W_, D, c)

        def fwd_bwd(fn=fn, W_=W_, g_=g_):
            torch.autograd.grad(fn(W_, D, c), (W_, D), g_)
        tasks[f"{name} fwd"] = fwd
        tasks[f"{name} fwd+bwd"] = fwd_bwd
    return tasks


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the composition")
    parser.add_argument("--compositions", default="kernel,feature,auto")
    args = parser.parse_args()
    torch.set_num_threads(2)
    compositions = args.compositions.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.reps} interleaved runs\n")
    print("| shape | scenario | variant | median ms | ratio to nn.Conv2d |\n|---|---|---|---:|---:|")
    memory_rows = []
    for channels, size in SHAPES:
        models = variants(channels, compositions)
        for scenario, batch, make in (("batch-1 eval inference", 1, inference_task),
                                      ("SGD training step, batch 8", 8, training_task)):
            x = torch.randn(batch, channels, size, size)
            result = interleaved({k: make(m, x) for k, m in models.items()}, args.reps)
            base = result["nn.Conv2d"]
            for name, t in result.items():
                print(f"| {channels}@{size}x{size} | {scenario} | {name} | {t * 1e3:.2f} | {t / base:.3f} |")
        x = torch.randn(8, channels, size, size)
        base = saved_bytes(models["nn.Conv2d"], x)
        for name, model in models.items():
            b = saved_bytes(model, x)
            memory_rows.append(f"| {channels}@{size}x{size} | {name} | {b / 2**20:.1f} | {b / base:.3f} |")
    print("\nComposition alone, one 3x3 layer (C_in = C_out = C, D_mul = 9):\n")
    print("| C | implementation | median ms |\n|---|---|---:|")
    for channels, _ in SHAPES:
        for name, t in interleaved(composition_tasks(channels, args.compile), args.reps).items():
            print(f"| {channels} | {name} | {t * 1e3:.2f} |")
    print("\nTraining-step memory at batch 8 (saved-for-backward + parameters + gradients):\n")
    print("| shape | variant | MiB | ratio to nn.Conv2d |\n|---|---|---:|---:|")
    print("\n".join(memory_rows))


if __name__ == "__main__":
    main()

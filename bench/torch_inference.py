"""Unfolded inference of a whole model in PyTorch: what the default costs, what ``cached`` and ``fold`` give.

A CIFAR ResNet-20 (16-64 channels, 32x32 input; :func:`doconv.experiments.models.build_model`) and its
DO-Conv twin (:func:`doconv.torch.convert`, D randomised so no identity shortcut helps), in eval mode under
``torch.no_grad()``, at batch 1 and 32. Variants, side by side in one process, interleaved, order shuffled
per round: the plain model; the twin as it is (every call composes each kernel); the twin inside
``doconv.torch.cached(model)`` (each kernel composed once for the whole run); the folded twin
(``doconv.torch.fold``, plain ``nn.Conv2d`` again). Prints a Markdown table of medians and of the median
of the per-round ratios to the plain model, with their spread (25th-75th percentile).

Usage: ``python bench/torch_inference.py [--reps 30] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import copy

import torch

import doconv.torch as dt
import harness  # timing and ratios, shared with the whole-model scripts
from doconv.experiments.models import build_model


def twin_models(seed: int = 0):
    torch.manual_seed(seed)
    plain = build_model("resnet_v1", 20, 10).eval()
    twin, _ = dt.convert(plain)
    with torch.no_grad():
        for layer in dt.doconv_layers(twin).values():
            if layer.D is not None:
                layer.D.normal_(0, 0.05)
    return {"plain": plain, "DO-Conv default": twin, "DO-Conv in cached()": copy.deepcopy(twin),
            "DO-Conv folded": dt.fold(twin)[0].eval()}


def run(models, x, reps: int, warmup: int = 5):
    """:func:`harness.interleaved` over one call of each model, the ``cached()`` arm inside its scope."""
    tasks = {name: (lambda m=m: m(x)) for name, m in models.items()}
    with dt.cached(models["DO-Conv in cached()"]), torch.no_grad():
        return harness.interleaved(tasks, reps, warmup)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CIFAR ResNet-20, eval + no_grad, "
          f"median of {args.reps} interleaved rounds\n")
    print("| batch | variant | median ms | ratio to plain (median) | ratio spread (p25-p75) |\n|---:|---|---:|---:|---|")
    for batch in (1, 32):
        x = torch.randn(batch, 3, 32, 32)
        for name, r in harness.summarise(run(twin_models(), x, args.reps)).items():
            print(f"| {batch} | {name} | {r['median_ms']:.2f} | {r['ratio']:.3f} | "
                  f"{r['ratio_p25']:.3f}-{r['ratio_p75']:.3f} |")


if __name__ == "__main__":
    main()

"""The paper's comparison protocol (Section 4): a baseline and its DO-Conv twin, the replacement the only change.

For each run r (seed = ``seed + r``):

1. ``torch.manual_seed(seed)``; build the baseline (``nn.Conv2d`` everywhere).
2. The twin is ``doconv.torch.convert(deepcopy(baseline), d_init=..., D_mul=..., include=<stages>)``: with
   identity init it computes exactly the baseline's function (W' = W), so both start from identical weights;
   the runner measures the largest output difference on a validation batch and records it.
3. Both are trained with the same hyper-parameters (SGD, momentum 0.9, weight decay 1e-4 on every parameter --
   DO-Conv's D' = D - I included, as in the paper --, lr divided by 10 at 50% and 75% of the epochs, the
   32k/48k-of-64k-iterations schedule of the CIFAR ResNets) and a data generator seeded alike, so batches and
   augmentations are identical.

Metric (Section 4.1): top-1 validation accuracy averaged over the last five epochs, then over runs; the
delta DO-Conv minus baseline is reported with its spread (the standard deviation over runs of the paired
per-run deltas) and whether |delta| exceeds that spread.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from . import data as data_lib
from .models import ARCHITECTURES, build_model, stage_prefixes

#: Number of final epochs averaged by the paper's metric.
LAST_EPOCHS = 5
D_INITS = ("identity", "random")


@dataclasses.dataclass
class ExperimentConfig:
    """Everything that defines an experiment; the defaults are the embedded quick run.

    ResNet-v1-20 at the paper's width (16/32/64 channels) on the embedded digits upsampled to 16x16,
    15 epochs, 3 runs: about 3-4 minutes on 2 busy CPU cores. ``threads=1`` because these small networks
    train about as fast on one thread and far more predictably when other processes share the cores
    (two OpenMP threads on a loaded 2-core machine swung from 0.8 s to 19 s per epoch in our measurements);
    ``threads=0`` keeps torch's default.
    """

    model: str = "resnet_v1"
    depth: int = 20
    width: int = 16
    stages: Sequence[int] = (0, 1, 2, 3)
    d_init: str = "identity"
    d_mul: str = "MN"
    epochs: int = 15
    runs: int = 3
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    dataset: str = "digits"
    data_dir: Optional[str] = None
    image_size: int = 16
    train_samples: Optional[int] = None
    test_samples: Optional[int] = None
    seed: int = 0
    device: str = "cpu"
    threads: int = 1

    def validate(self) -> "ExperimentConfig":
        """ValueError naming the option for bad values; returns self."""
        if self.model not in ARCHITECTURES:
            raise ValueError(f"model must be one of {ARCHITECTURES}, but got model={self.model!r}")
        if self.d_init not in D_INITS:
            raise ValueError(f"d_init must be one of {D_INITS}, but got d_init={self.d_init!r}")
        if self.dataset not in data_lib.DATASETS:
            raise ValueError(f"dataset must be one of {data_lib.DATASETS}, but got dataset={self.dataset!r}")
        if not isinstance(self.threads, int) or isinstance(self.threads, bool) or self.threads < 0:
            raise ValueError(f"threads must be an int >= 0 (0: torch's default), but got threads={self.threads!r}")
        for name in ("epochs", "runs", "batch_size", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, but got {name}={value!r}")
        for name in ("lr", "momentum", "weight_decay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0, but got {name}={value!r}")
        stage_prefixes(self.stages)
        parse_d_mul(self.d_mul)
        resolve_device(self.device)
        return self


# ---- options ------------------------------------------------------------------------------------

def parse_d_mul(text) -> Callable[[int, int], int]:
    """D_mul as a function of the kernel size (M, N): ``'MN'``, ``'(M+2)(N+2)'``, ``'2M2N'``, ``'M*N+3'``, ``'9'``.

    Juxtaposition multiplies (Table 8 writes (M+2)x(N+2) and (Mx2)x(Nx2)); only M, N, integers, + - * and
    parentheses are allowed.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        return lambda M, N: text
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"d_mul must be an int or an expression in M and N such as 'MN' or '(M+2)(N+2)', "
                         f"but got d_mul={text!r}")
    tokens, i, src = [], 0, text.replace(" ", "").replace("x", "*").replace("×", "*")
    while i < len(src):
        j = i + 1
        if src[i].isdigit():
            while j < len(src) and src[j].isdigit():
                j += 1
        elif src[i] not in "MN+-*()":
            raise ValueError(f"d_mul may hold only M, N, integers, + - * and parentheses, but got d_mul={text!r}")
        token = src[i:j]
        if tokens and (tokens[-1][-1].isdigit() or tokens[-1] in ("M", "N", ")")) and (
                token[0].isdigit() or token in ("M", "N", "(")):
            tokens.append("*")
        tokens.append(token)
        i = j
    try:
        tree = ast.parse("".join(tokens), mode="eval")
    except SyntaxError:
        raise ValueError(f"d_mul is not a valid expression in M and N: d_mul={text!r}") from None

    def evaluate(node, M, N):
        if isinstance(node, ast.Expression):
            return evaluate(node.body, M, N)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return {"M": M, "N": N}[node.id]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
            left, right = evaluate(node.left, M, N), evaluate(node.right, M, N)
            return left + right if isinstance(node.op, ast.Add) else (
                left - right if isinstance(node.op, ast.Sub) else left * right)
        raise ValueError(f"d_mul is not a valid expression in M and N: d_mul={text!r}")

    evaluate(tree, 3, 3)
    return lambda M, N: evaluate(tree, M, N)


def resolve_device(name: str) -> torch.device:
    """``'cpu'`` (default), ``'cuda'``/``'cuda:K'`` (ValueError when CUDA is unavailable) or ``'auto'``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:K' or 'auto', but got device={name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} was requested but CUDA is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:K' or 'auto', but got device={name!r}")
    return device


# ---- the twin -----------------------------------------------------------------------------------

def selected_convs(model: nn.Module, stages: Sequence[int]) -> List[str]:
    """Module paths of the non-pointwise ``nn.Conv2d`` layers in the selected stages (what DO-Conv replaces)."""
    prefixes = stage_prefixes(stages)
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)
            and (name + ".").startswith(prefixes)]


def make_twin(baseline: nn.Module, config: ExperimentConfig, seed: int):
    """The DO-Conv twin of ``baseline``: a converted deep copy; returns ``(twin, convert_report)``.

    Layers are grouped by kernel size so that an expression D_mul (Table 8) is evaluated per kernel.
    ``torch.manual_seed(seed)`` first, so a random D init (Table 7) is reproducible too.
    """
    from doconv.torch import convert

    d_mul = parse_d_mul(config.d_mul)
    by_kernel: Dict[tuple, List[str]] = {}
    for name in selected_convs(baseline, config.stages):
        by_kernel.setdefault(tuple(baseline.get_submodule(name).kernel_size), []).append(name)
    torch.manual_seed(seed)
    twin, report = copy.deepcopy(baseline), []
    for (M, N), names in sorted(by_kernel.items()):
        twin, rows = convert(twin, D_mul=d_mul(M, N), d_init=config.d_init, include=names, inplace=True)
        report.extend(rows)
    return twin, report


# ---- training -----------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512):
    """(mean cross-entropy, top-1 accuracy in %) in eval mode."""
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        logits = model(x[start:start + batch_size])
        target = y[start:start + batch_size]
        loss += nn.functional.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(1) == target).sum().item()
    return loss / len(y), 100.0 * correct / len(y)


def milestones(epochs: int) -> List[int]:
    """Epochs after which the learning rate is divided by 10: 50% and 75% of training."""
    return sorted({max(1, round(epochs * 0.5)), max(1, round(epochs * 0.75))})


def train_model(model: nn.Module, data: data_lib.Dataset, config: ExperimentConfig, seed: int,
                progress=None) -> Dict[str, List[float]]:
    """Train one network under the protocol; per-epoch history of losses, accuracies (%) and lr."""
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones(config.epochs), gamma=0.1)
    generator = torch.Generator().manual_seed(seed)
    history = {key: [] for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")}
    for _ in range(config.epochs):
        start, model_loss, correct, seen = time.perf_counter(), 0.0, 0, 0
        model.train()
        for x, y in data_lib.train_batches(data, config.batch_size, generator):
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            model_loss += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
        history["lr"].append(optimizer.param_groups[0]["lr"])
        schedule.step()
        val_loss, val_acc = evaluate(model, data.x_test, data.y_test)
        for key, value in (("train_loss", model_loss / seen), ("train_acc", 100.0 * correct / seen),
                           ("val_loss", val_loss), ("val_acc", val_acc),
                           ("seconds", time.perf_counter() - start)):
            history[key].append(value)
        if progress is not None:
            progress.set_postfix(val_acc=f"{val_acc:.2f}")
            progress.update(1)
    return history


def final_metric(history: Dict[str, List[float]], last: int = LAST_EPOCHS) -> float:
    """The paper's metric for one run: validation top-1 averaged over the last ``last`` epochs."""
    return float(np.mean(history["val_acc"][-last:]))


@torch.no_grad()
def max_output_difference(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    """Largest |a(x) - b(x)| in eval mode: 0 up to rounding for a twin at identity init."""
    a.eval()
    b.eval()
    return float((a(x) - b(x)).abs().max())


def run_pair(config: ExperimentConfig, data: data_lib.Dataset, seed: int, device: torch.device, bars=None):
    """One run: baseline and twin from the same seed; returns (record, trained twin)."""
    torch.manual_seed(seed)
    baseline = build_model(config.model, config.depth, data.num_classes, width=config.width,
                           in_channels=data.in_channels).to(device)
    twin, report = make_twin(baseline, config, seed)
    probe = data.x_test[:64]
    record = {"seed": seed, "initial_max_abs_diff": max_output_difference(baseline, twin, probe),
              "convert_report": [dataclasses.asdict(row) for row in report]}
    for arm, model in (("baseline", baseline), ("doconv", twin)):
        bar = bars(f"seed {seed} {arm}") if bars else None
        record[arm] = train_model(model, data, config, seed, bar)
        if bar is not None:
            bar.close()
        record[f"{arm}_metric"] = final_metric(record[arm])
    record["delta"] = record["doconv_metric"] - record["baseline_metric"]
    return record, twin


def run_experiment(config: ExperimentConfig, *, progress: bool = True, data: Optional[data_lib.Dataset] = None):
    """The whole protocol; returns ``(result_dict, last_trained_twin)`` (the dict is JSON-ready)."""
    config.validate()
    device = resolve_device(config.device)
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _run(config, device, progress, data)
    finally:
        torch.set_num_threads(threads)


def _run(config: ExperimentConfig, device: torch.device, progress: bool, data: Optional[data_lib.Dataset]):
    started = time.perf_counter()
    if data is None:
        data = data_lib.load_dataset(config.dataset, config.data_dir, config.image_size)
    data = data.subset(config.train_samples, config.test_samples).to(device)
    bars, outer = None, None
    if progress:
        from tqdm.auto import tqdm

        outer = tqdm(total=config.runs, desc="runs", unit="run", position=0)
        bars = lambda desc: tqdm(total=config.epochs, desc=desc, unit="epoch", position=1, leave=False)  # noqa: E731
    runs, twin = [], None
    for r in range(config.runs):
        record, twin = run_pair(config, data, config.seed + r, device, bars)
        runs.append(record)
        if outer is not None:
            outer.set_postfix(delta=f"{record['delta']:+.2f}")
            outer.update(1)
    if outer is not None:
        outer.close()
    from .report import summarize

    result = {"config": dataclasses.asdict(config) | {"stages": list(config.stages)},
              "data": {"name": data.name, "train": len(data.y_train), "test": len(data.y_test),
                       "shape": list(data.x_train.shape[1:]), "classes": data.num_classes},
              "environment": {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads()},
              "runs": runs, "summary": summarize(runs), "wall_seconds": time.perf_counter() - started}
    return result, twin

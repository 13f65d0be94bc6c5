"""The paper's pictures: Fig. 5 (training/validation curves) and Fig. 6 (H = sum |W' - W| heat maps).

Fig. 6 (Section 4.4, "Effect of D on W"): for a DO-Conv layer with composed kernel W' = D^T o W
(:func:`doconv.compose`) and conventional kernel W, ``H[m, n] = sum over (C_out, C_in/g) of |W'[o, c, m, n] -
W[o, c, m, n]|``, an M x N map. W is the layer's W over its first MN depth columns -- all of it for
D_mul = M*N, and the part that identity D maps onto W' for D_mul > M*N. Each map is normalised on its
own for display (min-max, as in the paper: brighter = larger); the raw maximum is printed above it.

All plotting uses matplotlib's Agg backend (files only, no display needed).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

import doconv

from .models import stage_of

ARM_STYLE = {"baseline": ("Baseline", "tab:blue"), "doconv": ("DO-Conv", "tab:red")}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str, title: Optional[str]) -> str:
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


# ---- Fig. 6 -------------------------------------------------------------------------------------

def kernel_difference(params: doconv.DOConvParams, config: doconv.DOConvConfig) -> np.ndarray:
    """H (M, N) = sum over (C_out, C_in/g) of |W' - W[..., :MN]|, W' = doconv.compose(params, config)."""
    if not config.has_D:
        raise ValueError(f"kernel_difference needs a layer with D (a non-pointwise kernel), but got {config!r}")
    if config.S < config.MN:
        raise ValueError(f"kernel_difference compares W' with W[..., :M*N], which a depthwise-separable layer "
                         f"(D_mul={config.S} < M*N={config.MN}) does not have: {config!r}")
    composed = doconv.compose(params, config)
    W = np.asarray(params.W)[..., :config.MN].reshape(config.kernel_shape)
    return np.abs(composed - W).sum(axis=(0, 1))


def layer_difference(layer) -> np.ndarray:
    """H of one ``doconv.torch.DOConv2d`` (its canonical params via ``doconv.torch.get_params``)."""
    from doconv.torch import get_params, layer_config

    config = layer_config(layer)
    return kernel_difference(get_params(layer).astype(np.float64), config)


def model_differences(model, group: Callable[[str], str] = stage_of) -> Dict[str, List[Tuple[str, np.ndarray]]]:
    """H of every DO-Conv layer of any torch model, grouped by ``group(module_path)`` (default: its stage).

    Layers without D (1x1 DO-Conv) and depthwise-separable ones (D_mul < M*N, no W[..., :M*N]) have no
    map and are left out.
    """
    from doconv.torch import DOConv2d, layer_config

    out: Dict[str, List[Tuple[str, np.ndarray]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, DOConv2d) and layer_config(module).has_D and module.D_mul >= layer_config(module).MN:
            out.setdefault(group(name), []).append((name, layer_difference(module)))
    return out


def plot_heatmaps(differences: Dict[str, Sequence[Tuple[str, np.ndarray]]], path: str,
                  title: Optional[str] = None) -> str:
    """Fig. 6 layout: one row per stage, one normalised M x N map per DO-Conv layer; writes a PNG."""
    if not differences:
        raise ValueError("plot_heatmaps: no DO-Conv layer to draw (differences is empty)")
    plt = _pyplot()
    rows, cols = len(differences), max(len(v) for v in differences.values())
    fig, axes = plt.subplots(rows, cols, figsize=(1.5 * cols + 0.9, 1.65 * rows + 0.6), squeeze=False)
    for r, (stage, layers) in enumerate(differences.items()):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(layers):
                ax.axis("off")
                continue
            _, H = layers[c]
            low, top = float(H.min()), float(H.max())
            shown = (H - low) / (top - low) if top > low else np.zeros_like(H)  # min-max, as the paper
            ax.imshow(shown, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(f"Conv{c + 1}\nmax {top:.3g}", fontsize=7)
            if c == 0:
                ax.set_ylabel(stage.capitalize(), fontsize=8)
    return _save(fig, path, title)


def plot_model_heatmaps(model, path: str, title: Optional[str] = None,
                        group: Callable[[str], str] = stage_of) -> str:
    """Fig. 6 for any torch model holding DO-Conv layers."""
    return plot_heatmaps(model_differences(model, group), path, title)


# ---- Fig. 5 -------------------------------------------------------------------------------------

def plot_curves(runs: Sequence[Dict], path: str, title: Optional[str] = None) -> str:
    """Fig. 5 style: train (dashed) and validation (solid) top-1 error per epoch, baseline vs DO-Conv.

    Lines are means over runs, bands span min..max over runs; the right panel shows the losses. Log scales
    (errors below 0.05% are drawn at 0.05%) so that the late epochs, where the arms differ, stay readable.
    ``runs`` are the run records of :func:`doconv.experiments.train.run_experiment`.
    """
    if not runs:
        raise ValueError("plot_curves: runs is empty")
    plt = _pyplot()
    fig, (err_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for arm, (label, color) in ARM_STYLE.items():
        for split, style in (("train", "--"), ("val", "-")):
            for ax, key, transform in ((err_ax, f"{split}_acc", lambda a: np.maximum(100.0 - a, 0.05)),
                                       (loss_ax, f"{split}_loss", lambda a: a)):
                values = transform(np.array([run[arm][key] for run in runs], dtype=float))
                epochs = np.arange(1, values.shape[1] + 1)
                ax.plot(epochs, values.mean(0), style, color=color, label=f"{label} {split}")
                if len(runs) > 1:
                    ax.fill_between(epochs, values.min(0), values.max(0), color=color, alpha=0.12, linewidth=0)
    from matplotlib.ticker import FormatStrFormatter, LogLocator, MaxNLocator, NullFormatter

    err_ax.set_ylabel("top-1 error (%), log scale")
    loss_ax.set_ylabel("cross-entropy, log scale")
    for ax in (err_ax, loss_ax):
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3, which="both")
    err_ax.legend(fontsize=8)
    return _save(fig, path, title)

"""Result tables: the paper's metric per arm, the delta, its spread, as Markdown, CSV and JSON."""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Dict, List

import numpy as np

#: Columns of the summary table, in order.
COLUMNS = ("model", "dataset", "stages", "d_init", "d_mul", "epochs", "runs", "baseline", "baseline_std",
           "doconv", "doconv_std", "delta", "delta_std", "delta_exceeds_spread")


def _std(values) -> float:
    """Sample standard deviation over runs (0 for a single run)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarize(runs: List[Dict]) -> Dict[str, float]:
    """Mean and spread over runs of each arm's metric and of the paired deltas.

    ``delta_exceeds_spread`` is |mean delta| > std of the per-run deltas (false with a single run, where
    no spread can be measured).
    """
    base = [r["baseline_metric"] for r in runs]
    do = [r["doconv_metric"] for r in runs]
    deltas = [r["delta"] for r in runs]
    delta, spread = float(np.mean(deltas)), _std(deltas)
    return {"baseline": float(np.mean(base)), "baseline_std": _std(base), "doconv": float(np.mean(do)),
            "doconv_std": _std(do), "delta": delta, "delta_std": spread,
            "delta_exceeds_spread": bool(len(runs) > 1 and abs(delta) > spread)}


def summary_row(result: Dict) -> Dict:
    """One table row (see :data:`COLUMNS`) from a result of :func:`doconv.experiments.train.run_experiment`."""
    cfg, summary = result["config"], result["summary"]
    model = {"plain": "Plain", "resnet_v1": "ResNet-v1", "resnet_v2": "ResNet-v2"}[cfg["model"]]
    width = "" if cfg["width"] == 16 else f" (width {cfg['width']})"
    return {"model": f"{model}-{cfg['depth']}{width}", "dataset": result["data"]["name"],
            "stages": ",".join(str(s) for s in cfg["stages"]), "d_init": cfg["d_init"], "d_mul": str(cfg["d_mul"]),
            "epochs": cfg["epochs"], "runs": cfg["runs"], **summary}


def markdown(result: Dict) -> str:
    """The summary and per-run tables in Markdown (accuracies in %, top-1, mean of the last five epochs)."""
    row, data = summary_row(result), result["data"]
    out = [f"Top-1 validation accuracy (%), mean of the last {min(5, row['epochs'])} epochs, "
           f"{row['runs']} run(s); {data['name']}: {data['train']} train / {data['test']} validation images "
           f"{'x'.join(str(s) for s in data['shape'])}; device {result['environment']['device']}.", "",
           "| Model | Data | DO-Conv stages | D init | D_mul | Epochs | Runs | Baseline | DO-Conv | Delta "
           "| Spread of delta | Delta > spread |",
           "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|",
           f"| {row['model']} | {row['dataset']} | {row['stages']} | {row['d_init']} | {row['d_mul']} "
           f"| {row['epochs']} | {row['runs']} | {row['baseline']:.2f} ± {row['baseline_std']:.2f} "
           f"| {row['doconv']:.2f} ± {row['doconv_std']:.2f} | {row['delta']:+.2f} | {row['delta_std']:.2f} "
           f"| {'yes' if row['delta_exceeds_spread'] else 'no'} |", "",
           "| Seed | Baseline | DO-Conv | Delta | Initial max abs output difference |",
           "|---:|---:|---:|---:|---:|"]
    for run in result["runs"]:
        out.append(f"| {run['seed']} | {run['baseline_metric']:.2f} | {run['doconv_metric']:.2f} "
                   f"| {run['delta']:+.2f} | {run['initial_max_abs_diff']:.1e} |")
    return "\n".join(out) + "\n"


def csv_text(result: Dict) -> str:
    """The summary row as CSV (header + one line)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerow({k: summary_row(result)[k] for k in COLUMNS})
    return buffer.getvalue()


def write_reports(result: Dict, out_dir: str) -> Dict[str, str]:
    """Write ``results.md``, ``results.csv`` and ``results.json`` into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"results.{ext}") for ext in ("md", "csv", "json")}
    with open(paths["md"], "w", encoding="utf-8") as handle:
        handle.write(markdown(result))
    with open(paths["csv"], "w", encoding="utf-8", newline="") as handle:
        handle.write(csv_text(result))
    with open(paths["json"], "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1, default=str)
    return paths

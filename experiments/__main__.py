"""``doconv-experiment`` / ``python -m doconv.experiments``: run the comparison protocol and write its report.

Writes into ``--out``: results.md, results.csv, results.json, curves.png (Fig. 5) and heatmaps.png (Fig. 6,
the trained DO-Conv twin of the last run), and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys

from .models import ARCHITECTURES, PAPER_DEPTHS
from .train import D_INITS, ExperimentConfig

DEFAULTS = ExperimentConfig()


def _model_name(text: str) -> str:
    return text.lower().replace("-", "_")


def _stages(text: str):
    try:
        return tuple(int(s) for s in text.replace(" ", "").split(",") if s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--stages takes comma-separated stage numbers such as '0,1,2,3', "
                                         f"but got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = argparse.ArgumentParser(prog="doconv-experiment", description=(
        "Train a baseline and its DO-Conv twin (identical seeds, initial weights, data order and "
        "hyper-parameters) over several seeds and report top-1 accuracy averaged over the last five epochs "
        "and over runs (paper Section 4). The default is a quick run on scikit-learn's embedded digits."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=_model_name, default=d.model, choices=ARCHITECTURES,
                   help=f"network of the paper's CIFAR table (depths {PAPER_DEPTHS})")
    p.add_argument("--depth", type=int, default=d.depth, help="6n+2: 20, 56, 110")
    p.add_argument("--width", type=int, default=d.width, help="channels of stage 1 (paper: 16)")
    p.add_argument("--stages", type=_stages, default=d.stages,
                   help="stages whose 3x3 convs become DO-Conv (Table 6): 0 = stem, 1-3 = residual stages")
    p.add_argument("--d-init", default=d.d_init, choices=D_INITS, help="initialisation of D (Table 7)")
    p.add_argument("--d-mul", default=d.d_mul,
                   help="D_mul as an expression in the kernel size M x N (Table 8): 'MN', '(M+2)(N+2)', '2M2N'")
    p.add_argument("--epochs", type=int, default=d.epochs, help="lr / 10 after 50%% and 75%% of them")
    p.add_argument("--runs", type=int, default=d.runs, help="seeds seed, seed+1, ...")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the first run")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="as the CIFAR ResNets")
    p.add_argument("--lr", type=float, default=d.lr, help="SGD learning rate")
    p.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="L2 on every parameter, D' included")
    p.add_argument("--dataset", default=d.dataset, choices=("digits", "cifar10", "cifar100"),
                   help="digits: embedded in scikit-learn; cifar10/100: needs --data-dir")
    p.add_argument("--data-dir", default=None, help="CIFAR python-pickle folder (or its parent)")
    p.add_argument("--image-size", type=int, default=d.image_size, help="digits are upsampled from 8x8 to this")
    p.add_argument("--train-samples", type=int, default=None, help="use only the first K training images")
    p.add_argument("--test-samples", type=int, default=None, help="use only the first K validation images")
    p.add_argument("--device", default=d.device, help="'cpu', 'cuda', 'cuda:K' or 'auto'")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="torch CPU threads during the run (0: torch's default); 1 is robust on shared machines")
    p.add_argument("--out", default="doconv-experiment", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = ExperimentConfig(
        model=args.model, depth=args.depth, width=args.width, stages=args.stages, d_init=args.d_init,
        d_mul=args.d_mul, epochs=args.epochs, runs=args.runs, batch_size=args.batch_size, lr=args.lr,
        momentum=args.momentum, weight_decay=args.weight_decay, dataset=args.dataset, data_dir=args.data_dir,
        image_size=args.image_size, train_samples=args.train_samples, test_samples=args.test_samples,
        seed=args.seed, device=args.device, threads=args.threads)
    from .figures import plot_curves, plot_model_heatmaps
    from .report import markdown, summary_row, write_reports
    from .train import run_experiment

    try:
        result, twin = run_experiment(config, progress=not args.no_progress)
    except ValueError as error:
        parser.error(str(error))
    paths = write_reports(result, args.out)
    if not args.no_figures:
        name = summary_row(result)["model"]
        paths["curves"] = plot_curves(result["runs"], os.path.join(args.out, "curves.png"),
                                      title=f"{name} on {result['data']['name']}: baseline vs DO-Conv "
                                            f"({len(result['runs'])} runs)")
        paths["heatmaps"] = plot_model_heatmaps(twin, os.path.join(args.out, "heatmaps.png"),
                                                title=f"H = sum |W' - W|, {name} DO-Conv, seed "
                                                      f"{result['runs'][-1]['seed']} (each map normalised)")
    print(markdown(result))
    print(f"wall time {result['wall_seconds']:.0f} s; wrote " + ", ".join(sorted(paths.values())))
    return 0


if __name__ == "__main__":
    sys.exit(main())

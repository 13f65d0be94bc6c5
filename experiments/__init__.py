"""doconv.experiments: the paper's comparison protocol (Section 4) as a command, ``doconv-experiment``.

A baseline CIFAR network (Plain / ResNet-v1 / ResNet-v2, :mod:`.models`) and its DO-Conv twin --
``doconv.torch.convert`` of a copy, identity init, so both start from the same function -- are trained
with identical seeds, data order and hyper-parameters over several seeds (:mod:`.train`); the report gives
top-1 accuracy averaged over the last five epochs and over runs, the delta and its spread (:mod:`.report`),
and the pictures of Fig. 5 and Fig. 6 (:mod:`.figures`). Data: scikit-learn's embedded digits by default,
CIFAR-10/100 from a local directory (:mod:`.data`). Needs torch, scikit-learn, matplotlib and tqdm.
"""

from .data import Dataset, load_cifar, load_dataset, load_digits
from .figures import kernel_difference, layer_difference, model_differences, plot_curves, plot_heatmaps, \
    plot_model_heatmaps
from .models import build_model, stage_of
from .report import markdown, summarize, write_reports
from .train import ExperimentConfig, make_twin, parse_d_mul, run_experiment

__all__ = ["Dataset", "ExperimentConfig", "build_model", "kernel_difference", "layer_difference", "load_cifar",
           "load_dataset", "load_digits", "make_twin", "markdown", "model_differences", "parse_d_mul", "plot_curves",
           "plot_heatmaps", "plot_model_heatmaps", "run_experiment", "stage_of", "summarize", "write_reports"]

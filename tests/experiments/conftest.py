"""Shared fixtures for the experiments runner's tests: a tiny digits set and a tiny configuration."""

import pytest

pytest.importorskip("torch", reason="doconv.experiments needs torch")
pytest.importorskip("sklearn", reason="doconv.experiments needs scikit-learn (embedded digits)")
pytest.importorskip("matplotlib", reason="doconv.experiments needs matplotlib (figures)")

from doconv.experiments import ExperimentConfig, load_digits  # noqa: E402  (after the importorskips)


@pytest.fixture(scope="session")
def digits8():
    """The embedded digits at their native 8x8, 96 training and 48 validation images."""
    return load_digits(8).subset(96, 48)


@pytest.fixture
def tiny_config():
    """One epoch of a ResNet-v1-8 of width 2: the smallest network of the family."""
    return ExperimentConfig(model="resnet_v1", depth=8, width=2, epochs=1, runs=2, batch_size=32, image_size=8,
                            train_samples=96, test_samples=48)

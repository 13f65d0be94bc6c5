"""Models of the paper's CIFAR table and the data pipeline (digits, CIFAR pickle directories, augmentation)."""

import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from doconv.experiments import data as D
from doconv.experiments.models import build_model, stage_of, stage_prefixes
from doconv.experiments.train import parse_d_mul, selected_convs


@pytest.mark.parametrize("arch,depth", [("plain", 20), ("resnet_v1", 20), ("resnet_v1", 56), ("resnet_v2", 20),
                                        ("resnet_v2", 110)])
def test_layer_counts_follow_depth(arch, depth):
    model = build_model(arch, depth, 10)
    n = (depth - 2) // 6
    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    spatial = [name for name, m in convs.items() if m.kernel_size == (3, 3)]
    assert len(spatial) + 1 == depth  # the 3x3 convs plus the classifier are the weighted layers
    assert {s: sum(stage_of(x) == s for x in spatial) for s in ("stage0", "stage1", "stage2", "stage3")} == \
        {"stage0": 1, "stage1": 2 * n, "stage2": 2 * n, "stage3": 2 * n}
    pointwise = [name for name, m in convs.items() if m.kernel_size == (1, 1)]
    assert len(pointwise) == (0 if arch == "plain" else 2)  # the two stride-2 shortcuts
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet20_has_the_papers_size():
    # He et al. report 0.27M parameters for ResNet-20 (with parameter-free shortcuts; ours add two 1x1 convs)
    count = sum(p.numel() for p in build_model("resnet_v1", 20, 10).parameters())
    assert 0.27e6 <= count <= 0.28e6, count


def test_plain_has_no_skip_and_v2_is_preactivated():
    torch.manual_seed(0)
    plain, v1 = build_model("plain", 8, 10), build_model("resnet_v1", 8, 10)
    v1.load_state_dict({k: v for k, v in plain.state_dict().items()}, strict=False)
    x = torch.randn(4, 3, 16, 16)
    plain.eval(), v1.eval()
    assert not torch.allclose(plain(x), v1(x))  # the skip links change the function
    v2 = build_model("resnet_v2", 8, 10)
    assert isinstance(v2.stage1[0].bn1, nn.BatchNorm2d) and isinstance(v2.head[0], nn.BatchNorm2d)


@pytest.mark.parametrize("kwargs,match", [
    (dict(arch="resnet_v3", depth=20), "model must be one of"),
    (dict(arch="resnet_v1", depth=21), "depth must be 6n"),
    (dict(arch="plain", depth=2), "depth must be 6n"),
])
def test_bad_model_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_model(num_classes=10, **kwargs)


def test_stage_selection():
    model = build_model("resnet_v2", 20, 10)
    assert stage_prefixes([2, 0]) == ("stage0.", "stage2.")
    names = selected_convs(model, [0, 3])
    assert names[0] == "stage0.1" and all(stage_of(n) in ("stage0", "stage3") for n in names)
    assert len(names) == 1 + 6 and not any(n.endswith("downsample") for n in names)
    with pytest.raises(ValueError, match="stages must be drawn from"):
        stage_prefixes([4])


@pytest.mark.parametrize("text,k,want", [("MN", (3, 3), 9), ("(M+2)(N+2)", (3, 3), 25), ("2M2N", (3, 3), 36),
                                         ("(M*2)*(N*2)", (3, 1), 12), ("(M x 2) x (N x 2)", (3, 3), 36),
                                         ("M*N+3", (5, 5), 28), ("12", (3, 3), 12), (20, (3, 3), 20)])
def test_parse_d_mul(text, k, want):
    assert parse_d_mul(text)(*k) == want


@pytest.mark.parametrize("text", ["", "M**N", "K*N", "MN(", "import os", None])
def test_parse_d_mul_rejects(text):
    with pytest.raises(ValueError, match="d_mul"):
        parse_d_mul(text)


# ---- data -----------------------------------------------------------------------------------------

def test_digits_are_embedded_real_and_normalised():
    data = D.load_digits(16)
    assert data.x_train.shape == (1437, 1, 16, 16) and data.x_test.shape == (360, 1, 16, 16)
    assert data.num_classes == 10 and sorted(data.y_test.unique().tolist()) == list(range(10))
    assert abs(float(data.x_train.mean())) < 1e-4 and abs(float(data.x_train.std()) - 1) < 1e-3
    # the split is fixed and stratified: each class has 35-37 validation images
    assert set(np.bincount(data.y_test.numpy())) <= {35, 36, 37}
    with pytest.raises(ValueError, match="image_size"):
        D.load_digits(4)


def test_augment_crops_and_flips_from_the_generator():
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).reshape(2, 3, 5, 6)
    out = D.augment(x, 2, True, torch.Generator().manual_seed(7))
    replay = torch.Generator().manual_seed(7)
    offsets = torch.randint(0, 5, (2, 2), generator=replay)
    flips = torch.rand(2, generator=replay) < 0.5
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        crop = padded[i, :, offsets[0, i]:offsets[0, i] + 5, offsets[1, i]:offsets[1, i] + 6]
        assert torch.equal(out[i], crop.flip(-1) if flips[i] else crop)
    assert out.stride() == x.stride()  # fresh NCHW strides (see augment's comment)


def test_same_seed_same_batches(digits8):
    first = list(D.train_batches(digits8, 32, torch.Generator().manual_seed(3)))
    second = list(D.train_batches(digits8, 32, torch.Generator().manual_seed(3)))
    other = list(D.train_batches(digits8, 32, torch.Generator().manual_seed(4)))
    assert [len(y) for _, y in first] == [32, 32, 32]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    assert not torch.equal(first[0][0], other[0][0])


def _write_cifar10(root, images=6, corrupt=None):
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (images, 3072), dtype=np.uint8),
                 b"labels": list(rng.integers(0, 10, images))}
        with open(os.path.join(folder, name), "wb") as handle:
            if name == corrupt:
                handle.write(b"not a pickle")
            else:
                pickle.dump(batch, handle)
    return folder


def test_cifar10_pickle_directory(tmp_path):
    folder = _write_cifar10(str(tmp_path))
    for where in (str(tmp_path), folder):  # the parent or the folder itself
        data = D.load_dataset("cifar10", where)
        assert data.x_train.shape == (30, 3, 32, 32) and data.x_test.shape == (6, 3, 32, 32)
        assert data.crop_pad == 4 and data.flip and data.num_classes == 10
    with open(os.path.join(folder, "data_batch_1"), "rb") as handle:
        raw = pickle.load(handle, encoding="bytes")
    pixel = raw[b"data"][0].reshape(3, 32, 32)[1, 2, 3] / 255.0  # row-major 3x32x32, channel 1 (green)
    first = np.concatenate([pickle.load(open(os.path.join(folder, f"data_batch_{i}"), "rb"), encoding="bytes")[b"data"]
                            for i in range(1, 6)]).reshape(-1, 3, 32, 32)[:, 1] / 255.0
    assert float(data.x_train[0, 1, 2, 3]) == pytest.approx((pixel - first.mean()) / first.std(), abs=1e-5)
    assert data.y_train[0] == raw[b"labels"][0]


def test_cifar_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="needs --data-dir"):
        D.load_dataset("cifar10", None)
    with pytest.raises(ValueError, match="is not a directory"):
        D.load_dataset("cifar100", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"holds neither cifar-100-python/ nor .*\['train', 'test'\] missing"):
        D.load_dataset("cifar100", str(tmp_path))
    _write_cifar10(str(tmp_path), corrupt="data_batch_3")
    with pytest.raises(ValueError, match="data_batch_3.*not a CIFAR python-pickle batch"):
        D.load_dataset("cifar10", str(tmp_path))
    with pytest.raises(ValueError, match="dataset must be one of"):
        D.load_dataset("mnist")

"""CIFAR from its official python-pickle archives, long-tailed CIFAR and CIFAR-10-C, written here in their real
on-disk formats (small), read and trained on through deit.main."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data.cifar import long_tailed_counts, long_tailed_indices, read_cifar, read_corruptions
from deit.main import cli
from deit.metrics import shot_accuracy
from tests.conftest import TINY
from tests.data_formats import write_cifar10


def test_the_official_archive_is_read_with_its_pixel_layout(tmp_path):
    first_test = write_cifar10(tmp_path)
    images, labels = read_cifar(tmp_path, 'CIFAR10', train=False)
    assert images.shape == (30, 32, 32, 3) and images.dtype == np.uint8 and labels.tolist()[:3] == [0, 0, 0]
    # the row holds the red plane, then green, then blue, each row-major
    assert images[0, 0, 1, 0] == first_test[0, 1] and images[0, 2, 3, 1] == first_test[0, 1024 + 2 * 32 + 3]
    assert images[0, 31, 31, 2] == first_test[0, 3071]
    train_images, train_labels = read_cifar(tmp_path / 'cifar-10-batches-py', 'CIFAR10', train=True)  # folder itself
    assert len(train_images) == 100 and np.bincount(train_labels).tolist() == [10] * 10
    (tmp_path / 'cifar-10-batches-py' / 'data_batch_3').write_bytes(b'not a pickle')
    with pytest.raises(ValueError, match='data_batch_3: not a CIFAR pickle batch'):
        read_cifar(tmp_path, 'CIFAR10', train=True)
    with pytest.raises(FileNotFoundError, match='no cifar-100-python/ archive'):
        read_cifar(tmp_path, 'CIFAR100', train=True)


def test_long_tailed_counts_follow_the_imbalance_formula_exactly():
    """n_c = int(n_max * (1 / ratio) ** (c / (K - 1))): the class counts and totals of the literature's splits."""
    assert long_tailed_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert [sum(long_tailed_counts(5000, 10, r)) for r in (100, 50, 10)] == [12406, 13996, 20431]
    assert sum(long_tailed_counts(500, 100, 100)) == 10847  # CIFAR-100-LT, ratio 100
    labels = np.repeat(np.arange(10), 5000)
    keep = long_tailed_indices(labels, 50)
    assert np.bincount(labels[keep]).tolist() == long_tailed_counts(5000, 10, 50)
    assert len(set(keep.tolist())) == len(keep) and np.array_equal(keep, long_tailed_indices(labels, 50))
    with pytest.raises(ValueError, match='must be >= 1'):
        long_tailed_counts(5000, 10, 0.5)


def test_shot_groups_average_their_classes():
    correct, seen = torch.tensor([9., 5., 1., 0.]), torch.tensor([10., 10., 10., 10.])
    stats = shot_accuracy(correct, seen, [500, 101, 100, 19])  # many: > 100, medium 20..100, few < 20
    assert stats == pytest.approx({'many_acc1': 70.0, 'medium_acc1': 10.0, 'few_acc1': 0.0})
    assert shot_accuracy(correct, seen, [500, 500, 100, 100])['few_acc1'] is None


def test_long_tailed_cifar_trains_one_epoch_and_reports_the_shot_groups(tmp_path):
    write_cifar10(tmp_path / 'data', per_class_train=30)
    out = tmp_path / 'run'
    assert cli(TINY + ['--data-set', 'CIFAR10_LT', '--data-path', str(tmp_path / 'data'), '--imbalance-ratio', '10',
                       '--model', 'resnet32_cifar', '--epochs', '1', '--batch-size', '8',
                       '--output_dir', str(out)]) == 0
    log = json.loads((out / 'log.txt').read_text())
    assert log['test_n'] == 30  # the balanced test batch
    # 30 .. 3 images per class: classes with >= 20 are medium-shot, the rest few-shot
    assert log['test_many_acc1'] is None and 0 <= log['test_medium_acc1'] <= 100 and 0 <= log['test_few_acc1'] <= 100


def test_cifar10c_is_the_evaluation_split_of_a_cifar10_run(tmp_path):
    write_cifar10(tmp_path)
    folder = tmp_path / 'CIFAR-10-C'
    folder.mkdir()
    labels = np.tile(np.arange(10), 2)  # as the release: severities 1..5 stacked (here 2 x 10 images)
    np.save(folder / 'labels.npy', labels.astype(np.uint8))
    for name in ('fog', 'gaussian_noise'):
        np.save(folder / f'{name}.npy', np.random.default_rng(1).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8))
    images, all_labels, names = read_corruptions(tmp_path)
    assert images.shape == (40, 32, 32, 3) and names == ['fog', 'gaussian_noise']
    assert all_labels[20:].tolist() == labels.tolist()
    assert all(isinstance(a, np.memmap) for a in images.arrays)  # read in place, not copied into memory
    assert np.array_equal(images[25], np.load(folder / 'gaussian_noise.npy')[5])
    out = tmp_path / 'run'
    assert cli(TINY + ['--data-set', 'CIFAR10C', '--data-path', str(tmp_path), '--epochs', '1',
                       '--output_dir', str(out)]) == 0
    assert json.loads((out / 'log.txt').read_text())['test_n'] == 40
    np.save(folder / 'fog.npy', np.zeros((5, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r'fog.npy: \(5, 32, 32, 3\) uint8; expected 20 x 32 x 32 x 3'):
        read_corruptions(tmp_path)


@pytest.mark.parametrize('name, params, features', [
    ('resnet32_cifar', 0.464, (64, 8, 8)),  # He et al. 2016, Table 6: 0.46M
    ('resnet18_cifar', 11.17, (512, 4, 4)), ('resnet50_cifar', 23.52, (2048, 4, 4)),
    ('resnet101_cifar', 42.51, (2048, 4, 4)), ('mobilenetv2_cifar', 2.24, (1280, 4, 4))])
def test_cifar_networks_keep_the_resolution_of_32px_inputs(name, params, features):
    """CIFAR stems: a 32x32 input reaches the last stage at 8x8 (ResNet-32) or 4x4, not 1x1 as with ImageNet's."""
    from deit.models import create_model
    model = create_model(name, 10, input_size=32).eval()
    with torch.no_grad():
        assert tuple(model.forward_features(torch.zeros(1, 3, 32, 32)).shape[1:]) == features
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params, abs=0.01)

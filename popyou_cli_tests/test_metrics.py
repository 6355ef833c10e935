"""FID / KID maths against closed forms, and the real Inception network offline."""
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

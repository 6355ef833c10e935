"""VAR with an optional adapter, trained from stored codes: what `finetune` and `train-adapter` share.

`ConditionedVAR` is the one module both stages train (and `eval` scores): VAR (maybe wrapped by peft), the frozen
quantizer that turns encode's stored codes into VAR's teacher-forcing input, and optionally a `CondAdapter`
reading an embedding column, so that cond = alpha * class_emb[class_id] + beta * adapter(embedding). finetune
trains VAR with no adapter; train-adapter trains the adapter on a frozen VAR. Conditioning dropout is VAR's own
(training mode only): the null class, and no delta, for a random `cond_drop` share of the rows.

Also here: reading an encode folder into memory (`load_encoded`), the VQ-VAE that made its codes
(`load_matching_vqvae`), the fixed held-out split (`split_rows`), the right-vs-shuffled held-out loss
(`conditioning_eval`) and the sample grids written during training (`sample_grid_fn`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from popyou_cli.core.errors import PopyouError
from popyou_cli.models.lora import base_var
from popyou_cli.models.generate import generate

HELD_OUT_SEED = 0  # the train / held-out split of train-adapter and eval: fixed, whatever the training seed
SHUFFLE_SEED = 1  # the permutation that gives each held-out row another row's embedding


class ConditionedVAR(nn.Module):
    """VAR + the frozen quantizer (+ an adapter reading batch[column]); forward(batch) -> (logits, target)."""

    def __init__(self, var: nn.Module, quantizer: nn.Module, class_id: int, *, hflip: bool,
                 adapter: nn.Module | None = None, column: str | None = None, alpha: float = 1.0,
                 beta: float = 1.0):
        super().__init__()
        if (adapter is None) != (column is None):
            raise ValueError("an adapter needs the embedding column it reads, and a column needs an adapter")
        self.var, self.quantizer, self.adapter = var, quantizer, adapter
        self.class_id, self.column, self.alpha, self.beta, self.hflip = class_id, column, alpha, beta, hflip
        self.patch_nums = base_var(var).config.patch_nums

    def forward(self, batch: dict, emb: torch.Tensor | None = None, use_delta: bool = True):
        """(logits, target codes). emb replaces the batch's embeddings (the shuffled-conditioning check);
        use_delta False leaves the adapter out (the class alone)."""
        x, target = teacher_forcing(self.quantizer, batch, self.patch_nums, self.hflip, self.training)
        delta = None
        if self.adapter is not None and use_delta:
            delta = self.adapter(batch[self.column] if emb is None else emb)
        labels = torch.full((x.shape[0],), self.class_id, device=x.device)
        return self.var(labels, x, cond_delta=delta, alpha=self.alpha, beta=self.beta), target


@dataclass
class TrainingStageResult:
    """What finetune and train-adapter report (every process returns it; the main process prints it)."""
    steps: int
    losses: list[float]  # mean loss of each optimizer step run now
    rows: int  # training rows (after dropping rows with an encode_error and the held-out ones)
    skipped: int  # rows dropped for their encode_error
    tokens_per_s: float
    world_size: int
    is_main_process: bool
    class_id: int
    checkpoint: Path | None  # the last checkpoint written

    def _head(self, stage: str) -> str:
        return f"{stage}: {self.steps} steps on {self.rows} rows x {self.world_size} process(es), "

    def __str__(self) -> str:
        return self.summary()

    def summary(self) -> str:
        raise NotImplementedError


def teacher_forcing(quantizer, batch: dict, patch_nums, hflip: bool, training: bool):
    """(VAR input x_BLCv, target codes (B, L) int64) from stored codes; with hflip, a random half of the rows
    use the codes of the mirrored image. Runs the quantizer's embedding + phi convs only, in fp32."""
    codes = batch["codes"].long()
    if hflip and training and "codes_flip" in batch:
        flip = torch.rand(codes.shape[0], device=codes.device) < 0.5
        codes = torch.where(flip[:, None], batch["codes_flip"].long(), codes)
    with torch.no_grad(), torch.autocast(codes.device.type, enabled=False):
        x = quantizer.codes_to_var_input(list(codes.split([p * p for p in patch_nums], dim=1)))
    return x, codes


def load_encoded(path: Path, *, for_stage: str, columns: list[str], patch_nums, console=None) -> dict:
    """Rows of an `encode` folder in memory: `codes` (N, L) int16, optional `codes_flip`, and `columns` (N, D)
    float16. Rows whose `encode_error` is set are dropped (and counted). Checks the VAR's patch_nums first.
    Returns {"rows", "settings" (the folder's manifest settings), "skipped", "index" (kept rows' index)}."""
    from popyou_cli.store import load_stage, read_manifest, require_columns

    ds = load_stage(path)
    require_columns(ds, ["codes", *columns], for_stage=for_stage, path=path)
    settings = (read_manifest(path) or {}).get("settings", {})
    L = sum(p * p for p in patch_nums)
    if settings.get("patch_nums") is not None and tuple(settings["patch_nums"]) != tuple(patch_nums):
        raise PopyouError(f"{path}: codes were made for patch_nums {tuple(settings['patch_nums'])}, the VAR uses "
                          f"{tuple(patch_nums)}; rerun 'popyou encode' with this VAR's VQ-VAE and patch_nums")
    keep = np.ones(len(ds), dtype=bool)
    if "encode_error" in ds.column_names:
        keep = np.array([not e for e in ds["encode_error"]], dtype=bool)
    skipped = int((~keep).sum())
    if not keep.any():
        raise PopyouError(f"{path}: all {len(ds)} rows have an encode_error; nothing to train on")
    if skipped and console is not None:
        console.print(f"{for_stage}: skipping {skipped} of {len(ds)} rows with an encode_error", highlight=False)
    cols = ["codes"] + (["codes_flip"] if "codes_flip" in ds.column_names else []) + list(columns)
    arrays = ds.select_columns(cols).with_format("numpy")[:]
    rows = {}
    for c in cols:
        a = arrays[c]
        a = np.stack(a) if a.dtype == object else a  # variable-length lists come back as arrays of arrays
        t = torch.from_numpy(np.ascontiguousarray(a[keep]))
        rows[c] = t.to(torch.int16) if c.startswith("codes") else t.to(torch.float16)
    if rows["codes"].shape[1] != L:
        raise PopyouError(f"{path}: codes have {rows['codes'].shape[1]} tokens per row, the VAR's patch_nums "
                          f"{tuple(patch_nums)} need {L}; rerun 'popyou encode' for this VAR")
    return {"rows": rows, "settings": settings, "skipped": skipped, "index": np.asarray(ds["index"])[keep]}


def load_matching_vqvae(vae: str | None, var, codes: torch.Tensor, *, data: Path, settings: dict, meta: dict,
                        var_spec: str | None = None):
    """(VQ-VAE, its spec): --vae, else the one the encode folder's manifest names, else the VAR folder's (a local
    path recorded there is relative to that folder); checked against the VAR's codebook and the stored codes,
    with a one-line error naming the fix."""
    from popyou_cli.core.files import resolve_recorded
    from popyou_cli.models.checkpoints import load_vqvae

    spec = (vae or resolve_recorded(settings.get("vqvae"), data)
            or (resolve_recorded(meta.get("vqvae"), var_spec) if var_spec else meta.get("vqvae")))
    if not spec:
        raise PopyouError(f"{data} does not name its VQ-VAE (no 'vqvae' in its manifest); pass --vae")
    vqvae = load_vqvae(spec, patch_nums=var.config.patch_nums)
    if (vqvae.config.vocab_size, vqvae.config.z_channels) != (var.config.vocab_size, var.config.z_channels):
        raise PopyouError(f"the VQ-VAE {spec} ({vqvae.config.vocab_size} codes x {vqvae.config.z_channels}) "
                          f"does not fit the VAR ({var.config.vocab_size} x {var.config.z_channels})")
    if int(codes.max()) >= var.config.vocab_size or int(codes.min()) < 0:
        raise PopyouError(f"{data}: codes outside 0..{var.config.vocab_size - 1}; were they made by {spec}?")
    return vqvae, spec


def split_rows(rows: dict[str, torch.Tensor], val_fraction: float, seed: int = HELD_OUT_SEED):
    """(train rows, held-out rows or None): a fixed permutation, independent of the training seed, so that eval
    finds the rows train-adapter held out."""
    n = len(rows["codes"])
    n_val = int(round(n * val_fraction)) if val_fraction > 0 else 0
    if n_val and n - n_val < 1:
        raise PopyouError(f"--val-fraction {val_fraction} leaves no training rows")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    tr, va = perm[n_val:].sort().values, perm[:n_val].sort().values
    return {k: v[tr] for k, v in rows.items()}, ({k: v[va] for k, v in rows.items()} if n_val else None)


@torch.no_grad()
@torch.no_grad()
def per_row_nll(model: ConditionedVAR, rows: dict, device, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Held-out next-scale loss per row (eval mode, no dropout; the mean over a row's tokens, float64 nats/token)
    with the right embeddings, with embeddings shuffled among the rows (a fixed permutation), and with no delta
    (the class alone): {right, shuffled, class_only: (N,)}. eval compares them row by row; the adapter is useful
    when right < shuffled."""
    if model.adapter is None:
        raise ValueError("per_row_nll needs a ConditionedVAR with an adapter")
    was = model.training
    model.eval()
    n = len(rows["codes"])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SHUFFLE_SEED))
    out = {"right": [], "shuffled": [], "class_only": []}
    for s in range(0, n, batch_size):
        idx = torch.arange(s, min(n, s + batch_size))
        batch = {k: v[idx].to(device) for k, v in rows.items()}
        other = rows[model.column][perm[idx]].to(device)
        for name, kw in (("right", {}), ("shuffled", {"emb": other}), ("class_only", {"use_delta": False})):
            logits, target = model(batch, **kw)
            ce = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="none")
            out[name].append(ce.view(target.shape).mean(-1).double().cpu())
    model.train(was)
    return {k: torch.cat(v) for k, v in out.items()}


def conditioning_eval(model: ConditionedVAR, rows: dict, device, batch_size: int = 64) -> dict:
    """train-adapter's eval.json: the mean of each held-out loss of per_row_nll, and the row count."""
    per_row = per_row_nll(model, rows, device, batch_size)
    return {k: float(v.mean()) for k, v in per_row.items()} | {"rows": len(per_row["right"])}


def sample_grid_fn(vqvae, *, n: int, cfg: float, top_k: int, top_p: float, device,
                   embeddings: torch.Tensor | None = None) -> Callable[[ConditionedVAR, int], torch.Tensor]:
    """The training loop's sample_fn: n images of the trained class at seeds 0..n-1 (image k uses embeddings[k]
    when the model has an adapter), as one (H, W, 3) uint8 grid."""
    from popyou_cli.core.devices import generator
    from popyou_cli.core.images import grid, to_uint8

    if embeddings is not None:
        n = min(n, len(embeddings))

    def sample(model: ConditionedVAR, step: int) -> torch.Tensor:
        var = base_var(model.var)
        delta = model.adapter(embeddings[:n].to(device)) if model.adapter is not None else None
        images = generate(var, vqvae, n, model.class_id, cfg=cfg, top_k=min(top_k, var.config.vocab_size),
                          top_p=top_p, cond_delta=delta, alpha=model.alpha, beta=model.beta,
                          generator=[generator(device, seed) for seed in range(n)])
        return grid(to_uint8(images))

    return sample

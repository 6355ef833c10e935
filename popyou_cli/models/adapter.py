"""The conditioning adapter of seed-system.md: a SigLIP embedding -> `cond_delta` for VAR.

    LayerNorm(D_emb) -> Linear(D_emb, H) -> GELU -> Linear(H, C_var) -> LayerNorm(C_var) -> L2-normalise

VAR then uses cond = alpha * class_emb[class_id] + beta * cond_delta. For SigLIP-B/16 and VAR-d16
(768 -> 1024 -> 1024) this is about 1.8M parameters, as in the original.

The two Linear layers start near zero (xavier, gain 1e-3), as the original did. Note what that does and does
not buy: the final LayerNorm + L2 normalisation rescale the output, so |cond_delta| is 1 from the first step;
the small init only makes the *direction* start out nearly independent of the embedding (the net starts as an
almost constant offset and learns what to read from the embedding). `beta` sets how strongly delta counts.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from popyou_cli.core.errors import PopyouError, short_error

WEIGHTS, CONFIG = "adapter.safetensors", "adapter.json"


@dataclass
class AdapterConfig:
    embed_dim: int  # width of the SigLIP embedding (768 for ViT-B-16-SigLIP)
    var_dim: int  # VAR's width C (1024 for VAR-d16)
    hidden_dim: int | None = None  # H; None means var_dim, the original's choice

    def __post_init__(self):
        if self.hidden_dim is None:
            self.hidden_dim = self.var_dim
        if min(self.embed_dim, self.var_dim, self.hidden_dim) < 1:
            raise PopyouError(f"adapter widths must be positive (got {asdict(self)})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterConfig":
        return cls(**{k: d[k] for k in ("embed_dim", "var_dim", "hidden_dim") if k in d})


class CondAdapter(nn.Module):
    def __init__(self, cfg: AdapterConfig, init_gain: float = 1e-3):
        super().__init__()
        self.config = cfg
        self.norm_in = nn.LayerNorm(cfg.embed_dim)
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.hidden_dim)
        self.fc2 = nn.Linear(cfg.hidden_dim, cfg.var_dim)
        self.norm_out = nn.LayerNorm(cfg.var_dim)
        for lin in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(lin.weight, gain=init_gain)
            nn.init.zeros_(lin.bias)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim) embeddings (any float dtype) -> (B, var_dim) unit-norm cond_delta in float32."""
        if emb.shape[-1] != self.config.embed_dim:
            raise PopyouError(f"embedding width {emb.shape[-1]} does not fit the adapter ({self.config.embed_dim})")
        h = self.fc2(F.gelu(self.fc1(self.norm_in(emb.float()))))
        # The output norm and the L2 step run in fp32 even under autocast: tiny pre-norm values underflow in fp16.
        with torch.autocast(emb.device.type, enabled=False):
            return F.normalize(self.norm_out(h.float()), dim=-1)


def save_adapter(adapter: CondAdapter, folder: str | Path, extra: dict | None = None) -> Path:
    """adapter.safetensors + adapter.json in `folder`, each committed atomically (files.atomic_write)."""
    from safetensors.torch import save_file

    from popyou_cli.core.files import atomic_write_json, committing

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu().float() for k, v in adapter.state_dict().items()}
    with committing(folder / WEIGHTS) as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt", "popyou_type": "adapter"})
    atomic_write_json(folder / CONFIG, {"popyou_type": "adapter", "config": adapter.config.to_dict(), **(extra or {})})
    return folder


def load_adapter(folder: str | Path, device: str | torch.device = "cpu") -> tuple[CondAdapter, dict]:
    """(adapter in eval mode, the adapter.json dict) from a folder holding adapter.safetensors + adapter.json."""
    from safetensors.torch import load_file

    folder = Path(folder)
    w, c = folder / WEIGHTS, folder / CONFIG
    if not w.is_file() or not c.is_file():
        raise PopyouError(f"{folder} holds no adapter ({WEIGHTS} + {CONFIG}); make one with 'popyou train-adapter'")
    try:
        meta = json.loads(c.read_text())
        model = CondAdapter(AdapterConfig.from_dict(meta["config"]))
        model.load_state_dict(load_file(str(w)), strict=True)
    except Exception as e:  # noqa: BLE001 - JSON, a truncated or corrupt .safetensors, shapes that do not fit
        raise PopyouError(f"{folder}: the adapter files are unreadable or do not fit together "
                          f"({short_error(e, 160, with_type=True)}); train the adapter again") from None
    return model.to(device).eval(), meta

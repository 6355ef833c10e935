"""The VAR transformer (next-scale prediction) and its KV cache (docs/architecture.md, "The VAR and VQ-VAE facts").

Names and shapes match the official `var_d*.pth` checkpoints. Two deliberate differences from the reference:
class dropout is applied only in training mode (the reference applies it in eval too), and the sampler takes
an explicit generator on the model's device, so a seed is reproducible on CPU and on CUDA.

Conditioning: cond = alpha * class_emb[label] + beta * cond_delta. It is the start token and the AdaLN
condition everywhere. The unconditional branch of CFG uses the null class (row num_classes) and no delta.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from popyou_cli.models.vqvae import OFFICIAL_PATCH_NUMS

__all__ = ["VAR", "VARConfig", "KVCache", "next_scale_loss"]


@dataclass
class VARConfig:
    depth: int = 16
    embed_dim: int = 1024
    num_heads: int = 16
    num_classes: int = 1000
    vocab_size: int = 4096
    z_channels: int = 32
    patch_nums: tuple[int, ...] = OFFICIAL_PATCH_NUMS
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    shared_aln: bool = False
    attn_l2_norm: bool = True
    cond_drop_rate: float = 0.1
    drop_path_rate: float = 0.0

    @classmethod
    def official(cls, depth: int, **kw) -> "VARConfig":
        """The build_vae_var recipe: width 64*depth, heads = depth, drop-path 0.1*depth/24."""
        return cls(depth=depth, embed_dim=64 * depth, num_heads=depth, drop_path_rate=0.1 * depth / 24, **kw)

    @property
    def L(self) -> int:
        return sum(p * p for p in self.patch_nums)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "VARConfig":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})


class KVCache:
    """Preallocated keys/values for one attention layer; scales are written in order at `len`. Allocated on the
    first append so that it takes the dtype attention runs in (fp32, or bf16/fp16 under autocast). The sampler
    may keep it across calls (static buffers for CUDA graphs): reset() starts a call, keep_rows() drops the
    unconditional half when guidance stops."""

    def __init__(self, max_len: int):
        self.max_len, self.len = max_len, 0
        self.k = self.v = None
        self._full: tuple[torch.Tensor, torch.Tensor] | None = None

    def reset(self) -> "KVCache":
        self.len = 0
        if self._full is not None:
            self.k, self.v = self._full
        return self

    def keep_rows(self, n: int) -> None:
        self.k, self.v = self.k[:n], self.v[:n]  # views: the first rows are contiguous, nothing is copied

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:
            B, H, _, hd = k.shape
            self.k = k.new_empty(B, H, self.max_len, hd)
            self.v = v.new_empty(B, H, self.max_len, hd)
            self._full = (self.k, self.v)
        end = self.len + k.shape[2]
        self.k[:, :, self.len:end] = k
        self.v[:, :, self.len:end] = v
        self.len = end
        return self.k[:, :, :end], self.v[:, :, :end]


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, l2_norm: bool):
        super().__init__()
        self.heads, self.head_dim, self.l2_norm = heads, dim // heads, l2_norm
        if l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), math.log(4.0)))  # (4.0).log(), bit for bit
            self.max_scale_mul = math.log(100)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        self.kv_cache: KVCache | None = None
        self.unfused_attention = False  # set by models/fast.py where it is the faster kernel (reduced precision)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        if getattr(self.mat_qkv, "takes_bias", False):  # an inference-only replacement from models/fast.py
            qkv = self.mat_qkv(x, bias)
        else:  # the reference reads the weight directly (so a LoRA wrapped around mat_qkv never acts)
            qkv = F.linear(x, getattr(self.mat_qkv, "base_layer", self.mat_qkv).weight, bias)
        qkv = qkv.view(B, L, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, hd)
        if self.l2_norm:
            q = F.normalize(q, dim=-1).mul(self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp())
            k = F.normalize(k, dim=-1)
        low = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
        if low is not None:
            # the attention runs in autocast's dtype anyway: cast the new keys and values once here, so that the
            # cache is kept in that dtype instead of being re-cast whole at every call (same values either way)
            q, k, v = q.to(low), k.to(low), v.to(low)
        if self.kv_cache is not None:
            # The cache holds every coarser scale; the current scale sees itself and all of them, which is
            # exactly the block-causal mask, so no mask is needed here.
            k, v = self.kv_cache.append(k, v)
        if self.unfused_attention and low is not None and attn_mask is None:
            out = unfused_attention(q, k, v, self.scale)
        else:
            if attn_mask is not None:
                attn_mask = attn_mask.to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


ATTENTION_CHUNK = 1 << 21  # scores per chunk of unfused_attention: 4 MiB in bf16, inside a 2-core CPU's L3


def unfused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v as plain batched GEMMs and a softmax, a few (batch x head) slices at a time so
    that the scores stay in the cache. In bf16 on a CPU with bf16 dot products this beats PyTorch's fused (flash)
    CPU kernel (d16 at B=4: 2.57 -> 2.39 s/image on the AMD EPYC of BENCHMARKS.md); autotune.py measures it."""
    B, H, L, hd = q.shape
    out = q.new_empty(B * H, L, hd)  # written slice by slice, then viewed as (B, H, L, hd)
    qs, ks, vs = (t.reshape(B * H, *t.shape[2:]) for t in (q, k, v))
    step = max(1, ATTENTION_CHUNK // (L * k.shape[2]))
    for i in range(0, B * H, step):
        scores = torch.bmm(qs[i:i + step], ks[i:i + step].transpose(1, 2))
        if scale != 1.0:
            scores.mul_(scale)
        torch.bmm(torch.softmax(scores, dim=-1), vs[i:i + step], out=out[i:i + step])
    return out.view(B, H, L, hd)


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class AdaLNBlock(nn.Module):
    """Pre-LN transformer block with AdaLN modulation; chunk order gamma1, gamma2, scale1, scale2, shift1, shift2."""

    def __init__(self, cfg: VARConfig, drop_path: float):
        super().__init__()
        C = cfg.embed_dim
        self.C, self.drop_path, self.eps = C, drop_path, cfg.norm_eps
        self.attn = SelfAttention(C, cfg.num_heads, cfg.attn_l2_norm)
        self.ffn = FFN(C, round(C * cfg.mlp_ratio))
        if cfg.shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        """(B, 1, 6, C) from the condition (or from the shared AdaLN output, for shared_aln models)."""
        if hasattr(self, "ada_gss"):
            return self.ada_gss + cond
        return self.ada_lin(cond).view(-1, 1, 6, self.C)

    def forward(self, x, ada: torch.Tensor, attn_mask=None):
        g1, g2, s1, s2, b1, b2 = ada.unbind(2)
        ln = lambda t: F.layer_norm(t, (self.C,), eps=self.eps)  # noqa: E731 - LayerNorm without affine
        x = x + _drop_path(self.attn(ln(x).mul(s1.add(1)).add_(b1), attn_mask).mul_(g1), self.drop_path, self.training)
        x = x + _drop_path(self.ffn(ln(x).mul(s2.add(1)).add_(b2)).mul(g2), self.drop_path, self.training)
        return x


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C: int, eps: float):
        super().__init__()
        self.C, self.eps = C, eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, x, cond):
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.C).unbind(2)
        return F.layer_norm(x, (self.C,), eps=self.eps).mul(scale.add(1)).add_(shift)


class VAR(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.config = cfg
        C, S, L = cfg.embed_dim, len(cfg.patch_nums), cfg.L
        self.num_classes, self.first_l = cfg.num_classes, cfg.patch_nums[0] ** 2
        init_std = math.sqrt(1 / C / 3)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.empty(1, L, C))
        nn.init.trunc_normal_(self.pos_start, std=init_std)
        nn.init.trunc_normal_(self.pos_1LC, std=init_std)
        self.register_buffer("lvl_1L", torch.empty(1, L, dtype=torch.long))
        self.register_buffer("attn_bias_for_masking", torch.empty(1, 1, L, L))
        self.word_embed = nn.Linear(cfg.z_channels, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)
        self.lvl_embed = nn.Embedding(S, C)
        if cfg.shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linspace(0, rate, depth)
        self.blocks = nn.ModuleList([AdaLNBlock(cfg, dpr[i]) for i in range(cfg.depth)])
        self.head_nm = AdaLNBeforeHead(C, cfg.norm_eps)
        self.head = nn.Linear(C, cfg.vocab_size)
        self.init_buffers()

    def init_buffers(self) -> None:
        """(Re)compute the constant buffers; called after loading so they never depend on the file."""
        dev = self.pos_1LC.device
        if dev.type == "meta":
            return  # building on meta (devices.on_meta): the registered shapes stand until the loader calls this
        pns = self.config.patch_nums
        lvl = torch.cat([torch.full((p * p,), i, dtype=torch.long, device=dev) for i, p in enumerate(pns)]).view(1, -1)
        self.lvl_1L = lvl
        mask = torch.where(lvl.view(-1, 1) >= lvl.view(1, -1), 0.0, -torch.inf)  # block-causal by scale
        self.attn_bias_for_masking = mask.view(1, 1, *mask.shape)
        for b in self.blocks:
            b.attn.zero_k_bias = torch.zeros(self.config.embed_dim, device=dev)

    def init_weights(self, init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1.0) -> None:
        """The reference initialisation, for training from scratch (inference always loads weights)."""
        std = math.sqrt(1 / self.config.embed_dim / 3) if init_std < 0 else init_std
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=std)
        C, depth = self.config.embed_dim, self.config.depth
        with torch.no_grad():
            self.head.weight.mul_(init_head)
            self.head.bias.zero_()
            self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
            self.head_nm.ada_lin[-1].bias.zero_()
            for b in self.blocks:
                b.attn.proj.weight.div_(math.sqrt(2 * depth))
                b.ffn.fc2.weight.div_(math.sqrt(2 * depth))
                if hasattr(b, "ada_lin"):
                    b.ada_lin[-1].weight[2 * C:].mul_(init_adaln)
                    b.ada_lin[-1].weight[:2 * C].mul_(init_adaln_gamma)
                    b.ada_lin[-1].bias.zero_()

    # ---------------------------------------------------------------- conditioning
    def condition(self, labels: torch.Tensor, cond_delta: torch.Tensor | None = None,
                  alpha: float = 1.0, beta: float = 1.0) -> torch.Tensor:
        cond = self.class_emb(labels)
        if alpha != 1.0:
            cond = cond * alpha
        if cond_delta is not None:
            cond = cond + beta * cond_delta.to(cond.dtype)
        return cond

    def block_modulations(self, cond: torch.Tensor) -> list[torch.Tensor]:
        shared = self.shared_ada_lin(cond).view(-1, 1, 6, self.config.embed_dim) if self.config.shared_aln else cond
        return [b.modulation(shared) for b in self.blocks]

    def logits(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_nm(x.float(), cond).float()).float()

    # ---------------------------------------------------------------- teacher forcing
    def forward(self, labels: torch.Tensor, x_BLCv: torch.Tensor, cond_delta: torch.Tensor | None = None,
                alpha: float = 1.0, beta: float = 1.0) -> torch.Tensor:
        """Teacher-forced logits (B, L, V). x_BLCv is VQVAE.quantize.codes_to_var_input(codes).
        In training mode, with probability cond_drop_rate a row gets the null class and no delta (for CFG)."""
        B = x_BLCv.shape[0]
        if self.training and self.config.cond_drop_rate > 0:
            drop = torch.rand(B, device=labels.device) < self.config.cond_drop_rate
            labels = torch.where(drop, self.num_classes, labels)
            if cond_delta is not None:
                cond_delta = cond_delta * (~drop).to(cond_delta.dtype).unsqueeze(1)
        with torch.autocast(x_BLCv.device.type, enabled=False):
            cond = self.condition(labels, cond_delta, alpha, beta)
            sos = cond.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
            x = torch.cat((sos, self.word_embed(x_BLCv.float())), dim=1)
            x = x + (self.lvl_embed(self.lvl_1L.expand(B, -1)) + self.pos_1LC)
        mask = self.attn_bias_for_masking
        for b, ada in zip(self.blocks, self.block_modulations(cond)):
            x = b(x, ada, mask)
        return self.logits(x, cond)


def next_scale_loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0,
                    token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """VAR's teacher-forced loss: per-token cross-entropy weighted (default uniformly, 1/L) and summed over
    tokens, then averaged over the batch. logits (B, L, V), target (B, L)."""
    B, L, V = logits.shape
    ce = F.cross_entropy(logits.reshape(-1, V), target.reshape(-1), label_smoothing=label_smoothing, reduction="none")
    w = token_weights if token_weights is not None else ce.new_full((1, L), 1.0 / L)
    return (ce.view(B, L) * w).sum(-1).mean()


"""VAR's multi-scale residual VQ-VAE (docs/architecture.md, "The VAR and VQ-VAE facts").

Parameter and buffer names match the official `vae_ch160v4096z32.pth` so it loads strictly.
Images go in as [-1, 1]; `decode_fhat` returns [-1, 1] (clamped). A "code list" is a list of
S int64 tensors, one per scale, each (B, pn*pn) in row-major order.

`VQVAEConfig.resize` picks how the quantizer moves maps between scales: "reference" (area down, bicubic up, as
the reference VAR) or "bilinear" (bilinear both ways, as the original PopYOU model was fine-tuned and sampled).

`VQVAEConfig.has_encoder` False builds the decoder side only (quantizer, post-quant conv, decoder): what sampling
needs, and all the original demo's model file keeps (it deleted the encoder before saving). Encoding images then
needs the full VQ-VAE, e.g. the official `vae_ch160v4096z32.pth`, whose decoder side is the same weights.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from popyou_cli.core.errors import PopyouError
from popyou_cli.core.presets import DEFAULT_VAE

OFFICIAL_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
RESIZE_MODES = ("reference", "bilinear")


@dataclass
class VQVAEConfig:
    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    in_channels: int = 3
    share_quant_resi: int = 4  # 4 = four convs shared across scales; 1 = one; 0 = one per scale
    quant_resi: float = 0.5
    patch_nums: tuple[int, ...] = OFFICIAL_PATCH_NUMS
    resize: str = "reference"  # one of RESIZE_MODES: how the quantizer resizes between scales
    has_encoder: bool = True  # False: decoder side only (see the module docstring)

    def __post_init__(self):
        if self.resize not in RESIZE_MODES:
            raise PopyouError(f"unknown VQ-VAE resize mode {self.resize!r} (use one of {', '.join(RESIZE_MODES)})")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        return self.patch_nums[-1] * self.downsample

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "VQVAEConfig":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        return self.nin_shortcut(x) + self.conv2(self.conv2_input(x))

    def conv2_input(self, x):
        """The residual branch up to its last conv: silu(norm2(conv1(silu(norm1(x)))))."""
        h = self.conv1(F.silu(self.norm1(x), inplace=True))  # in place: the norm output is a fresh tensor
        return F.silu(self.norm2(h), inplace=True)


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with one fused qkv 1x1 conv (channel blocks q|k|v)."""

    def __init__(self, c: int):
        super().__init__()
        self.C = c
        self.norm = _norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)
        # contiguous() everywhere the reference has it: bmm on strided inputs sums in another order
        q = q.permute(0, 2, 1).contiguous()  # (B, HW, C)
        w = torch.bmm(q, k.contiguous()).mul_(C**-0.5).softmax(dim=2)  # (B, HWq, HWk)
        h = torch.bmm(v.contiguous(), w.permute(0, 2, 1).contiguous()).view(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # right/bottom pad, as the LDM VQ-f16 family does


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: res blocks, optional attention after each, optional resampler."""

    def __init__(self, cin: int, cout: int, n_blocks: int, attn: bool, resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout) for i in range(n_blocks)])
        self.attn = nn.ModuleList([AttnBlock(cout) for _ in range(n_blocks)] if attn else [])
        if resample is not None:
            self.add_module(name, resample)
        self.resample = name if resample is not None else None

    def forward(self, x):
        for i, blk in enumerate(self.block):
            x = blk(x)
            if len(self.attn):
                x = self.attn[i](x)
        return getattr(self, self.resample)(x) if self.resample else x


class _Mid(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        ch, mult, n = cfg.ch, cfg.ch_mult, len(cfg.ch_mult)
        in_mult = (1,) + tuple(mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        for i in range(n):
            cin, cout = ch * in_mult[i], ch * mult[i]
            last = i == n - 1
            self.down.append(_Level(cin, cout, cfg.num_res_blocks, last, None if last else Downsample(cout), "downsample"))
        c = ch * mult[-1]
        self.mid = _Mid(c)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h)), inplace=True))


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        ch, mult, n = cfg.ch, cfg.ch_mult, len(cfg.ch_mult)
        c = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = _Mid(c)
        levels = []
        for i in reversed(range(n)):  # built coarse to fine, stored by level (up.0 = finest)
            cout = ch * mult[i]
            levels.insert(0, _Level(c, cout, cfg.num_res_blocks + 1, i == n - 1, Upsample(cout) if i else None, "upsample"))
            c = cout
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, cfg.in_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class Phi(nn.Conv2d):
    """Residual refinement of an upsampled code map: (1-r)*h + r*conv3x3(h)."""

    def __init__(self, c: int, ratio: float):
        super().__init__(c, c, 3, padding=1)
        self.ratio = ratio

    def forward(self, h):
        return h.mul(1 - self.ratio) + super().forward(h).mul_(self.ratio)


def phi_indices(num_convs: int, num_scales: int) -> list[int]:
    """Which of K phi convs each scale uses. Follows the reference in float64 on purpose: for K=4, S=10
    scales 2 and 7 tie exactly in real arithmetic and float64 rounding decides ([0,0,1,1,1,2,2,3,3,3])."""
    K = num_convs
    ticks = np.linspace(1 / 3 / K, 1 - 1 / 3 / K, K) if K == 4 else np.linspace(1 / 2 / K, 1 - 1 / 2 / K, K)
    denom = max(num_scales - 1, 1)
    return [int(np.argmin(np.abs(ticks - si / denom))) for si in range(num_scales)]


class _PhiPartiallyShared(nn.Module):
    def __init__(self, convs):
        super().__init__()
        self.qresi_ls = nn.ModuleList(convs)


class _PhiShared(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.qresi = conv


class MultiScaleQuantizer(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        V, Cv, S = cfg.vocab_size, cfg.z_channels, len(cfg.patch_nums)
        self.patch_nums = tuple(cfg.patch_nums)
        self.set_resize(cfg.resize)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(S, V))  # training statistic kept for strict loading
        k = cfg.share_quant_resi
        if k == 1:
            self.quant_resi = _PhiShared(Phi(Cv, cfg.quant_resi))
            convs = [self.quant_resi.qresi]
        elif k == 0:
            self.quant_resi = nn.ModuleList([Phi(Cv, cfg.quant_resi) for _ in range(S)])
            convs = list(self.quant_resi)
        else:
            self.quant_resi = _PhiPartiallyShared([Phi(Cv, cfg.quant_resi) for _ in range(k)])
            convs = list(self.quant_resi.qresi_ls)
        self.embedding = nn.Embedding(V, Cv)
        self._phi_convs = convs  # plain list: the modules are registered above, this only indexes them
        self.phi_index = phi_indices(len(convs), S)
        self.one_image_at_a_time = False  # set by models/fast_decoder.prepare_decoder (reduced precision on a CPU)

    def phi(self, si: int, h: torch.Tensor) -> torch.Tensor:
        conv = self._phi_convs[self.phi_index[si]]
        if self.one_image_at_a_time:  # in one memory format too: a lone image's map can come NCHW, a batch's not
            return torch.cat([conv(image.contiguous()) for image in h.split(1)])
        return conv(h)

    def set_resize(self, mode: str) -> None:
        """One of RESIZE_MODES; the original PopYOU quantizer replaced area (down) and bicubic (up) with bilinear."""
        if mode not in RESIZE_MODES:
            raise PopyouError(f"unknown VQ-VAE resize mode {mode!r} (use one of {', '.join(RESIZE_MODES)})")
        self.down_mode, self.up_mode = ("bilinear", "bilinear") if mode == "bilinear" else ("area", "bicubic")

    def down(self, x: torch.Tensor, pn: int) -> torch.Tensor:
        """x resized to a coarser pn x pn scale (area, or bilinear for the original's quantizer)."""
        return F.interpolate(x, size=(pn, pn), mode=self.down_mode)

    def up(self, x: torch.Tensor, size: int) -> torch.Tensor:
        """x resized to the finest size x size map (bicubic, or bilinear for the original's quantizer)."""
        return F.interpolate(x, size=(size, size), mode=self.up_mode)

    def lookup(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Nearest code by squared L2 (first index wins ties), same op order as the reference."""
        E = self.embedding.weight
        d = z_NC.square().sum(dim=1, keepdim=True) + E.square().sum(dim=1)
        d.addmm_(z_NC, E.T, alpha=-2, beta=1)
        return d.argmin(dim=1)

    @torch.no_grad()
    def encode(self, f: torch.Tensor, to_fhat: bool = False) -> list[torch.Tensor]:
        """Residual quantisation of f (B, Cv, h, h): returns per-scale codes, or cumulative f_hat after each scale."""
        B, C, H, W = f.shape
        S = len(self.patch_nums)
        f = f.float()
        f_rest, f_hat, out = f.clone(), torch.zeros_like(f), []
        for si, pn in enumerate(self.patch_nums):
            last = si == S - 1
            z = f_rest if last else self.down(f_rest, pn)
            idx = self.lookup(z.permute(0, 2, 3, 1).reshape(-1, C)).view(B, pn, pn)
            h = self.embedding(idx).permute(0, 3, 1, 2)
            h = h.contiguous() if last else F.interpolate(h, size=(H, W), mode=self.up_mode).contiguous()
            h = self.phi(si, h)
            f_hat.add_(h)
            f_rest.sub_(h)
            out.append(f_hat.clone() if to_fhat else idx.reshape(B, pn * pn))
        return out

    def codes_to_maps(self, codes: list[torch.Tensor]) -> list[torch.Tensor]:
        B, Cv = codes[0].shape[0], self.embedding.embedding_dim
        return [self.embedding(c).transpose(1, 2).reshape(B, Cv, pn, pn) for c, pn in zip(codes, self.patch_nums)]

    def codes_to_fhat(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """Sum over scales of phi(up(code map)); the reference's all_to_max_scale path."""
        maps = self.codes_to_maps(codes)
        H = self.patch_nums[-1]
        f_hat = maps[0].new_zeros(maps[0].shape[0], maps[0].shape[1], H, H)
        for si, h in enumerate(maps):  # a prefix of the scales gives the partial image after that scale
            if h.shape[-1] != H:
                h = self.up(h, H)
            f_hat.add_(self.phi(si, h))
        return f_hat

    def codes_to_var_input(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input (B, L - first_l, Cv): the cumulative f_hat downsampled to each next scale."""
        pns, H = self.patch_nums, self.patch_nums[-1]
        B, Cv = codes[0].shape[0], self.embedding.embedding_dim
        f_hat = torch.zeros(B, Cv, H, H, device=codes[0].device, dtype=torch.float32)
        nxt = []
        for si in range(len(pns) - 1):
            h = self.embedding(codes[si]).transpose(1, 2).reshape(B, Cv, pns[si], pns[si])
            f_hat.add_(self.phi(si, self.up(h, H)))
            nxt.append(self.down(f_hat, pns[si + 1]).view(B, Cv, -1).transpose(1, 2))
        return torch.cat(nxt, dim=1)

    def next_ar_input(self, si: int, f_hat: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference step: add scale si's code map h (B, Cv, pn, pn) into f_hat IN PLACE; return the next scale's input map."""
        pns, H = self.patch_nums, self.patch_nums[-1]
        if si != len(pns) - 1:
            f_hat.add_(self.phi(si, self.up(h, H)))
            return f_hat, self.down(f_hat, pns[si + 1])
        f_hat.add_(self.phi(si, h))
        return f_hat, f_hat


class VQVAE(nn.Module):
    def __init__(self, cfg: VQVAEConfig | None = None):
        super().__init__()
        cfg = cfg or VQVAEConfig()
        self.config = cfg
        self.encoder = Encoder(cfg) if cfg.has_encoder else None
        self.decoder = Decoder(cfg)
        self.quantize = MultiScaleQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, padding=1)
        self.one_image_at_a_time = False  # set by models/fast_decoder.prepare_decoder (reduced precision on a CPU)

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.quantize.patch_nums

    @torch.no_grad()
    def encode_latent(self, img: torch.Tensor) -> torch.Tensor:
        if self.encoder is None:
            raise PopyouError("this VQ-VAE was saved without its encoder (decoder side only, as the original demo's "
                              f"model file): encode with the full VQ-VAE, e.g. --vae {DEFAULT_VAE}")
        return self.quant_conv(self.encoder(img))

    @torch.no_grad()
    def encode_codes(self, img: torch.Tensor) -> list[torch.Tensor]:
        """Images in [-1, 1] (B, 3, H, W) -> per-scale codes."""
        return self.quantize.encode(self.encode_latent(img))

    @torch.no_grad()
    def decode_fhat(self, f_hat: torch.Tensor) -> torch.Tensor:
        if self.one_image_at_a_time and len(f_hat) > 1:
            return torch.cat([self.decode_fhat(image) for image in f_hat.split(1)])
        return self.decoder(self.post_quant_conv(f_hat)).clamp_(-1, 1)

    @torch.no_grad()
    def decode_codes(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """Per-scale codes -> images in [-1, 1]."""
        return self.decode_fhat(self.quantize.codes_to_fhat(codes))

    @torch.no_grad()
    def reconstruct(self, img: torch.Tensor) -> torch.Tensor:
        return self.decode_codes(self.encode_codes(img))

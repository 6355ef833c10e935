"""The VQ-VAE decoder's sampling speed-ups (models/fast.py chooses them): sub-pixel upsampling; for the fp32 decoder
(exact mode, --quantize int8) either channels_last on the finest levels with TwoPassGroupNorm or Winograd
convolutions on the large maps (WinogradConv2d); channels_last under reduced precision, with each residual
block's add inside its second conv (ResidualAddBlock), and on a CPU one image at a time (prepare_decoder)."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from popyou_cli.models.vqvae import ResnetBlock, Upsample

# exact mode's fp32 channels_last decoder (Kernels.fp32_conv "channels_last"): its finest levels. On the golden tiny10
# decoder the three finest keep the image about as close to the reference as NCHW does (2.1e-5 against 1.9e-5; the
# goldens allow 1e-4); the coarser ones move it more (3.7e-5 with all five) and cost little anyway (the finest
# three are 85% of the multiply-adds).
FP32_CHANNELS_LAST_LEVELS = 3


# the fp32 decoder's Winograd convolutions (Kernels.fp32_conv "winograd"): the 3x3 convs on maps at least this side.
# NNPACK's Winograd is 2.2x oneDNN's direct fp32 conv at 64 px and more (VQ-VAE 160 channels at 256 px: 68 ms
# against 146 per image, 2 cores of the AMD EPYC of BENCHMARKS.md), slower below (640 channels at 16 px: 24 ms
# against 10).
WINOGRAD_MIN_SIDE = 64


def winograd_available() -> bool:
    """Whether this PyTorch build has NNPACK and it runs on this CPU (the call also initialises it)."""
    try:
        return bool(torch.backends.nnpack.is_available())
    except (AttributeError, RuntimeError):
        return False


class WinogradConv2d(nn.Module):
    """A 3x3 stride-1 fp32 convolution through NNPACK's inference kernel (Winograd for 3x3), one image at a time
    (NNPACK's batched path is slower than oneDNN's: 881 ms against 580 for four 256 px images). Winograd trades
    multiply-adds for transforms whose rounding adds to the direct sum's: the d16 decoder's image moves 1.2e-5 from
    float64 (direct fp32: 0.9e-5; the goldens allow 1e-4 on the tiny decoder). Shares the conv's parameters (same
    state dict). Other dtypes (autocast, bf16), other devices and a forked child (NNPACK's thread pool belongs to
    the process that made it) run F.conv2d."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.weight, self.bias, self.padding = conv.weight, conv.bias, list(conv.padding)
        self._pid = os.getpid()

    @classmethod
    def fits(cls, conv: nn.Module, input_shape: tuple[int, ...]) -> bool:
        """Whether Winograd takes this conv at this input size (traced_convs' shapes)."""
        return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
                and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
                and min(input_shape[-2:]) >= WINOGRAD_MIN_SIDE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 4 or os.getpid() != self._pid
                or torch.is_autocast_enabled("cpu") or self.weight.dtype != torch.float32):
            return F.conv2d(x, self.weight, self.bias, padding=self.padding)
        x = x.contiguous()
        images = [torch._nnpack_spatial_convolution(x[i:i + 1], self.weight, self.bias, self.padding)
                  for i in range(len(x))]
        return images[0] if len(images) == 1 else torch.cat(images)


def traced_convs(vqvae) -> list[tuple[nn.Conv2d, tuple[int, ...], int]]:
    """Every decoder nn.Conv2d with its input shape and multiply-adds at the model's real size (one image): traced
    on a 1x1 latent (every size in the decoder scales with the latent's), then scaled to the last scale's side."""
    side, found = vqvae.config.patch_nums[-1], []

    def hook(conv, inputs, out):
        kh, kw = conv.kernel_size
        n, c, h, w = inputs[0].shape
        macs = out.shape[2] * out.shape[3] * side * side * conv.out_channels * conv.in_channels // conv.groups * kh * kw
        found.append((conv, (n, c, h * side, w * side), macs))

    decoder = vqvae.decoder
    handles = [m.register_forward_hook(hook) for m in decoder.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            decoder(torch.zeros(1, vqvae.config.z_channels, 1, 1, device=next(decoder.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return found


class TwoPassGroupNorm(nn.GroupNorm):
    """GroupNorm that keeps fp32 precision on channels_last input: PyTorch's channels_last GroupNorm kernel sums x
    and x^2 in one pass, which loses digits when a group's mean is large next to its spread (7.7e-5 off on N(1, 3)
    data against 1.4e-6 for its NCHW kernel; on the golden decoder, 7.9e-5 of the 1e-4 tolerance). Here: per-channel
    means (one summing pass), then the centred squares (a second pass, in cache-sized chunks), combined per group in
    float64, and one scale-and-shift pass. Other layouts and dtypes run the stock kernel."""

    CHUNK = 1 << 19  # elements of centred squares held at a time

    @classmethod
    def of(cls, norm: nn.GroupNorm) -> "TwoPassGroupNorm":
        new = cls(norm.num_groups, norm.num_channels, norm.eps, norm.affine)
        new.weight, new.bias = norm.weight, norm.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype != torch.float32 or x.dim() != 4 or not self.affine or x.is_contiguous()
                or not x.is_contiguous(memory_format=torch.channels_last) or torch.is_autocast_enabled(x.device.type)):
            return super().forward(x)
        N, C, H, W = x.shape
        G = self.num_groups
        rows = x.permute(0, 2, 3, 1).reshape(N, H * W, C)  # a view: channels_last memory is (N, H, W, C)
        mean_c = rows.sum(1).div_(H * W)  # (N, C)
        step = max(1, self.CHUNK // C)
        sq_c = sum((chunk - mean_c[:, None]).square_().sum(1) for chunk in rows.split(step, dim=1)).double()
        mean_g = mean_c.double().view(N, G, -1)
        group_mean = mean_g.mean(-1, keepdim=True)
        # a group's variance: its channels' centred squares plus their means' spread around the group mean
        var_g = (sq_c.view(N, G, -1).sum(-1, keepdim=True) / (H * W)
                 + (mean_g - group_mean).square().sum(-1, keepdim=True)) / (C // G)
        scale = (var_g + self.eps).rsqrt() * self.weight.double().view(1, G, -1)
        shift = self.bias.double().view(1, G, -1) - group_mean * scale
        return torch.addcmul(shift.float().view(N, C, 1, 1), x, scale.float().view(N, C, 1, 1))


class SubpixelUpsample(nn.Module):
    """The decoder's nearest-x2 upsample + 3x3 conv, computed as four 2x2 convs on the small map, one per output
    phase (2.25x fewer multiply-adds, no upsampled copy). Output phase (a, b) of the big map reads small rows
    {i-1, i} (a = 0) or {i, i+1} (a = 1), so each 2x2 kernel sums the 3x3 kernel's taps that land on the same
    small pixel. Same result up to fp32 rounding of those sums."""

    _TAPS = ((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0))  # phase -> (2 x 3) tap sums

    def __init__(self, upsample: nn.Module):
        super().__init__()
        conv = upsample.conv
        w = conv.weight.detach().double()
        kernels = []
        for a in (0, 1):
            for b in (0, 1):
                ra, rb = (torch.tensor(self._TAPS[p], dtype=torch.float64, device=w.device) for p in (a, b))
                kernels.append(torch.einsum("yi,ocij,xj->ocyx", ra, w, rb).to(conv.weight.dtype))
        for k, kernel in enumerate(kernels):  # one (Cout, Cin, 2, 2) buffer per phase (4-D: channels_last applies)
            self.register_buffer(f"kernel{k}", kernel)
        self.bias = conv.bias
        self.channels_last_out = False  # write channels_last whatever the input's layout (prepare_decoder)

    def forward(self, x):
        B, _, H, W = x.shape
        xp = F.pad(x, (1, 1, 1, 1))
        cout = self.kernel0.shape[0]
        channels_last = self.channels_last_out or (x.is_contiguous(memory_format=torch.channels_last)
                                                    and not x.is_contiguous())
        # written straight into the interleaved layout the next layer reads (NHWC when channels_last)
        out = x.new_empty(B, H, 2, W, 2, cout) if channels_last else x.new_empty(B, cout, H, 2, W, 2)
        for k, (a, b) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
            y = F.conv2d(xp[:, :, a:a + H + 1, b:b + W + 1], getattr(self, f"kernel{k}"), self.bias)
            if channels_last:
                out[:, :, a, :, b] = y.permute(0, 2, 3, 1)
            else:
                out[:, :, :, a, :, b] = y
        if channels_last:
            return out.view(B, 2 * H, 2 * W, cout).permute(0, 3, 1, 2)
        return out.view(B, cout, 2 * H, 2 * W)


class ResidualAddBlock(ResnetBlock):
    """The VQ-VAE's residual block (same parameters and names) with its add inside the second conv: oneDNN adds
    the shortcut to the conv's fp32 sums before rounding to bf16, so the sum is one pass less over the map and one
    rounding less (d16, 4 images, 160 channels at 256 px: 74 ms per image against 80 for conv then add). For
    bf16 channels_last maps on a CPU; anything else runs the block as written."""

    def __init__(self, block: ResnetBlock):
        nn.Module.__init__(self)  # the block's own modules, not new ones
        self.norm1, self.conv1, self.norm2, self.conv2 = block.norm1, block.conv1, block.norm2, block.conv2
        self.nin_shortcut = block.nin_shortcut

    def forward(self, x):
        h = self.conv2_input(x)
        shortcut = self.nin_shortcut(x)
        if not self._fusable(h, shortcut):
            return shortcut + self.conv2(h)
        conv = self.conv2
        bias = None if conv.bias is None else conv.bias.to(h.dtype)
        return torch.ops.mkldnn._convolution_pointwise.binary(
            h, shortcut, conv.weight.to(h.dtype), bias, list(conv.padding), list(conv.stride), list(conv.dilation),
            conv.groups, "add", None, None, [], None)

    def _fusable(self, h: torch.Tensor, shortcut: torch.Tensor) -> bool:
        channels_last = torch.channels_last
        return (h.device.type == "cpu" and h.dtype == torch.bfloat16 and shortcut.dtype == h.dtype
                and h.is_contiguous(memory_format=channels_last) and shortcut.is_contiguous(memory_format=channels_last)
                and self.conv2.padding_mode == "zeros" and not torch.is_grad_enabled())


def prepare_decoder(vqvae, channels_last: bool = False, subpixel: bool = True, fp32_conv: str = "nchw",
                    one_image_at_a_time: bool = False):
    """The decoder's speed-ups in place: sub-pixel upsampling (exact); channels_last for reduced precision (the
    whole decoder); else the fp32 decoder's conv kernels, `fp32_conv`: "channels_last" (the finest levels only,
    module docstring), "winograd" (where NNPACK runs: the large maps' 3x3 convs, NCHW) or "nchw".
    one_image_at_a_time: decode_fhat and the quantizer's phi convs take one image at a time (reduced precision on a
    CPU), so that an image's pixels do not depend on its batch: on 2+ threads PyTorch's channels_last bf16
    GroupNorm splits its sums by batch size (64+ channels at 32 px and up), and a lone image's phi input can come
    in another memory format than a batch's, which oneDNN's bf16 conv sums in another order; so a batched image
    rounded differently from the same image alone (VAR-d16 `--fast`: up to 9 levels, 19% of the values off by more
    than one). One image at a time: the same, at the same speed here."""
    decoder = vqvae.decoder
    vqvae.one_image_at_a_time = vqvae.quantize.one_image_at_a_time = one_image_at_a_time
    for level in decoder.up:
        if subpixel and level.resample and isinstance(getattr(level, level.resample), Upsample):
            setattr(level, level.resample, SubpixelUpsample(getattr(level, level.resample)))
    if channels_last:
        decoder.to(memory_format=torch.channels_last)
        vqvae.post_quant_conv.to(memory_format=torch.channels_last)
        if torch.backends.mkldnn.is_available():
            _fuse_residual_adds(decoder)
    elif fp32_conv == "channels_last":
        _finest_levels_channels_last(decoder)
    elif fp32_conv == "winograd" and winograd_available():
        _winograd_convs(vqvae)


def _fuse_residual_adds(decoder) -> None:
    for module in list(decoder.modules()):
        for name, child in module.named_children():
            if type(child) is ResnetBlock:
                setattr(module, name, ResidualAddBlock(child))


def _winograd_convs(vqvae) -> None:
    eligible = {id(conv) for conv, shape, _ in traced_convs(vqvae) if WinogradConv2d.fits(conv, shape)}
    for module in list(vqvae.decoder.modules()):
        for name, child in module.named_children():
            if id(child) in eligible:
                setattr(module, name, WinogradConv2d(child))


def _finest_levels_channels_last(decoder) -> None:
    """The FP32_CHANNELS_LAST_LEVELS finest levels (up to the first with attention, whose reshapes assume NCHW), the
    output norm and conv in channels_last, each GroupNorm there a TwoPassGroupNorm; the upsampling that feeds them
    writes channels_last, so no layout conversion runs in between."""
    n = 0
    while n < min(FP32_CHANNELS_LAST_LEVELS, len(decoder.up)) and not len(decoder.up[n].attn):
        n += 1
    if n == 0:
        return
    for module in [*decoder.up[:n], decoder.norm_out, decoder.conv_out]:
        module.to(memory_format=torch.channels_last)
    _two_pass_group_norms(decoder.up[:n])
    decoder.norm_out = TwoPassGroupNorm.of(decoder.norm_out)
    feeder = decoder.up[n] if n < len(decoder.up) else None
    if feeder is not None and feeder.resample:
        upsample = getattr(feeder, feeder.resample)
        if isinstance(upsample, SubpixelUpsample):
            upsample.channels_last_out = True
        else:  # nearest + conv: the conv in channels_last writes that layout
            upsample.to(memory_format=torch.channels_last)


def _two_pass_group_norms(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.GroupNorm) and not isinstance(child, TwoPassGroupNorm):
            setattr(module, name, TwoPassGroupNorm.of(child))
        else:
            _two_pass_group_norms(child)

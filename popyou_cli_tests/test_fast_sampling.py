"""Sampling speed-ups (models/fast.py, models/generate.py): exact mode still meets the goldens; each fast mode runs,
is deterministic for a seed and differs from exact mode only as documented. Expected values come from the
goldens (the reference implementation), from an unprepared model, or from a teacher-forced forward pass."""
import copy
import gc
import json
import weakref

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from helpers import invoke
from popyou_cli.models import autotune
from popyou_cli.core.errors import PopyouError
from popyou_cli.models.checkpoints import build_tiny_var, build_tiny_vqvae, load_var, load_vqvae
from popyou_cli.models import fast as fast_module
from popyou_cli.models.fast import (DenseLinear, FusedFFN, Int8Linear, Kernels, prepare_for_sampling,
                                    quantize_var)
from popyou_cli.models.fast_decoder import (ResidualAddBlock, SubpixelUpsample, TwoPassGroupNorm, WinogradConv2d,
                                            prepare_decoder, winograd_available)
from popyou_cli.models import var as var_module
from popyou_cli.models.vqvae import VQVAE, ResnetBlock, Upsample, VQVAEConfig
from popyou_cli.models.generate import SamplingGraphs, generate

_CACHE = {}
KERNEL_CHOICES = [k.spelled() for k in Kernels.exact_choices()]  # every choice autotune can make for exact mode


def _golden_models(golden, tag):
    if tag not in _CACHE:
        var, _ = load_var(str(golden / f"{tag}_var.safetensors"))
        vae = load_vqvae(str(golden / "tiny_vae.safetensors"), patch_nums=var.config.patch_nums)
        meta = json.loads((golden / "tiny_config.json").read_text())[tag]
        _CACHE[tag] = (var.eval(), vae.eval(), load_file(str(golden / f"{tag}_cases.safetensors")), meta)
    return _CACHE[tag]


def _prepared(golden, tag, **kw):
    var, vae, cases, meta = _golden_models(golden, tag)
    pvar, pvae = copy.deepcopy(var), copy.deepcopy(vae)
    prepare_for_sampling(pvar, pvae, "cpu", **kw)
    return pvar, pvae, cases, meta


def _forced_kernels(monkeypatch, spelled: str) -> Kernels:
    """Exact mode's kernels as $POPYOU_EXACT_KERNELS forces them, through autotune's own path (no measuring)."""
    monkeypatch.setenv(autotune.KERNELS_ENV, spelled)
    kernels = autotune.exact_kernels(None, None, torch.device("cpu"), timer=None)
    assert kernels.spelled() == spelled
    return kernels


def _run(var, vae, n, labels, seed=0, **kw):
    """Images and per-scale (tokens, guided logits) with one generator per image, as the pipeline draws."""
    steps = []
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    img = generate(var, vae, n, labels, generator=gens,
                   on_step=lambda si, logits, idx, fh: steps.append((idx, logits)), **kw)
    return img, steps


@pytest.mark.parametrize("kernels", KERNEL_CHOICES)
@pytest.mark.parametrize("tag,run", [("tiny", "ar_greedy"), ("tiny", "ar_topk_topp"), ("tiny", "ar_topp_only"),
                                     ("tiny", "ar_smooth"), ("tiny10", "ar_greedy"), ("tiny10", "ar_topk_topp")])
def test_exact_mode_meets_the_goldens(golden, tag, run, kernels, monkeypatch):
    """prepare_for_sampling with each kernel choice autotune can make (oneDNN or MKL GEMMs, fused GELU or not,
    sub-pixel or nearest upsampling), forced through $POPYOU_EXACT_KERNELS: the golden AR runs' tokens bit for
    bit, logits and images within the golden README's tolerances."""
    var, vae, c, meta = _prepared(golden, tag, kernels=_forced_kernels(monkeypatch, kernels))
    call = meta["ar_runs"][run]["call"]
    steps = []
    img = generate(var, vae, call["B"], torch.tensor(call["label_B"]), cfg=call["cfg"], top_k=call["top_k"],
                   top_p=call["top_p"], more_smooth=call["more_smooth"],
                   generator=torch.Generator().manual_seed(call["g_seed"]),
                   on_step=lambda si, logits, idx, fh: steps.append((logits, idx, fh)))
    for k, (logits, idx, fh) in enumerate(steps):
        assert torch.equal(idx, c[f"{run}_idx_s{k}"]), f"{run}: tokens differ at scale {k}"
        torch.testing.assert_close(logits, c[f"{run}_logits_s{k}"], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(fh, c[f"{run}_fhat_s{k}"], atol=1e-5, rtol=0)
    torch.testing.assert_close(img, c[f"{run}_img"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("kernels", KERNEL_CHOICES)
def test_exact_mode_decodes_the_golden_codes(golden, kernels, monkeypatch):
    _, vae, c, _ = _prepared(golden, "tiny10", kernels=_forced_kernels(monkeypatch, kernels))
    codes = [c[f"idx_s{k}"] for k in range(10)]
    torch.testing.assert_close(vae.decode_codes(codes), c["recon_from_idx"], atol=1e-4, rtol=0)


def test_each_kernel_choice_changes_what_runs():
    """The choices are not names only: the GEMM, the GELU's place, the upsampling and the fp32 decoder's convs
    differ in the modules (Winograd where NNPACK runs, on the tiny decoder's 64 px finest level only)."""
    for kernels in Kernels.exact_choices():
        var, vae = build_tiny_var(), build_tiny_vqvae()
        prepare_for_sampling(var, vae, "cpu", kernels=kernels)
        block = var.blocks[0]
        assert isinstance(block.attn.proj, DenseLinear) == (kernels.gemm == "onednn")
        assert isinstance(block.ffn, FusedFFN) == (kernels.gemm == "onednn" and kernels.fused_gelu)
        ups = [getattr(level, level.resample) for level in vae.decoder.up if level.resample]
        assert all(isinstance(u, SubpixelUpsample) == (kernels.upsample == "subpixel") for u in ups) and ups
        finest = vae.decoder.up[0].block[0]
        channels_last = kernels.fp32_conv == "channels_last"
        assert isinstance(finest.norm1, TwoPassGroupNorm) == channels_last
        assert finest.conv1.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert not isinstance(vae.decoder.mid.block_1.norm1, TwoPassGroupNorm)  # the coarse levels stay NCHW
        winograd = kernels.fp32_conv == "winograd" and winograd_available()
        assert isinstance(finest.conv1, WinogradConv2d) == winograd
        assert isinstance(vae.decoder.conv_out, WinogradConv2d) == winograd
        assert not isinstance(vae.decoder.mid.block_1.conv1, WinogradConv2d)  # 4 px: oneDNN is faster there


def test_the_fp32_channels_last_decoder_writes_no_layout_conversion():
    """The upsampling that feeds the finest levels writes channels_last itself, and the decoder's output comes
    out of them in that layout: no NCHW <-> NHWC copy runs in between (that copy cost what the layout saved)."""
    vae = build_tiny_vqvae()
    prepare_for_sampling(build_tiny_var(), vae, "cpu", kernels=Kernels(fp32_conv="channels_last"))
    seen = []
    hooks = [level.register_forward_pre_hook(lambda m, args: seen.append(args[0])) for level in vae.decoder.up[:3]]
    with torch.no_grad():
        vae.decoder(torch.randn(1, vae.config.z_channels, 2, 2))
    for h in hooks:
        h.remove()
    levels_in = seen[-3:]  # the finest three levels run last
    assert all(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() for x in levels_in)


@pytest.mark.skipif(not winograd_available(), reason="this PyTorch build has no NNPACK")
def test_winograd_conv_keeps_fp32_precision_and_falls_back_elsewhere(monkeypatch):
    """Against float64, on a batch of two (NNPACK runs one image at a time): one conv is about 20x direct fp32's
    error away (2.4e-5 on outputs of order 1: Winograd's transforms round too), well inside the goldens' 1e-4 (the
    golden decodes run it on their 64 px and larger maps). A bf16 conv, autocast and a forked child (NNPACK's
    thread pool stays in the parent) run F.conv2d, bit for bit. The state dict is the conv's."""
    gen = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(32, 48, 3, padding=1)
    x = torch.randn(2, 32, 64, 64, generator=gen)
    winograd = WinogradConv2d(conv)
    with torch.no_grad():
        want = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
        direct_error = (conv(x).double() - want).abs().max().item()
        got = winograd(x)
        assert got.shape == want.shape and not torch.equal(got, conv(x))  # a different kernel ran
        assert (got.double() - want).abs().max().item() < min(50 * direct_error, 1e-4)
        bf16 = copy.deepcopy(conv).bfloat16()
        assert torch.equal(WinogradConv2d(bf16)(x.bfloat16()), bf16(x.bfloat16()))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(winograd(x), conv(x))
        monkeypatch.setattr(winograd, "_pid", -1)
        assert torch.equal(winograd(x), conv(x))
    assert winograd.state_dict().keys() == conv.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(winograd.state_dict().values(), conv.state_dict().values()))


@pytest.mark.parametrize("offset", [0.0, 50.0])
def test_two_pass_group_norm_keeps_fp32_precision_on_channels_last(offset):
    """Against float64 GroupNorm: as close as PyTorch's NCHW kernel, also where a group's mean is 50x its spread
    (where a one-pass sum of x and x^2 loses digits); NCHW input and other dtypes run the stock kernel."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 24, 20, generator=gen) + offset
    norm = torch.nn.GroupNorm(32, 64, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(generator=gen), norm.bias.normal_(generator=gen)
        two_pass = TwoPassGroupNorm.of(norm)
        want = F.group_norm(x.double(), 32, norm.weight.double(), norm.bias.double(), 1e-6)
        nchw_error = (norm(x).double() - want).abs().max().item()
        got = two_pass(x.contiguous(memory_format=torch.channels_last))
        assert got.is_contiguous(memory_format=torch.channels_last) and got.dtype == torch.float32
        assert (got.double() - want).abs().max().item() <= max(2 * nchw_error, 1e-6)
        assert torch.equal(two_pass(x), norm(x))  # NCHW: the stock kernel


@pytest.mark.parametrize("quantize, dtype", [(None, torch.bfloat16), ("int8", torch.bfloat16)])
def test_the_bf16_candidates_of_fast_keep_90_percent_of_exact_tokens(golden, quantize, dtype):
    """--fast's bf16 candidates, as the int8 one below: greedy tokens of 8 classes on tiny10, every scale >= 90%
    of exact mode's (the documented agreement that makes them candidates)."""
    exact_var, vae, _, _ = _prepared(golden, "tiny10")
    fast_var, fast_vae, _, _ = _prepared(golden, "tiny10", quantize=quantize, dtype=dtype)
    labels = torch.arange(8) % 10
    with torch.autocast("cpu", dtype=dtype):
        _, f_steps = _run(fast_var, fast_vae, 8, labels, cfg=1.5, top_k=1)
    _, e_steps = _run(exact_var, vae, 8, labels, cfg=1.5, top_k=1)
    agreement = [(x[0] == y[0]).float().mean().item() for x, y in zip(f_steps, e_steps)]
    assert min(agreement) >= autotune.MIN_AGREEMENT, agreement
    assert sum(not torch.equal(x[1], y[1]) for x, y in zip(f_steps, e_steps)) > 0  # bf16 logits are not exact


@pytest.mark.parametrize("channels_last", [False, True])
def test_subpixel_upsample_equals_nearest_upsample_then_conv(channels_last):
    torch.manual_seed(0)
    up = Upsample(16).eval()
    x = torch.randn(2, 16, 5, 7)
    with torch.no_grad():
        want = up(x)
        fast = SubpixelUpsample(up)
        if channels_last:
            fast = fast.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        got = fast(x)
    assert got.shape == want.shape == (2, 16, 10, 14)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cin", [32, 64])  # the shortcut as it is, and through its 1x1 conv
def test_the_residual_add_inside_the_conv_is_the_block(cin):
    """ResidualAddBlock: bf16 channels_last maps get the shortcut added inside conv2 (closer to float64 than the
    block's own bf16 conv-then-add, and not the same numbers, so the fused path ran); anything else runs the block
    as written, bit for bit; the parameters are the block's."""
    torch.manual_seed(0)
    block = ResnetBlock(cin, 32).eval()
    fused = ResidualAddBlock(block)
    assert fused.state_dict().keys() == block.state_dict().keys()
    x = torch.randn(2, cin, 12, 10)
    with torch.no_grad():
        assert torch.equal(fused(x), block(x))  # fp32: not fused
        want = copy.deepcopy(block).double()(x.bfloat16().double())
        xb = x.bfloat16().contiguous(memory_format=torch.channels_last)
        bf16 = copy.deepcopy(block).bfloat16().to(memory_format=torch.channels_last)
        plain, got = bf16(xb), ResidualAddBlock(bf16)(xb)
    assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(got, plain)
    assert (got.double() - want).abs().mean() < (plain.double() - want).abs().mean()
    torch.testing.assert_close(got.double(), want, atol=0.1, rtol=0.05)


def test_the_reduced_precision_decoder_fuses_every_residual_add():
    vae = build_tiny_vqvae()
    blocks = sum(type(m) is ResnetBlock for m in vae.decoder.modules())
    prepare_decoder(vae, channels_last=True)
    assert blocks > 0 and sum(type(m) is ResidualAddBlock for m in vae.decoder.modules()) == blocks
    assert not any(type(m) is ResnetBlock for m in vae.decoder.modules())


def test_a_reduced_precision_decode_does_not_depend_on_the_batch():
    """On 2 threads PyTorch's channels_last bf16 GroupNorm sums a 64-channel 32 px map in another order for a batch
    than for one image, and the quantizer's phi conv gets a batch's code map channels_last but a lone image's NCHW.
    Prepared for bf16 on a CPU, both run one image at a time (phi in NCHW), so image k of a batch is the image
    alone. fp32 preparation leaves them batched."""
    torch.manual_seed(0)
    cfg = VQVAEConfig(vocab_size=64, z_channels=32, ch=64, ch_mult=(1, 1), num_res_blocks=1, patch_nums=(1, 2, 4, 16))
    vae = VQVAE(cfg).eval()
    f_hat = torch.randn(3, 32, 16, 16)
    codes = torch.randint(0, 64, (3, 16 * 16))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        def decode(v, batch):
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                return v.decode_fhat(batch)

        batched = copy.deepcopy(vae)
        prepare_decoder(batched, channels_last=True)
        prepare_decoder(vae, channels_last=True, one_image_at_a_time=True)
        alone = torch.cat([decode(vae, f_hat[i:i + 1]) for i in range(3)])
        assert torch.equal(decode(vae, f_hat), alone)
        # the kernel this works around: a batched decode rounds differently (if this fails, PyTorch's GroupNorm no
        # longer depends on the batch and the one-image loop can go)
        assert not torch.equal(decode(batched, f_hat), alone)

        # phi's conv sees what a lone image's upsampled map is (one image, NCHW), however the batch comes; its bf16
        # sums differ with the memory format, though rarely on random weights, so the inputs are checked here
        quantizer = vae.quantize
        conv = quantizer._phi_convs[quantizer.phi_index[3]]
        code_map = quantizer.embedding(codes).transpose(1, 2).reshape(3, 32, 16, 16)  # as generate() builds it
        assert code_map.is_contiguous(memory_format=torch.channels_last) and not code_map.is_contiguous()
        seen = []
        hook = conv.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            got = quantizer.phi(3, code_map)
        hook.remove()
        assert [(len(x), x.is_contiguous()) for x in seen] == [(1, True)] * 3
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(got, torch.cat([conv(code_map[i:i + 1].contiguous()) for i in range(3)]))
    finally:
        torch.set_num_threads(threads)
    for dtype, expected in ((torch.bfloat16, True), (torch.float32, False)):
        model = build_tiny_vqvae()
        prepare_for_sampling(build_tiny_var(), model, "cpu", dtype)
        assert model.one_image_at_a_time is model.quantize.one_image_at_a_time is expected


@pytest.mark.parametrize("chunk", [1 << 21, 700])  # one chunk, and one (batch x head) slice at a time
def test_unfused_attention_is_attention(chunk, monkeypatch):
    """var.unfused_attention against float64 softmax(q k^T * scale) v: within bf16's rounding, in chunks or not."""
    monkeypatch.setattr(var_module, "ATTENTION_CHUNK", chunk)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=gen) for n in (5, 7, 7))
    want = torch.softmax(q.double() @ k.double().transpose(-1, -2) * 0.5, dim=-1) @ v.double()
    got = var_module.unfused_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.5)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 3, 5, 8)
    torch.testing.assert_close(got.double(), want, atol=3e-2, rtol=3e-2)
    assert not torch.equal(got.double(), want)  # it is bf16: the check above is not vacuous


@pytest.mark.parametrize("attention", ["unfused", "fused"])
def test_the_attention_kernel_runs_under_reduced_precision_only(golden, attention, monkeypatch):
    """attention=unfused sends bf16 sampling through var.unfused_attention, never fp32 (exact mode, goldens);
    attention=fused never does. Either way bf16 keeps >= 90% of exact mode's greedy tokens at every scale."""
    calls = []
    real = var_module.unfused_attention
    monkeypatch.setattr(var_module, "unfused_attention", lambda *a: calls.append(1) or real(*a))
    var, vae, _, _ = _prepared(golden, "tiny10", kernels=Kernels(attention=attention))
    labels = torch.arange(8) % 10
    _, exact_steps = _run(var, vae, 8, labels, cfg=1.5, top_k=1)
    assert calls == []  # fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, steps = _run(var, vae, 8, labels, cfg=1.5, top_k=1)
    assert bool(calls) == (attention == "unfused")
    agreement = [(x[0] == y[0]).float().mean().item() for x, y in zip(steps, exact_steps)]
    assert min(agreement) >= autotune.MIN_AGREEMENT, agreement


def test_cfg_on_every_scale_is_the_reference_bit_for_bit(golden):
    var, vae, _, _ = _golden_models(golden, "tiny10")
    S = len(var.config.patch_nums)
    labels = torch.tensor([1, 3, 5])
    base, base_steps = _run(var, vae, 3, labels, cfg=1.5, top_k=8, top_p=0.9)
    for k in (S, S + 3):
        img, steps = _run(var, vae, 3, labels, cfg=1.5, top_k=8, top_p=0.9, cfg_scales=k)
        assert torch.equal(img, base)
        assert all(torch.equal(a[0], b[0]) for a, b in zip(steps, base_steps))


@pytest.mark.parametrize("k", [0, 4, 8])
def test_cfg_scales_guides_the_first_k_scales_then_runs_the_conditional_half(golden, k):
    """Scales before K: the exact guided logits. From K on: the conditional logits alone, i.e. a teacher-forced
    forward of the labels on the sampled tokens (this fails if the cache kept the unconditional rows)."""
    var, vae, _, _ = _golden_models(golden, "tiny10")
    labels = torch.tensor([1, 3])
    _, steps = _run(var, vae, 2, labels, cfg=1.5, top_k=1, cfg_scales=k)
    _, exact = _run(var, vae, 2, labels, cfg=1.5, top_k=1)
    tokens = [idx for idx, _ in steps]
    with torch.no_grad():
        cond_only = var(labels, vae.quantize.codes_to_var_input(tokens))
    start = 0
    for si, ((idx, logits), pn) in enumerate(zip(steps, var.config.patch_nums)):
        if si < k:
            assert torch.equal(logits, exact[si][1])
        else:
            torch.testing.assert_close(logits, cond_only[:, start:start + pn * pn], atol=1e-4, rtol=1e-5)
        start += pn * pn
    assert k == 0 or not torch.equal(steps[-1][0], exact[-1][0])  # guidance does move tokens on tiny10


def test_int8_is_deterministic_and_close_to_exact(golden):
    """Greedy tokens of 8 classes against exact mode: the fast mode's documented distance (every scale >= 90%)."""
    exact_var, vae, _, _ = _prepared(golden, "tiny10")
    q_var, _, _, _ = _prepared(golden, "tiny10", quantize="int8")
    labels = torch.arange(8) % 10
    a, a_steps = _run(q_var, vae, 8, labels, cfg=1.5, top_k=1)
    b, _ = _run(q_var, vae, 8, labels, cfg=1.5, top_k=1)
    assert torch.equal(a, b)
    _, e_steps = _run(exact_var, vae, 8, labels, cfg=1.5, top_k=1)
    agreement = [(x[0] == y[0]).float().mean().item() for x, y in zip(a_steps, e_steps)]
    assert min(agreement) >= 0.9, agreement
    assert sum(not torch.equal(x[1], y[1]) for x, y in zip(a_steps, e_steps)) > 0  # int8 logits are not exact


def test_exact_mode_keeps_its_weights_packed_once_and_gives_them_back_plain():
    """DenseLinear packs its weight once in oneDNN's layout and keeps no plain copy (no doubled memory); the
    prepared model's state dict is the original's bit for bit, and the layer computes F.linear (also with input
    gradients, through the plain fallback)."""
    var = build_tiny_var().eval()
    want = {k: v.clone() for k, v in var.state_dict().items()}
    original = weakref.ref(var.blocks[0].attn.proj.weight)
    prepare_for_sampling(var, None, "cpu", kernels=Kernels())
    gc.collect()
    assert original() is None  # the plain weight is freed, not kept beside the packed one
    layer = var.blocks[0].attn.proj
    assert isinstance(layer, DenseLinear)
    assert layer.packed is not None, "this PyTorch build cannot pack oneDNN weights (exact mode would repack per call)"
    assert "weight" not in dict(layer.named_parameters()) and layer.packed.is_mkldnn
    got = var.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    x = torch.randn(5, layer.in_features, requires_grad=True)
    plain = F.linear(x, want["blocks.0.attn.proj.weight"], want["blocks.0.attn.proj.bias"])
    with torch.no_grad():
        torch.testing.assert_close(layer(x), plain, atol=1e-5, rtol=1e-5)
    layer(x).sum().backward()
    assert x.grad is not None


def test_the_int8_gelu_is_tanh_gelu():
    """fast.gelu_tanh_ (x * sigmoid(2u), faster on a CPU) against PyTorch's tanh-GELU in float64, from -1e30 to
    1e30: fp32 rounding apart, the same function, in place."""
    x = torch.cat([torch.linspace(-12, 12, 20001), torch.tensor([0.0, -0.0, 50.0, -50.0, 1e30, -1e30])])
    want = F.gelu(x.double(), approximate="tanh")
    got = x.clone()
    assert fast_module.gelu_tanh_(got) is got
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)


def test_int8_rows_are_rounded_half_to_even_into_1_to_255():
    """fast.quantize_rows against round(x / scale) + 128: ties (k + 0.5 steps), both ends, zeros, a zero row."""
    x = torch.randn(6, 300, generator=torch.Generator().manual_seed(0)) * torch.tensor([1e-3, 1, 3, 1e4, 1, 0])[:, None]
    x[1, :10] = torch.arange(-5, 5) + 0.5  # with row 1's max below, these are exact half steps
    x[1] = x[1].clamp(-50.8, 50.8)
    x[1, 10], x[1, 11] = 127.0, -127.0  # scale exactly 1
    codes, scale = fast_module.quantize_rows(x)
    want = (x / scale).round().add(128).clamp(1, 255).to(torch.uint8)
    assert codes.dtype == torch.uint8 and torch.equal(codes, want)
    assert scale[1].item() == 1.0 and codes[1, :10].tolist() == [124, 124, 126, 126, 128, 128, 130, 130, 132, 132]
    assert codes[:5].max() == 255 and codes[:5].min() == 1 and bool((codes[5] == 128).all())


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_reduced_precision_stores_the_per_call_linears_in_its_dtype(quantize):
    """Under bf16 the AdaLN Linears and the head keep bf16 weights instead of being cast at every call; the products
    are autocast's own, bit for bit (a stored cast is the same cast)."""
    torch.manual_seed(0)
    var = build_tiny_var().eval()
    cond = var.condition(torch.tensor([1, 2]))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = var.block_modulations(cond)
        want_head = var.head(var.head_nm(torch.randn(2, 3, var.config.embed_dim,
                                                     generator=torch.Generator().manual_seed(1)), cond))
    prepare_for_sampling(var, None, "cpu", torch.bfloat16, quantize=quantize)
    stored = [b.ada_lin[-1] for b in var.blocks] + [var.head_nm.ada_lin[-1], var.head]
    assert all(m.weight.dtype == torch.bfloat16 for m in stored)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = var.block_modulations(cond)
        got_head = var.head(var.head_nm(torch.randn(2, 3, var.config.embed_dim,
                                                    generator=torch.Generator().manual_seed(1)), cond))
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert torch.equal(got_head, want_head)


def test_int8_layers_run_in_chunks_with_the_same_result(monkeypatch):
    """Int8Linear and FusedFFN take CHUNK_TOKENS tokens at a time (so that big batches stay in the CPU's cache):
    rows are independent, so the result is the whole run's bit for bit."""
    var = quantize_var(build_tiny_var(), "int8", "cpu")
    block = var.blocks[0]
    x = torch.randn(3, 30, var.config.embed_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = block.ffn(x)
        chunks = []
        real = Int8Linear._rows
        monkeypatch.setattr(Int8Linear, "_rows", lambda self, *a: chunks.append(len(a[0])) or real(self, *a))
        monkeypatch.setattr(fast_module, "CHUNK_TOKENS", 16)
        chunked = block.ffn(x)
    assert isinstance(block.ffn, FusedFFN) and torch.equal(chunked, whole)
    assert max(chunks) <= 16 and sum(chunks) == 2 * 90  # fc1 and fc2, every one of the 90 tokens once


def test_bf16_weights_run_deterministically_under_autocast(golden):
    var, vae, _, _ = _prepared(golden, "tiny", quantize="bf16", dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, _ = _run(var, vae, 2, torch.tensor([1, 3]), cfg=1.5, top_k=8, top_p=0.9)
        b, _ = _run(var, vae, 2, torch.tensor([1, 3]), cfg=1.5, top_k=8, top_p=0.9)
    assert a.shape == (2, 3, 64, 64) and torch.equal(a, b)


def test_unknown_quantize_mode_is_refused():
    with pytest.raises(PopyouError, match="unknown --quantize 'int4'"):
        quantize_var(build_tiny_var(), "int4", "cpu")
    var = build_tiny_var()
    assert quantize_var(var, None, "cpu") is var


class CallAgain:
    """CPU stand-in for a CUDA graph: 'replaying' calls the captured step again. Like a graph, it only sees the
    static buffers it was built on, so a per-call tensor that bypasses them would be stale here too."""

    def __init__(self, fn):
        self.fn = fn

    def replay(self):
        return self.fn()


def test_static_steps_replayed_across_calls_equal_eager_sampling():
    """The CUDA-graph path's data flow (static KV cache, static inputs, one captured step per scale and row count)
    checked on the CPU: second and third calls replay steps captured during the first."""
    vae = build_tiny_vqvae()
    eager = build_tiny_var()
    static = copy.deepcopy(eager)
    graphs = SamplingGraphs(CallAgain)  # what the Pipeline keeps and passes to every call
    delta = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    calls = [dict(labels=torch.tensor([1, 2]), seed=0, cfg_scales=None),
             dict(labels=torch.tensor([5, 7]), seed=9, cfg_scales=2, cond_delta=delta),
             dict(labels=torch.tensor([3, 3]), seed=4, cfg_scales=None, cond_delta=-delta)]
    for call in calls:
        kw = dict(cfg=2.0, top_k=8, top_p=0.9, **call)
        want, _ = _run(eager, vae, 2, kw.pop("labels"), seed=kw.pop("seed"), **kw)
        got, _ = _run(static, vae, 2, call["labels"], seed=call["seed"], graphs=graphs, **kw)
        assert torch.equal(got, want)
    assert len(graphs.steps[(4, "cpu", torch.float32)].graphs) == 4 + 2  # (scale, rows) keys


def test_bench_sample_tiny_reports_every_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("POPYOU_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "sample.json"
    res = invoke("bench", "sample", "--arch", "tiny", "--batch-sizes", "1", "--repeats", "1", "--video-frames", "2",
                 "--no-distances", "--out", out)
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    modes = [r["mode"] for r in result["results"]]
    assert modes[:4] == ["reference pattern", "exact", "--quantize int8", "--cfg-scales 8"]
    assert all(r["s_per_image"] > 0 and r["vs_reference"] > 0 for r in result["results"])
    assert [v["frames"] for v in result["beta_video"]] == [2, 2, 2]
    assert modes[-1].startswith("--fast (= ") and result["autotune"]["used_fast_mode"] in autotune.FAST_CHOICES
    assert result["beta_video"][-1]["mode"] == modes[-1]  # the demo's default


def test_bench_sample_names_the_cpu_the_kernels_and_the_fast_pick(tmp_path, monkeypatch):
    monkeypatch.setenv("POPYOU_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(autotune.FAST_MODE_ENV, "int8")
    res = invoke("bench", "sample", "--arch", "tiny", "--batch-sizes", "1", "--repeats", "1", "--video-frames", "0",
                 "--no-distances", "--out", tmp_path / "s.json")
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    for fact in ("CPU: ", "AMX ", "AVX512-BF16 ", "VNNI ", "AVX2 ", "exact-mode kernels gemm=", "--fast picks ",
                 "forced by POPYOU_FAST_MODE=int8", "--fast (= --quantize int8)"):
        assert fact in text, fact
    result = json.loads((tmp_path / "s.json").read_text())
    assert result["autotune"]["cached"] is False and "cpu_flags" in result["machine"]
    assert result["results"][-1]["mode"] == "--fast (= --quantize int8)"

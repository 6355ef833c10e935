"""How `--fast` and exact mode's kernels are chosen (popyou_cli/models/autotune.py), with a fake timer: no assertion here
depends on how fast this machine is. The timer says how long each measured case takes; the tests check what is
chosen from that, what is cached, and what the environment variables force."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from popyou_cli.models import autotune

from popyou_cli.core import devices
from popyou_cli.core.errors import PopyouError
from popyou_cli.models.checkpoints import build_tiny_var, build_tiny_vqvae
from popyou_cli.models.fast import DEFAULT_KERNELS, Kernels
from popyou_cli.models import fast_decoder
from popyou_cli.models.fast_decoder import winograd_available
from popyou_cli.models.var import VAR

BF16_CPU = devices.CpuInfo("Test CPU with AMX", frozenset({"amx_bf16", "amx_int8", "amx_tile", "avx512_bf16",
                                                           "avx512_vnni", "avx512f", "avx2", "fma"}))
AVX2_CPU = devices.CpuInfo("Test CPU without bf16", frozenset({"avx2", "fma"}))


class FakeTimer:
    """Seconds per case label (default 1 s); records every call and never runs the measured code."""

    def __init__(self, seconds: dict | None = None):
        self.seconds = dict(seconds or {})
        self.calls = []

    def __call__(self, label, fn):
        self.calls.append(label)
        return self.seconds.get(label, 1.0)


def refuse(label, fn):
    raise AssertionError(f"timed {label}, but nothing should be measured")


@pytest.fixture
def models():
    return build_tiny_var(), build_tiny_vqvae()


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Each test with an empty cache of its own and no forced choice; a bf16 CPU unless a test says otherwise."""
    monkeypatch.setenv("POPYOU_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(autotune.FAST_MODE_ENV, raising=False)
    monkeypatch.delenv(autotune.KERNELS_ENV, raising=False)
    monkeypatch.setattr(devices, "cpu_info", lambda: BF16_CPU)


def _cases(timer):
    return sorted(set(timer.calls))


@pytest.mark.parametrize("fastest_block, mode", [("block int8", "int8"), ("block bf16", "bf16"),
                                                 ("block bf16+int8", "bf16+int8"), ("block onednn+gelu", "exact")])
def test_the_fastest_candidate_wins(models, fastest_block, mode):
    timer = FakeTimer({fastest_block: 0.1})
    tuning = autotune.measure(*models, timer=timer, cpu=BF16_CPU)
    assert tuning.fast_mode == mode
    assert tuning.estimates_s[mode] == min(tuning.estimates_s.values())
    # every case was called once untimed, then timed in REPEATS rounds
    assert all(timer.calls.count(label) == 1 + autotune.REPEATS for label in _cases(timer))


def test_a_reduced_precision_mode_counts_its_faster_attention(models):
    """bf16's block with fused attention is slower than int8's, with unfused attention faster: bf16 wins."""
    timer = FakeTimer({"block int8": 0.5, "block bf16": 0.6, "block bf16 unfused attention": 0.4})
    tuning = autotune.measure(*models, timer=timer, cpu=BF16_CPU)
    assert tuning.fast_mode == "bf16" and tuning.kernels.attention == "unfused"
    assert {"block bf16", "block bf16 unfused attention", "block bf16+int8 unfused attention"} <= set(timer.calls)
    assert "block int8 unfused attention" not in timer.calls  # fp32 modes always run the fused kernel


def test_the_decoder_counts_in_the_estimate(models):
    """bf16 blocks a little slower than int8 ones, but bf16 convolutions much faster: bf16 wins on the whole."""
    timer = FakeTimer({"block int8": 0.5, "block bf16": 0.6, "conv fp32": 10.0, "conv fp32 channels_last": 10.0,
                       "conv bf16 nchw": 1.0, "conv bf16 channels_last": 2.0})
    tuning = autotune.measure(*models, timer=timer, cpu=BF16_CPU)
    assert tuning.fast_mode == "bf16" and tuning.kernels.channels_last is False


@pytest.mark.parametrize("seconds, kernels", [
    ({"block plain": 0.5}, Kernels(gemm="plain")),
    ({"block onednn": 0.5}, Kernels(fused_gelu=False)),
    ({"block onednn+gelu": 0.5}, Kernels()),
    ({"block onednn+gelu": 0.5, "upsample nearest": 0.5}, Kernels(upsample="nearest")),
    ({"block plain": 0.5, "conv bf16 channels_last": 2.0}, Kernels(gemm="plain", channels_last=False)),
    ({"block onednn+gelu": 0.5, "conv fp32 channels_last": 2.0, "conv fp32 winograd": 2.0}, Kernels(fp32_conv="nchw")),
    # exact mode's channels_last pays for its two-pass norm: the conv plus the norm decide, not the conv alone
    ({"block onednn+gelu": 0.5, "conv fp32 channels_last": 0.8, "norm fp32 channels_last": 1.5,
      "conv fp32 winograd": 2.0}, Kernels(fp32_conv="nchw")),
    ({"block onednn+gelu": 0.5, "conv fp32 channels_last": 0.7, "norm fp32 channels_last": 1.2}, Kernels()),
    ({"block onednn+gelu": 0.5, "block bf16+int8": 0.2}, Kernels(attention="fused")),
    ({"block onednn+gelu": 0.5, "block bf16+int8 unfused attention": 0.2}, Kernels(attention="unfused")),
    # the picked mode's block decides: bf16 wins here, and its unfused attention is the faster one
    ({"block onednn+gelu": 0.5, "block bf16": 0.3, "block bf16 unfused attention": 0.2, "block bf16+int8": 0.25},
     Kernels(attention="unfused")),
])
def test_each_exact_kernel_is_kept_only_where_it_is_faster(models, seconds, kernels):
    timer = FakeTimer(seconds)
    assert autotune.measure(*models, timer=timer, cpu=BF16_CPU).kernels == kernels


@pytest.mark.skipif(not winograd_available(), reason="this PyTorch build has no NNPACK (no Winograd case)")
@pytest.mark.parametrize("seconds, fp32_conv", [
    ({"conv fp32 winograd": 0.5}, "winograd"),
    # Winograd runs NCHW, so it pays the stock norm: against channels_last, the conv plus the norm decide
    ({"conv fp32 winograd": 0.9, "norm fp32 nchw": 1.5, "conv fp32 channels_last": 1.0,
      "norm fp32 channels_last": 1.0}, "channels_last"),
    ({"conv fp32 winograd": 1.1, "conv fp32": 1.0, "conv fp32 channels_last": 1.5}, "nchw"),
])
def test_the_fp32_decoder_takes_winograd_only_where_it_is_faster(models, seconds, fp32_conv, monkeypatch):
    monkeypatch.setattr(fast_decoder, "WINOGRAD_MIN_SIDE", 1)  # the tiny decoder's heaviest conv is on a small map
    timer = FakeTimer(seconds)
    tuning = autotune.measure(*models, timer=timer, cpu=BF16_CPU)
    assert "conv fp32 winograd" in timer.calls and tuning.kernels.fp32_conv == fp32_conv
    # exact mode's estimate follows the chosen kernel: a faster Winograd conv makes exact cheaper
    slower = autotune.measure(*models, timer=FakeTimer({**seconds, "conv fp32 winograd": 5.0}), cpu=BF16_CPU)
    assert (tuning.estimates_s["exact"] < slower.estimates_s["exact"]) == (fp32_conv == "winograd")


def test_modes_below_90_percent_agreement_are_never_chosen(models):
    assert [m.name for m in autotune.MODES if not m.candidate] == ["cfg-scales 8"]  # 0.42 of exact's tokens
    assert autotune.fastest({"exact": 5.0, "cfg-scales 8": 0.1, "int8": 3.0}) == "int8"
    assert autotune.fastest({"exact": 5.0, "cfg-scales 8": 0.1}) == "exact"
    with pytest.raises(PopyouError):
        autotune.mode_named("cfg-scales 8")
    timer = FakeTimer()
    autotune.measure(*models, timer=timer, cpu=BF16_CPU)
    assert not any("cfg" in label for label in timer.calls)  # never even measured


def test_a_cpu_without_bf16_instructions_measures_no_bf16_mode(models):
    timer = FakeTimer({"block int8": 0.1})
    tuning = autotune.measure(*models, timer=timer, cpu=AVX2_CPU)
    assert not any("bf16" in label for label in timer.calls)
    assert set(tuning.estimates_s) == {"exact", "int8"} and tuning.fast_mode == "int8"
    assert tuning.kernels.channels_last == DEFAULT_KERNELS.channels_last  # not measured: the default stays


def test_the_cache_is_used_the_second_time(models, tmp_path):
    var, vae = models
    timer = FakeTimer({"block int8": 0.1})
    first = autotune.tune(var, vae, timer)
    assert first.fast_mode == "int8" and timer.calls
    entries = json.loads((tmp_path / "cache" / autotune.CACHE_FILE).read_text())["entries"]
    assert list(entries) == [autotune.cache_key(var, vae)]
    again = autotune.tune(var, vae, refuse)  # the second time: no timing at all
    assert again == first
    assert autotune.fast_mode(var, vae, torch.device("cpu"), refuse).name == "int8"
    assert autotune.exact_kernels(var, vae, torch.device("cpu"), refuse) == first.kernels


def test_the_key_is_cpu_flags_torch_threads_and_model_shape(models, monkeypatch):
    var, vae = models
    key = autotune.cache_key(var, vae, BF16_CPU)
    assert "Test CPU with AMX" in key and "amx_bf16" in key and torch.__version__ in key
    assert key != autotune.cache_key(var, vae, AVX2_CPU)
    wider = VAR(replace(var.config, embed_dim=128, num_heads=2))
    assert key != autotune.cache_key(wider, vae, BF16_CPU)
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert key != autotune.cache_key(var, vae, BF16_CPU)


@pytest.mark.parametrize("content", ["{not json", json.dumps([1, 2]), json.dumps({"version": autotune.CACHE_VERSION, "entries": 5}),
                                     "corrupt entry"])
def test_a_corrupt_cache_is_ignored_and_rewritten(models, tmp_path, content):
    var, vae = models
    path = tmp_path / "cache" / autotune.CACHE_FILE
    path.parent.mkdir(parents=True)
    if content == "corrupt entry":  # valid JSON, but the entry names a mode --fast may not pick
        good = autotune.measure(var, vae, FakeTimer(), BF16_CPU).as_dict()
        content = json.dumps({"version": autotune.CACHE_VERSION, "entries": {autotune.cache_key(var, vae): {**good,
                                                                                      "fast_mode": "cfg-scales 8"}}})
    path.write_text(content)
    timer = FakeTimer({"block bf16": 0.1})
    assert autotune.tune(var, vae, timer).fast_mode == "bf16" and timer.calls  # measured again
    rewritten = json.loads(path.read_text())
    assert rewritten["entries"][autotune.cache_key(var, vae)]["fast_mode"] == "bf16"
    assert autotune.tune(var, vae, refuse).fast_mode == "bf16"


def test_the_environment_forces_the_mode_and_the_kernels(models, monkeypatch):
    var, vae = models
    cpu = torch.device("cpu")
    monkeypatch.setenv(autotune.FAST_MODE_ENV, "BF16+int8")
    monkeypatch.setenv(autotune.KERNELS_ENV, "gemm=plain, upsample=nearest")
    assert autotune.fast_mode(var, vae, cpu, refuse).name == "bf16+int8"
    assert autotune.exact_kernels(var, vae, cpu, refuse) == Kernels(gemm="plain", upsample="nearest")
    plan = autotune.prepare(var, vae, cpu, torch.float32, fast=True, timer=refuse)
    assert (plan.fast_mode, plan.dtype, plan.quantize) == ("bf16+int8", torch.bfloat16, "int8")
    monkeypatch.setenv(autotune.FAST_MODE_ENV, "cfg-scales 8")
    with pytest.raises(PopyouError, match="POPYOU_FAST_MODE: unknown fast mode 'cfg-scales 8' .use exact, int8, bf16, "
                                          "bf16\\+int8"):
        autotune.fast_mode(var, vae, cpu, refuse)
    monkeypatch.setenv(autotune.KERNELS_ENV, "gemm=mkl")
    with pytest.raises(PopyouError, match="POPYOU_EXACT_KERNELS: unknown kernel choice 'gemm=mkl'"):
        autotune.exact_kernels(var, vae, cpu, refuse)


def test_on_cuda_fast_is_bf16_and_nothing_is_measured(models):
    var, vae = models
    cuda = torch.device("cuda")
    assert autotune.fast_mode(var, vae, cuda, refuse).name == "bf16"
    assert autotune.exact_kernels(var, vae, cuda, refuse) == DEFAULT_KERNELS


def test_kernel_spellings_round_trip():
    for k in Kernels.exact_choices():
        assert Kernels.parse(k.spelled()) == k
    assert Kernels(gemm="plain", fused_gelu=True) == Kernels(gemm="plain", fused_gelu=False)  # one per behaviour
    assert len(set(Kernels.exact_choices())) == 18  # 3 GEMM ways x 2 upsamplings x 3 fp32 decoder convs


def test_measure_times_the_real_cases_on_the_tiny_models(models):
    """The real timer, once: every case runs on the models' shapes and the choices come out well-formed."""
    tuning = autotune.measure(*models, cpu=devices.CpuInfo("real", frozenset({"avx512_bf16"})))
    assert set(tuning.estimates_s) <= set(autotune.FAST_CHOICES) and tuning.fast_mode in autotune.FAST_CHOICES
    assert {"block plain", "conv fp32", "upsample subpixel", "upsample nearest"} <= set(tuning.timings_ms)
    assert all(ms > 0 for ms in tuning.timings_ms.values())


def test_fast_pipelines_sample_as_their_mode_does(monkeypatch):
    """Pipeline.from_pretrained(..., fast=True): the picked mode, the same images as asking for it by name."""
    from popyou_cli import Pipeline

    monkeypatch.setenv(autotune.FAST_MODE_ENV, "int8")
    fast = Pipeline.from_pretrained("tiny", device="cpu", fast=True)
    named = Pipeline.from_pretrained("tiny", device="cpu", quantize="int8")
    assert (fast.fast_mode, fast.quantize, fast.dtype) == ("int8", "int8", torch.float32)
    assert fast.speed_record == {"dtype": "fp32", "quantize": "int8", "fast": "int8"}
    a, b = (np.stack([np.asarray(im) for im in p(None, n=2, class_id=3, seed=5)]) for p in (fast, named))
    assert np.array_equal(a, b)
    assert Pipeline.from_pretrained("tiny", device="cpu").fast_mode is None
    with pytest.raises(PopyouError, match="--fast picks --dtype and --quantize itself"):
        Pipeline.from_pretrained("tiny", device="cpu", fast=True, quantize="int8")
    with pytest.raises(PopyouError, match="--fast picks"):
        Pipeline.from_model("tiny", device="cpu", fast=True, dtype="bf16")


def test_fast_pipelines_measure_once_and_name_their_pick(tmp_path):
    """Without the environment variable: measured on the tiny shapes, cached, and the pick is a candidate."""
    from popyou_cli import Pipeline

    pipe = Pipeline.from_model("tiny", device="cpu", fast=True)
    assert pipe.fast_mode in autotune.FAST_CHOICES
    assert json.loads((tmp_path / "cache" / autotune.CACHE_FILE).read_text())["entries"]
    assert len(pipe(None, n=1, class_id=1, seed=0)) == 1


def test_a_pick_measured_on_a_busy_machine_is_measured_again_then_kept(models, monkeypatch):
    """Measured while another program held the CPUs (popyou got 50% of them): the pick is used and said, but the
    next run measures again, up to BUSY_RETRIES times; then the last busy pick is kept."""
    var, vae = models
    monkeypatch.setattr(autotune, "cpu_share", lambda wall, cpu, threads: 0.5)
    timer = FakeTimer({"block int8": 0.1})
    for attempt in range(1, autotune.BUSY_RETRIES + 1):
        timer.calls.clear()
        with pytest.warns(RuntimeWarning, match="busy .* 50% of the CPUs"):
            tuning = autotune.tune(var, vae, timer)
        assert timer.calls and tuning.fast_mode == "int8" and tuning.busy and tuning.busy_tries == attempt
    assert autotune.tune(var, vae, refuse).busy_tries == autotune.BUSY_RETRIES  # kept now: nothing measured
    assert "busy machine" in autotune.tune(var, vae, refuse).summary()


def test_an_idle_measurement_is_trusted_at_once(models, monkeypatch):
    var, vae = models
    monkeypatch.setattr(autotune, "cpu_share", lambda wall, cpu, threads: 0.97)
    first = autotune.tune(var, vae, FakeTimer({"block bf16": 0.1}))
    assert not first.busy and first.busy_tries == 0 and "busy" not in first.summary()
    assert autotune.tune(var, vae, refuse) == first


@pytest.mark.parametrize("wall, cpu, threads, share", [(2.0, 3.92, 2, 0.98), (2.0, 2.44, 2, 0.61), (0.01, 0.0, 2, 1.0),
                                                       (1.0, 9.0, 2, 1.0)])
def test_the_cpu_share_is_cpu_time_over_wall_time_and_threads(wall, cpu, threads, share):
    assert autotune.cpu_share(wall, cpu, threads) == pytest.approx(share)


def test_the_fastest_round_counts_not_a_disturbed_one(models):
    """A case slowed in one round by another program (3 s instead of 0.1 s) is still read as 0.1 s."""
    rounds = iter([0.1] * 10)

    class Disturbed(FakeTimer):
        def __call__(self, label, fn):
            self.calls.append(label)
            if label == "block int8":
                n = sum(c == label for c in self.calls)
                return 3.0 if n == 3 else next(rounds)
            return 1.0

    tuning = autotune.measure(*models, timer=Disturbed(), cpu=BF16_CPU)
    assert tuning.timings_ms["block int8"] == pytest.approx(100.0) and tuning.fast_mode == "int8"


EPYC_CPUINFO = ("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx2 fma avx512f avx512_bf16 avx512_vnni "
                "sha_ni\n\nprocessor\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx2 fma avx512f\n")


@pytest.mark.parametrize("cap, flags", [
    (None, {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni"}),
    ("ALL", {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni"}),
    ("avx512_core_vnni", {"avx2", "fma", "avx512f", "avx512_vnni"}),
    ("AVX512_CORE", {"avx2", "fma", "avx512f"}),
    ("AVX2", {"avx2", "fma"}),
    ("AVX512_CORE_FP16", {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni"}),
    ("SSE41", set()),
])
def test_the_cpu_is_read_from_proc_cpuinfo_within_onednns_isa_cap(cap, flags, monkeypatch):
    """The first processor's model and flags (those that decide the modes); $ONEDNN_MAX_CPU_ISA drops the flags
    oneDNN may not use, so a capped run measures no bf16 mode and has a cache key of its own."""
    monkeypatch.undo()  # the autouse fixture's stand-in for cpu_info
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    cpu = devices.cpu_info(EPYC_CPUINFO)
    assert cpu.model == "AMD EPYC" and cpu.flags == flags
    assert cpu.native_bf16 == ("avx512_bf16" in flags)

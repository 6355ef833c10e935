"""Named settings per stage: "full" (real Hub models and sizes, for a GPU) and "tiny" (seeded random stand-ins
built in code: offline, seconds on CPU, for tests and smoke runs).

Each data stage has its own frozen dataclass and a dict of presets; the two training stages share one,
`TrainPreset`. CLI options default to None and fall back to the chosen preset field by field (see `resolve`).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Mapping, TypeVar

from popyou_cli.core.errors import PopyouError

TINY = "tiny"  # the spec of popyou's seeded random stand-in models, and the preset that uses them
PRESET_NAMES = ("full", TINY)

# The real models the "full" presets and the defaults name (Hub specs, core/hub.py).
OFFICIAL_REPO = "FoundationVision/var"
DEFAULT_VAR = f"{OFFICIAL_REPO}/var_d16.pth"
DEFAULT_VAE = f"{OFFICIAL_REPO}/vae_ch160v4096z32.pth"
DEFAULT_SIGLIP, DEFAULT_SIGLIP_PRETRAINED = "ViT-B-16-SigLIP", "webli"  # open_clip's name and tag
# The model the original demo runs: the demo Space's file (the model repo AmitIsraeli/VARpop holds only a README)
DEFAULT_PIPELINE = "spaces/AmitIsraeli/PopYou/VARtext_v1.pth"

# The values of --dtype and --quantize, here (no torch) so that --help lists them without loading torch.
DTYPES = ("auto", "fp32", "bf16", "fp16")  # the spellings shown in --help; DTYPE_ALIASES parse too
DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}
QUANTIZE_MODES = ("int8", "bf16")  # models/fast.py

T = TypeVar("T")


@dataclass(frozen=True)
class GenDataPreset:
    """Settings of `popyou gen-data`."""
    model: str  # diffusers text-to-image pipeline: Hub id, local folder, or "tiny"
    size: int  # height = width in pixels (a multiple of 8)
    steps: int  # denoising steps (SDXL-Turbo is trained for 1 to 4)
    guidance: float  # classifier-free guidance; SDXL-Turbo is trained without it (0)
    batch_size: int  # images per pipeline call
    shard_size: int  # rows per shard file: the unit of resume and of work split across processes
    dtype: str  # auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16
    image_format: str = "png"


GEN_DATA_PRESETS: dict[str, GenDataPreset] = {
    # The original recipe's model and size with Turbo's intended 1 step and no guidance. A shard of 1000 PNGs at
    # 512 px is about 400 MB: big enough for few files at 100k rows, small enough that a kill loses seconds.
    "full": GenDataPreset(model="stabilityai/sdxl-turbo", size=512, steps=1, guidance=0.0, batch_size=8,
                          shard_size=1000, dtype="auto"),
    # Small shards so that resume and multi-process splitting are exercised even on a few dozen rows.
    "tiny": GenDataPreset(model="tiny", size=64, steps=1, guidance=0.0, batch_size=8, shard_size=16, dtype="auto"),
}


def get_preset(presets: Mapping[str, T], name: str, *, stage: str) -> T:
    """The preset `name` of one stage, or a one-line error listing the known names."""
    try:
        return presets[name]
    except KeyError:
        raise PopyouError(f"{stage}: unknown preset '{name}' (use one of: {', '.join(presets)})") from None


def resolve(preset: T, **overrides: Any) -> T:
    """`preset` with every override that is not None applied (CLI options left out stay at the preset)."""
    names = {f.name for f in fields(preset)}  # type: ignore[arg-type]
    unknown = set(overrides) - names
    if unknown:
        raise TypeError(f"not fields of {type(preset).__name__}: {sorted(unknown)}")
    return replace(preset, **{k: v for k, v in overrides.items() if v is not None})  # type: ignore[type-var]


@dataclass(frozen=True)
class TrainPreset:
    """Every option of `popyou finetune` and `popyou train-adapter`, and the only place they are defined: a new
    option is one field here plus its CLI flag (cli.py passes every command parameter named like a field).
    Defaults are the training loop's; the presets below set what differs. A stage ignores the fields it has no
    use for (finetune: val_fraction, hidden_dim, alpha, beta; train-adapter: scale_weights)."""
    # --- the model
    var: str | None = None  # starting VAR (finetune) / the VAR to steer (train-adapter; default: --init's)
    lora: bool = False  # a peft LoRA instead of full training (finetune) / on top of the frozen VAR (adapter)
    lora_rank: int = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: str = "proj,fc1,fc2,ada_lin.1,word_embed,head"  # every Linear VAR calls as a module
    lora_save: str = "merged"  # merged into the saved weights, or separate (peft files beside the base)
    hidden_dim: int = 0  # adapter hidden width; 0 = the VAR's width (the original's 1024 for d16)
    adapter_init_gain: float = 1e-3  # xavier gain of the adapter's Linear layers (the original's 1e-3)
    alpha: float = 1.0  # cond = alpha * class_emb[class_id] + beta * adapter(embedding)
    beta: float = 1.0
    # --- the loss
    label_smoothing: float = 0.0
    scale_weights: tuple[float, ...] | None = None  # loss weight per scale; None: every token counts the same
    cond_drop: float = 0.1  # a row trains with the null class (and no delta): classifier-free guidance
    hflip: bool = True  # the mirrored image's codes for a random half of the rows, when the data has them
    val_fraction: float = 0.0  # rows held out for the right-vs-shuffled conditioning check (adapter)
    # --- the optimisation
    lr: float = 3e-4
    batch_size: int = 4  # rows per process per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int | None = None  # optimizer steps; when None, `epochs` decides
    epochs: float | None = None
    warmup: float = 0.08  # < 1: a fraction of the steps; >= 1: a number of steps
    schedule: str = "linear"  # linear | cosine | constant (after the warm-up)
    min_lr_ratio: float = 0.0  # the decay ends at lr * min_lr_ratio
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # 0 = off
    mixed_precision: str = "no"  # no | bf16 | fp16
    seed: int = 0  # data order, dropout, LoRA and new-row init
    # --- the run
    save_every: int = 0  # checkpoint every N steps (0: only at the end; -1: never, for benchmarks)
    keep_last: int = 2
    log_every: int = 10
    report_to: str = "none"  # none | tensorboard | wandb
    resume: str | None = "auto"  # auto | never | latest | a checkpoint folder (resume.py)
    resume_with_changes: bool = False  # continue another run's checkpoint with these settings (recorded)
    sample_every: int = 0  # sample grid every N steps (0: only at the end, when n_samples > 0)
    n_samples: int = 8  # images in each sample grid (0: none)
    sample_cfg: float = 4.0
    sample_top_k: int = 900
    sample_top_p: float = 0.95

    def check(self) -> None:
        """One-line errors for values no run can use, before anything loads."""
        from popyou_cli.core.bounds import MAX_BATCH, check_finite, check_int, check_seed

        check_finite(**{f.name: getattr(self, f.name) for f in fields(self)
                        if isinstance(getattr(self, f.name), float)})
        for name in ("scale_weights", "betas"):
            for value in getattr(self, name) or ():
                check_finite(**{name: value})
        check_seed("--seed", self.seed)
        check_int("--batch-size", self.batch_size, 1, MAX_BATCH)
        check_int("--grad-accum", self.grad_accum, 1, MAX_BATCH)
        bad = [n for n in ("batch_size", "grad_accum", "keep_last", "log_every") if getattr(self, n) < 1]
        if bad:
            raise PopyouError(f"{', '.join('--' + b.replace('_', '-') for b in bad)} must be at least 1")
        if self.max_steps is None and self.epochs is None:
            raise PopyouError("give --max-steps or --epochs")
        if (self.max_steps is not None and self.max_steps < 1) or (self.epochs is not None and self.epochs <= 0):
            raise PopyouError("--max-steps and --epochs must be positive")
        if self.lr <= 0 or self.warmup < 0 or not 0 <= self.min_lr_ratio <= 1 or self.grad_clip < 0:
            raise PopyouError("need --lr > 0, --warmup >= 0, --min-lr-ratio in [0, 1] and --grad-clip >= 0")
        for flag, value, allowed in (("--schedule", self.schedule, ("linear", "cosine", "constant")),
                                     ("--dtype", {"no": "fp32"}.get(self.mixed_precision, self.mixed_precision),
                                      ("fp32", "bf16", "fp16")),
                                     ("--report-to", self.report_to, ("none", "tensorboard", "wandb")),
                                     ("--lora-save", self.lora_save, ("merged", "separate"))):
            if value not in allowed:
                raise PopyouError(f"{flag} must be {', '.join(allowed[:-1])} or {allowed[-1]} (got {value})")
        for flag, value in (("--label-smoothing", self.label_smoothing), ("--cond-drop", self.cond_drop),
                            ("--val-fraction", self.val_fraction)):
            if not 0 <= value < 1:
                raise PopyouError(f"{flag} must be in [0, 1) (got {value})")


def train_preset(presets: Mapping[str, TrainPreset], name: str, *, stage: str, **overrides: Any) -> TrainPreset:
    """The preset `name` with the user's options applied (None = the preset's) and checked. --epochs replaces
    the preset's --max-steps; giving both is an error."""
    if overrides.get("epochs") is not None and overrides.get("max_steps") is not None:
        raise PopyouError("give --max-steps or --epochs, not both")
    p = resolve(get_preset(presets, name, stage=stage), **overrides)
    if overrides.get("epochs") is not None:
        p = replace(p, max_steps=None)
    if isinstance(p.scale_weights, list):
        p = replace(p, scale_weights=tuple(p.scale_weights))
    p.check()
    return p


FINETUNE_PRESETS: dict[str, TrainPreset] = {
    # The original stage 1: VAR-d16, lr 3e-4, batch 4 x accumulation 2, label smoothing 0.1, 8% warm-up then
    # linear decay, grad clip 1, fp16 (plus VAR's AdamW betas/decay groups); "tens of thousands of steps".
    "full": TrainPreset(var=DEFAULT_VAR, lr=3e-4, batch_size=4, grad_accum=2,
                        max_steps=30000, warmup=0.08, mixed_precision="fp16", label_smoothing=0.1, cond_drop=0.1,
                        save_every=1000, keep_last=3, sample_every=1000, log_every=20),
    # Seconds on a CPU: the tiny VAR, a few steps, a checkpoint and a grid mid-way.
    "tiny": TrainPreset(var=TINY, lr=3e-3, batch_size=8, max_steps=20, warmup=0.1, cond_drop=0.1, save_every=10,
                        keep_last=2, sample_every=10, log_every=5, lora_rank=4, lora_alpha=8.0, lora_dropout=0.0,
                        n_samples=4, sample_cfg=1.5, sample_top_k=16, sample_top_p=0.0),
}

ADAPTER_PRESETS: dict[str, TrainPreset] = {
    # The original stages 2/3: lr 1e-4, batch 4, 20k steps, CE without smoothing, optional LoRA r8/a32/d0.05;
    # sampling as the original's defaults: cfg 1.5, top-k 0, top-p 0.9.
    "full": TrainPreset(lr=1e-4, batch_size=4, max_steps=20000, warmup=0.02, mixed_precision="fp16",
                        cond_drop=0.1, save_every=1000, keep_last=3, sample_every=1000, log_every=20,
                        val_fraction=0.02, sample_cfg=1.5, sample_top_k=0, sample_top_p=0.9),
    # adapter_init_gain 1: with the original's 1e-3, 20 steps teach the tiny adapter little but its biases, so
    # every prompt would give one cond_delta and the quick-start's pictures would not show the text at all.
    "tiny": TrainPreset(lr=3e-3, batch_size=8, max_steps=20, warmup=0.1, weight_decay=0.0, cond_drop=0.1,
                        adapter_init_gain=1.0,
                        save_every=10, keep_last=2, sample_every=10, log_every=5, val_fraction=0.2, lora_rank=4,
                        lora_alpha=8.0, lora_dropout=0.0, n_samples=4, sample_cfg=1.5, sample_top_k=16,
                        sample_top_p=0.0),
}


@dataclass(frozen=True)
class CaptionPreset:
    """Settings of `popyou caption`."""
    model: str  # Blip2ForConditionalGeneration checkpoint: Hub id, local folder, or "tiny"
    prompt: str | None  # text the caption continues (e.g. "Question: what is this? Answer:"); None = plain caption
    max_new_tokens: int
    num_beams: int  # 1 = greedy search; more = beam search
    batch_size: int
    shard_size: int
    dtype: str  # auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16


CAPTION_PRESETS: dict[str, CaptionPreset] = {
    # BLIP-2 OPT-2.7b in fp16 is about 8 GB; 32 images a batch keeps an 80 GB GPU busy with room for beams.
    "full": CaptionPreset(model="Salesforce/blip2-opt-2.7b", prompt=None, max_new_tokens=30, num_beams=1,
                          batch_size=32, shard_size=1000, dtype="auto"),
    "tiny": CaptionPreset(model="tiny", prompt=None, max_new_tokens=8, num_beams=1, batch_size=8, shard_size=16,
                          dtype="auto"),
}


@dataclass(frozen=True)
class EncodePreset:
    """Settings of `popyou encode`."""
    siglip_model: str  # open_clip model name (or hf-hub: / local-dir:), or "tiny"
    siglip_pretrained: str | None  # open_clip pretrained tag or checkpoint file
    vqvae: str  # VQ-VAE weights spec (models/checkpoints.py), or "tiny"
    patch_nums: tuple[int, ...]  # VAR's scales; the last times 16 is the image size
    resize: int | None  # short side before the centre crop; None = 9/8 of the image size (288 for 256)
    batch_size: int
    shard_size: int
    embed_dtype: str  # float16 or float32: storage type of the SigLIP embeddings
    dtype: str  # SigLIP autocast: auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16; the VQ-VAE runs in fp32


ENCODE_PRESETS: dict[str, EncodePreset] = {
    # The original recipe: SigLIP base (the weights of google/siglip-base-patch16-224) and VAR's 256 px VQ-VAE.
    "full": EncodePreset(siglip_model=DEFAULT_SIGLIP, siglip_pretrained=DEFAULT_SIGLIP_PRETRAINED, vqvae=DEFAULT_VAE,
                         patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), resize=None, batch_size=64, shard_size=1000,
                         embed_dtype="float16", dtype="auto"),
    # 64 px: the tiny VQ-VAE's four scales (1, 2, 3, 4) at 16x downsampling; 72 -> 64 keeps the 9/8 ratio.
    "tiny": EncodePreset(siglip_model=TINY, siglip_pretrained=None, vqvae=TINY, patch_nums=(1, 2, 3, 4),
                         resize=None, batch_size=8, shard_size=16, embed_dtype="float16", dtype="auto"),
}

"""The inference API: load a pipeline once, call it for images.

    from popyou_cli import Pipeline
    pipe = Pipeline.from_pretrained("runs/txt/pipeline")          # or a Hub id; None: the default model
    pipe("a wizard funko pop", seed=1)[0].save("wizard.png")

A text pipeline is VAR + VQ-VAE + adapter + text encoder: prompt -> text embedding -> adapter -> cond_delta ->
VAR with classifier-free guidance -> VQ-VAE decode. A plain VAR model folder (or `Pipeline.from_model`) gives a
class-conditional pipeline with no text.

`Pipeline.from_pretrained(..., fast=True)` samples in the fastest mode for this device among those within 90% of
exact mode's tokens (autotune.py; measured once per machine and model shape, then cached; `pipe.fast_mode` names
it); without it, sampling is exact (the reference VAR's tokens).

Seeds: image k of each prompt uses seed + k, drawn from its own generator, so an image depends only on its own
seed (not on the batch it was made in); for a single image `seed=S` means what the original PopYOU demo's
`g_seed=S` meant. Every returned image carries `img.info["seed"]` (and "prompt", "beta").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from popyou_cli.core import devices
from popyou_cli.models.autotune import check_fast
from popyou_cli.core.errors import PopyouError
from popyou_cli.core.presets import DEFAULT_VAE, TINY
from popyou_cli.models.checkpoints import load_vqvae, recorded_vqvae
from popyou_cli.models.generate import SamplingGraphs, generate
from popyou_cli.models.lora import load_var_lora
from popyou_cli.models.var import VAR
from popyou_cli.models.vqvae import VQVAE
from popyou_cli.infer.resolve import default_pipeline, resolve_pipeline
from popyou_cli.infer.folder import PipelineFolder
from popyou_cli.infer.options import SamplingOptions, seed_or_random


@dataclass
class Pipeline:
    var: VAR
    vqvae: VQVAE
    adapter: nn.Module | None = None  # embedding -> cond_delta; None for a class-conditional pipeline
    text_encoder: object | None = None  # prompts -> (P, dim) unit-norm embeddings (third_party/text.py)
    defaults: dict = field(default_factory=dict)  # pipeline.json "sampling": cfg, top_k, ..., class_id
    config: dict = field(default_factory=dict)  # pipeline.json as read ({} for a plain VAR model)
    source: str = ""
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32  # autocast dtype of sampling
    quantize: str | None = None  # the opt-in fast mode the weights were loaded in (None: exact)
    fast_mode: str | None = None  # what fast=True (--fast) picked: exact, int8, bf16 or bf16+int8; None: not asked
    graphs: SamplingGraphs | None = None  # captured sampling steps (CUDA), replayed by every call

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, spec: str | None = None, *, revision: str | None = None, device="auto", dtype="auto",
                        vae: str | None = None, quantize: str | None = None, fast: bool = False) -> "Pipeline":
        """A pipeline folder; a Hub spec (OWNER/NAME, spaces/OWNER/NAME/FILE, ...@REV, or `revision`) holding a
        popyou pipeline or the original PopYOU model, imported once into popyou's cache; or a VAR model folder,
        local weights file or "tiny" (class-conditional). None: $POPYOU_PIPELINE or the original demo's model."""
        check_fast(fast, dtype, quantize)
        spec = spec or default_pipeline()
        local = Path(spec).expanduser()
        is_model_folder = (local.is_dir() and not PipelineFolder.is_pipeline(local)
                           and (local / "config.json").is_file())
        if is_model_folder or local.is_file() or spec == TINY:
            return cls.from_model(spec, vae, device=device, dtype=dtype, quantize=quantize, fast=fast)
        folder = PipelineFolder.read(resolve_pipeline(spec, revision), spec)
        return cls._load_folder(folder, device, dtype, vae, quantize, fast)

    @classmethod
    def from_model(cls, var: str, vae: str | None = None, *, device="auto", dtype="auto",
                   quantize: str | None = None, fast: bool = False) -> "Pipeline":
        """Class-conditional sampling from a VAR (model folder, Hub file, official .pth or "tiny"). The VQ-VAE is
        `vae`, else the one the model folder records, else the official one."""
        check_fast(fast, dtype, quantize)
        dev = devices.resolve_device(device)
        model, meta = load_var_lora(var, device=dev)  # a finetune folder may keep its LoRA separate
        vqvae = _load_vqvae_for(model, vae or recorded_vqvae(Path(var).expanduser(), meta) or DEFAULT_VAE, dev)
        pipe = cls(var=model, vqvae=vqvae, source=var, device=dev,
                   dtype=devices.resolve_dtype(dtype, dev, "sample"), config={"class_names": meta.get("class_names")})
        return pipe._prepared(quantize, fast)

    @classmethod
    def _load_folder(cls, folder: PipelineFolder, device, dtype, vae, quantize, fast: bool = False) -> "Pipeline":
        from popyou_cli.third_party.text import load_text_encoder
        from popyou_cli.models.adapter import load_adapter

        cfg, shown = folder.config, folder.shown
        dev = devices.resolve_device(device)
        var, _ = load_var_lora(folder.part("var"), device=dev)
        vqvae = _load_vqvae_for(var, vae or folder.part("vqvae"), dev, resize=cfg.get("vqvae_resize"))
        adapter, _ = load_adapter(folder.path, device=dev)
        if adapter.config.var_dim != var.config.embed_dim:
            raise PopyouError(f"{shown}: the adapter outputs {adapter.config.var_dim} values, the VAR is "
                              f"{var.config.embed_dim} wide")
        encoder = load_text_encoder(cfg["encoder"], folder.path, device=dev)
        if encoder.dim != adapter.config.embed_dim:
            raise PopyouError(f"{shown}: the text encoder gives {encoder.dim} values, the adapter takes "
                              f"{adapter.config.embed_dim}")
        pipe = cls(var=var, vqvae=vqvae, adapter=adapter, text_encoder=encoder, defaults=cfg.get("sampling", {}),
                   config=cfg, source=shown, device=dev, dtype=devices.resolve_dtype(dtype, dev, "sample"))
        return pipe._prepared(quantize, fast)

    def _prepared(self, mode: str | None, fast: bool = False) -> "Pipeline":
        """Exact mode's speed-ups (always: same tokens, images within the goldens' tolerance; on a CPU the kernels
        measured fastest here), then the opt-in `--quantize` mode, or with `fast` the fastest mode within 90% of
        exact mode's tokens (autotune.py: measured once per machine and model shape, then cached); models/fast.py
        says what each does. Inference only, like the pipeline."""
        from popyou_cli.models.autotune import prepare

        plan = prepare(self.var, self.vqvae, self.device, self.dtype, quantize=mode, fast=fast)
        self.dtype, self.fast_mode, self.graphs = plan.dtype, plan.fast_mode, plan.graphs
        self.quantize = None if plan.quantize in (None, "none", "fp32") else plan.quantize  # quantize_var's exact
        return self

    @property
    def speed_record(self) -> dict:
        """How the images are made, as samples.jsonl and metrics.json record it."""
        return {"dtype": devices.dtype_name(self.dtype), "quantize": self.quantize, "fast": self.fast_mode}

    def to(self, device) -> "Pipeline":
        self.device = devices.resolve_device(device)
        for part in (self.var, self.vqvae, self.adapter, self.text_encoder):
            if part is not None:
                part.to(self.device)
        return self

    # ------------------------------------------------------------------------------------------ facts
    @property
    def has_text(self) -> bool:
        return self.adapter is not None

    @property
    def image_size(self) -> int:
        return self.vqvae.config.image_size

    @property
    def class_id(self) -> int:
        """The class that text pipelines condition on (the finetuned "funko" row, or the original's 578)."""
        return int(self.defaults.get("class_id", self.var.config.num_classes - 1))

    @property
    def description(self) -> str:
        """One line for people: what this pipeline is and where it came from."""
        prov = self.config.get("provenance") or {}
        if prov.get("kind"):
            rev = f"@{prov['revision']}" if prov.get("revision") else ""
            return f"{prov['kind']} ({prov.get('source', self.source)}{rev})"
        kind = "text-to-image pipeline" if self.has_text else "class-conditional VAR"
        return f"{kind} {self.source}"

    def options(self, **given) -> SamplingOptions:
        """The sampling options for one call: given values, else the pipeline's defaults, else VAR's; checked."""
        return SamplingOptions(**given).resolve(self.defaults, self.var.config.vocab_size)

    # ------------------------------------------------------------------------------------------ generation
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """cond_delta (P, C) for prompts: text encoder -> adapter (unit norm)."""
        if not self.has_text:
            raise PopyouError(f"{self.source} is a class-conditional model with no text encoder; use a pipeline "
                              "folder (popyou train-adapter / popyou import) for prompts")
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise PopyouError(f"prompt {i + 1} is empty; give some text, e.g. \"a wizard funko pop\"")
        with torch.no_grad():
            emb = self.text_encoder(list(prompts)).to(self.device)
            return self.adapter(emb).float()

    def generate_u8(self, cond_delta: torch.Tensor | None, seeds: Sequence[int], opts: SamplingOptions,
                    class_id: int | None = None) -> torch.Tensor:
        """One batch: images (B, H, W, 3) uint8 on CPU. cond_delta rows already carry their beta (or None)."""
        from popyou_cli.core.images import to_uint8

        gens = [devices.generator(self.device, s) for s in seeds]
        label = self.class_id if class_id is None else class_id
        kw = {"cfg_scales": opts.cfg_scales} if opts.cfg_scales is not None else {}
        with devices.autocast(self.device, self.dtype):
            img = generate(self.var, self.vqvae, len(seeds), label, cfg=opts.cfg, top_k=opts.top_k, top_p=opts.top_p,
                           more_smooth=opts.more_smooth, generator=gens, cond_delta=cond_delta, alpha=opts.alpha,
                           beta=1.0, graphs=self.graphs, **kw)
        return to_uint8(img)

    def __call__(self, prompts: str | Sequence[str] | None = None, *, n: int = 1, seed: int | None = None,
                 beta: float | None = None, alpha: float | None = None, cfg: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, more_smooth: bool | None = None,
                 class_id: int | None = None, cfg_scales: int | None = None, batch_size: int = 8,
                 on_image: Callable[[int, int], None] | None = None) -> list:
        """n images per prompt (prompts None: n class-conditional images of `class_id`), as PIL images."""
        from PIL import Image

        from popyou_cli.infer.options import check_counts

        check_counts(n, batch_size)
        seed = seed_or_random(seed, n)
        opts = self.options(cfg=cfg, top_k=top_k, top_p=top_p, more_smooth=more_smooth, alpha=alpha, beta=beta,
                            cfg_scales=cfg_scales)
        if prompts is None:
            texts, delta = [None], None
            if class_id is None and self.has_text:
                raise PopyouError("give a prompt: this is a text-to-image pipeline")
            self._check_class(class_id)
        else:
            texts = [prompts] if isinstance(prompts, str) else list(prompts)
            delta = self.encode_prompts(texts) * opts.beta
        jobs = [(p, k) for p in range(len(texts)) for k in range(n)]  # prompts are batched together
        images = []
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            rows = delta[[p for p, _ in chunk]] if delta is not None else None
            u8 = self.generate_u8(rows, [seed + k for _, k in chunk], opts, class_id)
            for (p, k), arr in zip(chunk, u8):
                img = Image.fromarray(arr.numpy())
                img.info.update(seed=seed + k, prompt=texts[p], prompt_index=p, beta=opts.beta)
                images.append(img)
                if on_image is not None:
                    on_image(len(images), len(jobs))
        return images

    def beta_sweep(self, prompt: str, betas: Sequence[float], *, seed: int | None = None, batch_size: int = 8,
                   on_frame: Callable[[int, int], None] | None = None, should_stop: Callable[[], bool] | None = None,
                   **options) -> list:
        """One prompt, one seed, one image per beta: frame i is pipe(prompt, seed=seed, beta=betas[i])[0] (the same
        tokens; batched frames may differ from a single image by one level of decoder rounding)."""
        from PIL import Image

        seed = seed_or_random(seed)
        opts = self.options(**options)
        delta = self.encode_prompts([prompt])
        frames = []
        for start in range(0, len(betas), batch_size):
            if should_stop is not None and should_stop():
                break
            chunk = list(betas[start:start + batch_size])
            scaled = delta.expand(len(chunk), -1) * torch.tensor(chunk, device=self.device).unsqueeze(1)
            for b, arr in zip(chunk, self.generate_u8(scaled, [seed] * len(chunk), opts)):
                img = Image.fromarray(arr.numpy())
                img.info.update(seed=seed, prompt=prompt, beta=float(b))
                frames.append(img)
                if on_frame is not None:
                    on_frame(len(frames), len(betas))
        return frames

    def _check_class(self, class_id: int | None) -> None:
        if class_id is None:
            raise PopyouError("class-conditional sampling needs a class id (--class-id N)")
        if not 0 <= class_id < self.var.config.num_classes:
            raise PopyouError(f"--class-id {class_id} is out of range: this model has classes "
                              f"0..{self.var.config.num_classes - 1}")


def _load_vqvae_for(var: VAR, spec: str, dev: torch.device, resize: str | None = None) -> VQVAE:
    """The VQ-VAE, checked to fit the VAR; `resize` overrides its quantizer's resize mode (imported original
    models resize with bilinear, see models/vqvae.py)."""
    vqvae = load_vqvae(spec, patch_nums=var.config.patch_nums, device=dev, resize=resize)
    if vqvae.config.vocab_size != var.config.vocab_size or vqvae.config.z_channels != var.config.z_channels:
        raise PopyouError(f"the VQ-VAE {spec} ({vqvae.config.vocab_size} codes x {vqvae.config.z_channels}) does not "
                          f"fit the VAR ({var.config.vocab_size} x {var.config.z_channels})")
    return vqvae

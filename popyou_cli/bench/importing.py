"""`popyou bench import`: seconds and peak memory of `popyou import` on a file with the original's key layout and
random weights (VAR with peft LoRA on every Linear, the VQ-VAE, a SigLIP text tower, the adapter), in the demo
Space's layout (`VARtext_v1.pth`: a plain state dict, the VQ-VAE without its encoder; the default) or the Lightning
one; then the imported folder samples one image, so the bench shows the import made something that runs.

The import runs in a child process that reports its own peak RSS (VmHWM, which counts the memory-mapped
checkpoint pages it touched) and the seconds `import_checkpoint` took; a second child that only imports the same
modules gives the baseline that Python, torch and transformers cost before any weight is read.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from popyou_cli.bench.common import machine_info
from popyou_cli.core.errors import PopyouError
from popyou_cli.models.var import VAR, VARConfig
from popyou_cli.models.vqvae import VQVAE, VQVAEConfig

_LORA_R = 8

# What runs in the children: the same imports in both, the import itself only in the measured one.
_CHILD = """
import json, resource, sys, time
from popyou_cli.infer.import_model import import_checkpoint
t = time.perf_counter()
if sys.argv[1] == "import":
    import_checkpoint(sys.argv[2], sys.argv[3], text_encoder=sys.argv[4], tokenizer=sys.argv[4])
elif sys.argv[1] == "sample":
    from popyou_cli.infer.pipeline import Pipeline
    Pipeline.from_pretrained(sys.argv[2], device="cpu")("a wizard funko pop", seed=0)[0].save(sys.argv[3])
seconds = time.perf_counter() - t
try:  # VmHWM: this process image's own peak (ru_maxrss would also count the parent's peak at fork time)
    hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
except (OSError, StopIteration):
    hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "rss_mib": hwm / 1024}))
"""


def text_encoder_folder(folder: Path, tiny: bool) -> Path:
    """A SigLIP text config (SigLIP-B/16's sizes, or tiny ones) and a small word-level tokenizer, offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, SiglipTextConfig

    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=64) \
        if tiny else dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          vocab_size=32000)
    cfg = SiglipTextConfig(max_position_embeddings=64, projection_size=sizes["hidden_size"], pad_token_id=1, bos_token_id=None,
                           eos_token_id=1, **sizes)
    cfg.save_pretrained(folder)
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(16)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=64, pad_token="</s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    return folder


LAYOUTS = ("space", "lightning")


def make_original_like_checkpoint(path: Path, text_folder: Path, *, depth: int = 16, tiny: bool = False,
                                  layout: str = "space") -> int:
    """Writes a file with the original's key layout and random weights: "space" as the demo Space's VARtext_v1.pth
    (the plain state dict, no vae.encoder.*), "lightning" as a training checkpoint; returns its parameter count."""
    from transformers import AutoConfig, SiglipTextModel

    torch.manual_seed(0)
    if tiny:
        var_cfg = VARConfig(depth=2, embed_dim=128, num_heads=2, num_classes=1000, vocab_size=64, z_channels=8,
                            patch_nums=(1, 2, 3, 4))
        vae_cfg = VQVAEConfig(vocab_size=64, z_channels=8, ch=32, patch_nums=(1, 2, 3, 4))
    else:
        var_cfg, vae_cfg = VARConfig.official(depth), VQVAEConfig()
    sd: dict[str, torch.Tensor] = {}
    var = VAR(var_cfg)
    linears = {name for name, m in var.named_modules() if isinstance(m, nn.Linear)}
    for key, t in var.state_dict().items():
        mod, _, leaf = key.rpartition(".")
        if mod in linears:  # peft's layout: base_layer plus lora_A (r, in) and lora_B (out, r)
            sd[f"var.base_model.model.{mod}.base_layer.{leaf}"] = t
            if leaf == "weight":
                sd[f"var.base_model.model.{mod}.lora_A.default.weight"] = torch.randn(_LORA_R, t.shape[1]) * 0.01
                sd[f"var.base_model.model.{mod}.lora_B.default.weight"] = torch.randn(t.shape[0], _LORA_R) * 0.01
        else:
            sd[f"var.base_model.model.{key}"] = t
    del var
    sd.update({f"vae.{k}": v for k, v in VQVAE(vae_cfg).state_dict().items()
               if layout != "space" or not k.startswith("encoder.")})  # the demo deleted the encoder
    text = SiglipTextModel(AutoConfig.from_pretrained(text_folder))
    sd.update({f"siglip_text_encoder.text_model.{k}": v for k, v in text.state_dict().items()})
    d_text, C, H = text.config.hidden_size, var_cfg.embed_dim, 1024
    sd.update({"adapter.norm0.weight": torch.ones(d_text), "adapter.norm0.bias": torch.zeros(d_text),
               "adapter.layer1.weight": torch.randn(H, d_text) * 0.02, "adapter.layer1.bias": torch.zeros(H),
               "adapter.layer2.weight": torch.randn(C, H) * 0.02, "adapter.layer2.bias": torch.zeros(C),
               "adapter.norm2.weight": torch.ones(C), "adapter.norm2.bias": torch.zeros(C)})
    if layout == "space":
        torch.save(sd, path)
        return sum(v.numel() for v in sd.values())
    hparams = {"MODEL_DEPTH": var_cfg.depth, "beta": 1, "alpha": 1, "start_class_id": min(578, var_cfg.num_classes - 1),
               "do_lora": True}
    torch.save({"epoch": 0, "global_step": 0, "pytorch-lightning_version": "2.4.0", "state_dict": sd,
                "hparams_name": "kwargs", "hyper_parameters": hparams}, path)
    return sum(v.numel() for v in sd.values())


def _child(args: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one child process running _CHILD."""
    proc = subprocess.run([sys.executable, "-c", _CHILD, *args], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise PopyouError(f"the import child failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:300]}")
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    return got["seconds"], got["rss_mib"]


def bench_import(*, depth: int, tiny: bool, work: Path | None, out: Path | None, console,
                 layout: str = "space") -> dict:
    if layout not in LAYOUTS:
        raise PopyouError(f"--layout must be one of {', '.join(LAYOUTS)} (got {layout!r})")
    with tempfile.TemporaryDirectory(prefix="popyou-bench-import-", dir=work) as tmp:
        tmp = Path(tmp)
        text = text_encoder_folder(tmp / "text", tiny)
        ckpt = tmp / ("VARtext_v1.pth" if layout == "space" else "original-like.ckpt")
        n_params = make_original_like_checkpoint(ckpt, text, depth=depth, tiny=tiny, layout=layout)
        size_mb = ckpt.stat().st_size / 2**20
        _, base_rss = _child(["baseline"])
        seconds, rss = _child(["import", str(ckpt), str(tmp / "pipeline"), str(text)])
        written = sum(p.stat().st_size for p in (tmp / "pipeline").rglob("*") if p.is_file()) / 2**20
        sample_s, sample_rss = _child(["sample", str(tmp / "pipeline"), str(tmp / "first.png")])
        from PIL import Image

        image_px = Image.open(tmp / "first.png").size[0]
    result = {"machine": machine_info(torch.device("cpu")), "model": "tiny" if tiny else f"VAR-d{depth} + LoRA r8, "
              "VQ-VAE ch160, SigLIP-B text, adapter", "parameters": n_params, "checkpoint_mib": round(size_mb, 1),
              "pipeline_mib": round(written, 1), "seconds": round(seconds, 2), "peak_rss_mib": round(rss, 1),
              "baseline_rss_mib": round(base_rss, 1),
              "weights_copies": round((rss - base_rss) / size_mb, 2), "layout": layout,
              "peak_over_file": round(rss / size_mb, 2), "first_image": {"pixels": image_px, "seconds": round(sample_s, 2),
                                                                          "peak_rss_mib": round(sample_rss, 1)}}
    console.print(f"import of a {size_mb:,.0f} MiB checkpoint ({n_params / 1e6:,.0f}M parameters): "
                  f"{seconds:.1f} s, peak RSS {rss:,.0f} MiB (Python + torch + transformers alone: {base_rss:,.0f} MiB), "
                  f"i.e. {result['weights_copies']:.2f} copies of the weights above the baseline ({layout} layout); "
                  f"then one {image_px} px image from the imported folder in {sample_s:.1f} s (load included)",
                  highlight=False)
    if out is not None:
        Path(out).write_text(json.dumps(result, indent=2))
    return result

"""A saved SigLIP / SigLIP2 text tower in plain torch: what transformers' SiglipTextModel computes, op for op, read
from the folder its save_pretrained wrote (config.json + model.safetensors), and the folder's tokenizer read with
the `tokenizers` library as transformers reads a plain tokenizer.json.

Why: sampling a pipeline made by `popyou import` needs only this forward pass, and importing transformers' model
classes costs 3-5 s and torch._dynamo at every start. transformers stays the reference (test_hf_text compares the
two bit for bit) and does everything else: building from a Hub id, converting weights (hf_text.py), and any folder
this module does not take for certain, for which `load_text_tower` / `load_tokenizer_file` return None: another
architecture or activation, sharded weights, or a tokenizer with rules of its own (the real SigLIP's
sentencepiece tokenizer canonicalises its text in Python).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

TEXT_MODEL_TYPES = ("siglip_text_model", "siglip2_text_model")
_ACTIVATIONS = {"gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu}
# tokenizer classes that are nothing but tokenizer.json, and the settings that would change it on load
_PLAIN_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")
_TOKENIZER_REWRITES = ("add_bos_token", "add_eos_token", "add_prefix_space", "do_lower_case", "legacy")
_DEFAULT_INPUT_NAMES = ("input_ids", "token_type_ids", "attention_mask")  # transformers' default


@dataclass
class TextTowerConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    projection_size: int
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"


class TextOutput(NamedTuple):
    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor


class _Embeddings(nn.Module):
    def __init__(self, cfg: TextTowerConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device).unsqueeze(0)
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class _Attention(nn.Module):
    def __init__(self, cfg: TextTowerConfig):
        super().__init__()
        dim, self.heads = cfg.hidden_size, cfg.num_attention_heads
        self.head_dim = dim // self.heads
        self.scale = self.head_dim ** -0.5
        self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.q_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, L = x.shape[:-1]
        q, k, v = (proj(x).view(B, L, -1, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=self.scale,
                                             is_causal=False)  # (B, heads, L, head_dim)
        out = out.transpose(1, 2).contiguous()
        return self.out_proj(out.reshape(B, L, -1).contiguous())


class _MLP(nn.Module):
    def __init__(self, cfg: TextTowerConfig):
        super().__init__()
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.fc1, self.fc2 = nn.Linear(cfg.hidden_size, cfg.intermediate_size), nn.Linear(cfg.intermediate_size,
                                                                                            cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Layer(nn.Module):
    def __init__(self, cfg: TextTowerConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = _Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = _MLP(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class _Encoder(nn.Module):
    def __init__(self, cfg: TextTowerConfig):
        super().__init__()
        self.layers = nn.ModuleList([_Layer(cfg) for _ in range(cfg.num_hidden_layers)])


class SiglipTextTower(nn.Module):
    """SiglipTextModel's forward (Siglip2TextModel's is the same): token + position embeddings, pre-norm encoder
    layers with bidirectional attention over the unpadded positions, a final norm, and the head applied to the last
    position (padding, when the prompt was padded: as the original trained it). Key names as transformers 5 saves
    them."""

    def __init__(self, cfg: TextTowerConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.projection_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TextOutput:
        x = self.embeddings(input_ids)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):  # no padding: no mask, as transformers
            L = input_ids.shape[-1]
            mask = attention_mask.bool()[:, None, None, :].expand(-1, 1, L, L)
        for layer in self.encoder.layers:
            x = layer(x, mask)
        x = self.final_layer_norm(x)
        return TextOutput(x, self.head(x[:, -1, :]))


def load_text_tower(folder: str | Path) -> SiglipTextTower | None:
    """The text tower a local folder holds (config.json + one model.safetensors), in float32 and eval mode; None
    when this module cannot take it for certain (then transformers loads it)."""
    from popyou_cli.core.devices import on_meta

    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        return None
    cfg = json.loads((folder / "config.json").read_text())
    if cfg.get("model_type") not in TEXT_MODEL_TYPES or cfg.get("hidden_act", "gelu_pytorch_tanh") not in _ACTIVATIONS:
        return None
    names = [f for f in TextTowerConfig.__dataclass_fields__ if f in cfg]
    config = TextTowerConfig(**{name: cfg[name] for name in names})
    from safetensors.torch import load_file

    sd = {k.removeprefix("text_model."): v.float() for k, v in load_file(str(folder / "model.safetensors")).items()}
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}  # a buffer some versions saved
    with on_meta():
        tower = SiglipTextTower(config)
    if set(sd) != set(tower.state_dict()):
        return None  # not the layout this module knows: transformers' loader says what is wrong
    tower.load_state_dict(sd, strict=True, assign=True)
    return tower.eval().requires_grad_(False)


class TokenizerFile:
    """A tokenizer.json called as transformers' TokenizersBackend calls it: the file's own normaliser, splitting
    and special tokens; padding and truncation per call; the outputs the folder's model_input_names name."""

    def __init__(self, tokenizer, config: dict):
        self._tok = tokenizer
        self.model_max_length = int(config.get("model_max_length", int(1e30)))
        self.pad_token = config.get("pad_token")
        self.padding_side = config.get("padding_side", "right")
        self.truncation_side = config.get("truncation_side", "right")
        self.input_names = tuple(config.get("model_input_names") or _DEFAULT_INPUT_NAMES)

    def __call__(self, texts: list[str], padding=False, max_length: int | None = None, truncation: bool = False,
                 return_tensors: str | None = None, **_) -> dict:
        tok = self._tok
        tok.no_padding()
        tok.no_truncation()
        if truncation:
            tok.enable_truncation(max_length or self.model_max_length, strategy="longest_first",
                                  direction=self.truncation_side)
        if padding == "max_length":
            tok.enable_padding(length=max_length or self.model_max_length, pad_id=tok.token_to_id(self.pad_token),
                               pad_token=self.pad_token, direction=self.padding_side)
        encodings = tok.encode_batch(list(texts), add_special_tokens=True)
        columns = {"input_ids": [e.ids for e in encodings], "token_type_ids": [e.type_ids for e in encodings],
                   "attention_mask": [e.attention_mask for e in encodings]}
        out = {name: columns[name] for name in self.input_names if name in columns}
        return {k: torch.tensor(v) for k, v in out.items()} if return_tensors == "pt" else out


def load_tokenizer_file(folder: str | Path) -> TokenizerFile | None:
    """The folder's tokenizer when it is a plain tokenizer.json (what transformers 5 saves for a fast tokenizer);
    None otherwise (then transformers loads it)."""
    folder = Path(folder).expanduser()
    if not (folder / "tokenizer.json").is_file() or not (folder / "tokenizer_config.json").is_file():
        return None
    config = json.loads((folder / "tokenizer_config.json").read_text())
    if config.get("tokenizer_class") not in _PLAIN_TOKENIZERS or any(k in config for k in _TOKENIZER_REWRITES):
        return None
    pad = config.get("pad_token")
    if not isinstance(pad, str):
        return None
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return TokenizerFile(tokenizer, config) if tokenizer.token_to_id(pad) is not None else None

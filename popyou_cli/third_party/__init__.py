"""Loading of the third-party models popyou builds on.

One loader per model family, each taking either a real model (a Hugging Face Hub id, a local folder, or an
open_clip name) or the word ``"tiny"``:

- :func:`load_text_to_image`: SDXL-Turbo through diffusers (the gen-data stage);
- :func:`load_captioner`: BLIP-2 through transformers (the caption stage);
- :func:`load_siglip`: SigLIP through open_clip (the encode stage and the text/image adapters), with
  :func:`encode_images`, :func:`encode_texts` and :func:`embedding_dim`.

``"tiny"`` builds a small randomly initialised stand-in of the same class from code: no download, no Hub, a
fraction of a second on CPU. Its weights come from a fixed seed drawn inside :func:`torch.random.fork_rng`, so
every process builds bit-identical stand-ins and the caller's random state is left untouched. Tiny builds are
cached in-process (the same call returns the same object), so treat them as shared: do not train them in place.

A real model that cannot be loaded because it is neither a local folder nor in the Hugging Face cache (and the
Hub is off or unreachable) raises :class:`~popyou_cli.core.errors.PopyouError` with a one-line explanation.

Heavy libraries (torch, diffusers, transformers, open_clip) are imported inside the functions so that importing
this module, and therefore ``popyou --help``, stays fast.

The loaders live in one module per family (``sdxl``, ``blip2``, ``siglip``) over ``common`` (seeded weights, the offline
errors, the CLIP tokenizer); this package re-exports their public names, so import them from
``popyou_cli.third_party``. Devices and dtypes are resolved by ``popyou_cli.core.devices`` (purpose "data"). Tiny stand-ins use one seed per family (``TINY_*_SEED``), so that they do not
share weights by accident.
"""

from popyou_cli.core.presets import DEFAULT_SIGLIP, DEFAULT_SIGLIP_PRETRAINED, TINY
from popyou_cli.third_party.blip2 import (
    DEFAULT_CAPTIONER,
    TINY_CAPTIONER_IMAGE_SIZE,
    TINY_CAPTIONER_QUERY_TOKENS,
    TINY_CAPTIONER_SEED,
    build_tiny_captioner,
    load_captioner,
)
from popyou_cli.third_party.common import (
    CLIP_CONTEXT_LENGTH,
    clip_tokenizer,
    hub_offline,
    is_tiny,
    open_clip_bpe_path,
    seeded,
)
from popyou_cli.third_party.sdxl import (
    DEFAULT_TEXT_TO_IMAGE,
    TINY_IMAGE_SIZE,
    TINY_TEXT_TO_IMAGE_SEED,
    build_tiny_text_to_image,
    load_text_to_image,
)
from popyou_cli.third_party.siglip import (
    TINY_SIGLIP_CONTEXT_LENGTH,
    TINY_SIGLIP_EMBED_DIM,
    TINY_SIGLIP_IMAGE_SIZE,
    TINY_SIGLIP_NAME,
    TINY_SIGLIP_SEED,
    build_tiny_siglip,
    embedding_dim,
    encode_images,
    encode_texts,
    load_siglip,
    register_tiny_siglip,
    tiny_siglip_config,
)

__all__ = [
    "CLIP_CONTEXT_LENGTH",
    "DEFAULT_CAPTIONER",
    "DEFAULT_SIGLIP",
    "DEFAULT_SIGLIP_PRETRAINED",
    "DEFAULT_TEXT_TO_IMAGE",
    "TINY",
    "TINY_CAPTIONER_IMAGE_SIZE",
    "TINY_CAPTIONER_QUERY_TOKENS",
    "TINY_CAPTIONER_SEED",
    "TINY_IMAGE_SIZE",
    "TINY_SIGLIP_CONTEXT_LENGTH",
    "TINY_SIGLIP_EMBED_DIM",
    "TINY_SIGLIP_IMAGE_SIZE",
    "TINY_SIGLIP_NAME",
    "TINY_SIGLIP_SEED",
    "TINY_TEXT_TO_IMAGE_SEED",
    "build_tiny_captioner",
    "build_tiny_siglip",
    "build_tiny_text_to_image",
    "clip_tokenizer",
    "embedding_dim",
    "encode_images",
    "encode_texts",
    "hub_offline",
    "is_tiny",
    "load_captioner",
    "load_siglip",
    "load_text_to_image",
    "open_clip_bpe_path",
    "register_tiny_siglip",
    "seeded",
    "tiny_siglip_config",
]

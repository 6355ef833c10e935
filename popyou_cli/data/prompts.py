"""The Funko Pop! prompt scheme: prompt ``i`` of a data set is a pure function of ``(seed, i)``.

A prompt is the template with a comma-separated list of attribute phrases::

    A Funko Pop! figure inspired by Ada Lovelace, with olive skin, showing an angry expression,
    with a red ponytail, holding a book. Set on a white background.

Each attribute is drawn independently with its own probability, and then one of its options is
drawn uniformly (the scheme of the original PopYOU data set, plus the later
attributes tattoo, eyewear, footwear and hair colour, whose probabilities were not published and
are popyou's choice). At least one attribute is always present.

Reproducibility
    ``make_prompt(scheme, seed, i)`` seeds a private ``random.Random`` with a BLAKE2 hash of
    ``(seed, i)`` and only ever calls its ``random()`` method, the one part of Python's ``random``
    module whose output is guaranteed not to change between Python versions. So prompt ``i`` does
    not depend on the process, on PYTHONHASHSEED, on which other rows were made, or on their order:
    shards and resumed runs produce exactly the prompts of a single run. Changing the scheme
    (options, probabilities, the figure list in ``data/figures.txt``) changes the prompts.

The scheme itself (attributes, grammar, the built-in figures, user attribute files) is in prompt_scheme.py;
its public names are importable from here too. `read_prompt_file` reads a user's file of prompts (--prompt-file).
"""

from __future__ import annotations

import hashlib
import operator
import random
from pathlib import Path
from typing import Iterator, NamedTuple

from popyou_cli.core.errors import PopyouError

from popyou_cli.data.prompt_scheme import (  # noqa: F401 - the scheme's public names, importable from popyou_cli.data.prompts
    DEFAULT_TEMPLATE,
    HAIR_COLOUR,
    HAIR_COLOUR_PHRASE,
    HAIRSTYLE,
    Attribute,
    PromptScheme,
    builtin_figures,
    default_scheme,
    fix_articles,
    indefinite_article,
    load_scheme,
    scheme_from_dict,
)

# Hairstyles that have no hair to colour; matched as whole words of the option.
_HAIRLESS_WORDS = frozenset({"bald", "shaved", "shaven", "hairless"})


# --------------------------------------------------------------------------------------------
# Making prompts
# --------------------------------------------------------------------------------------------


class PromptRow(NamedTuple):
    index: int
    prompt: str
    attributes: dict[str, str]


def _row_rng(seed: int, i: int) -> random.Random:
    # A cryptographic hash of (seed, i), not Python's salted hash(), so every process agrees; and
    # not seed * 2**32 + i, which would make (seed, 2**32) collide with (seed + 1, 0).
    digest = hashlib.blake2b(f"popyou-prompt/{seed}/{i}".encode(), digest_size=16).digest()
    return random.Random(int.from_bytes(digest, "big"))


def _pick(u: float, n: int) -> int:
    # min(): u * n can round up to n when u is within an ulp of 1.
    return min(int(u * n), n - 1)


def _colour_hairstyle(style: str, colour: str) -> str | None:
    """Put a hair colour into a hairstyle option, or None when the style has no hair to colour.

    "curly hair" -> "curly red hair", "a ponytail" -> "a red ponytail", "dreadlocks" -> "red dreadlocks".
    """
    words = style.split()
    if _HAIRLESS_WORDS.intersection(w.lower() for w in words):
        return None
    if words[-1].lower() == "hair":
        # Colour goes next to the noun, after shape words: "long red hair", not "red long hair".
        return " ".join(words[:-1] + [colour, words[-1]])
    if words[0].lower() in ("a", "an"):
        # fix_articles later turns "a orange ponytail" into "an orange ponytail".
        return " ".join([words[0], colour] + words[1:])
    return " ".join([colour] + words)


def make_prompt(scheme: PromptScheme, seed: int, i: int) -> tuple[str, dict[str, str]]:
    """Prompt ``i`` of the data set made with ``seed``: ``(prompt, {attribute name: option})``.

    The attribute dict lists what the prompt says, in prompt order (a hair colour dropped for a
    bald head is not listed).
    """
    seed, i = operator.index(seed), operator.index(i)
    rng = _row_rng(seed, i)
    # Two numbers per attribute, always drawn, so each attribute reads the same positions of the
    # stream whatever the others drew: changing one attribute's probability or options leaves the
    # draws of all the others unchanged.
    draws = [(rng.random(), rng.random()) for _ in scheme.attributes]
    chosen = [k for k, (attribute, (u_keep, _)) in enumerate(zip(scheme.attributes, draws))
              if u_keep < attribute.probability]
    if not chosen:
        # Force one attribute (weighted by probability) so a prompt never describes nothing. Rare
        # at the defaults (about 1 row in 200,000), so frequencies barely move.
        candidates = [k for k, a in enumerate(scheme.attributes) if a.probability > 0]
        target = rng.random() * sum(scheme.attributes[k].probability for k in candidates)
        forced, acc = candidates[-1], 0.0  # the last one also catches float rounding at the top
        for k in candidates:
            acc += scheme.attributes[k].probability
            if target < acc:
                forced = k
                break
        chosen = [forced]

    picks = {k: _pick(draws[k][1], len(scheme.attributes[k].options)) for k in chosen}
    attributes = {scheme.attributes[k].name: scheme.attributes[k].options[j] for k, j in picks.items()}

    merged_hair = None
    hair = HAIRSTYLE in attributes and HAIR_COLOUR in attributes
    if hair and scheme.attribute(HAIR_COLOUR).phrase_template == HAIR_COLOUR_PHRASE:
        merged_hair = _hair_phrase(scheme, attributes[HAIRSTYLE], attributes[HAIR_COLOUR])
        if merged_hair is None:
            del attributes[HAIR_COLOUR]

    phrases = []
    for k in chosen:
        name = scheme.attributes[k].name
        if name not in attributes:
            continue
        if merged_hair is not None and name == HAIRSTYLE:
            phrases.append(merged_hair)
        elif merged_hair is not None and name == HAIR_COLOUR:
            continue  # said in the hairstyle phrase
        else:
            phrases.append(scheme._phrases[k][picks[k]])
    return scheme.template.replace("{attributes}", ", ".join(phrases)), attributes


def _hair_phrase(scheme: PromptScheme, style: str, colour: str) -> str | None:
    cache = scheme._hair_phrases
    if (style, colour) not in cache:
        option = _colour_hairstyle(style, colour)
        cache[style, colour] = None if option is None else scheme.attribute(HAIRSTYLE).render(option)
    return cache[style, colour]


def iter_prompts(scheme: PromptScheme, seed: int, start: int, stop: int) -> Iterator[PromptRow]:
    """``PromptRow(i, prompt, attributes)`` for ``start <= i < stop``; the same rows as make_prompt."""
    for i in range(start, stop):
        prompt, attributes = make_prompt(scheme, seed, i)
        yield PromptRow(i, prompt, attributes)


# --------------------------------------------------------------------------------------------
# Reading prompts
# --------------------------------------------------------------------------------------------


class PromptFile(NamedTuple):
    prompts: list[str]
    blank_lines: int  # blank lines between prompts, skipped (a note tells the user how many)


def read_prompt_file(path: str | Path) -> PromptFile:
    """The prompts of a UTF-8 text file, one a line, stripped. A blank line between prompts is skipped, not an
    error (an empty line in a pasted list is common), and counted; blank lines at the end are not counted."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise PopyouError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise PopyouError(f"cannot read the prompt file {path}: {e.strerror or e}") from None
    while lines and not lines[-1].strip():  # trailing newlines at the end of a file are not prompts
        lines.pop()
    prompts = [line.strip() for line in lines if line.strip()]
    return PromptFile(prompts, len(lines) - len(prompts))

"""The Funko Pop! prompt scheme: attributes, their options and probabilities, and user attribute files.

prompts.py turns a scheme into prompts (prompt ``i`` is a pure function of ``(seed, i)``).

Grammar
    Options are written the way they read after the phrase ("glasses", "a hat", "a bald head"), and
    every rendered phrase passes through ``fix_articles``, which turns "a"/"an" into the article the
    next word needs ("showing a angry expression" becomes "showing an angry expression"). When both
    a hairstyle and a hair colour are drawn they become one phrase ("with curly red hair", "with a
    red ponytail"); a hairstyle without hair ("a bald head") drops the colour.

User attribute files (``load_scheme``), YAML or JSON, change the default scheme::

    # my-attributes.yaml
    template: "A Funko Pop! figure {attributes}. Set on a white background."   # optional
    attributes:
      celebrity:                        # existing attribute: every key is optional
        extend: [Hedy Lamarr, a space cowboy]
      accessory:
        replace: [a cape, a crown, sunglasses]      # the whole list ("options" means the same)
        probability: 0.7
      footwear:
        remove: [heels]
      expression:
        probability: 0                  # never drawn
      lighting:                         # a new attribute: needs probability, phrase and options
        probability: 0.2
        phrase: "lit by {x}"
        options: [candlelight, neon signs]

The same in JSON: ``{"attributes": {"celebrity": {"extend": ["Hedy Lamarr"]}}}``.

- ``phrase`` contains ``{x}``, replaced by the drawn option; ``template`` contains ``{attributes}``.
- ``replace``/``options`` is applied first, then ``extend``, then ``remove``; repeated options are
  dropped (they would silently double an option's chance).
- New attributes come after the existing ones, in file order.
- ``base: empty`` (top level) starts from no attributes instead of the default scheme; together with
  ``PromptScheme.to_dict()`` this lets a data set's manifest record its full scheme and reload it.
- Anything else (unknown keys, wrong types, a probability outside [0, 1], an empty option list)
  raises ``PopyouError`` naming the file and the attribute.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from popyou_cli.core.errors import PopyouError

DEFAULT_TEMPLATE = "A Funko Pop! figure {attributes}. Set on a white background."

# The two attributes that are merged into one phrase when both are drawn (see prompts._colour_hairstyle).
HAIRSTYLE = "hairstyle"
HAIR_COLOUR = "hair colour"
HAIR_COLOUR_PHRASE = "with {x} hair"


# --------------------------------------------------------------------------------------------
# Articles
# --------------------------------------------------------------------------------------------

# Words that start with a vowel letter but a consonant sound ("a unicorn", "a one-eyed pirate",
# "a European"), and words that start with a silent h ("an hour"). Prefixes, lower case.
_CONSONANT_SOUND_PREFIXES = (
    "unicorn", "unicycl", "unif", "union", "uniq", "unis", "unit", "univ", "use", "usu", "uten",
    "util", "utop", "uku", "ura", "euro", "eu", "ewe", "once", "oui",
)
_SILENT_H_PREFIXES = ("hour", "honest", "honor", "honour", "heir")
# Letters whose spoken name starts with a vowel sound: "an FBI agent", "an MVP", "an X-ray".
_VOWEL_SOUND_LETTERS = frozenset("AEFHILMNORSX")


def indefinite_article(word: str) -> str:
    """Return "a" or "an" for the word that follows it (English, by sound, with common exceptions)."""
    word = word.lstrip("\"'(“‘")
    if not word:
        return "a"
    if word[0].isdigit():
        # Numbers are read out: "an 8-bit hero", "an 11-year-old", "an 18th-century queen".
        digits = re.match(r"\d+", word).group()
        vowel = digits[0] == "8" or (len(digits) in (2, 5) and digits[:2] in ("11", "18"))
        return "an" if vowel else "a"
    head = word.split("-")[0].replace(".", "")
    if head.isupper() and len(head) <= 3 and head[0].isalpha():
        # A short all-capitals word is spelled out letter by letter ("an NBA star", "a DJ").
        return "an" if head[0] in _VOWEL_SOUND_LETTERS else "a"
    lower = word.lower()
    if lower.startswith(_SILENT_H_PREFIXES):
        return "an"
    if lower.startswith(_CONSONANT_SOUND_PREFIXES) or re.match(r"one\b", lower):
        return "a"
    return "an" if lower[0] in "aeiou" else "a"


# A lower-case "a" or "an" standing as a word, followed by the next word. Capitalised "A" is left
# alone: it starts the template or belongs to a name.
_ARTICLE_RE = re.compile(r"(?<![\w'’.-])(a|an)(?=\s+([^\s]+))")


def fix_articles(text: str) -> str:
    """Make every lower-case "a"/"an" in ``text`` agree with the word after it."""
    return _ARTICLE_RE.sub(lambda m: indefinite_article(m.group(2)), text)


# --------------------------------------------------------------------------------------------
# The scheme
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attribute:
    """One optional part of a prompt: drawn with ``probability``, then one of ``options`` uniformly,
    rendered as ``phrase_template`` with ``{x}`` replaced by the option."""

    name: str
    probability: float
    phrase_template: str
    options: tuple[str, ...]

    def __post_init__(self) -> None:
        # Tuples keep the scheme immutable and hashable; callers may pass any sequence.
        object.__setattr__(self, "options", tuple(self.options))
        if not isinstance(self.name, str) or not self.name.strip():
            raise PopyouError(f"attribute name must be a non-empty string, got {self.name!r}")
        if isinstance(self.probability, bool) or not isinstance(self.probability, (int, float)):
            raise PopyouError(f"attribute {self.name!r}: probability must be a number, got {self.probability!r}")
        if not 0.0 <= self.probability <= 1.0:
            raise PopyouError(f"attribute {self.name!r}: probability must be in [0, 1], got {self.probability}")
        if not isinstance(self.phrase_template, str) or "{x}" not in self.phrase_template:
            raise PopyouError(f"attribute {self.name!r}: phrase must be a string containing {{x}}, "
                              f"got {self.phrase_template!r}")
        if not self.options:
            raise PopyouError(f"attribute {self.name!r}: needs at least one option")
        for option in self.options:
            if not isinstance(option, str) or not option.strip():
                raise PopyouError(f"attribute {self.name!r}: options must be non-empty strings "
                                  f"(quote numbers and yes/no in YAML), got {option!r}")
        if len(set(self.options)) != len(self.options):
            raise PopyouError(f"attribute {self.name!r}: repeated options")

    def render(self, option: str) -> str:
        """The grammatical phrase for one option, e.g. "showing an angry expression"."""
        # str.replace, not str.format: user phrases and options may contain braces.
        return fix_articles(self.phrase_template.replace("{x}", option))


@dataclass(frozen=True)
class PromptScheme:
    """The attributes, in prompt order, and the template with its ``{attributes}`` slot."""

    attributes: tuple[Attribute, ...]
    template: str = DEFAULT_TEMPLATE
    # Rendered phrases, computed once: make_prompt then only draws numbers and looks strings up,
    # which keeps 100k prompts at a couple of seconds.
    _phrases: tuple[tuple[str, ...], ...] = field(init=False, repr=False, compare=False)
    _hair_phrases: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "attributes", tuple(self.attributes))
        names = [a.name for a in self.attributes]
        if len(set(names)) != len(names):
            raise PopyouError(f"attribute names must be unique, got {names}")
        if not any(a.probability > 0 for a in self.attributes):
            raise PopyouError("the prompt scheme needs at least one attribute with probability > 0")
        if not isinstance(self.template, str) or "{attributes}" not in self.template:
            raise PopyouError(f"template must be a string containing {{attributes}}, got {self.template!r}")
        object.__setattr__(self, "_phrases", tuple(tuple(a.render(o) for o in a.options) for a in self.attributes))
        object.__setattr__(self, "_hair_phrases", {})

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.attributes]

    def attribute(self, name: str) -> Attribute:
        for attribute in self.attributes:
            if attribute.name == name:
                return attribute
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description that ``scheme_from_dict``/``load_scheme`` turn back into this scheme."""
        return {
            "base": "empty",
            "template": self.template,
            "attributes": {
                a.name: {"probability": a.probability, "phrase": a.phrase_template, "options": list(a.options)}
                for a in self.attributes
            },
        }


@lru_cache(maxsize=1)
def builtin_figures() -> tuple[str, ...]:
    """The built-in "inspired by" list: characters, archetypes and famous people (data/figures.txt)."""
    text = resources.files("popyou_cli").joinpath("data/figures.txt").read_text(encoding="utf-8")
    lines = (line.strip() for line in text.splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


def default_scheme() -> PromptScheme:
    """The data set's scheme: the original PopYOU data set's attribute table plus the later attributes."""
    return PromptScheme(
        attributes=(
            # The original published list of people was not released; this one mixes famous people,
            # fictional characters and archetypes ("a pirate captain"), which all read well here.
            Attribute("celebrity", 0.8, "inspired by {x}", builtin_figures()),
            Attribute("skin tone", 0.9, "with {x} skin", ("light", "medium", "dark", "olive", "tan")),
            # Plural nouns without an article, singular ones with: "wearing glasses", "wearing a hat".
            Attribute("accessory", 0.5, "wearing {x}", (
                "glasses", "a hat", "headphones", "a backpack", "a jacket", "a scarf", "a watch", "a necklace")),
            Attribute("expression", 0.6, "showing a {x} expression", (
                "smiling", "serious", "surprised", "happy", "angry", "winking", "laughing")),
            Attribute(HAIRSTYLE, 0.5, "with {x}", (
                "curly hair", "straight hair", "a bald head", "a ponytail", "short hair", "long hair",
                "braided hair", "a mohawk")),
            # Placed right after the hairstyle so that the merged phrase sits where both would.
            Attribute(HAIR_COLOUR, 0.4, HAIR_COLOUR_PHRASE, ("black", "red", "pink", "green", "blonde", "brown")),
            Attribute("clothing", 0.5, "wearing {x}-style clothing", (
                "casual", "formal", "sporty", "vintage", "punk", "gothic", "hipster", "bohemian")),
            Attribute("pose", 0.4, "in a {x} pose", (
                "standing", "sitting", "jumping", "dancing", "running", "saluting", "heroic")),
            Attribute("theme", 0.3, "themed as a {x}", (
                "superhero", "musician", "athlete", "actor", "fantasy character", "robot", "alien")),
            Attribute("held item", 0.3, "holding {x}", (
                "a sword", "a book", "a microphone", "a camera", "a guitar", "a shield", "a magic wand")),
            Attribute("tattoo", 0.15, "with a {x} tattoo", ("abstract", "floral", "dragon")),
            Attribute("eyewear", 0.2, "wearing {x}", ("goggles", "aviators", "round glasses", "sports glasses")),
            Attribute("footwear", 0.3, "wearing {x}", ("boots", "sneakers", "heels", "sandals")),
        ),
        template=DEFAULT_TEMPLATE,
    )



# --------------------------------------------------------------------------------------------
# User attribute files
# --------------------------------------------------------------------------------------------

_TOP_KEYS = {"base", "template", "attributes"}
_ATTRIBUTE_KEYS = {"probability", "phrase", "options", "replace", "extend", "remove"}


def _string_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, list):
        raise PopyouError(f"{where} must be a list of strings, got {type(value).__name__}")
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise PopyouError(f"{where} must hold non-empty strings (quote numbers and yes/no in YAML), got {item!r}")
    return [item.strip() for item in value]


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def scheme_from_dict(data: Mapping[str, Any], base: PromptScheme | None = None) -> PromptScheme:
    """Apply the changes described in the module docstring to ``base`` (the default scheme)."""
    if not isinstance(data, Mapping):
        raise PopyouError(f"the top level must be a mapping with 'attributes', got {type(data).__name__}")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise PopyouError(f"unknown top-level keys {sorted(unknown)}; expected some of {sorted(_TOP_KEYS)}")
    start = data.get("base", "default")
    if start == "empty":
        base_attributes: list[Attribute] = []
    elif start == "default":
        base_attributes = list((base or default_scheme()).attributes)
    else:
        raise PopyouError(f"base must be 'default' or 'empty', got {start!r}")
    template = data.get("template", (base or default_scheme()).template)

    changes = data.get("attributes", {})
    if changes is None:
        changes = {}
    if not isinstance(changes, Mapping):
        raise PopyouError(f"'attributes' must map attribute names to settings, got {type(changes).__name__}")

    by_name = {a.name: a for a in base_attributes}
    order = [a.name for a in base_attributes]
    for name, change in changes.items():
        where = f"attribute {name!r}"
        if change is None:
            change = {}
        if not isinstance(change, Mapping):
            raise PopyouError(f"{where}: settings must be a mapping, got {type(change).__name__}")
        unknown = set(change) - _ATTRIBUTE_KEYS
        if unknown:
            raise PopyouError(f"{where}: unknown keys {sorted(unknown)}; expected some of {sorted(_ATTRIBUTE_KEYS)}")
        if "options" in change and "replace" in change:
            raise PopyouError(f"{where}: give 'replace' or 'options' (they mean the same), not both")

        old = by_name.get(name)
        if old is None:
            missing = {"probability", "phrase"} - set(change)
            if missing or not ({"options", "replace", "extend"} & set(change)):
                raise PopyouError(f"{where} is new: it needs probability, phrase and options")
            order.append(name)
        options = list(old.options) if old else []
        if "options" in change or "replace" in change:
            key = "options" if "options" in change else "replace"
            options = _string_list(change[key], f"{where}: {key}")
        if "extend" in change:
            options += _string_list(change["extend"], f"{where}: extend")
        if "remove" in change:
            removed = set(_string_list(change["remove"], f"{where}: remove"))
            absent = removed - set(options)
            if absent:
                raise PopyouError(f"{where}: cannot remove {sorted(absent)}: not among its options")
            options = [o for o in options if o not in removed]
        by_name[name] = Attribute(
            name=name,
            probability=change.get("probability", old.probability if old else None),
            phrase_template=change.get("phrase", old.phrase_template if old else None),
            options=tuple(_unique(options)),
        )
    return PromptScheme(attributes=tuple(by_name[n] for n in order), template=template)


def load_scheme(path: str | Path, base: PromptScheme | None = None) -> PromptScheme:
    """Read a user attribute file (.yaml, .yml or .json) and apply it to ``base`` (default scheme)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise PopyouError(f"{path}: attribute files must end in .yaml, .yml or .json")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise PopyouError(f"{path}: cannot read attribute file: {error}") from None
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise PopyouError(f"{path}: not valid JSON: {error}") from None
    else:
        import yaml  # lazily: only YAML files need PyYAML

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise PopyouError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
    try:
        return scheme_from_dict(data, base)
    except PopyouError as error:
        raise PopyouError(f"{path}: {error}") from None

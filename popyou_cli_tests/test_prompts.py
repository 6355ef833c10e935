"""Tests for popyou_cli/data/prompts.py: the Funko attribute scheme, prompt i = f(seed, i)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from popyou_cli.core.errors import PopyouError
from popyou_cli.data.prompts import (
    Attribute,
    PromptScheme,
    builtin_figures,
    default_scheme,
    fix_articles,
    indefinite_article,
    iter_prompts,
    load_scheme,
    make_prompt,
    scheme_from_dict,
)

REPO = Path(__file__).resolve().parents[1]
PREFIX = "A Funko Pop! figure "
SUFFIX = ". Set on a white background."


@pytest.fixture(scope="module")
def scheme() -> PromptScheme:
    return default_scheme()


@pytest.fixture(scope="module")
def sample(scheme):
    """20k rows at seed 0, shared by the frequency and grammar tests."""
    return [make_prompt(scheme, 0, i) for i in range(20_000)]


# ---------------------------------------------------------------------------- the scheme itself


def test_default_scheme_matches_the_seed_table(scheme):
    expected = {
        "celebrity": 0.8, "skin tone": 0.9, "accessory": 0.5, "expression": 0.6, "hairstyle": 0.5,
        "clothing": 0.5, "pose": 0.4, "theme": 0.3, "held item": 0.3,
    }
    for name, probability in expected.items():
        assert scheme.attribute(name).probability == probability
    # The later attributes with the options the seed document lists.
    assert set(scheme.attribute("tattoo").options) == {"abstract", "floral", "dragon"}
    assert set(scheme.attribute("eyewear").options) == {"goggles", "aviators", "round glasses", "sports glasses"}
    assert set(scheme.attribute("footwear").options) == {"boots", "sneakers", "heels", "sandals"}
    assert set(scheme.attribute("hair colour").options) == {"black", "red", "pink", "green", "blonde", "brown"}
    assert len(scheme.attribute("expression").options) == 7
    assert len(scheme.attribute("hairstyle").options) == 8


def test_builtin_figures_are_many_and_distinct():
    figures = builtin_figures()
    assert len(figures) >= 300
    folded = Counter(f.casefold() for f in figures)
    assert [f for f, n in folded.items() if n > 1] == []
    assert all(f == f.strip() and f and not f.startswith("#") for f in figures)
    # The list mixes characters, archetypes and real people.
    for figure in ("Albert Einstein", "Darth Vader", "a pirate captain", "Serena Williams", "Freddie Mercury"):
        assert figure in figures


def test_figures_ship_as_package_data():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'popyou_cli\s*=\s*\[[^\]]*"data/\*\.txt"', pyproject)


# ---------------------------------------------------------------------------- prompts


def test_prompt_shape_and_attributes(scheme, sample):
    for prompt, attributes in sample[:2000]:
        assert prompt.startswith(PREFIX) and prompt.endswith(SUFFIX)
        assert attributes, "at least one attribute"
        assert ", ," not in prompt and "  " not in prompt
        assert list(attributes) == [n for n in scheme.names if n in attributes], "prompt order"
        for name, option in attributes.items():
            assert option in scheme.attribute(name).options
        if "celebrity" in attributes:
            assert f"inspired by {attributes['celebrity']}" in prompt


def test_at_least_100k_distinct_prompts(scheme):
    prompts = {prompt for _, prompt, _ in iter_prompts(scheme, 0, 0, 120_000)}
    assert len(prompts) >= 100_000


def test_prompt_depends_only_on_seed_and_index():
    a, b = default_scheme(), default_scheme()
    forward = [make_prompt(a, 7, i) for i in range(50)]
    backward = [make_prompt(b, 7, i) for i in reversed(range(50))][::-1]
    assert forward == backward
    assert make_prompt(a, 7, 10_000_000) == make_prompt(b, 7, 10_000_000)
    assert [r.prompt for r in iter_prompts(a, 7, 20, 30)] == [p for p, _ in forward[20:30]]
    # A different seed gives (almost all) different prompts.
    other = [make_prompt(a, 8, i)[0] for i in range(50)]
    assert sum(p == q for (p, _), q in zip(forward, other)) <= 2
    assert make_prompt(a, 0, 0) != make_prompt(a, 1, 0)


def test_default_prompts_are_pinned(scheme):
    # Data sets are reproduced from (seed, i): a refactor must not change them. If you changed the
    # scheme or data/figures.txt on purpose, update these values (and say so: old seeds now differ).
    assert make_prompt(scheme, 0, 0) == (
        "A Funko Pop! figure inspired by the Genie from Aladdin, with green hair, wearing formal-style clothing, "
        "holding a sword, with a floral tattoo. Set on a white background.",
        {"celebrity": "the Genie from Aladdin", "hair colour": "green", "clothing": "formal",
         "held item": "a sword", "tattoo": "floral"},
    )
    first_1000 = "\n".join(make_prompt(scheme, 0, i)[0] for i in range(1000)).encode()
    assert hashlib.sha256(first_1000).hexdigest() == "7317855d65ab83fa5ad1d9257876c36987ac684f28d4dd53c017646832c06428"


def test_prompts_are_the_same_in_another_process():
    # A fresh interpreter with a different hash salt must agree: no dependence on hash().
    code = ("import json; from popyou_cli.data.prompts import default_scheme, make_prompt; "
            "s = default_scheme(); print(json.dumps([make_prompt(s, 3, i) for i in (0, 1, 99999)]))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    scheme = default_scheme()
    assert json.loads(out.stdout) == [list(make_prompt(scheme, 3, i)) for i in (0, 1, 99999)]


def test_seed_and_index_must_be_integers(scheme):
    import numpy as np

    assert make_prompt(scheme, np.int64(3), np.int32(4)) == make_prompt(scheme, 3, 4)
    with pytest.raises(TypeError):
        make_prompt(scheme, 0, 1.5)


def test_attribute_frequencies_match_probabilities(scheme, sample):
    counts = Counter(name for _, attributes in sample for name in attributes)
    n = len(sample)
    hairstyle = scheme.attribute("hairstyle")
    p_bald = hairstyle.probability * sum("bald" in o for o in hairstyle.options) / len(hairstyle.options)
    for attribute in scheme.attributes:
        expected = attribute.probability
        if attribute.name == "hair colour":
            expected *= 1 - p_bald  # a bald head drops the colour
        # 4.5 standard deviations of a binomial frequency at n = 20k is at most 0.016.
        assert abs(counts[attribute.name] / n - expected) < 0.016, attribute.name
    # Options are drawn uniformly: every expression shows up about 1/7 of the time it is drawn.
    expressions = Counter(a["expression"] for _, a in sample if "expression" in a)
    total = sum(expressions.values())
    assert all(abs(c / total - 1 / 7) < 0.02 for c in expressions.values())


def test_one_attribute_is_forced_when_none_is_drawn():
    rare = PromptScheme((Attribute("mood", 0.001, "looking {x}", ("sleepy", "bored")),
                         Attribute("never", 0.0, "with {x}", ("nothing",))))
    rows = [make_prompt(rare, 0, i) for i in range(500)]
    assert all(a == {"mood": a["mood"]} for _, a in rows)
    assert {a["mood"] for _, a in rows} == {"sleepy", "bored"}
    assert rows[0][0] in {f"A Funko Pop! figure looking {x}. Set on a white background." for x in ("sleepy", "bored")}


# ---------------------------------------------------------------------------- grammar

# Words after "a" that start with a vowel letter but a consonant sound.
_OK_AFTER_A = re.compile(r"(uni(corn|form|que|t|vers)|use|one\b|one-|euro)", re.I)
_OK_AFTER_AN = re.compile(r"(hour|honest|hono)", re.I)
# Countable singular nouns that need an article, and plurals/mass nouns that must not have one.
_NEEDS_ARTICLE = re.compile(
    r"\b(with|holding|wearing) (bald|ponytail|mohawk|head|hat|backpack|jacket|scarf|watch|necklace|"
    r"sword|book|microphone|camera|guitar|shield|magic wand)\b")
_NO_ARTICLE = re.compile(
    r"\ban? (glasses|headphones|goggles|aviators|round glasses|sports glasses|boots|sneakers|heels|sandals|"
    r"\w+ hair)\b")


def _grammar_problems(prompt: str) -> list[str]:
    problems = []
    for article, word in re.findall(r"(?<![\w'.-])(a|an) ([\w\"'-]+)", prompt):
        starts_vowel = word[0].lower() in "aeiou"
        if article == "a" and starts_vowel and not _OK_AFTER_A.match(word):
            problems.append(f"a {word}")
        if article == "an" and not starts_vowel and not _OK_AFTER_AN.match(word):
            problems.append(f"an {word}")
    problems += [m.group() for m in _NEEDS_ARTICLE.finditer(prompt)]
    problems += [m.group() for m in _NO_ARTICLE.finditer(prompt)]
    if re.search(r"\bhair\b.*\bhair\b", prompt):
        problems.append("hair said twice")
    return problems


def test_grammar_checker_catches_the_original_slips():
    assert _grammar_problems("showing a angry expression, with bald head") == ["a angry", "with bald"]
    assert _grammar_problems("wearing hat, holding sword, wearing a glasses") == ["wearing hat", "holding sword",
                                                                                   "a glasses"]
    assert _grammar_problems("themed as an robot, with red hair, with curly hair") == ["an robot", "hair said twice"]


def test_every_phrase_of_every_option_is_grammatical(scheme):
    for attribute in scheme.attributes:
        for option in attribute.options:
            phrase = attribute.render(option)
            assert _grammar_problems(phrase) == [], phrase


def test_sampled_prompts_are_grammatical(sample):
    bad = [(p, _grammar_problems(p)) for p, _ in sample if _grammar_problems(p)]
    assert bad == []


def test_articles_examples(scheme):
    assert scheme.attribute("expression").render("angry") == "showing an angry expression"
    assert scheme.attribute("expression").render("smiling") == "showing a smiling expression"
    assert scheme.attribute("pose").render("heroic") == "in a heroic pose"
    assert scheme.attribute("theme").render("athlete") == "themed as an athlete"
    assert scheme.attribute("theme").render("alien") == "themed as an alien"
    assert scheme.attribute("hairstyle").render("a bald head") == "with a bald head"
    assert scheme.attribute("tattoo").render("abstract") == "with an abstract tattoo"
    assert scheme.attribute("tattoo").render("dragon") == "with a dragon tattoo"
    assert scheme.attribute("accessory").render("glasses") == "wearing glasses"
    assert scheme.attribute("accessory").render("a hat") == "wearing a hat"
    assert scheme.attribute("eyewear").render("aviators") == "wearing aviators"
    assert scheme.attribute("footwear").render("boots") == "wearing boots"
    assert scheme.attribute("held item").render("a book") == "holding a book"


@pytest.mark.parametrize("word, article", [
    ("apple", "an"), ("pirate", "a"), ("hour", "an"), ("honest", "an"), ("unicorn", "a"), ("umbrella", "an"),
    ("uniform", "a"), ("European", "a"), ("one-eyed", "a"), ("FBI", "an"), ("MVP", "an"), ("DJ", "a"),
    ("UFO", "a"), ("X-ray", "an"), ("8-bit", "an"), ("11-year-old", "an"), ("1980s", "a"), ("R2-D2", "an"),
    ("E.T.", "an"), ("LEGO", "a"), ("Egyptian", "an"), ("\"angry\"", "an"),
])
def test_indefinite_article(word, article):
    assert indefinite_article(word) == article


def test_fix_articles_leaves_names_alone():
    assert fix_articles("inspired by an pirate, holding a apple") == "inspired by a pirate, holding an apple"
    assert fix_articles("A Funko Pop! figure inspired by A Tribe Called Quest") == \
        "A Funko Pop! figure inspired by A Tribe Called Quest"
    assert fix_articles("inspired by Mona Lisa and Wanda") == "inspired by Mona Lisa and Wanda"


def _one_hair_row(scheme, style, colour):
    """A scheme that always draws exactly the given hairstyle and colour."""
    only = PromptScheme((Attribute("hairstyle", 1.0, scheme.attribute("hairstyle").phrase_template, (style,)),
                         Attribute("hair colour", 1.0, scheme.attribute("hair colour").phrase_template, (colour,))))
    return make_prompt(only, 0, 0)


def test_hairstyle_and_colour_make_one_phrase(scheme):
    cases = {
        ("curly hair", "red"): "with curly red hair",
        ("a ponytail", "pink"): "with a pink ponytail",
        ("a mohawk", "green"): "with a green mohawk",
        ("long hair", "blonde"): "with long blonde hair",
        ("a ponytail", "orange"): "with an orange ponytail",
        ("dreadlocks", "black"): "with black dreadlocks",
    }
    for (style, colour), phrase in cases.items():
        prompt, attributes = _one_hair_row(scheme, style, colour)
        assert prompt == f"{PREFIX}{phrase}{SUFFIX}"
        assert attributes == {"hairstyle": style, "hair colour": colour}
    prompt, attributes = _one_hair_row(scheme, "a bald head", "red")
    assert prompt == f"{PREFIX}with a bald head{SUFFIX}"
    assert attributes == {"hairstyle": "a bald head"}


def test_hair_colour_alone(sample):
    alone = [p for p, a in sample if "hair colour" in a and "hairstyle" not in a]
    assert alone and all(re.search(r"with (black|red|pink|green|blonde|brown) hair", p) for p in alone)


# ---------------------------------------------------------------------------- user files


USER_YAML = """
attributes:
  celebrity:
    extend: [Hedy Lamarr, a one-eyed space cowboy, Albert Einstein]
  accessory:
    replace: [a cape, a crown]
    probability: 0.7
  footwear:
    remove: [heels]
  expression:
    probability: 0
  theme:
    extend: [astronaut]
  lighting:
    probability: 1.0
    phrase: "lit by {x}"
    options: [candlelight, neon signs]
"""


def test_yaml_file_replaces_extends_and_adds(tmp_path):
    path = tmp_path / "attributes.yaml"
    path.write_text(USER_YAML)
    scheme = load_scheme(path)
    default = default_scheme()
    assert scheme.attribute("celebrity").options == default.attribute("celebrity").options + (
        "Hedy Lamarr", "a one-eyed space cowboy")  # Albert Einstein is already there: not repeated
    assert scheme.attribute("accessory").options == ("a cape", "a crown")
    assert scheme.attribute("accessory").probability == 0.7
    assert scheme.attribute("footwear").options == ("boots", "sneakers", "sandals")
    assert scheme.names[-1] == "lighting"
    assert scheme.attribute("theme").render("astronaut") == "themed as an astronaut"
    rows = [make_prompt(scheme, 0, i) for i in range(3000)]
    assert all("expression" not in a and "lit by" in p for p, a in rows)
    assert {a["accessory"] for _, a in rows if "accessory" in a} == {"a cape", "a crown"}
    assert any(a.get("celebrity") == "Hedy Lamarr" for _, a in rows)
    assert all(_grammar_problems(p) == [] for p, _ in rows)
    # Unchanged attributes keep their draws: the stream is laid out per attribute.
    assert [a.get("skin tone") for _, a in rows[:200]] == \
        [make_prompt(default, 0, i)[1].get("skin tone") for i in range(200)]


def test_json_file_replaces_and_extends(tmp_path):
    path = tmp_path / "attributes.json"
    path.write_text(json.dumps({
        "template": "A Funko Pop! toy {attributes}.",
        "attributes": {"celebrity": {"options": ["Ada Lovelace"], "probability": 1},
                       "pose": {"extend": ["meditating"]}},
    }))
    scheme = load_scheme(path)
    assert scheme.attribute("celebrity").options == ("Ada Lovelace",)
    assert scheme.attribute("pose").options[-1] == "meditating"
    prompt, attributes = make_prompt(scheme, 5, 5)
    assert prompt.startswith("A Funko Pop! toy inspired by Ada Lovelace") and prompt.endswith(".")
    assert attributes["celebrity"] == "Ada Lovelace"


def test_scheme_round_trips_through_to_dict(tmp_path):
    path = tmp_path / "full.json"
    scheme = load_scheme(_write(tmp_path / "user.yml", USER_YAML))
    path.write_text(json.dumps(scheme.to_dict()))
    again = load_scheme(path)
    assert again == scheme
    assert [make_prompt(again, 1, i) for i in range(100)] == [make_prompt(scheme, 1, i) for i in range(100)]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("name, text, message", [
    ("bad.yaml", "attributes: [unclosed", "not valid YAML"),
    ("bad.json", "{\"attributes\": ", "not valid JSON"),
    ("bad.yaml", "- just\n- a list\n", "top level must be a mapping"),
    ("bad.yaml", "attributes:\n  pose:\n    extnd: [x]\n", "unknown keys ['extnd']"),
    ("bad.yaml", "attributes:\n  pose:\n    probability: 1.5\n", "probability must be in [0, 1]"),
    ("bad.yaml", "attributes:\n  pose:\n    probability: lots\n", "probability must be a number"),
    ("bad.yaml", "attributes:\n  pose:\n    replace: []\n", "at least one option"),
    ("bad.yaml", "attributes:\n  pose:\n    extend: sitting\n", "must be a list"),
    ("bad.yaml", "attributes:\n  pose:\n    extend: [yes]\n", "non-empty strings"),
    ("bad.yaml", "attributes:\n  pose:\n    remove: [flying]\n", "cannot remove"),
    ("bad.yaml", "attributes:\n  mood:\n    options: [sleepy]\n", "is new"),
    ("bad.yaml", "attributes:\n  mood:\n    probability: 0.5\n    phrase: looking\n    options: [sleepy]\n",
     "containing {x}"),
    ("bad.json", "{\"template\": \"no slot\"}", "containing {attributes}"),
    ("bad.json", "{\"base\": \"empty\"}", "at least one attribute"),
    ("bad.txt", "attributes: {}", "must end in .yaml, .yml or .json"),
])
def test_malformed_user_file_is_a_popyou_error(tmp_path, name, text, message):
    path = _write(tmp_path / name, text)
    with pytest.raises(PopyouError) as info:
        load_scheme(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value), "one-line message for the CLI"


def test_missing_user_file_is_a_popyou_error(tmp_path):
    with pytest.raises(PopyouError, match="cannot read"):
        load_scheme(tmp_path / "missing.yaml")


def test_scheme_from_dict_without_a_file():
    scheme = scheme_from_dict({"attributes": {"tattoo": {"probability": 1.0}}})
    assert all("tattoo" in make_prompt(scheme, 2, i)[1] for i in range(100))

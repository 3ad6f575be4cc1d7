"""The built-in toy set: E2E-style restaurant tables and sentences generated from a seed, so the
demo and tests run without data files."""

from __future__ import annotations

import functools
import random
from collections.abc import Mapping

from prefixtune.data.records import BUILTIN, Example, check_split, linearize_table

_NAMES = (
    "The Golden Fork", "Blue Lantern", "The Olive Tree", "Green Man", "The Copper Kettle",
    "Riverside Grill", "The Wrestlers", "Cotto", "The Punter", "Aromi", "The Mill", "Loch Fyne",
    "The Cricketers", "Bibimbap House", "Clowns", "Fitzbillies", "Giraffe", "Midsummer House",
)  # fmt: skip


_NEARS = ("Café Rouge", "The Bakers", "Burger King", "Crowne Plaza Hotel", "The Portland Arms")


_TYPES = ("restaurant", "pub", "coffee shop")


_FOODS = ("Italian", "French", "Chinese", "Indian", "Japanese", "English", "fast food")


_PRICES = ("cheap", "moderate", "high", "less than £ 20", "£ 20 - 25", "more than £ 30")


_RATINGS = ("low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5")


_BUILTIN_SIZES = {"train": 200, "dev": 40, "test": 40}


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def _toy_mr(rng: random.Random) -> dict[str, str]:
    slots = {
        "Type": _TYPES,
        "food": _FOODS,
        "price": _PRICES,
        "customer rating": _RATINGS,
        "area": ("city centre", "riverside"),
        "family friendly": ("yes", "no"),
        "near": _NEARS,
    }
    keys = rng.sample(list(slots), rng.randint(2, 5))
    mr = {"name": rng.choice(_NAMES)}
    mr.update({k: rng.choice(v) for k, v in slots.items() if k in keys})
    return mr


def _toy_text(mr: Mapping[str, str], rng: random.Random) -> str:
    """An E2E-style (tokenised) description of ``mr``; ``rng`` picks one of two sentence shapes."""
    noun = " ".join(x for x in (mr.get("food"), mr.get("Type", "place")) if x)
    first = f"{mr['name']} is {_article(noun)} {noun}"
    if "area" in mr:
        first += f" in the {mr['area']} area"
    if "near" in mr:
        first += f" near {mr['near']}"
    rest = []
    if "price" in mr:
        p = mr["price"]
        rest.append(f"has {p} prices" if p in ("cheap", "moderate", "high") else f"costs {p}")
    if "customer rating" in mr:
        r = mr["customer rating"]
        rest.append(f"is rated {r}" if "out of" in r else f"has {_article(r)} {r} customer rating")
    if "family friendly" in mr:
        rest.append(("is" if mr["family friendly"] == "yes" else "is not") + " family - friendly")
    if not rest:
        return f"{first} ."
    tail = rest[0] if len(rest) == 1 else f"{' , '.join(rest[:-1])} and {rest[-1]}"
    return f"{first} . It {tail} ." if rng.random() < 0.5 else f"{first} , which {tail} ."


@functools.cache
def _builtin_all() -> dict[str, tuple[Example, ...]]:
    taken: set[str] = set()
    out = {}
    for split, size in _BUILTIN_SIZES.items():
        rng = random.Random(f"prefixtune-builtin-{split}")
        examples: list[Example] = []
        while len(examples) < size:
            mr = _toy_mr(rng)
            source = linearize_table(mr)
            if source in taken:
                continue
            taken.add(source)
            text = _toy_text(mr, rng)
            examples.append(Example(source, text, (text,), {"id": f"{split}-{len(examples)}"}))
        out[split] = tuple(examples)
    return out


def builtin_examples(split: str) -> list[Example]:
    """A small generated E2E-style set (200 train / 40 dev / 40 test restaurant MRs, one reference
    each, disjoint sources across splits), for demos and tests when the data dir is absent."""
    check_split(BUILTIN, split)
    return list(_builtin_all()[split])

"""Task definitions for the bundled tiny-arith model: corpus generation and the held-out split.

Everything here is pure Python (no mlx import), deterministic and generated offline.

Arithmetic samples look like ``17+25=42`` with a, b in 0..99. A fixed ~10 % of the
*unordered* pairs {a, b} is held out: neither ``a+b=`` nor ``b+a=`` ever appears in the
training data, so the held-out accuracy measures real generalisation, not memorisation
(not even through commutativity).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator

MAX_OPERAND = 99
HELDOUT_PERCENT = 10
_SPLIT_SALT = "dtype-serve/tiny-arith/v1"


def _unordered_key(a: int, b: int) -> tuple[int, int]:
    return (a, b) if a <= b else (b, a)


def is_heldout(a: int, b: int) -> bool:
    """True if the unordered pair {a, b} belongs to the held-out set (hash-based, stable)."""
    lo, hi = _unordered_key(a, b)
    digest = hashlib.sha256(f"{_SPLIT_SALT}:{lo}:{hi}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < HELDOUT_PERCENT


def all_pairs() -> list[tuple[int, int]]:
    return [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]


def train_pairs() -> list[tuple[int, int]]:
    return [(a, b) for a, b in all_pairs() if not is_heldout(a, b)]


def heldout_pairs() -> list[tuple[int, int]]:
    return [(a, b) for a, b in all_pairs() if is_heldout(a, b)]


def addition_prompt(a: int, b: int) -> str:
    return f"{a}+{b}="


def heldout_prompts(n: int | None = None) -> list[tuple[str, str]]:
    """(prompt, expected answer) for the held-out additions, e.g. ("17+25=", "42").

    With ``n`` a deterministic, evenly spread subset of n prompts is returned.
    """
    items = [(addition_prompt(a, b), str(a + b)) for a, b in heldout_pairs()]
    if n is not None and n < len(items):
        step = len(items) / n
        items = [items[int(i * step)] for i in range(n)]
    return items


def is_correct(expected: str, generated_text: str) -> bool:
    """The answer is the completion up to the end of sequence / first newline, stripped."""
    text = generated_text
    for stop in ("<eos>", "\n"):
        text = text.split(stop, 1)[0]
    return text.strip() == expected.strip()


# --------------------------------------------------------------------------- English text

_NAMES = ["Alice", "Bob", "Carol", "Dave", "Emma", "Frank", "Grace", "Henry", "Ivy", "Jack",
          "Kate", "Leo", "Mia", "Noah", "Olivia", "Paul", "Rosa", "Sam", "Tina", "Victor"]
_ADJS = ["small", "big", "red", "blue", "green", "old", "new", "quiet", "happy", "bright",
         "dark", "warm", "cold", "fast", "slow", "little", "young", "kind", "busy", "lazy"]
_NOUNS = ["cat", "dog", "bird", "house", "tree", "river", "book", "car", "garden", "city",
          "child", "teacher", "farmer", "boat", "road", "window", "apple", "horse", "lamp", "hill"]
_PLACES = ["park", "kitchen", "forest", "library", "market", "school", "garden", "village",
           "station", "museum", "harbor", "field"]
_VERBS_T = ["sees", "likes", "finds", "follows", "watches", "paints", "carries", "reads",
            "builds", "visits", "helps", "cleans"]
_VERBS_I = ["runs", "sleeps", "sings", "waits", "jumps", "walks", "smiles", "works",
            "plays", "rests"]
_ACTIVITIES = ["read books", "play music", "walk", "cook dinner", "draw pictures", "swim",
               "write letters", "plant flowers", "ride a bike", "watch the birds"]
_TIMES = ["in the morning", "at night", "every day", "on Sunday", "after lunch",
          "in the evening", "today", "in the summer", "in the winter", "before school"]
_WEATHER = ["sunny", "rainy", "cloudy", "windy", "cold", "warm", "foggy", "snowy"]
_COLORS = ["red", "blue", "green", "yellow", "white", "black", "brown", "orange"]
_GREETINGS = ["Hello", "Hi", "Good morning", "Good evening", "Welcome"]


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def english_sentence(rng: random.Random) -> str:
    """One templated English sentence (license-clean: built from the word lists above)."""
    c = rng.choice
    k = rng.randrange(12)
    if k == 0:
        return f"The {c(_ADJS)} {c(_NOUNS)} {c(_VERBS_T)} the {c(_ADJS)} {c(_NOUNS)}."
    if k == 1:
        return f"{c(_NAMES)} likes to {c(_ACTIVITIES)} {c(_TIMES)}."
    if k == 2:
        return f"The {c(_NOUNS)} {c(_VERBS_I)} in the {c(_PLACES)} {c(_TIMES)}."
    if k == 3:
        return f"{c(_NAMES)} and {c(_NAMES)} went to the {c(_PLACES)}."
    if k == 4:
        return f"It is {c(_WEATHER)} today, so {c(_NAMES)} stays in the {c(_PLACES)}."
    if k == 5:
        return f"{c(_GREETINGS)}, {c(_NAMES)}! How are you {c(['today', 'this morning', 'now'])}?"
    if k == 6:
        return f"{c(_NAMES)} has a {c(_COLORS)} {c(_NOUNS)} and a {c(_ADJS)} {c(_NOUNS)}."
    if k == 7:
        return f"Where is the {c(_ADJS)} {c(_NOUNS)}? It is in the {c(_PLACES)}."
    if k == 8:
        return f"{_cap(c(_TIMES))}, {c(_NAMES)} {c(_VERBS_T)} a {c(_ADJS)} {c(_NOUNS)}."
    if k == 9:
        return f"I think the {c(_NOUNS)} is very {c(_ADJS)}."
    if k == 10:
        return f"{c(_NAMES)} {c(_VERBS_I)} while the {c(_NOUNS)} {c(_VERBS_I)}."
    return f"We can {c(_ACTIVITIES)} in the {c(_PLACES)} {c(_TIMES)}."


def english_text(rng: random.Random) -> str:
    """One or two sentences joined by a space."""
    text = english_sentence(rng)
    if rng.random() < 0.5:
        text += " " + english_sentence(rng)
    return text


# --------------------------------------------------------------------------- corpus

def arithmetic_samples(rng: random.Random) -> Iterator[tuple[str, str]]:
    """Endless (prompt, answer) training additions, held-out pairs excluded."""
    pairs = train_pairs()
    while True:
        a, b = rng.choice(pairs)
        yield addition_prompt(a, b), str(a + b)


def training_corpus(seed: int = 0, n: int | None = None) -> Iterator[str]:
    """A mixed stream of raw training texts (without special tokens), ``n`` of them if given.

    Built from the same generators the trainer draws from (``arithmetic_samples`` and
    ``english_text``); arithmetic texts are ``prompt + answer``.
    """
    rng = random.Random(seed)
    arith = arithmetic_samples(rng)
    i = 0
    while n is None or i < n:
        if rng.random() < 0.85:
            prompt, answer = next(arith)
            yield prompt + answer
        else:
            yield english_text(rng)
        i += 1


def all_training_arithmetic_texts() -> list[str]:
    """Every arithmetic text the training data can contain (the full support of the generator)."""
    return [addition_prompt(a, b) + str(a + b) for a, b in train_pairs()]

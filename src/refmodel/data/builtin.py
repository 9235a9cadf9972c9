"""The built-in preference data: a task a tiny model can learn, for the demo, tests and benchmarks.

Each prompt is a short question (sums, differences, successors, opposites, colours) whose chosen answer
is correct and whose rejected answer is a plausible wrong one. The words are few and fixed
(:func:`task_vocabulary`), so the tiny tokenizers of :mod:`refmodel.models.tiny` hold every one of them
whole. The bundled ``assets/preference_pairs.jsonl`` is ``preference_pairs(3000, seed=0)``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
_NUMBERS = [str(i) for i in range(21)]
_OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "light": "dark", "old": "new",
    "happy": "sad", "early": "late", "open": "closed", "full": "empty", "high": "low", "hard": "soft",
}
_OPPOSITES.update({v: k for k, v in list(_OPPOSITES.items())})
_COLOURS = {
    "sky": "blue", "grass": "green", "snow": "white", "coal": "black", "sun": "yellow",
    "blood": "red", "orange": "orange", "plum": "purple", "sea": "blue", "leaf": "green",
}
_COLOUR_WORDS = sorted(set(_COLOURS.values()))
_WORDS = (
    "what is plus minus comes after the opposite of color colour answer it I think . ? , "
    "sure , let me see : so"
).split()


def task_vocabulary() -> list[str]:
    """Every token of the built-in task, specials first; its order fixes the token ids."""
    words = set(_WORDS) | set(_NUMBERS) | set(_OPPOSITES) | set(_COLOURS) | set(_COLOUR_WORDS)
    words |= {"system", "user", "assistant"}
    return SPECIAL_TOKENS + sorted(words - set(SPECIAL_TOKENS))


def _one_pair(rng: random.Random) -> dict[str, str]:
    kind = rng.choice(["plus", "minus", "after", "opposite", "colour"])
    if kind == "plus":
        a, b = rng.randint(0, 10), rng.randint(0, 10)
        prompt, right, pool = f"what is {a} plus {b} ?", str(a + b), _NUMBERS
    elif kind == "minus":
        a = rng.randint(0, 20)
        b = rng.randint(0, a)
        prompt, right, pool = f"what is {a} minus {b} ?", str(a - b), _NUMBERS
    elif kind == "after":
        a = rng.randint(0, 19)
        prompt, right, pool = f"what comes after {a} ?", str(a + 1), _NUMBERS
    elif kind == "opposite":
        word = rng.choice(sorted(_OPPOSITES))
        prompt, right, pool = f"what is the opposite of {word} ?", _OPPOSITES[word], sorted(_OPPOSITES)
    else:
        thing = rng.choice(sorted(_COLOURS))
        prompt, right, pool = f"what colour is the {thing} ?", _COLOURS[thing], _COLOUR_WORDS
    wrong = rng.choice([w for w in pool if w != right])
    lead = rng.choice(["the answer is", "I think it is", "sure , it is", "let me see : it is"])
    return {"prompt": prompt, "chosen": f"{lead} {right} .", "rejected": f"{lead} {wrong} ."}


def iter_preference_pairs(seed: int = 0) -> Iterator[dict[str, str]]:
    """An endless deterministic stream of ``{"prompt", "chosen", "rejected"}`` pairs."""
    rng = random.Random(seed)
    while True:
        yield _one_pair(rng)


def preference_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` deterministic preference pairs (chosen = correct answer, rejected = a wrong one).

    ``prompt`` and the completions are whitespace-separated words of :func:`task_vocabulary`, so
    tokenizing ``prompt + " " + completion`` equals tokenizing each and concatenating.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    stream = iter_preference_pairs(seed)
    return [next(stream) for _ in range(n)]


BUILTIN_DATASET_SIZE = 3000


def builtin_dataset_path() -> Path:
    """Path of the bundled JSONL dataset: ``preference_pairs(3000, seed=0)``, one pair per line."""
    return Path(__file__).parents[1] / "assets" / "preference_pairs.jsonl"


__all__ = ["BUILTIN_DATASET_SIZE", "SPECIAL_TOKENS", "builtin_dataset_path", "iter_preference_pairs",
           "preference_pairs", "task_vocabulary"]

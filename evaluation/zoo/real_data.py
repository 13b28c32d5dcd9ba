"""Data of the real zoo tier: arithmetic word problems in English and German, German fortunes.

A problem is drawn once, as language-free indices (person, item, verb, numbers), and can be
written in either language from parallel word lists: that is how `math_de` asks problems
from a pool disjoint from `math`'s, while both ask the same kind of question. Numbers are
digits in both languages (as in MGSM) and small (start 2-20, change 1-10), so the answer
is one step of arithmetic a 135M model can learn on CPU.

German text comes from Debian's `fortunes-de` (quotes, jokes, sayings; files of entries
separated by `%` lines): only whole prose entries in plain German characters are kept.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from merging.errors import EvomergeError

FORTUNES_DIR = Path("/usr/share/games/fortunes/de")

# parallel lists: index i is the same person / item / action in both languages
NAMES_EN = ["Tom", "Emma", "Jack", "Lily", "Noah", "Grace", "Oliver", "Chloe", "Harry", "Ruby", "George", "Alice"]
NAMES_DE = ["Lukas", "Anna", "Jonas", "Lena", "Felix", "Marie", "Paul", "Hannah", "Jakob", "Sophie", "Moritz", "Klara"]
ITEMS_EN = ["apples", "pears", "coins", "books", "cards", "eggs", "stones", "shells", "cups", "pens", "keys", "hats"]
ITEMS_DE = ["Äpfel", "Birnen", "Münzen", "Bücher", "Karten", "Eier", "Steine", "Muscheln", "Tassen", "Stifte",
            "Schlüssel", "Hüte"]
ADD_EN = ["buys", "finds", "gets"]
ADD_DE = ["kauft", "findet", "bekommt"]
SUB_EN = ["loses", "sells", "gives away"]
SUB_DE = ["verliert", "verkauft", "verschenkt"]


@dataclass(frozen=True)
class Problem:
    """`person` has `start` items, then gains (`add`) or loses `change` of them."""

    person: int
    item: int
    add: bool
    verb: int
    start: int
    change: int

    @property
    def answer(self) -> int:
        return self.start + self.change if self.add else self.start - self.change

    def english(self) -> str:
        name, item = NAMES_EN[self.person], ITEMS_EN[self.item]
        verb = (ADD_EN if self.add else SUB_EN)[self.verb]
        change = f"{self.change} more" if self.add else f"{self.change} of them"
        return (f"{name} has {self.start} {item}. Then {name} {verb} {change}. "
                f"How many {item} does {name} have now?")

    def german(self) -> str:
        name, item = NAMES_DE[self.person], ITEMS_DE[self.item]
        verb = (ADD_DE if self.add else SUB_DE)[self.verb]
        change = f"{self.change} dazu" if self.add else f"{self.change} davon"
        return f"{name} hat {self.start} {item}. Dann {verb} {name} {change}. Wie viele {item} hat {name} jetzt?"


def draw_problem(rng: random.Random) -> Problem:
    add = rng.random() < 0.5
    start = rng.randint(2, 20)  # >= 2: the item is always plural
    change = rng.randint(1, 10) if add else rng.randint(1, start)
    return Problem(rng.randrange(len(NAMES_EN)), rng.randrange(len(ITEMS_EN)), add, rng.randrange(3), start, change)


def math_record(p: Problem) -> dict:
    return {"prompt": f"Question: {p.english()}\nAnswer:", "answer": str(p.answer)}


def math_de_record(p: Problem) -> dict:
    return {"prompt": f"Frage: {p.german()}\nAntwort:", "answer": str(p.answer)}


_GERMAN_PROBLEM = re.compile(r"Frage: (\w+) hat (\d+) (\w+)\. Dann (\w+) \1 (\d+) (dazu|davon)\. "
                             r"Wie viele \3 hat \1 jetzt\?\nAntwort:")


def solve_german(prompt: str) -> int:
    """Read a math_de prompt back and solve it (checks that the German says what the answer says)."""
    match = _GERMAN_PROBLEM.fullmatch(prompt)
    if not match:
        raise ValueError(f"not a math_de prompt: {prompt!r}")
    _, start, _, verb, change, direction = match.groups()
    if (verb in ADD_DE) != (direction == "dazu"):
        raise ValueError(f"verb {verb!r} does not fit {direction!r}")
    return int(start) + int(change) if direction == "dazu" else int(start) - int(change)


def make_math_tasks(seed: int, counts: dict[str, int]) -> dict[str, dict[str, list[dict]]]:
    """{"math": {split: records}, "math_de": {...}}: every problem drawn once, so no problem
    is in two splits, and math_de never asks a problem that math teaches (in any language)."""
    from evaluation.zoo.data import split_unique

    rng = random.Random(f"real-math-{seed}")
    pools = split_unique(lambda: {"p": draw_problem(rng)},
                         {f"{task}/{split}": n for task in ("math", "math_de") for split, n in counts.items()},
                         key=lambda r: repr(r["p"]))
    return {"math": {s: [math_record(r["p"]) for r in pools[f"math/{s}"]] for s in counts},
            "math_de": {s: [math_de_record(r["p"]) for r in pools[f"math_de/{s}"]] for s in counts}}


# ---- German text ----

_CLEAN = re.compile(r"[A-Za-zÄÖÜäöüß0-9 .,;:!?'\"()\-„“‚‘»«–…]+")
_GERMAN_WORDS = {"der", "die", "das", "und", "ist", "nicht", "ich", "ein", "eine", "zu", "es", "sie", "man", "wer",
                 "mit", "den", "dem", "sich", "auf", "wenn", "auch", "nur", "im", "von", "wie", "so", "nichts"}


def parse_fortunes(text: str, *, min_chars: int = 40, max_chars: int = 200) -> list[str]:
    """The clean German prose entries of one fortune file, each on one line.

    Attribution lines (`-- author`) are dropped; entries with indented lines (ascii art,
    dictionary layouts) or chat logs (`<nick>`, `* nick`) are skipped, as are entries with
    characters outside plain German text, that do not start with a capital and end a
    sentence, or that have no common German word (English jokes)."""
    kept = []
    for entry in re.split(r"^%\s*$", text, flags=re.M):
        lines = [line for line in entry.splitlines() if line.strip() and not line.strip().startswith("--")]
        if not lines or any(line[0].isspace() or line[0] in "<*" for line in lines):
            continue
        sentence = " ".join(" ".join(lines).split())
        if not (min_chars <= len(sentence) <= max_chars and _CLEAN.fullmatch(sentence)
                and sentence[0].isupper() and sentence[-1] in ".!?"):
            continue
        if _GERMAN_WORDS & set(re.findall(r"\w+", sentence.lower())):
            kept.append(sentence)
    return kept


def load_fortunes(directory: Path = FORTUNES_DIR) -> list[str]:
    """Every clean entry of the fortune files in `directory` (symlinks and `.dat` indexes skipped)."""
    files = sorted(p for p in Path(directory).glob("*") if p.is_file() and not p.is_symlink() and p.suffix != ".dat")
    if not files:
        raise EvomergeError(f"no German fortune files in {directory}; install them with: apt-get install fortunes-de")
    return [s for p in files for s in parse_fortunes(p.read_text(encoding="utf-8", errors="replace"))]


def split_fortunes(sentences: list[str], seed: int, counts: dict[str, int]) -> dict[str, list[dict]]:
    """Deduplicated (case and punctuation ignored), shuffled with `seed`, cut into splits;
    a count of None takes all that is left (the fine-tune's train split)."""
    unique: dict[str, str] = {}
    for s in sentences:
        unique.setdefault(re.sub(r"\W+", "", s.lower()), s)
    pool = sorted(unique.values())
    random.Random(f"real-fortunes-{seed}").shuffle(pool)
    splits, at = {}, 0
    for split, n in counts.items():
        end = len(pool) if n is None else at + n
        if end > len(pool):
            raise EvomergeError(f"only {len(pool)} German sentences; cannot fill split {split!r}")
        splits[split] = [{"text": s} for s in pool[at:end]]
        at = end
    return splits

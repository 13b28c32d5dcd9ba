"""Seeded generators for the zoo's corpus and tasks.

Everything is drawn from `random.Random(seed)`, so one seed gives one zoo. The world is
small on purpose: a few names, items and verbs, said in English or in "Lang", a
synthetic language with its own lexicon (drawn from the seed) and its own word order
(subject-object-verb with particles, where English is subject-verb-object). Numbers are
written with digits in both languages, as in MGSM's Japanese problems.

Skills, one per fine-tune, each scored by exact match of a short answer line:

* ``math``: a one-step arithmetic word problem in English -> the number;
* ``lang``: translate an English noun phrase into Lang (no arithmetic anywhere;
  the fine-tune also learns whole sentences, both directions, and monolingual Lang);
* ``reverse``: a string skill, spell a made-up word backwards;
* ``math_lang`` (the target): the math problems asked in Lang -> the number.
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass

NAMES = ["tom", "ana", "sam", "lea", "max", "eva", "ben", "mia", "leo", "zoe", "kim", "ivo"]
ITEMS = ["apples", "pears", "coins", "books", "cards", "eggs", "stones", "shells", "cups", "pens", "keys", "hats"]
ANIMALS = ["cat", "dog", "bird", "fox", "horse", "fish", "goat", "frog"]
ADJECTIVES = ["big", "small", "red", "old", "happy", "quick", "blue", "tall", "young", "slow"]
PLACES = ["park", "house", "river", "market", "garden", "school"]
ADD_VERBS = ["buys", "finds", "gets"]
SUB_VERBS = ["loses", "sells", "gives away"]
OTHER_VERBS = ["sees", "likes", "follows", "feeds"]
DETERMINERS = ["the", "a", "my", "your", "this", "that"]
FUNCTION_WORDS = ["then", "more", "how_many", "now", "has", "the", "in", "is", "and", "of"]

ALPHABET = string.ascii_letters + string.digits + " .,?:!'-_\n"
"""Every character the zoo's text uses; the tokenizer's vocabulary (plus specials)."""


@dataclass(frozen=True)
class Lang:
    """The second language: a lexicon (English word -> Lang word), names kept as they are."""

    words: dict[str, str]
    subject: str
    object: str
    place: str

    def w(self, english: str) -> str:
        return self.words.get(english, english)


def make_lang(seed: int) -> Lang:
    """A lexicon of unique CV-syllable words, none of them an English word of the world."""
    rng = random.Random(f"lang-{seed}")
    english = ITEMS + ANIMALS + ADJECTIVES + PLACES + ADD_VERBS + SUB_VERBS + OTHER_VERBS + FUNCTION_WORDS + DETERMINERS[1:]
    taken = set(english) | set(NAMES)
    words: dict[str, str] = {}
    particles = []
    while len(words) < len(english) or len(particles) < 3:
        syllables = rng.choice([1, 2, 3]) if len(particles) < 3 else rng.choice([2, 3])
        word = "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(syllables))
        if word in taken:
            continue
        taken.add(word)
        if len(particles) < 3:
            particles.append(word)
        else:
            words[english[len(words)]] = word
    return Lang(words, *particles)


# ---- sentences: (english, lang) pairs built from one meaning ----

def sentence(rng: random.Random, lang: Lang, name: str | None = None, n: int | None = None) -> tuple[str, str]:
    """A random non-arithmetic sentence of the world, in both languages."""
    name, item, animal = name or rng.choice(NAMES), rng.choice(ITEMS), rng.choice(ANIMALS)
    adjective, place, verb = rng.choice(ADJECTIVES), rng.choice(PLACES), rng.choice(OTHER_VERBS)
    n = n or rng.randint(1, 99)
    L, s, o = lang.w, lang.subject, lang.object
    kind = rng.randrange(5)
    if kind == 0:
        return (f"{name} has {n} {item}.", f"{name} {s} {n} {L(item)} {o} {L('has')}.")
    if kind == 1:
        return (f"{name} {verb} the {animal}.", f"{name} {s} {L(animal)} {o} {L(verb)}.")
    if kind == 2:
        return (f"the {animal} is {adjective}.", f"{L(animal)} {s} {L(adjective)} {L('is')}.")
    if kind == 3:
        return (f"{name} is in the {place}.", f"{name} {s} {L(place)} {lang.place} {L('is')}.")
    other = rng.choice([x for x in NAMES if x != name])
    return (f"{name} and {other} {verb.removesuffix('s')} the {adjective} {animal}.",
            f"{name} {L('and')} {other} {s} {L(adjective)} {L(animal)} {o} {L(verb)}.")


@dataclass(frozen=True)
class Problem:
    name: str
    item: str
    start: int
    verb: str
    change: int

    @property
    def answer(self) -> int:
        return self.start + self.change if self.verb in ADD_VERBS else self.start - self.change

    def english(self) -> list[str]:
        more = " more" if self.verb in ADD_VERBS else ""
        return [f"{self.name} has {self.start} {self.item}.",
                f"then {self.name} {self.verb} {self.change}{more}.",
                f"how many {self.item} does {self.name} have now?"]

    def lang(self, lang: Lang) -> list[str]:
        L, s, o = lang.w, lang.subject, lang.object
        more = f" {L('more')}" if self.verb in ADD_VERBS else ""
        return [f"{self.name} {s} {self.start} {L(self.item)} {o} {L('has')}.",
                f"{L('then')} {self.name} {s} {self.change}{more} {L(self.verb)}.",
                f"{L('now')} {self.name} {s} {L(self.item)} {o} {L('how_many')} {L('has')}?"]


def problem(rng: random.Random, max_number: int) -> Problem:
    verb = rng.choice(ADD_VERBS + SUB_VERBS)
    start = rng.randint(1, max_number)
    change = rng.randint(1, max_number) if verb in ADD_VERBS else rng.randint(1, start)
    return Problem(rng.choice(NAMES), rng.choice(ITEMS), start, verb, change)


# ---- task records ----

def math_record(p: Problem) -> dict:
    return {"prompt": "Q: " + " ".join(p.english()) + "\nA:", "answer": str(p.answer)}


def math_lang_record(p: Problem, lang: Lang) -> dict:
    return {"prompt": "Q: " + " ".join(p.lang(lang)) + "\nA:", "answer": str(p.answer)}


def lang_record(english: str, lang_text: str) -> dict:
    return {"prompt": f"translate to lang: {english}\nA:", "answer": lang_text}


def phrase_pair(rng: random.Random, lang: Lang) -> tuple[str, str]:
    """A noun phrase: "my big red fox" -> "<fox> <red> <big> <my>" (Lang puts the noun
    first, then its adjectives innermost first, then the determiner). Names are left out:
    copying a name is what the micro model could not learn in its budget (docs/zoo.md)."""
    adjectives = rng.sample(ADJECTIVES, rng.randint(1, 2))
    noun = rng.choice(ITEMS + ANIMALS)
    determiner = rng.choice(DETERMINERS + [""])
    english = " ".join(([determiner] if determiner else []) + adjectives + [noun])
    lang_text = " ".join([lang.w(noun)] + [lang.w(a) for a in reversed(adjectives)]
                         + ([lang.w(determiner)] if determiner else []))
    return english, lang_text


def reverse_record(word: str) -> dict:
    return {"prompt": f"reverse: {word}\nA:", "answer": word[::-1]}


def random_word(rng: random.Random, lengths: tuple[int, int]) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(*lengths)))


def split_unique(draw, counts: dict[str, int], key=lambda r: r["prompt"]) -> dict[str, list[dict]]:
    """Fill the splits in order from `draw()`, never repeating a key: splits cannot overlap."""
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {}
    for split, count in counts.items():
        rows: list[dict] = []
        attempts = 0
        while len(rows) < count:
            attempts += 1
            if attempts > 100 * count + 1000:
                raise ValueError(f"cannot draw {count} unique examples for split {split!r}")
            record = draw()
            if key(record) not in seen:
                seen.add(key(record))
                rows.append(record)
        splits[split] = rows
    return splits


def make_tasks(seed: int, counts: dict[str, int], *, max_number: int = 9,
               word_lengths: tuple[int, int] = (3, 5)) -> dict[str, dict[str, list[dict]]]:
    """All task data: {task: {split: records}}. math and math_lang draw from disjoint
    problem pools (math_lang asks problems no math split contains)."""
    lang = make_lang(seed)
    rng = random.Random(f"tasks-{seed}")
    problems = split_unique(lambda: {"p": problem(rng, max_number)},
                            {"math_" + k: v for k, v in counts.items()} | {"ml_" + k: v for k, v in counts.items()},
                            key=lambda r: repr(r["p"]))
    tasks = {
        "math": {k: [math_record(r["p"]) for r in problems["math_" + k]] for k in counts},
        "math_lang": {k: [math_lang_record(r["p"], lang) for r in problems["ml_" + k]] for k in counts},
        "lang": split_unique(lambda: lang_record(*phrase_pair(rng, lang)), counts),
        "reverse": split_unique(lambda: reverse_record(random_word(rng, word_lengths)), counts),
    }
    return tasks


def translation_pair(rng: random.Random, lang: Lang) -> tuple[str, str]:
    """Mostly world sentences; a third are sentences of word problems (no answers: no math)."""
    if rng.random() < 0.3:
        p = problem(rng, 9)
        i = rng.randrange(3)
        return p.english()[i], p.lang(lang)[i]
    return sentence(rng, lang)


def pretrain_text(rng: random.Random, lang: Lang) -> str:
    """One pretraining document: a few world sentences in English or in Lang (never both,
    never a translation pair, never a question with its answer)."""
    in_lang = rng.random() < 0.5
    if rng.random() < 0.5:  # a story: one person, one number, said again (teaches copying)
        name, n = rng.choice(NAMES), rng.randint(1, 99)
        parts = [sentence(rng, lang, name, n)[in_lang] for _ in range(rng.randint(2, 4))]
        return " ".join(parts + [parts[0]])
    parts = []
    for _ in range(rng.randint(2, 4)):
        if rng.random() < 0.25:
            p = problem(rng, 9)
            parts.append(rng.choice(p.lang(lang) if in_lang else p.english()))
        else:
            parts.append(sentence(rng, lang)[in_lang])
    return " ".join(parts)


def lang_text(rng: random.Random, lang: Lang) -> str:
    """Monolingual Lang text for the lang fine-tune."""
    return " ".join(sentence(rng, lang)[1] for _ in range(rng.randint(2, 4)))

"""Tasks: data + prompt format + scorer, returning one score per example.

A search needs per-example scores (M2N2's resource competition works on them) and
standard errors (to know when two candidates really differ), so every task yields a
vector, never only an average. Four kinds cover what merged models are judged on:

* ``generate``: greedy generation, cut at stop strings, then an answer is extracted
  (the last number for math; the stripped text otherwise) and compared exactly;
* ``multiple_choice``: the choice with the highest log-likelihood given the prompt;
* ``perplexity``: the negative mean token loss of a text (higher is better);
* ``classify``: accuracy of a classifier's argmax (non-LM models): each example holds a
  feature vector (``features``) and a class index (``answer_field``).

Data is a local JSONL file (``{"prompt": ..., "answer": ...}`` per line, or the fields
the template names), a `datasets` id with a split, read from the local cache, or MGSM's
plain TSV files fetched through the Hugging Face Hub cache.
"""
from __future__ import annotations

import csv
import json
import math
import re
import unicodedata
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation, localcontext
from pathlib import Path
from typing import Literal, Sequence

from merging.checkpoint import file_digest
from merging.errors import EvomergeError

TaskKind = Literal["generate", "multiple_choice", "perplexity", "classify"]

# A minus sign only where no letter or digit precedes it: in "5-3" or "pages 10-12" the
# hyphen joins two numbers. ASCII only, so "答えは-5" (no spaces in Japanese) keeps its sign.
_NUMBER = re.compile(r"(?:(?<![0-9A-Za-z])-)?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")
_FULL_WIDTH = re.compile("[\uff01-\uff5e]")


def _half_width(text: str) -> str:
    """Full-width forms ("１，２３４", "1，234") as ASCII, by NFKC. Only that block: NFKC
    of the whole text would turn "12 m²" into "12 m2", whose last number is 2."""
    return _FULL_WIDTH.sub(lambda match: unicodedata.normalize("NFKC", match.group()), text)


def extract_last_number(text: str) -> str | None:
    """The last number in `text`, normalised: commas dropped, trailing zeros of a
    decimal dropped, a leading '+' ignored ("1,234.50" -> "1234.5", "-3" -> "-3")."""
    matches = _NUMBER.findall(_half_width(text).replace("\u2212", "-"))
    if not matches:
        return None
    return normalise_number(matches[-1])


def normalise_number(text: str) -> str | None:
    """The canonical string of a number, so that equal numbers compare equal as strings.
    Decimal, not float: 12345678901234567890 and ...891 are different answers."""
    cleaned = _half_width(text).strip().replace("\u2212", "-").replace(",", "").lstrip("+").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value.is_zero():  # "-0", "0.00"
        return "0"
    with localcontext() as context:
        context.prec = len(cleaned)  # normalize() rounds to the context's precision: keep every digit
        return format(value.normalize(context), "f")  # "1234.50" -> "1234.5", "3.0" -> "3"


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """Generation up to (not including) the first stop string."""
    cut = len(text)
    for s in stop:
        index = text.find(s)
        if index != -1:
            cut = min(cut, index)
    return text[:cut]


EXTRACTORS = {
    "last_number": extract_last_number,
    "exact": lambda text: text.strip(),
    "first_line": lambda text: text.strip().split("\n")[0].strip(),
}


@dataclass
class Task:
    """One evaluation task."""

    name: str
    kind: TaskKind
    data: str
    """A JSONL path (`{split}` is filled in), `hf:DATASET_ID[:CONFIG]` for a `datasets` id,
    `mgsm:LANG` for MGSM's `mgsm_LANG.tsv` (test split only), or `sklearn:digits` for
    scikit-learn's bundled 8x8 digits (80/20 split)."""
    split: str = "test"
    template: str = "{prompt}"
    """`str.format` over an example's fields makes the prompt."""
    answer_field: str = "answer"
    extract: str = "last_number"
    stop: list[str] = field(default_factory=lambda: ["\n"])
    max_new_tokens: int = 32
    choices_field: str = "choices"
    fewshot: list[dict] = field(default_factory=list)
    """Worked examples prepended to each prompt (already formatted with `template`)."""
    bos: bool | None = None
    """Generation prompts start with the tokenizer's BOS token: None (default) where the
    tokenizer adds it by default (as HF pipelines and vLLM do, and as Llama and Gemma
    models were scored in their papers), True always, False never."""

    def load(self, limit: int | None = None) -> list[dict]:
        """The examples of `split`, the first `limit` of them."""
        if self.data.startswith("hf:"):
            rows = [dict(row) for row in _load_hf(self.name, self.data[3:], self.split)]
        elif self.data.startswith("mgsm:"):
            rows = parse_mgsm_tsv(_mgsm_file(self.name, self.data[5:], self.split))
        elif self.data == "sklearn:digits":
            rows = _load_digits(self.split)
        else:
            rows = [json.loads(line) for line in self._local_file().read_text().splitlines() if line.strip()]
        return rows[:limit] if limit is not None else rows

    def fingerprint(self) -> str:
        """A content hash of the split's data, so that rewritten data is never served the
        scores of the old (the score cache keys on it): the bytes of a local file, the
        `datasets` fingerprint of a Hub dataset, the TSV of MGSM, scikit-learn's version
        for its bundled digits."""
        if self.data.startswith("hf:"):
            return _hf_fingerprint(self.name, self.data[3:], self.split)
        if self.data.startswith("mgsm:"):
            return file_digest(_mgsm_file(self.name, self.data[5:], self.split))
        if self.data == "sklearn:digits":
            import sklearn

            return f"sklearn-{sklearn.__version__}"
        return file_digest(self._local_file())

    def _local_file(self) -> Path:
        path = Path(self.data.format(split=self.split))
        if not path.is_file():
            raise EvomergeError(f"task {self.name!r}: data file {path} not found")
        return path

    def prompt(self, example: dict) -> str:
        shots = "".join(self.template.format(**shot) + str(shot[self.answer_field]) + "\n\n"
                        for shot in self.fewshot)
        return shots + self.template.format(**example)

    def score_generation(self, example: dict, generated: str) -> float:
        """1.0 if the extracted answer equals the reference answer, else 0.0."""
        extractor = EXTRACTORS[self.extract]
        predicted = extractor(cut_at_stop(generated, self.stop))
        reference = str(example[self.answer_field])
        if self.extract == "last_number":  # also reads GSM8K-style "reasoning ... #### 18"
            reference = extract_last_number(reference) or reference
        return float(predicted is not None and predicted == reference)




_HF_FINGERPRINTS: dict[tuple, str] = {}


def _hf_fingerprint(task: str, spec: str, split: str) -> str:
    """The `datasets` fingerprint of the split (derived from its data files), computed once
    per process, or once per change of the files of a local dataset folder."""
    folder = Path(spec.partition(":")[0])
    files = tuple(sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file())
                  ) if folder.is_dir() else ()
    key = (spec, split, files)
    if key not in _HF_FINGERPRINTS:
        _HF_FINGERPRINTS[key] = _load_hf(task, spec, split)._fingerprint
    return _HF_FINGERPRINTS[key]


def _load_hf(task: str, spec: str, split: str):
    """The split of a `datasets` id (a Hub id, read from the local cache when offline, or a
    local folder of data files); `spec` is `ID[:CONFIG]`."""
    name, _, config = spec.partition(":")
    try:
        import datasets  # optional: only users with the Hub (or its cache) need it
    except ImportError as exc:
        raise EvomergeError(f"task {task!r} reads the dataset {name!r} with the `datasets` package, "
                            "which is not installed: pip install 'evomerge[datasets]'") from exc
    try:
        rows = datasets.load_dataset(name, config or None, split=split)
    except (OSError, ValueError, RuntimeError) as exc:  # not cached offline; no such dataset, config or
        # split; a script-based dataset that datasets >= 4 refuses
        raise EvomergeError(f"task {task!r}: cannot load dataset {name!r} (config {config or None!r}, split "
                            f"{split!r}) from the Hub or its local cache: {exc}") from exc
    return rows


MGSM_REPO = "juletxara/mgsm"


def _mgsm_file(task: str, lang: str, split: str) -> str:
    """The path of MGSM's test split in `lang`: the plain `mgsm_{lang}.tsv` of the dataset
    repo (its loading script is refused by `datasets` >= 4), through the Hub cache, so it
    is read offline once cached."""
    from huggingface_hub import hf_hub_download

    filename = f"mgsm_{lang}.tsv"
    if split != "test":
        raise EvomergeError(f"task {task!r}: MGSM's {filename} is the test split; there is no {split!r} split")
    try:
        path = hf_hub_download(repo_id=MGSM_REPO, filename=filename, repo_type="dataset")
    except OSError as exc:  # offline and not cached, no network, no such file
        raise EvomergeError(f"task {task!r}: cannot fetch {filename} of the dataset {MGSM_REPO} from the Hub "
                            f"or its local cache: {exc}") from exc
    return path


def parse_mgsm_tsv(path: str | Path) -> list[dict]:
    """`question<TAB>answer_number` rows without a header (quoted with '"' where needed;
    an answer may be written "1,234") -> {"question", "answer_number"} records."""
    records = []
    with open(path, newline="", encoding="utf-8") as handle:
        for line, row in enumerate(csv.reader(handle, delimiter="\t", quotechar='"'), start=1):
            if not row:
                continue
            answer = normalise_number(row[1]) if len(row) == 2 else None
            if answer is None or "." in answer:
                raise EvomergeError(f"{path}: row {line} is not `question<TAB>integer answer`: {row!r}")
            records.append({"question": row[0], "answer_number": int(answer)})
    return records


def load_digits_split(train_fraction: float = 0.8):
    """M2N2's image-classifier data, scikit-learn's bundled 8x8 digits (offline), as
    (x_train, y_train, x_test, y_test): float32 features (N, 64) scaled to [0, 1] (pixels
    are 0..16), int64 labels 0..9. Split without shuffling (first 80% train, last 20%
    test) so that every run and every machine sees the same examples."""
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    cut = int(len(x) * train_fraction)
    return x[:cut], y[:cut], x[cut:], y[cut:]


def _load_digits(split: str) -> list[dict]:
    if split not in ("train", "test"):
        raise EvomergeError(f"sklearn:digits has splits train and test, not {split!r}")
    x_train, y_train, x_test, y_test = load_digits_split()
    x, y = (x_train, y_train) if split == "train" else (x_test, y_test)
    return [{"features": row, "label": int(label)} for row, label in zip(x, y)]


@dataclass
class TaskResult:
    """Per-example scores and their aggregate."""

    task: str
    scores: list[float]

    @property
    def mean(self) -> float:
        return sum(self.scores) / len(self.scores) if self.scores else float("nan")

    @property
    def stderr(self) -> float:
        """Standard error of the mean (sample standard deviation / sqrt(n))."""
        n = len(self.scores)
        if n < 2:
            return float("nan")
        mean = self.mean
        return math.sqrt(sum((s - mean) ** 2 for s in self.scores) / (n - 1) / n)

    def summary(self) -> dict:
        """Mean, standard error and n: what a report or a zoo matrix keeps of a result."""
        return {"mean": self.mean, "stderr": self.stderr, "n": len(self.scores)}

    def to_dict(self) -> dict:
        """JSON-ready: an undefined mean or standard error (n < 1, n < 2) is null, not NaN,
        which strict JSON readers refuse."""
        return {"task": self.task, "mean": _finite_or_none(self.mean), "stderr": _finite_or_none(self.stderr),
                "n": len(self.scores), "scores": self.scores}


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def format_results(tasks: Sequence, results: dict[str, TaskResult]) -> str:
    """The table `evomerge eval` prints, one row per task (anything with `name` and
    `split`); a mean (n = 0) or standard error (n < 2) that does not exist reads n/a, not nan."""
    def cell(value: float) -> str:
        return f"{value:>8.4f}" if math.isfinite(value) else f"{'n/a':>8}"

    lines = [f"{'task':<16} {'split':<6} {'n':>6} {'mean':>8} {'stderr':>8}"]
    for task in tasks:
        result = results[task.name]
        lines.append(f"{task.name:<16} {task.split:<6} {len(result.scores):>6} {cell(result.mean)} "
                     f"{cell(result.stderr)}")
    return "\n".join(lines)


BUILTIN_TASKS: dict[str, Task] = {
    "gsm8k": Task("gsm8k", "generate", "hf:openai/gsm8k:main", split="test",
                  template="Question: {question}\nAnswer: Let's think step by step.",
                  answer_field="answer", stop=["Question:", "\n\n\n"], max_new_tokens=256),
    "mgsm_en": Task("mgsm_en", "generate", "mgsm:en", split="test",
                    template="Question: {question}\nStep-by-Step Answer:",
                    answer_field="answer_number", stop=["Question:", "\n\n\n"], max_new_tokens=256),
    "mgsm_ja": Task("mgsm_ja", "generate", "mgsm:ja", split="test",
                    template="問題：{question}\nステップごとの答え：",
                    answer_field="answer_number", stop=["問題：", "問題:", "\n\n\n"], max_new_tokens=256),
    "mgsm_ja_evollm": Task("mgsm_ja_evollm", "generate", "mgsm:ja", split="test",
                           template="以下に、あるタスクを説明する指示があります。リクエストを適切に完了するための回答を"
                                    "日本語で記述してください。一歩一歩考えましょう。\n\n### 指示:\n{question}\n\n### 応答:",
                           answer_field="answer_number", stop=["### 指示", "\n\n\n"], max_new_tokens=512),
    "digits": Task("digits", "classify", "sklearn:digits", split="test", answer_field="label"),
}
"""Benchmarks for users with a network (or a populated `datasets` cache): the MGSM
prompts follow the benchmark's native chain-of-thought format; the score is exact match
of the last number generated. `mgsm_ja_evollm` is MGSM-JA in the prompt of Sakana's
evolutionary-model-merge repository (its "ja-alpaca-cot" template), the one its table of
EvoLLM-JP scores used (without its extra fastText check that the answer is in Japanese).
`digits` (offline) is M2N2's image classification data."""


def task_from_spec(name: str, spec: dict, root: str | Path) -> Task:
    """A zoo manifest's task spec (zoo.json's `tasks`) as a Task over the zoo folder
    `root`'s `data/NAME/{split}.jsonl`; specs without a kind (micro, small) are
    generate tasks, and without `bos` they follow the tokenizer's default."""
    return Task(name, spec.get("kind", "generate"), str(Path(root) / "data" / name / "{split}.jsonl"),
                split="test", template=spec.get("template", "{prompt}"), extract=spec.get("extract", "last_number"),
                stop=["\n"], max_new_tokens=spec.get("max_new_tokens", 32), bos=spec.get("bos"))


def zoo_tasks(zoo_dir: str | Path) -> dict[str, Task]:
    """A zoo's tasks by name (test split; `dataclasses.replace(task, split="dev")` for others)."""
    manifest = json.loads(Path(zoo_dir, "zoo.json").read_text())
    return {name: task_from_spec(name, spec, zoo_dir) for name, spec in manifest["tasks"].items()}


def resolve_task(name: str, *, zoo_dir: str | Path | None = None, split: str | None = None,
                 lm_eval_include: str | Path | None = None) -> Task:
    """A task by name: `lm_eval:TASK` (lm-evaluation-harness), a zoo task, a built-in
    benchmark, or a JSONL file path (`{"prompt", "answer"}` records, scored by the last
    number generated)."""
    from dataclasses import replace

    if name.startswith("lm_eval:"):
        from evaluation.lm_eval_backend import lm_eval_task

        return lm_eval_task(name, lm_eval_include, split)
    task: Task | None = None
    if zoo_dir is not None and Path(zoo_dir, "zoo.json").is_file():
        task = zoo_tasks(zoo_dir).get(name)
    if task is None:
        task = BUILTIN_TASKS.get(name)
    if task is None and name.endswith(".jsonl"):
        if not Path(name).is_file():
            raise EvomergeError(f"task file {name} not found")
        task = Task(Path(name).stem, "generate", name)
    if task is None:
        zoo_names = zoo_tasks(zoo_dir) if zoo_dir is not None and Path(zoo_dir, "zoo.json").is_file() else {}
        known = sorted(BUILTIN_TASKS) + sorted(zoo_names)
        raise EvomergeError(f"unknown task {name!r}; known: {', '.join(known)}, or a path to a .jsonl file")
    return replace(task, split=split) if split else task

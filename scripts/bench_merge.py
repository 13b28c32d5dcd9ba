#!/usr/bin/env python3
"""Time and measure memory of one TIES merge of ~1B-parameter models: evomerge vs mergekit.

evomerge claims to stream tensors so that memory stays at a few tensors; this checks it
on a realistic size. It builds (once, cached in --work-dir) a random Llama with
TinyLlama's shape - hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 kv heads,
vocab 32000, ~1.1B parameters - stored in bfloat16 as sharded safetensors, plus two
fine-tune-like variants. Then it runs the same TIES recipe (`dtype: bfloat16`, as a
user would write) through `evomerge merge` and `mergekit-yaml`, each in a fresh
subprocess, and records the wall time and the peak resident memory of the process
tree (psutil, summing RSS over the child and its descendants every 50 ms). The table
goes to docs/benchmarks.md between marker comments, with the exact command.

    python3 scripts/bench_merge.py [--work-dir /tmp/evomerge-bench] [--repeats 1] [--skip-mergekit]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import psutil
import torch

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "benchmarks.md"
DEFAULT_MERGEKIT = "/opt/mergekit-venv/bin/mergekit-yaml"
START, END = "<!-- bench_merge:start -->", "<!-- bench_merge:end -->"
SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
"""TinyLlama-1.1B's shape."""
SHARD_BYTES = 1 << 30  # 1 GiB input shards: several per model, as on the Hub
RECIPE = """\
merge_method: ties
base_model: ./models/base
models:
  - model: ./models/variant_1
    parameters: {density: 0.5, weight: 0.5}
  - model: ./models/variant_2
    parameters: {density: 0.5, weight: 0.5}
parameters:
  normalize: true
dtype: bfloat16
"""
# "./" matters: mergekit's model card asks the Hub about any relative path with one "/"
# (models/base looks like org/name) and crashes offline after the merge.
RECIPE_NAME = "ties, density 0.5, 2 models, dtype bfloat16"


# ---------------------------------------------------------------- building the models
def _save_sharded(tensors_iter, folder: Path) -> None:
    """Write (name, tensor) pairs into ~SHARD_BYTES safetensors shards plus an index.

    Only the current shard is held in memory, so a model never is in full.
    """
    from safetensors.torch import save_file

    shard: dict[str, torch.Tensor] = {}
    size, files, weight_map, total = 0, [], {}, 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, folder / name, metadata={"format": "pt"})
            files.append(name)
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    for name, tensor in tensors_iter:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > SHARD_BYTES:
            flush()
        shard[name], size, total = tensor.contiguous(), size + nbytes, total + nbytes
        weight_map[name] = None
    flush()
    renames = {f: f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, f in enumerate(files)}
    for old, new in renames.items():
        (folder / old).rename(folder / new)
    index = {"metadata": {"total_size": total},
             "weight_map": {k: renames[v] for k, v in weight_map.items()}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_metadata(folder: Path, config, tokenizer) -> None:
    """config.json (dtype bfloat16), tokenizer and generation config, as a HF folder has."""
    from transformers import GenerationConfig

    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    GenerationConfig(max_new_tokens=16, eos_token_id=tokenizer.eos_token_id).save_pretrained(folder)


def build_models(models: Path, seed: int = 0) -> dict[str, Path]:
    """base + variant_1, variant_2 in bf16, streamed tensor by tensor (never a whole model in RAM).

    The base is initialised like a transformer (normal(0, 0.02) matrices, unit norms);
    the variants add merging.synthetic.perturb_'s fine-tune-shaped deltas, read from
    the base's shards one tensor at a time.
    """
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(REPO))
    from merging.synthetic import build_tokenizer, make_config, perturb_

    names = ["base", "variant_1", "variant_2"]
    if (models / "done.json").exists():
        return {n: models / n for n in names}
    shutil.rmtree(models, ignore_errors=True)
    config = make_config("llama", **SHAPE)
    config.dtype = "bfloat16"
    config.architectures = ["LlamaForCausalLM"]  # what save_pretrained of a model writes
    tokenizer = build_tokenizer()
    with torch.device("meta"):
        shapes = [(k, tuple(p.shape)) for k, p in AutoModelForCausalLM.from_config(config).state_dict().items()]

    gen = torch.Generator().manual_seed(seed)

    def base_tensors():
        for name, shape in shapes:
            if name.endswith("norm.weight"):
                yield name, torch.ones(shape, dtype=torch.bfloat16)
            else:
                yield name, (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)

    def variant_tensors(index: int):
        vgen = torch.Generator().manual_seed(seed + 1000 * index)
        base_index = json.loads((models / "base" / "model.safetensors.index.json").read_text())
        for name, _ in shapes:
            with safe_open(models / "base" / base_index["weight_map"][name], "pt") as f:
                holder = torch.nn.Module()
                holder.w = torch.nn.Parameter(f.get_tensor(name), requires_grad=False)
            perturb_(holder, vgen, scale=0.5)
            yield name, holder.w.data

    for name in names:
        print(f"building {models / name}", file=sys.stderr, flush=True)
        _write_metadata(models / name, config, tokenizer)
        tensors = base_tensors() if name == "base" else variant_tensors(names.index(name))
        _save_sharded(tensors, models / name)
    params = sum(torch.Size(s).numel() for _, s in shapes)
    (models / "done.json").write_text(json.dumps({"parameters": params, "shape": SHAPE, "seed": seed}))
    return {n: models / n for n in names}


# ------------------------------------------------------------------- measuring a run
@dataclass
class Run:
    tool: str
    wall_s: float
    peak_rss_bytes: int
    peak_anon_bytes: int
    returncode: int


def _rss_anon(pid: int) -> int:
    """Anonymous resident memory (heap, tensors) of one process, from /proc; 0 if unknown.

    Total RSS also counts pages of memory-mapped input files, which the kernel can drop
    at will; the anonymous part is what a merge really needs.
    """
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(cmd: list[str], cwd: Path, env: dict, log: Path, interval: float = 0.05) -> Run:
    """Run cmd; return its wall time, peak RSS and peak anonymous RSS of the process tree.

    RSS is summed over the child and all its descendants at each poll, so a tool that
    forks workers is charged for all of them; sampling every 50 ms can miss a shorter
    spike, which at these tensor sizes (hundreds of MB each) does not matter.
    """
    peak, peak_anon = 0, 0
    stop = threading.Event()
    start = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        root = psutil.Process(proc.pid)

        def poll() -> None:
            nonlocal peak, peak_anon
            while not stop.is_set():
                try:
                    procs = [root] + root.children(recursive=True)
                except psutil.NoSuchProcess:
                    return
                total, anon = 0, 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                        anon += _rss_anon(p.pid)
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
                peak, peak_anon = max(peak, total), max(peak_anon, anon)
                stop.wait(interval)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        rc = proc.wait()
        wall = time.perf_counter() - start
        stop.set()
        thread.join()
    return Run(cmd[0], wall, peak, peak_anon, rc)


def warm_page_cache(folders: list[Path]) -> None:
    """Read the inputs once so that every timed run starts with them cached alike."""
    for folder in folders:
        for f in folder.glob("*.safetensors"):
            with f.open("rb") as fh:
                while fh.read(64 << 20):
                    pass


def update_docs(table: str, command: str, notes: str, docs: Path = DOCS) -> None:
    """Replace the section between the markers in docs/benchmarks.md (create it if needed)."""
    section = f"{START}\n{table}\n\n{notes}\n\nProduced by:\n\n```\n{command}\n```\n{END}"
    text = docs.read_text() if docs.exists() else "# Benchmarks\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n## Merge: evomerge vs mergekit, ~1B Llama, TIES\n\n" + section + "\n"
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(text)


def shown(cmd: list[str]) -> list[str]:
    """The command as a reader would type it: `python3` for this interpreter."""
    return ["python3" if c == sys.executable else c for c in cmd]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Needs ~7 GB of disk for the models and ~2.2 GB per output.")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/evomerge-bench"),
                        help="models (built once, reused) and outputs (default: /tmp/evomerge-bench)")
    parser.add_argument("--repeats", type=int, default=1, choices=[1, 2, 3], help="runs per tool")
    parser.add_argument("--skip-mergekit", action="store_true", help="time evomerge only")
    parser.add_argument("--skip-evomerge", action="store_true", help="time mergekit only")
    parser.add_argument("--mergekit-bin", default=DEFAULT_MERGEKIT, help="the mergekit-yaml executable")
    parser.add_argument("--no-docs", action="store_true", help="print the table; leave docs/benchmarks.md alone")
    args = parser.parse_args(argv)

    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    paths = build_models(work / "models")
    params = json.loads((work / "models" / "done.json").read_text())["parameters"]
    (work / "recipe.yaml").write_text(RECIPE)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    tools: list[tuple[str, list[str]]] = []
    if not args.skip_evomerge:
        tools.append(("evomerge", [sys.executable, "-m", "evomerge", "merge", "recipe.yaml", "out-evomerge",
                                   "--overwrite", "--no-progress"]))
    if not args.skip_mergekit:
        if not Path(args.mergekit_bin).exists():
            print(f"{args.mergekit_bin} not found; use --skip-mergekit", file=sys.stderr)
            return 2
        tools.append(("mergekit", [args.mergekit_bin, "recipe.yaml", "out-mergekit", "--quiet"]))

    warm_page_cache(list(paths.values()))
    runs: list[Run] = []
    for rep in range(args.repeats):
        for tool, cmd in tools:
            shutil.rmtree(work / f"out-{tool}", ignore_errors=True)
            run = measure(cmd, work, env, work / f"{tool}-{rep}.log")
            run.tool = tool
            print(f"{tool} run {rep + 1}: {run.wall_s:.1f} s, peak RSS {run.peak_rss_bytes / 2**30:.2f} GiB "
                  f"(anonymous {run.peak_anon_bytes / 2**30:.2f}), rc {run.returncode}",
                  file=sys.stderr, flush=True)
            runs.append(run)
            if run.returncode != 0:
                print((work / f"{tool}-{rep}.log").read_text()[-2000:], file=sys.stderr)
                return 1

    machine = f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    lines = ["| tool | recipe | wall s | peak RSS GiB | of which anonymous GiB | machine |",
             "|---|---|---|---|---|---|"]
    for tool, _ in tools:
        mine = [r for r in runs if r.tool == tool]
        walls = ", ".join(f"{r.wall_s:.1f}" for r in mine)
        wall = f"{statistics.median(r.wall_s for r in mine):.1f}" + (f" (runs: {walls})" if len(mine) > 1 else "")
        rss = f"{max(r.peak_rss_bytes for r in mine) / 2**30:.2f}"
        anon = f"{max(r.peak_anon_bytes for r in mine) / 2**30:.2f}"
        lines.append(f"| {tool} | {RECIPE_NAME} | {wall} | {rss} | {anon} | {machine} |")
    table = "\n".join(lines)
    command = "python3 " + " ".join(shlex.quote(a) for a in
                                     [str(Path(__file__).relative_to(REPO))] + (argv if argv is not None else sys.argv[1:]))
    notes = (f"Models: random Llama with TinyLlama-1.1B's shape ({params / 1e9:.2f}B parameters, "
             f"{', '.join(f'{k}={v}' for k, v in SHAPE.items())}), bfloat16, 1 GiB safetensors shards; "
             "base + 2 variants. Recipe (recipe.yaml in the work dir):\n\n```yaml\n" + RECIPE +
             "```\n\nEach tool runs in a fresh subprocess with the inputs already in the page cache; "
             "wall time is the median over runs; peak RSS is the largest sum of RSS over the process "
             "tree, sampled every 50 ms with psutil (not /usr/bin/time, whose maximum is per process); it includes resident pages of memory-mapped input "
             "files, which the kernel can reclaim, so the anonymous part (RssAnon from /proc, same "
             "sampling; its peak may fall at another moment) is listed too. Commands: " +
             " and ".join(f"`{' '.join(shown(cmd))}`" for _, cmd in tools) +
             f", run in the work dir. {platform.python_implementation()} {platform.python_version()}, "
             f"torch {torch.__version__} (evomerge; mergekit's venv has its own).")
    print(table)
    if not args.no_docs:
        update_docs(table, command, notes)
        print(f"updated {DOCS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

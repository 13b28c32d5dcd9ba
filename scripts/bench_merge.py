#!/usr/bin/env python3
"""Time and measure the memory of one static TIES merge: evomerge vs mergekit vs the I/O floor.

Two models, built once (cached in --work-dir) as random Llamas with fine-tune-shaped
variants (merging.synthetic.perturb_), base + 2 variants each, sharded safetensors:

* `tinyllama-bf16`: TinyLlama-1.1B's shape in bfloat16, TIES density 0.5, `dtype: bfloat16`;
* `llama160m-f32`: a ~160M Llama (hidden 1024, intermediate 2816, 8 layers, vocab 32000,
  untied head) in float32, TIES density 0.4 / 0.6, `dtype: float32`.

Each tool runs the same recipe in a fresh subprocess under `/usr/bin/time -v`, whose
"Maximum resident set size" (mapped pages included) is the peak memory reported; the
anonymous part (RssAnon, sampled every 50 ms over the process tree) is listed beside it.
The floor is a plain read of every input file and a write of the output's size, timed the
same way. Results go to docs/benchmarks.md between marker comments, with the command.

    python3 scripts/bench_merge.py [--model tinyllama-bf16|llama160m-f32] [--repeats 1]
        [--skip-mergekit] [--threads N] [--work-dir /tmp/evomerge-bench]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
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
SHARD_BYTES = 1 << 30  # 1 GiB input shards: several per model, as on the Hub


@dataclass(frozen=True)
class Scenario:
    shape: dict
    dtype: str
    recipe: str
    label: str


def _ties(densities: tuple[float, float], dtype: str) -> str:
    # "./" matters: mergekit's model card asks the Hub about any relative path with one "/"
    # (models/base looks like org/name) and crashes offline after the merge.
    return (f"merge_method: ties\nbase_model: ./models/base\nmodels:\n"
            f"  - model: ./models/variant_1\n    parameters: {{density: {densities[0]}, weight: 0.5}}\n"
            f"  - model: ./models/variant_2\n    parameters: {{density: {densities[1]}, weight: 0.5}}\n"
            f"parameters:\n  normalize: true\ndtype: {dtype}\n")


SCENARIOS = {
    "tinyllama-bf16": Scenario(
        dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),  # TinyLlama-1.1B's shape
        "bfloat16", _ties((0.5, 0.5), "bfloat16"), "ties, density 0.5, 2 models, dtype bfloat16"),
    "llama160m-f32": Scenario(
        dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048),
        "float32", _ties((0.4, 0.6), "float32"), "ties, density 0.4 / 0.6, 2 models, dtype float32"),
}


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
    """config.json, tokenizer and generation config, as a HF folder has."""
    from transformers import GenerationConfig

    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    GenerationConfig(max_new_tokens=16, eos_token_id=tokenizer.eos_token_id).save_pretrained(folder)


def build_models(models: Path, scenario: Scenario, seed: int = 0) -> dict[str, Path]:
    """base + variant_1, variant_2 of the scenario's shape and dtype, streamed tensor by
    tensor (never a whole model in RAM).

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
    config = make_config("llama", **scenario.shape)
    config.dtype = scenario.dtype
    dtype = getattr(torch, scenario.dtype)
    config.architectures = ["LlamaForCausalLM"]  # what save_pretrained of a model writes
    tokenizer = build_tokenizer()
    with torch.device("meta"):
        shapes = [(k, tuple(p.shape)) for k, p in AutoModelForCausalLM.from_config(config).state_dict().items()]

    gen = torch.Generator().manual_seed(seed)

    def base_tensors():
        for name, shape in shapes:
            if name.endswith("norm.weight"):
                yield name, torch.ones(shape, dtype=dtype)
            else:
                yield name, (torch.randn(shape, generator=gen) * 0.02).to(dtype)

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
    (models / "done.json").write_text(json.dumps({"parameters": params, "shape": scenario.shape,
                                                         "dtype": scenario.dtype, "seed": seed}))
    return {n: models / n for n in names}


# ------------------------------------------------------------------- measuring a run
@dataclass
class Run:
    tool: str
    wall_s: float
    max_rss_bytes: int
    """The process's maximum resident set size, as /usr/bin/time -v reports it."""
    peak_anon_bytes: int
    returncode: int


def _rss_anon(pid: int) -> int:
    """Anonymous resident memory (heap, tensors) of one process, from /proc; 0 if unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(tool: str, cmd: list[str], cwd: Path, env: dict, log: Path, interval: float = 0.05) -> Run:
    """Run cmd under /usr/bin/time -v; its wall time, maximum RSS, and the peak of the
    anonymous RSS summed over the process tree (sampled every `interval` seconds)."""
    peak_anon = 0
    stop = threading.Event()
    start = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(["/usr/bin/time", "-v", *cmd], cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        root = psutil.Process(proc.pid)

        def poll() -> None:
            nonlocal peak_anon
            while not stop.is_set():
                try:
                    procs = [root] + root.children(recursive=True)
                except psutil.NoSuchProcess:
                    return
                peak_anon = max(peak_anon, sum(_rss_anon(p.pid) for p in procs))
                stop.wait(interval)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        rc = proc.wait()
        wall = time.perf_counter() - start
        stop.set()
        thread.join()
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", log.read_text())
    return Run(tool, wall, int(match.group(1)) * 1024 if match else 0, peak_anon, rc)


def io_floor(inputs: list[Path], out: Path, nbytes: int, chunk: int = 16 << 20) -> None:
    """The floor a merge cannot beat: read every input file once and write `nbytes`, in
    large chunks through one reused buffer (no computing)."""
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    for path in inputs:
        with path.open("rb", buffering=0) as handle:
            while handle.readinto(view):
                pass
    with out.open("wb", buffering=0) as handle:
        for start in range(0, nbytes, chunk):
            handle.write(view[:min(chunk, nbytes - start)])


def warm_page_cache(folders: list[Path]) -> None:
    """Read the inputs once so that every timed run starts with them cached alike."""
    io_floor([f for folder in folders for f in folder.glob("*.safetensors")], Path(os.devnull), 0)


def update_docs(section_name: str, title: str, table: str, command: str, notes: str, docs: Path = DOCS) -> None:
    """Replace the section between this scenario's markers in docs/benchmarks.md (append it if new)."""
    start, end = f"<!-- {section_name}:start -->", f"<!-- {section_name}:end -->"
    section = f"{start}\n{table}\n\n{notes}\n\nProduced by:\n\n```\n{command}\n```\n{end}"
    text = docs.read_text() if docs.exists() else "# Benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + f"\n\n## {title}\n\n" + section + "\n"
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(text)


def shown(cmd: list[str]) -> list[str]:
    """The command as a reader would type it: `python3` for this interpreter."""
    return ["python3" if c == sys.executable else c for c in cmd]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="tinyllama-bf16 needs ~7 GB of disk for the models and ~2.2 GB per output.")
    parser.add_argument("--model", choices=sorted(SCENARIOS), default="tinyllama-bf16", help="which benchmark")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/evomerge-bench"),
                        help="models (built once, reused) and outputs (default: /tmp/evomerge-bench/MODEL)")
    parser.add_argument("--repeats", type=int, default=1, choices=[1, 2, 3], help="runs per tool")
    parser.add_argument("--skip-mergekit", action="store_true", help="leave mergekit out")
    parser.add_argument("--threads", type=int, default=None, help="evomerge merge --threads")
    parser.add_argument("--mergekit-bin", default=DEFAULT_MERGEKIT, help="the mergekit-yaml executable")
    parser.add_argument("--no-docs", action="store_true", help="print the table; leave docs/benchmarks.md alone")
    parser.add_argument("--io-floor", nargs="+", help=argparse.SUPPRESS)  # OUT NBYTES INPUT...: the floor's subprocess
    args = parser.parse_args(argv)
    if args.io_floor:
        io_floor([Path(p) for p in args.io_floor[2:]], Path(args.io_floor[0]), int(args.io_floor[1]))
        return 0

    scenario = SCENARIOS[args.model]
    work = (args.work_dir / args.model).resolve()
    work.mkdir(parents=True, exist_ok=True)
    paths = build_models(work / "models", scenario)
    params = json.loads((work / "models" / "done.json").read_text())["parameters"]
    (work / "recipe.yaml").write_text(scenario.recipe)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    inputs = [f for folder in paths.values() for f in sorted(folder.glob("*.safetensors"))]
    out_bytes = sum(f.stat().st_size for f in paths["base"].glob("*.safetensors"))
    threads = ["--threads", str(args.threads)] if args.threads else []
    tools: list[tuple[str, list[str]]] = [
        ("floor (read inputs, write output)",
         [sys.executable, str(Path(__file__).resolve()), "--io-floor", "out-floor", str(out_bytes),
          *[str(f.relative_to(work)) for f in inputs]]),
        ("evomerge", [sys.executable, "-m", "evomerge", "merge", "recipe.yaml", "out-evomerge",
                      "--overwrite", "--no-progress", *threads]),
    ]
    if not args.skip_mergekit:
        if not Path(args.mergekit_bin).exists():
            print(f"{args.mergekit_bin} not found; use --skip-mergekit", file=sys.stderr)
            return 2
        tools.append(("mergekit", [args.mergekit_bin, "recipe.yaml", "out-mergekit", "--quiet"]))

    warm_page_cache(list(paths.values()))
    runs: list[Run] = []
    for rep in range(args.repeats):
        for tool, cmd in tools:
            slug = tool.split()[0]
            shutil.rmtree(work / f"out-{slug}", ignore_errors=True)
            run = measure(tool, cmd, work, env, work / f"{slug}-{rep}.log")
            print(f"{tool} run {rep + 1}: {run.wall_s:.1f} s, max RSS {run.max_rss_bytes / 2**30:.2f} GiB "
                  f"(anonymous {run.peak_anon_bytes / 2**30:.2f}), rc {run.returncode}",
                  file=sys.stderr, flush=True)
            runs.append(run)
            if run.returncode != 0:
                print((work / f"{slug}-{rep}.log").read_text()[-2000:], file=sys.stderr)
                return 1
        (work / "out-floor").unlink(missing_ok=True)

    def median(tool: str) -> float:
        return statistics.median(r.wall_s for r in runs if r.tool == tool)

    def rss(tool: str) -> int:
        return max(r.max_rss_bytes for r in runs if r.tool == tool)

    machine = f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    lines = ["| tool | wall s | max RSS GiB | anonymous GiB | wall vs mergekit | RSS vs mergekit | wall vs floor |",
             "|---|---|---|---|---|---|---|"]
    for tool, _ in tools:
        mine = [r for r in runs if r.tool == tool]
        walls = ", ".join(f"{r.wall_s:.1f}" for r in mine)
        wall = f"{median(tool):.1f}" + (f" (runs: {walls})" if len(mine) > 1 else "")
        versus = (f"{median('mergekit') / median(tool):.2f}× faster", f"{rss(tool) / rss('mergekit'):.2f}") \
            if not args.skip_mergekit else ("", "")
        floor = f"{median(tool) / median(tools[0][0]):.1f}×"
        lines.append(f"| {tool} | {wall} | {rss(tool) / 2**30:.2f} | "
                     f"{max(r.peak_anon_bytes for r in mine) / 2**30:.2f} | {versus[0]} | {versus[1]} | {floor} |")
    table = "\n".join(lines)
    command = "python3 " + " ".join(shlex.quote(a) for a in
                                     [str(Path(__file__).relative_to(REPO))] + (argv if argv is not None else sys.argv[1:]))
    load = os.getloadavg()[0]
    notes = (f"Models: random Llama, {params / 1e6:.0f}M parameters "
             f"({', '.join(f'{k}={v}' for k, v in scenario.shape.items())}), {scenario.dtype}, 1 GiB "
             f"safetensors shards; base + 2 variants. Recipe ({scenario.label}; recipe.yaml in the work "
             "dir):\n\n```yaml\n" + scenario.recipe + "```\n\nEach tool runs in a fresh subprocess "
             "with the inputs already in the page cache; wall time is the median over runs; max RSS is "
             "/usr/bin/time -v's maximum resident set size (mapped pages included); anonymous is the "
             "peak RssAnon summed over the process tree (psutil, every 50 ms). Commands: " +
             " and ".join(f"`{' '.join(shown(cmd))}`" for tool, cmd in tools if tool != tools[0][0]) +
             f", run in the work dir. {machine}, load average {load:.1f} at the end; "
             f"{platform.python_implementation()} {platform.python_version()}, torch {torch.__version__} "
             "(evomerge; mergekit's venv has its own).")
    print(table)
    if not args.no_docs:
        update_docs(f"bench_merge:{args.model}", f"Static merge: evomerge vs mergekit, {args.model}",
                    table, command, notes)
        print(f"updated {DOCS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Run the same recipes through mergekit and evomerge and compare every output tensor.

evomerge promises that a mergekit recipe gives mergekit's result. This script checks it
on small real checkpoints: it builds a tiny base and three fine-tune-like variants (Llama
in float32 unless --family / --source-dtype / --tied say otherwise), fills the model paths
into each recipe of scripts/mergekit_recipes/, runs `mergekit-yaml` (its own venv) and
`evomerge merge` on it (each tool in one worker process, scripts/merge_worker.py, or with
--fresh-processes a process per merge), and compares:

* deterministic methods (dtype float32): every tensor must agree to float32 rounding
  (|diff| <= rtol * max|tensor|, rtol = max(1e-6, eps of the output dtype));
* the seeded DARE and DELLA methods (their RNG streams differ): statistics - the
  fraction of entries left equal to the base, mean and std of the delta from the base
  (per tensor, averaged by size), the relative L2 difference; with one model also the
  rescale rule and, for DELLA, the keep rates of the largest and smallest |delta|;
* recipes whose dtype is below float32: mergekit computes in that dtype and evomerge in
  float32 (an intended difference, only reported); evomerge must then equal mergekit
  run with dtype float32 and out_dtype set to that dtype.

Recipes named `tokenizer-*` run on models whose tokenizers differ (`distinct_vocabularies`):
their output tokenizers must hold the same tokens at the same ids (`compare_vocabularies`).

It also compares config.json. It prints a markdown table and exits 1 when a
deterministic recipe (or a DARE statistic) disagrees, 2 when a tool fails to run.

    python3 scripts/compare_mergekit.py [--work-dir DIR] [--only ties*] [--mergekit-bin PATH]
        [--family qwen2] [--source-dtype bfloat16] [--tied] [--fresh-processes]
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import yaml
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parent.parent
RECIPES = Path(__file__).resolve().parent / "mergekit_recipes"
DEFAULT_MERGEKIT = "/opt/mergekit-venv/bin/mergekit-yaml"
STATS_METHODS = {"dare_linear", "dare_ties", "della", "della_linear"}
LOW_PRECISION = {"bfloat16", "float16"}
VLM_FAMILY = "mistral3"
"""The multi-module family (merging.synthetic.build_vlm_family); only the `modules-*`
recipes, written for its modules, run on it, and only on it."""
TOKENIZER_PREFIX = "tokenizer-"
"""Recipes named so run on models whose tokenizers differ (`distinct_vocabularies`), and
their output tokenizers are compared too."""
CONFIG_IGNORED = {"transformers_version"}
"""config.json keys that legitimately differ between the tools' outputs."""


@dataclass
class Result:
    """One recipe's outcome: a row of the table plus the details behind it."""

    recipe: str
    method: str
    mode: str  # exact | stats | approx
    tensors: int = 0
    max_abs_diff: float = float("nan")
    verdict: str = ""
    ok: bool = True
    details: list[str] = field(default_factory=list)


def build_models(work_dir: Path, seed: int, family: str = "llama", dtype: str = "float32",
                 tied: bool = False, distinct_vocab: bool = False) -> dict[str, Path]:
    """Base + variant_1..3 of a tiny `family` (merging.synthetic) in `dtype`, with tied
    embeddings if `tied` (else as the family has them: gemma2 tied, the rest untied), and
    with the variants' vocabularies made to differ (`distinct_vocabularies`) if
    `distinct_vocab`; reused when already in work_dir."""
    models = work_dir / ("models-distinct-vocab" if distinct_vocab else "models")
    names = ["base", "variant_1", "variant_2", "variant_3"]
    if all((models / n / "config.json").exists() for n in names) and (models / "family.json").exists():
        return {n: models / n for n in names}
    sys.path.insert(0, str(REPO))
    from merging.synthetic import build_family, build_vlm_family

    if family == VLM_FAMILY:
        return build_vlm_family(models, variants=3, seed=seed, dtype=getattr(torch, dtype), tied=tied)
    tying = {"tie_word_embeddings": True} if tied else {}
    paths = build_family(models, family=family, variants=3, seed=seed, dtype=getattr(torch, dtype), **tying)
    if distinct_vocab:
        (models / "family.json").unlink()  # written again once the vocabularies differ
        distinct_vocabularies(paths, seed)
        (models / "family.json").write_text(json.dumps({"family": family, "distinct_vocab": True}))
    return paths


EXTRA_TOKENS = {
    "variant_1": (["Ġevolve"], ["<|v1|>", "<|shared|>"], ["<|sp1|>"]),
    "variant_2": ([], ["<|shared|>", "<|v2|>", "<|v2b|>"], ["<|sp2|>"]),
}
"""Per variant: tokens added to its BPE vocabulary, added (normal) tokens, special tokens."""


def distinct_vocabularies(paths: dict[str, Path], seed: int) -> None:
    """Give the variants different tokenizers, as fine-tunes that added tokens have:
    EXTRA_TOKENS (`<|shared|>` at another id in each), each with a new embedding and head
    row (seeded noise of the embedding's scale); variant_2's tokenizer also swaps two
    base tokens' ids. variant_3 keeps the base's vocabulary."""
    from transformers import AutoTokenizer

    generator = torch.Generator().manual_seed(seed + 7)
    for name, (bpe, added, special) in EXTRA_TOKENS.items():
        folder = paths[name]
        spec = json.loads((folder / "tokenizer.json").read_text())
        vocab = spec["model"]["vocab"]
        for token in bpe:
            vocab[token] = max(spec["model"]["vocab"].values()) + 1
        if name == "variant_2":
            first, second = sorted(vocab, key=vocab.get)[300:302]
            vocab[first], vocab[second] = vocab[second], vocab[first]
        (folder / "tokenizer.json").write_text(json.dumps(spec))
        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokenizer.add_tokens(added)
        tokenizer.add_special_tokens({"additional_special_tokens": special})
        tokenizer.save_pretrained(folder)
        size = len(tokenizer)
        config = json.loads((folder / "config.json").read_text())
        old = config["vocab_size"]
        state = load_tensors(folder)
        for key, tensor in state.items():
            if tensor.dim() == 2 and tensor.shape[0] == old:
                noise = torch.randn(size - old, tensor.shape[1], generator=generator)
                state[key] = torch.cat([tensor, (noise * tensor.float().std()).to(tensor.dtype)])
        for shard in folder.glob("*.safetensors*"):
            shard.unlink()
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps({**config, "vocab_size": size}, indent=2))


def render(recipe: Path, paths: dict[str, Path], out: Path) -> dict:
    """Replace {base}, {variant_N} with absolute paths; write the recipe; return it parsed."""
    text = recipe.read_text()
    for name, path in paths.items():
        text = text.replace("{" + name + "}", str(path.resolve()))
    out.write_text(text)
    return yaml.safe_load(text)


class Tools:
    """Runs `mergekit-yaml ARGS` and `evomerge ARGS`, each job's output in its own log.

    By default through one long-lived scripts/merge_worker.py per tool (the same entry
    points, imported once: a tiny merge is otherwise ~90% interpreter start-up); with
    `fresh` as one subprocess per merge, exactly as a user runs the commands.
    """

    def __init__(self, mergekit_bin: str, fresh: bool):
        self.env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(
            [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        self.commands = {"mergekit": [mergekit_bin], "evomerge": [sys.executable, "-m", "evomerge"]}
        self.pythons = {"mergekit": str(Path(mergekit_bin).parent / "python"), "evomerge": sys.executable}
        self.fresh = fresh
        self.workers: dict[str, subprocess.Popen] = {}

    def run(self, tool: str, args: list[str], log: Path, cwd: Path, hash_seed: int | None = None) -> bool:
        """One merge; True when it succeeded. `hash_seed` runs it in a fresh process with
        that PYTHONHASHSEED (mergekit's set orders depend on it)."""
        if self.fresh or hash_seed is not None:
            env = self.env if hash_seed is None else dict(self.env, PYTHONHASHSEED=str(hash_seed))
            with log.open("w") as fh:
                return subprocess.run(self.commands[tool] + args, cwd=cwd, stdout=fh,
                                      stderr=subprocess.STDOUT, env=env).returncode == 0
        worker = self.workers.get(tool)
        if worker is None or worker.poll() is not None:
            worker = self.workers[tool] = subprocess.Popen(
                [self.pythons[tool], str(Path(__file__).resolve().parent / "merge_worker.py"), tool],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=self.env)
        worker.stdin.write(json.dumps({"argv": args, "cwd": str(cwd), "log": str(log)}) + "\n")
        worker.stdin.flush()
        reply = worker.stdout.readline()
        if not reply:  # the worker died (its last words are in the log)
            return False
        return json.loads(reply)["ok"]

    def close(self) -> None:
        for worker in self.workers.values():
            worker.stdin.close()
            worker.wait()


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint folder (sharded or not)."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def tolerance(dtype: torch.dtype, scale: float, rtol: float) -> float:
    """Float32 rounding (rtol) or, for a lower output dtype, one unit of its precision."""
    return max(rtol, torch.finfo(dtype).eps if dtype.is_floating_point else 0.0) * max(scale, 1e-30)


def compare_keys(mk: dict, ev: dict, res: Result) -> list[str]:
    """Names present in both outputs; a missing or extra tensor fails the recipe."""
    missing, extra = sorted(set(mk) - set(ev)), sorted(set(ev) - set(mk))
    if missing or extra:
        res.ok = False
        res.details.append(f"tensors only in mergekit: {missing}; only in evomerge: {extra}")
    common = [k for k in mk if k in ev]
    for key in common:
        if mk[key].shape != ev[key].shape or mk[key].dtype != ev[key].dtype:
            res.ok = False
            res.details.append(f"{key}: mergekit {tuple(mk[key].shape)} {mk[key].dtype}, "
                               f"evomerge {tuple(ev[key].shape)} {ev[key].dtype}")
    return [k for k in common if mk[k].shape == ev[k].shape]


def compare_exact(mk: dict, ev: dict, res: Result, rtol: float, label: str = "") -> int:
    """Element-wise agreement up to rounding; returns how many tensors disagree.

    Sets res.tensors / res.max_abs_diff and lists the worst tensors in res.details.
    """
    worst: list[tuple[float, str, float, float]] = []
    max_diff = 0.0
    keys = compare_keys(mk, ev, res)
    for key in keys:
        a, b = mk[key].double(), ev[key].double()
        diff = (a - b).abs().max().item() if a.numel() else 0.0
        scale = max(a.abs().max().item(), b.abs().max().item()) if a.numel() else 0.0
        tol = tolerance(mk[key].dtype, scale, rtol)
        max_diff = max(max_diff, diff)
        if diff > tol:
            frac = ((a - b).abs() > tol).double().mean().item()
            worst.append((diff / tol, key, diff, frac))
    res.tensors, res.max_abs_diff = len(keys), max_diff
    worst.sort(reverse=True)
    for _, key, diff, frac in worst[:5]:
        res.details.append(f"{label}{key}: max |diff| {diff:.3e}, {frac:.1%} of entries off")
    if len(worst) > 5:
        res.details.append(f"{label}... {len(worst) - 5} more tensors differ")
    return len(worst)


def _implied_rescale(out: torch.Tensor, base: torch.Tensor, model: torch.Tensor,
                     weight: float, lam: float) -> tuple[float, float]:
    """Single-model DARE: (observed factor, L1-ratio factor) of one output tensor.

    out - base = lam * weight * factor * mask * delta, so the factor is the median ratio
    over the kept entries; the L1 rule is sum|delta| / sum|kept delta| for that mask.
    """
    delta = (model - base).double()
    moved = out.double() - base.double()
    kept = (moved != 0) & (delta != 0)
    if not kept.any():
        return float("nan"), float("nan")
    ratio = moved[kept] / (lam * weight * delta[kept])
    return ratio.median().item(), (delta.abs().sum() / delta[kept].abs().sum()).item()


def delta_stats(outs: dict[str, dict], base: dict, keys: list[str]) -> dict[str, dict[str, float]]:
    """Per tool: fraction of entries equal to base, and numel-weighted per-tensor stats.

    Deltas are compared per tensor (then averaged, weighted by size) because tensor
    scales differ by orders of magnitude: pooled moments would be dominated by the few
    norm vectors and their sampling noise.
    """
    names = list(outs)
    ref = names[0]
    total = sum(base[k].numel() for k in keys)
    out: dict[str, dict[str, float]] = {n: dict(same=0.0, mean=0.0, std=0.0) for n in names}
    log_std_ratio, mean_gap = {n: 0.0 for n in names}, {n: 0.0 for n in names}
    for key in keys:
        b = base[key].double()
        w = b.numel() / total
        ref_d = outs[ref][key].double() - b
        ref_std = ref_d.std().item() if ref_d.numel() > 1 else 0.0
        for n in names:
            d = outs[n][key].double() - b
            std = d.std().item() if d.numel() > 1 else 0.0
            out[n]["same"] += w * (d == 0).double().mean().item()
            out[n]["mean"] += w * d.mean().item()
            out[n]["std"] += w * std
            if ref_std > 0 and std > 0:
                log_std_ratio[n] += w * (torch.tensor(std / ref_std).log().item())
                mean_gap[n] += w * abs(d.mean().item() - ref_d.mean().item()) / ref_std
    for n in names:
        out[n]["std_ratio"] = float(torch.tensor(log_std_ratio[n]).exp())
        out[n]["mean_gap"] = mean_gap[n]
    return out


def compare_stats(mk: dict, ev: dict, base: dict, recipe: dict, res: Result) -> None:
    """DARE: the masks differ by RNG, so compare statistics of the task delta."""
    keys = [k for k in compare_keys(mk, ev, res) if k in base]
    res.tensors = len(keys)
    stats = delta_stats({"mergekit": mk, "evomerge": ev}, base, keys)
    diff_sq = sum(((ev[k].double() - mk[k].double()) ** 2).sum().item() for k in keys)
    ref_sq = sum(((mk[k].double() - base[k].double()) ** 2).sum().item() for k in keys)
    res.max_abs_diff = max((ev[k].double() - mk[k].double()).abs().max().item() for k in keys)
    for tool, st in stats.items():
        res.details.append(f"{tool}: equal to base {st['same']:.4f}, delta mean {st['mean']:.3e}, "
                           f"delta std {st['std']:.4e} (size-weighted means over tensors)")
    ev_st = stats["evomerge"]
    res.details.append(f"evomerge/mergekit delta std ratio {ev_st['std_ratio']:.4f}, mean gap "
                       f"{ev_st['mean_gap']:.4f} std; relative L2 |ev - mk| / |mk - base| = "
                       f"{(diff_sq / ref_sq) ** 0.5 if ref_sq else float('nan'):.3f} "
                       "(independent masks: O(1) expected)")
    problems = []
    if abs(stats["mergekit"]["same"] - ev_st["same"]) > 0.01:
        problems.append("fraction equal to base")
    if not 0.97 <= ev_st["std_ratio"] <= 1.03:
        problems.append("delta std")
    if ev_st["mean_gap"] > 0.05:
        problems.append("delta mean")
    problems += _compare_rescale(mk, ev, base, keys, recipe, res)
    res.ok = res.ok and not problems
    res.verdict = "statistics agree" if res.ok else f"STATS DIFFER ({', '.join(problems) or 'tensors'})"


def _compare_rescale(mk: dict, ev: dict, base: dict, keys: list[str], recipe: dict,
                     res: Result) -> list[str]:
    """With one non-base model, check that both tools follow the same rescale rule."""
    models = [m for m in recipe.get("models") or [] if m["model"] != recipe.get("base_model")]
    if len(models) != 1 or recipe["merge_method"] not in ("dare_linear", "della_linear"):
        return []
    params = models[0].get("parameters") or {}
    weight, lam = float(params["weight"]), float((recipe.get("parameters") or {}).get("lambda", 1.0))
    model = load_tensors(Path(models[0]["model"]))
    problems = _compare_rank_keep(mk, ev, base, model, keys, res) if recipe["merge_method"] == "della_linear" else []
    bad: list[str] = []
    for key in keys:
        obs_mk, l1_mk = _implied_rescale(mk[key], base[key], model[key], weight, lam)
        obs_ev, l1_ev = _implied_rescale(ev[key], base[key], model[key], weight, lam)
        if abs(obs_mk / l1_mk - 1) > 1e-4:
            res.details.append(f"{key}: mergekit factor {obs_mk:.5f} is not its L1 ratio {l1_mk:.5f}")
        if abs(obs_ev / l1_ev - 1) > 1e-4:
            bad.append(key)
            if len(bad) <= 5:
                res.details.append(
                    f"{key}: evomerge rescale {obs_ev:.5f} != L1 ratio sum|delta|/sum|kept delta| "
                    f"= {l1_ev:.5f} (1/density = {1 / float(params['density']):.5f})")
    res.details.append(f"rescale factor = L1 norm ratio (mergekit's rule) in evomerge: "
                       f"{len(keys) - len(bad)}/{len(keys)} tensors")
    return problems + (["rescale rule"] if bad else [])


def _compare_rank_keep(mk: dict, ev: dict, base: dict, model: dict, keys: list[str],
                       res: Result) -> list[str]:
    """Single-model DELLA: the keep rate of the largest and the smallest fifth of each row's
    |delta| (DARE would keep both at `density`; DELLA at about density +/- 0.8 epsilon)."""
    rates = {}
    for tool, out in (("mergekit", mk), ("evomerge", ev)):
        top = bottom = count = 0.0
        for key in keys:
            delta = (model[key] - base[key]).double()
            rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
            kept = (out[key].double() - base[key].double()).reshape(rows.shape) != 0
            ranks = rows.abs().argsort(dim=1).argsort(dim=1)
            fifth = rows.shape[1] // 5
            top += kept[ranks >= rows.shape[1] - fifth].sum().item()
            bottom += kept[ranks < fifth].sum().item()
            count += fifth * rows.shape[0]
        rates[tool] = (top / count, bottom / count)
        res.details.append(f"{tool}: keep rate of the largest fifth of |delta| per row {top / count:.4f}, "
                           f"of the smallest fifth {bottom / count:.4f}")
    gap = max(abs(a - b) for a, b in zip(rates["mergekit"], rates["evomerge"]))
    return ["keep rate by magnitude"] if gap > 0.01 else []


def compare_configs(mk_dir: Path, ev_dir: Path, res: Result) -> None:
    """config.json must agree (layer count, dtype, ...) apart from CONFIG_IGNORED keys."""
    try:
        a = json.loads((mk_dir / "config.json").read_text())
        b = json.loads((ev_dir / "config.json").read_text())
    except FileNotFoundError as exc:
        res.ok = False
        res.details.append(f"config.json missing: {exc.filename}")
        return
    keys = sorted((set(a) | set(b)) - CONFIG_IGNORED)
    diffs = [f"{k}: mergekit {a.get(k)!r}, evomerge {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
    if diffs:
        res.ok = False
        res.details.append("config.json differs: " + "; ".join(diffs))
        if res.verdict in ("match", "statistics agree"):
            res.verdict = "CONFIG MISMATCH"
    mk_files = {p.name for p in mk_dir.iterdir()} - {"README.md", "mergekit_config.yml"}
    only_mk = sorted(mk_files - {p.name for p in ev_dir.iterdir()})
    if only_mk:
        res.details.append(f"files only mergekit wrote: {only_mk}")


def compare_recipe(recipe_path: Path, paths: dict[str, Path], work: Path, args: argparse.Namespace,
                   base_tensors: dict[str, torch.Tensor], tools: Tools) -> Result:
    """Render, run both tools, compare; never raises for a tool failure (reported instead)."""
    name = recipe_path.stem
    rdir = work / "runs" / name
    rdir.mkdir(parents=True, exist_ok=True)
    recipe = render(recipe_path, paths, rdir / "recipe.yaml")
    method = recipe["merge_method"]
    mode = ("stats" if method in STATS_METHODS
            else "approx" if recipe.get("dtype") in LOW_PRECISION else "exact")
    res = Result(name, method, mode)
    mk_out, ev_out = rdir / "mergekit", rdir / "evomerge"
    jobs = [
        ("mergekit", mk_out, ["recipe.yaml", str(mk_out), "--random-seed", str(args.seed), "--quiet"]),
        ("evomerge", ev_out, ["merge", "recipe.yaml", str(ev_out), "--overwrite", "--seed", str(args.seed),
                              "--no-progress"]),
    ]
    if mode == "approx":
        # The reference evomerge should equal: mergekit computing in float32, then
        # casting to the recipe's dtype (what evomerge does by design).
        f32 = dict(recipe, dtype="float32", out_dtype=recipe.get("out_dtype") or recipe["dtype"])
        (rdir / "recipe_f32.yaml").write_text(yaml.safe_dump(f32, sort_keys=False))
        jobs.append(("mergekit_f32", rdir / "mergekit_f32",
                     ["recipe_f32.yaml", str(rdir / "mergekit_f32"), "--random-seed", str(args.seed),
                      "--quiet"]))
    failed = []
    for tool, out, tool_args in jobs:
        if out.exists() and tool.startswith("mergekit"):  # mergekit has no --overwrite
            shutil.rmtree(out)
        if not tools.run(tool.split("_")[0], tool_args, rdir / f"{tool}.log", cwd=rdir):
            tail = (rdir / f"{tool}.log").read_text().strip().splitlines()[-3:]
            res.details.append(f"{tool} failed ({rdir / f'{tool}.log'}): " + " | ".join(tail))
            failed.append(tool)
    if failed:
        res.ok, res.verdict = False, f"{failed[0].upper()} FAILED"
        if failed == ["mergekit"] and mode == "exact" and list(mk_out.glob("*.safetensors")):
            # mergekit writes the tensors before config.json: compare what it wrote.
            written = Result(name, method, mode)
            bad = compare_exact(load_tensors(mk_out), load_tensors(ev_out), written, args.rtol)
            res.verdict += (f" after writing its tensors ({written.tensors}; evomerge's "
                            f"{'differ' if bad or not written.ok else 'agree'}, max abs diff {written.max_abs_diff:.2e})")
        return res
    if name.startswith(TOKENIZER_PREFIX):
        seed = rerun_in_recipe_order(tools, jobs[0][2], mk_out, ev_out, rdir)
        if seed is not None:
            res.details.append(f"mergekit rerun with PYTHONHASHSEED={seed}: then its set of the models "
                               "iterates in recipe order")
    mk, ev = load_tensors(mk_out), load_tensors(ev_out)
    if name.startswith(TOKENIZER_PREFIX):
        mk = compare_vocabularies(mk_out, ev_out, mk, paths["base"], res)
    if mode == "stats":
        compare_stats(mk, ev, base_tensors, recipe, res)
    elif mode == "exact":
        bad = compare_exact(mk, ev, res, args.rtol)
        res.ok = res.ok and not bad
        res.verdict = "match" if res.ok else f"MISMATCH ({bad}/{res.tensors} tensors)"
    else:
        ref = Result(name, method, mode)
        bad_ref = compare_exact(load_tensors(rdir / "mergekit_f32"), ev, ref, args.rtol,
                                label="vs mergekit float32 compute: ")
        bad = compare_exact(mk, ev, res, args.rtol, label=f"vs mergekit {recipe['dtype']} compute: ")
        res.details += ref.details
        res.details.append(f"max |diff| vs mergekit float32 compute + cast: {ref.max_abs_diff:.2e}")
        res.ok = res.ok and ref.ok and not bad_ref
        res.verdict = (f"MISMATCH vs mergekit float32 compute ({bad_ref} tensors)" if not res.ok else
                       f"{bad}/{res.tensors} tensors differ: intended ({recipe['dtype']} vs float32 "
                       "compute); matches mergekit float32 + cast")
    compare_configs(mk_out, ev_out, res)
    return res


def rerun_in_recipe_order(tools: "Tools", mergekit_args: list[str], mk_out: Path, ev_out: Path, rdir: Path,
                          tries: int = 12) -> int | None:
    """mergekit builds a union vocabulary from the models in the order of a Python set of
    them (mergekit/config.py referenced_models), which changes with the hash seed; evomerge
    takes recipe order. Rerun mergekit with other PYTHONHASHSEEDs until its token ids are
    evomerge's, so that tensors can be compared bit for bit; the seed used, or None."""
    from transformers import AutoTokenizer

    wanted = AutoTokenizer.from_pretrained(ev_out).get_vocab()
    for seed in range(1, tries + 1):
        if AutoTokenizer.from_pretrained(mk_out).get_vocab() == wanted:
            return None if seed == 1 else seed - 1
        shutil.rmtree(mk_out)
        if not tools.run("mergekit", mergekit_args, rdir / "mergekit.log", cwd=rdir, hash_seed=seed):
            return None
    return None


def compare_vocabularies(mk_dir: Path, ev_dir: Path, mk: dict, base: Path, res: Result) -> dict:
    """The output tokenizers must hold the same tokens at the same ids, with the same added
    tokens (special or not). One difference is allowed and reported: mergekit builds a union
    from the models in a set's order (it varies with PYTHONHASHSEED), evomerge in recipe
    order, so tokens the base lacks may sit at other ids. mergekit's vocabulary-indexed
    tensors are returned with their rows in evomerge's order, to be compared row by row."""
    from transformers import AutoTokenizer

    tokenizers = {tool: AutoTokenizer.from_pretrained(folder) for tool, folder in (("mergekit", mk_dir), ("evomerge", ev_dir))}
    mk_vocab, ev_vocab = (t.get_vocab() for t in tokenizers.values())
    if set(mk_vocab) != set(ev_vocab):
        res.ok = False
        res.details.append(f"vocabularies differ: only mergekit {sorted(set(mk_vocab) - set(ev_vocab))[:5]}, "
                           f"only evomerge {sorted(set(ev_vocab) - set(mk_vocab))[:5]}")
        return mk
    added = {tool: {info.content: (info.special, info.normalized, info.lstrip, info.rstrip, info.single_word)
                    for info in t.added_tokens_decoder.values()} for tool, t in tokenizers.items()}
    if added["mergekit"] != added["evomerge"]:
        res.ok = False
        res.details.append(f"added tokens differ: mergekit {added['mergekit']}, evomerge {added['evomerge']}")
    moved = sorted((t for t in mk_vocab if mk_vocab[t] != ev_vocab[t]), key=ev_vocab.get)
    res.details.append(f"output vocabulary: {len(ev_vocab)} tokens, {len(added['evomerge'])} added tokens, "
                       f"the same in both; {len(moved)} at other ids")
    if not moved:
        return mk
    in_base = set(AutoTokenizer.from_pretrained(base).get_vocab())
    if any(token in in_base for token in moved):
        res.ok = False
    res.details.append(f"ids differ for {moved} (mergekit {[mk_vocab[t] for t in moved]}, evomerge "
                       f"{[ev_vocab[t] for t in moved]}): new tokens in mergekit's set order of the models; "
                       "vocabulary rows compared by token")
    order = torch.tensor([mk_vocab[token] for token in sorted(ev_vocab, key=ev_vocab.get)])
    size = len(order)
    return {key: torch.cat([t[order], t[size:]]) if t.dim() == 2 and t.shape[0] >= size else t
            for key, t in mk.items()}


def markdown_table(results: list[Result]) -> str:
    """The summary table (the same one docs/mergekit-compat.md carries)."""
    lines = ["| recipe | method | tensors compared | max abs diff | verdict |",
             "|---|---|---|---|---|"]
    for r in results:
        diff = "-" if r.max_abs_diff != r.max_abs_diff else f"{r.max_abs_diff:.2e}"
        lines.append(f"| {r.recipe} | {r.method} | {r.tensors} | {diff} | {r.verdict} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where models and outputs go (default: a temporary folder, removed)")
    parser.add_argument("--mergekit-bin", default=DEFAULT_MERGEKIT, help="the mergekit-yaml executable")
    parser.add_argument("--recipes", type=Path, default=RECIPES, help="folder of *.yaml recipes")
    parser.add_argument("--only", action="append", default=None,
                        help="run only recipes whose name matches this glob (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="model seed and both tools' merge seed")
    parser.add_argument("--family", default="llama",
                        help="architecture of the tiny models (merging.synthetic.TINY_CONFIGS: llama, mistral, "
                             "mistral-nemo, qwen2, gemma, gemma2 (tied embeddings), ...; "
                             f"{VLM_FAMILY}: a tiny VLM, for the modules-* recipes)")
    parser.add_argument("--source-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype the tiny models are stored in (the recipes say what the merge computes in)")
    parser.add_argument("--tied", action="store_true",
                        help="tie the models' embeddings and head (no lm_head tensor stored), as Gemma's are "
                             "(gemma2's are tied without it)")
    parser.add_argument("--rtol", type=float, default=1e-6,
                        help="allowed |diff| relative to the tensor's max |value| (float32 rounding)")
    parser.add_argument("--details", action="store_true", help="print details of agreeing recipes too")
    parser.add_argument("--fresh-processes", action="store_true",
                        help="start mergekit-yaml and evomerge anew for every merge (slower; by default one "
                             "worker process per tool runs the same entry points)")
    args = parser.parse_args(argv)

    if not Path(args.mergekit_bin).exists():
        print(f"mergekit-yaml not found at {args.mergekit_bin}; see docs/mergekit-compat.md", file=sys.stderr)
        return 2
    recipes = [r for r in sorted(args.recipes.glob("*.yaml"))
               if r.stem.startswith("modules-") == (args.family == VLM_FAMILY)]
    if args.only:
        recipes = [r for r in recipes if any(fnmatch.fnmatch(r.stem, g) for g in args.only)]
    with tempfile.TemporaryDirectory(prefix="evomerge-mkcompat-") as tmp:
        work = (args.work_dir or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        results = []
        tools = Tools(args.mergekit_bin, args.fresh_processes)
        try:
            for recipe in recipes:
                distinct = recipe.stem.startswith(TOKENIZER_PREFIX)
                paths = build_models(work, args.seed, args.family, args.source_dtype, args.tied,
                                     distinct_vocab=distinct)
                print(f"... {recipe.stem}", file=sys.stderr, flush=True)
                results.append(compare_recipe(recipe, paths, work, args, load_tensors(paths["base"]), tools))
        finally:
            tools.close()
    print(markdown_table(results))
    for r in results:
        if r.details and (args.details or not r.ok or r.mode != "exact"):
            print(f"\n{r.recipe} ({r.method}, {r.mode}):")
            print("\n".join(f"  - {d}" for d in r.details))
    if any(" FAILED" in r.verdict for r in results):
        return 2
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

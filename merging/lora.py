"""`model+lora` sources: a PEFT LoRA adapter folded into its base before merging, as
mergekit does (`ModelReference.merged`: the base loaded with transformers, the adapter
with `peft.PeftModel.from_pretrained`, `merge_and_unload`, saved to a cache folder that
is then an ordinary source).

We fold without peft or a model class, tensor by tensor from the safetensors files, into
a cache folder (`$EVOMERGE_CACHE/lora/`, else ~/.cache/evomerge/lora/), written once and
reused; everything downstream (planning, workers, keys) sees a plain checkpoint. What
peft's merge computes, and so what we compute (checked against peft in tests):

* a LoRA layer: `W + (B @ A) * scaling`, `scaling = lora_alpha / r` (`/ sqrt(r)` with
  `use_rslora`), `B @ A` transposed for `fan_in_fan_out` layers; A and B in float32
  (peft loads 16-bit adapters in float32 by default), the sum in float32, then cast to
  W's dtype;
* an embedding LoRA (`lora_embedding_A` [r, vocab], `lora_embedding_B` [dim, r]):
  `W + (B @ A)^T * scaling`, the update rounded to W's dtype before the sum (peft 0.21's
  `Embedding.merge`);
* any other tensor of the adapter (`modules_to_save`, trained biases) replaces the base's.

Refused, naming the adapter: other PEFT types (IA3, LoHa, ...), DoRA, per-module
`rank_pattern` / `alpha_pattern`, LoRA biases, and an adapter whose modules or shapes
are not the base's (an adapter for another model).
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from merging.checkpoint import (
    CACHE_HOME, Checkpoint, ShardedWriter, TensorSpec, atomic_output_dir, copy_tokenizer, parse_size,
)
from merging.errors import CheckpointError

LORA_CACHE = CACHE_HOME / "lora"
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]
_PREFIX = "base_model.model."


def split_reference(reference: str) -> tuple[str, str] | None:
    """`base+adapter` -> (base, adapter); None for a plain reference (mergekit's rule: one
    `+` at most)."""
    if "+" not in reference:
        return None
    parts = reference.split("+")
    if len(parts) != 2 or not all(parts):
        raise CheckpointError(f"model {reference!r}: a LoRA source is written BASE+ADAPTER, with one '+'")
    return parts[0], parts[1]


class LoraAdapter:
    """A PEFT LoRA adapter folder: its settings and its tensors by base tensor name."""

    def __init__(self, reference: str, path: Path):
        self.reference, self.path = reference, path
        config_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
        if not config_file.is_file() or not weights.is_file():
            raise CheckpointError(f"LoRA adapter {reference!r}: {path} has no adapter_config.json and "
                                  "adapter_model.safetensors (a PEFT adapter saved with safetensors)")
        config = json.loads(config_file.read_text())
        refused = [why for why, bad in [
            (f"peft_type {config.get('peft_type')} (only LORA folds)", config.get("peft_type", "LORA") != "LORA"),
            ("DoRA (use_dora)", config.get("use_dora")),
            ("per-module rank_pattern / alpha_pattern", config.get("rank_pattern") or config.get("alpha_pattern")),
            *((key, config.get(key)) for key in ("layer_replication", "trainable_token_indices", "target_parameters",
                                                 "alora_invocation_tokens", "use_qalora")),
        ] if bad]
        if refused:
            raise CheckpointError(f"LoRA adapter {reference!r}: {', '.join(refused)} is not supported")
        rank = config["r"]
        self.scaling = config["lora_alpha"] / (math.sqrt(rank) if config.get("use_rslora") else rank)
        self.fan_in_fan_out = bool(config.get("fan_in_fan_out"))
        with safe_open(str(weights), framework="pt") as handle:
            self.tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        if any(name.endswith("lora_B.bias") for name in self.tensors):
            raise CheckpointError(f"LoRA adapter {reference!r}: LoRA biases (lora_bias) are not supported")

    def edits(self) -> dict[str, dict]:
        """Base tensor name -> its edits: "replace" (a tensor the adapter saved whole: a
        `modules_to_save` copy, a trained bias, the `base_layer` of an embedding it saved),
        applied first, then "update" ((kind, A, B): "lora" or "embedding")."""
        edits: dict[str, dict] = {}
        for name, tensor in self.tensors.items():
            module = name.removeprefix(_PREFIX)
            for kind, a_suffix, b_suffix in (("lora", ".lora_A.weight", ".lora_B.weight"),
                                             ("embedding", ".lora_embedding_A", ".lora_embedding_B")):
                if module.endswith(a_suffix):
                    target = module.removesuffix(a_suffix) + ".weight"
                    b = self.tensors[name.removesuffix(a_suffix) + b_suffix]
                    edits.setdefault(target, {})["update"] = (kind, tensor, b)
                    break
                if module.endswith(b_suffix):
                    break
            else:
                edits.setdefault(module.replace(".base_layer.", "."), {})["replace"] = tensor
        return edits


def delta(kind: str, a: torch.Tensor, b: torch.Tensor, scaling: float, fan_in_fan_out: bool) -> torch.Tensor:
    """What peft adds to the base weight (module docstring), in float32."""
    product = b.float() @ a.float()
    if kind == "embedding" or fan_in_fan_out:
        product = product.T
    return product * scaling


def fold(base: Checkpoint, adapter: LoraAdapter, out_dir: Path) -> None:
    """Write `base` with `adapter` folded in to `out_dir` (atomically), config and tokenizer
    files included."""
    edits = adapter.edits()
    unknown = sorted(set(edits) - set(base.tensors))
    if unknown:
        raise CheckpointError(f"LoRA adapter {adapter.reference!r} edits {unknown[0]}, which model "
                              f"{base.reference!r} does not have: the adapter was trained on another model")
    specs = [TensorSpec(name, info.shape, info.dtype) for name, info in base.tensors.items()]
    with atomic_output_dir(out_dir, overwrite=True) as staging:
        writer = ShardedWriter(staging, specs, parse_size("5GB"))
        for spec in specs:
            tensor = base.read(spec.name)
            if spec.name in edits:
                tensor = _edited(tensor, edits[spec.name], adapter, base, spec.name)
            writer.write(spec.name, tensor)
        writer.close()
        for name in ("config.json", "generation_config.json"):
            if (base.path / name).is_file():
                shutil.copy2(base.path / name, staging / name)
        copy_tokenizer(base.path, staging)


def _edited(weight: torch.Tensor, edits: dict, adapter: LoraAdapter, base: Checkpoint, name: str) -> torch.Tensor:
    """`weight` with the adapter's edits: its saved copy first, then the LoRA update."""
    def check(shape: tuple, what: str) -> None:
        if tuple(shape) != tuple(weight.shape):
            raise CheckpointError(f"LoRA adapter {adapter.reference!r}: {what} {name} is {tuple(shape)}, model "
                                  f"{base.reference!r}'s is {tuple(weight.shape)}: the adapter was trained on "
                                  "another model")

    if "replace" in edits:
        check(edits["replace"].shape, "its")
        weight = edits["replace"].to(weight.dtype)
    if "update" in edits:
        kind, a, b = edits["update"]
        change = delta(kind, a, b, adapter.scaling, adapter.fan_in_fan_out)
        check(change.shape, "its update of")
        if kind == "embedding":  # peft rounds an embedding's update to the weight's dtype before adding it
            change = change.to(weight.dtype)
        weight = (weight.float() + change.float()).to(weight.dtype)
    return weight


def adapter_path(reference: str) -> Path:
    """An adapter reference -> its local folder (a folder, or a Hub id fetched into the HF
    cache: only the adapter's two files)."""
    local = Path(reference).expanduser()
    if local.is_dir():
        return local
    repo_id, _, revision = reference.partition("@")
    if repo_id.count("/") != 1:
        raise CheckpointError(f"LoRA adapter {reference!r}: no such folder, and not a Hub id of the form org/name")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=ADAPTER_FILES))
    except Exception as exc:  # network, auth, missing repo: all mean "cannot use this id"
        raise CheckpointError(f"LoRA adapter {reference!r}: not a local folder, and fetching it from the Hugging "
                              f"Face Hub failed ({type(exc).__name__}: {exc})") from exc


def folded_path(reference: str, base_path: Path, adapter_path: Path) -> Path:
    """The cache folder of `base+adapter` folded, made on first use: named by the two
    folders' identity (resolved paths, files' sizes and modification times), so an edited
    adapter or base is folded again."""
    identity = hashlib.sha256()
    for folder in (base_path.resolve(), adapter_path.resolve()):
        identity.update(str(folder).encode())
        for file in sorted(folder.iterdir()):
            if file.is_file():
                stat = file.stat()
                identity.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    out_dir = LORA_CACHE / f"{base_path.name}+{adapter_path.name}-{identity.hexdigest()[:16]}"
    if not (out_dir / "config.json").is_file():
        base, adapter = reference.split("+")
        checkpoint = Checkpoint(base, base_path)
        try:
            fold(checkpoint, LoraAdapter(adapter, adapter_path), out_dir)
        finally:
            checkpoint.close()
    return out_dir

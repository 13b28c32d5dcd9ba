"""Which tensor belongs to which layer, derived from the model's own config.

mergekit keeps a hand-written JSON per architecture and silently drops tensors its
definition misses. Here the model class that transformers itself ships for the config
is built on the meta device (no memory, no weights); its `nn.ModuleList` of
`num_hidden_layers` blocks gives the layer prefix (`model.layers`, `transformer.h`,
`gpt_neox.layers`, ...) and its parameter order tells which non-layer tensors come
before the layers (embeddings) and which after (final norm, head). Every tensor of a
checkpoint is kept and classified; none is dropped.

A multi-module model (a VLM: text decoder, vision tower, projector) is a few such
structures side by side, each under its own tensor-name prefix and with its own
sub-config (`text_config`, `vision_config`); `model_modules` lists them under the names
mergekit's recipes use for them (`modules:`).
"""
from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import version
from typing import Literal

import torch

from merging.checkpoint import CACHE_HOME, write_atomic
from merging.errors import CheckpointError

Position = Literal["pre", "layer", "post"]

_FALLBACK_PREFIXES = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers",
                      "encoder.layer", "transformer.layers", "layers", "h", "blocks")


@dataclass(frozen=True)
class Architecture:
    """Layer structure of one model family with one depth."""

    model_type: str
    num_layers: int
    layer_prefixes: tuple[str, ...]
    """Layer-list paths as checkpoint names may spell them, longest first
    (`model.layers`, `layers`): checkpoints sometimes omit the base-model prefix."""
    pre_names: frozenset[str]
    """Suffixes of the non-layer parameters that come before the layers in the model."""

    def _match(self, name: str) -> re.Match | None:
        for prefix in self.layer_prefixes:
            match = re.match(rf"^(?P<head>(?:.*\.)?{re.escape(prefix)}\.)(?P<index>\d+)\.", name)
            if match:
                return match
        return None

    def layer_of(self, name: str) -> int | None:
        """The block index of a tensor, or None for embeddings, final norm, head."""
        match = self._match(name)
        return int(match["index"]) if match else None

    def rename_layer(self, name: str, index: int) -> str:
        """`model.layers.7.mlp.up_proj.weight` with index 2 -> `model.layers.2.mlp...`."""
        match = self._match(name)
        if match is None:
            raise ValueError(f"{name} is not a layer tensor")
        return f"{match['head']}{index}.{name[match.end():]}"

    def position(self, name: str) -> Position:
        if not self.layer_prefixes:  # a module without layers (a projector): mergekit's pre-weights
            return "pre"
        if self.layer_of(name) is not None:
            return "layer"
        return "pre" if any(name == p or name.endswith("." + p) or p.endswith("." + name)
                            for p in self.pre_names) else "post"


def num_layers_key(config: dict) -> str:
    """The config.json key that holds the depth (`num_hidden_layers`, GPT-2's `n_layer`, ...)."""
    key = num_layers_key_or_none(config)
    if key is None:
        raise CheckpointError(f"config of model_type {config.get('model_type')!r} states no number of layers")
    return key


def num_layers_key_or_none(config: dict) -> str | None:
    """`num_layers_key`, or None where the config states no depth (a multi-module model's).
    `num_hidden_layers` itself is the key wherever a config.json states it (a config
    class's attribute map only renames it), which spares importing transformers' configs."""
    if "num_hidden_layers" in config:
        return "num_hidden_layers"
    from transformers import AutoConfig

    try:
        config_class = type(AutoConfig.for_model(config["model_type"]))
        key = getattr(config_class, "attribute_map", {}).get("num_hidden_layers", "num_hidden_layers")
    except (KeyError, ValueError):
        key = "num_hidden_layers"
    if key not in config:
        for candidate in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
            if candidate in config:
                return candidate
        return None
    return key


ARCHITECTURE_CACHE = CACHE_HOME / "architectures"
"""Architectures found before, one JSON file per config and transformers version: building
the meta model imports transformers' modeling code, seconds of every merge's start."""


def detect_architecture(config: dict) -> Architecture:
    """Architecture from a config.json dict (cached per config, in memory and on disk)."""
    if "model_type" not in config:
        raise CheckpointError("config.json has no model_type")
    depth = int(config[num_layers_key(config)])
    config_json = _config_key(config)
    digest = hashlib.sha256(f"{version('transformers')}\n{config_json}".encode()).hexdigest()[:32]
    cached = ARCHITECTURE_CACHE / f"{digest}.json"
    try:
        known = json.loads(cached.read_text())
        return Architecture(known["model_type"], known["num_layers"], tuple(known["layer_prefixes"]),
                            frozenset(known["pre_names"]))
    except (OSError, ValueError, KeyError):
        pass
    architecture = _detect(config["model_type"], depth, config_json)
    if architecture.layer_prefixes != _FALLBACK_PREFIXES:  # a guess is not worth keeping
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cached, json.dumps({"model_type": architecture.model_type, "num_layers": architecture.num_layers,
                                         "layer_prefixes": list(architecture.layer_prefixes),
                                         "pre_names": sorted(architecture.pre_names)}))
    return architecture


def _config_key(config: dict) -> str:
    return json.dumps(config, sort_keys=True, default=str)


@lru_cache(maxsize=32)
def _detect(model_type: str, depth: int, config_json: str) -> Architecture:
    from transformers import AutoConfig

    config_dict = json.loads(config_json)
    try:
        hf_config = AutoConfig.for_model(**config_dict)
        model = _meta_model(hf_config)
    except Exception as exc:  # an unknown or custom model_type: fall back to name patterns
        warnings.warn(f"transformers cannot build model_type {model_type!r} ({exc}); "
                      "guessing layer names from common patterns")
        return Architecture(model_type, depth, _FALLBACK_PREFIXES, frozenset({"embed_tokens.weight", "wte.weight"}))

    layer_path = None
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == depth and module_name:
            layer_path = module_name
            break
    if layer_path is None:
        raise CheckpointError(f"model_type {model_type!r}: found no list of {depth} layers in the model")
    parts = layer_path.split(".")
    prefixes = tuple(".".join(parts[i:]) for i in range(len(parts)))
    pre: set[str] = set()
    for name, _ in model.named_parameters():
        if name.startswith(layer_path + "."):
            break
        pre.add(name)
    return Architecture(model_type, depth, prefixes, frozenset(pre))


def _meta_model(hf_config) -> torch.nn.Module:
    """The transformers model for `hf_config`, built without allocating weights."""
    from transformers import AutoModel, AutoModelForCausalLM

    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(hf_config)
        except ValueError:
            return AutoModel.from_config(hf_config)


@dataclass(frozen=True)
class Module:
    """One part of a model that a recipe's `modules:` merges on its own."""

    name: str
    prefix: str
    """The start of its tensors' names (`language_model.`); "" for the whole model."""
    config_key: str | None
    """Where its own config is in config.json (`text_config`); None: the model's config."""
    arch: Architecture
    """Its layers (none for a projector)."""

    def owns(self, tensor_name: str) -> bool:
        return tensor_name.startswith(self.prefix)

    def depth_config(self, config: dict) -> dict | None:
        """The (sub-)config dict that states this module's depth; None without layers."""
        if not self.arch.layer_prefixes:
            return None
        return config[self.config_key] if self.config_key else config


MODULES: dict[str, dict[str, tuple[str, str | None]]] = {
    "mistral3": {"text_decoder": ("language_model.", "text_config"),
                 "vision_tower": ("vision_tower.", "vision_config"),
                 "multi_modal_projector": ("multi_modal_projector.", None)},
}
"""Multi-module model types: module name -> (tensor-name prefix, sub-config key, None for a
module without layers). The names are mergekit 0.1.5's (its architecture definitions),
so its recipes' `modules:` run unchanged; each module's layers are still derived from
transformers, from its sub-config. Every other model is one module, `default` (mergekit's
name for it)."""
DEFAULT_MODULE = "default"


def model_modules(config: dict) -> dict[str, Module]:
    """The modules of a model, from its config.json dict, in mergekit's order."""
    table = MODULES.get(config.get("model_type"))
    parts = [key for key, value in config.items() if isinstance(value, dict) and "model_type" in value]
    if table is None and parts and num_layers_key_or_none(config) is None:
        raise CheckpointError(f"model_type {config.get('model_type')!r} is made of several models ({', '.join(parts)}) "
                              f"whose modules evomerge does not know; multi-module types it merges: "
                              f"{', '.join(MODULES)}")
    if table is None:
        return {DEFAULT_MODULE: Module(DEFAULT_MODULE, "", None, detect_architecture(config))}
    modules = {}
    for name, (prefix, config_key) in table.items():
        if config_key is None:
            arch = Architecture(config["model_type"], 0, (), frozenset())
        elif not isinstance(config.get(config_key), dict):
            raise CheckpointError(f"config of model_type {config['model_type']!r} has no {config_key!r} "
                                  f"(the config of its module {name!r})")
        else:
            arch = detect_architecture(config[config_key])
        modules[name] = Module(name, prefix, config_key, arch)
    return modules

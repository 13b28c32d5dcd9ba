"""Small real checkpoints built offline: a base model and "fine-tuned" variants of it.

No Hub access exists in CI, yet the merge engine must be exercised on real Hugging Face
folders (config, sharded safetensors, tokenizer) that `transformers` loads. This module
builds them from a seed: a randomly initialised base of any family transformers ships,
plus variants that differ from it by low-rank and sparse deltas, the shape of change
fine-tuning makes. They carry no skill (the trained zoo does that); they exist so that
merges, shapes, dtypes and file layouts are real.

    python -m merging.synthetic OUT_DIR [--family llama|...|mistral3] [--variants 2] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    "gemma": dict(model_type="gemma", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128),
    # Gemma-2: pre/post feed-forward norms around the MLP, logit soft-capping, alternating
    # sliding-window layers, and tied embeddings as its released checkpoints have.
    "gemma2": dict(model_type="gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                   sliding_window=32, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                   max_position_embeddings=128, tie_word_embeddings=True),
    # Mistral-Nemo: a Mistral whose head_dim (128 there) is not hidden_size / heads (160),
    # so q/k/v/o projections are not square.
    "mistral-nemo": dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=None,
                         max_position_embeddings=128),
    "phi": dict(model_type="phi", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, max_position_embeddings=128),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=4, n_head=4, n_positions=128),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                     num_attention_heads=4, max_position_embeddings=128),
}
"""A tiny configuration per family; each loads with AutoModelForCausalLM. Untied embeddings
unless the entry says otherwise (`tie_word_embeddings` overrides either way)."""

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Model merging combines the weights of fine-tuned models into one.",
    "Twelve apples and seven pears make nineteen pieces of fruit.",
    "Evolution proposes, selection disposes: the fittest recipe survives.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
]


def build_tokenizer(vocab_size: int = 384):
    """A real byte-level BPE tokenizer trained on a few sentences, in HF format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        unk_token="<|endoftext|>", pad_token="<|pad|>",
    )


def make_config(family: str, vocab_size: int, **overrides: Any):
    """A transformers config object for a tiny model of `family` (overrides win, even vocab_size)."""
    from transformers import AutoConfig

    if family not in TINY_CONFIGS:
        raise ValueError(f"unknown family {family!r}; known: {sorted(TINY_CONFIGS)}")
    kwargs = {**TINY_CONFIGS[family], "vocab_size": vocab_size, **overrides}
    model_type = kwargs.pop("model_type")
    kwargs.setdefault("tie_word_embeddings", False)
    return AutoConfig.for_model(model_type, **kwargs)


@torch.no_grad()
def perturb_(model: torch.nn.Module, generator: torch.Generator, scale: float, rank: int = 2) -> None:
    """Add a fine-tuning-shaped delta in place: low rank on matrices, sparse on vectors."""
    for param in model.parameters():
        if param.ndim == 2:
            rows, cols = param.shape
            a = torch.randn(rows, rank, generator=generator)
            b = torch.randn(rank, cols, generator=generator)
            delta = (a @ b) / rank ** 0.5 + 0.3 * torch.randn(rows, cols, generator=generator)
        else:
            delta = torch.randn(param.shape, generator=generator)
            delta *= torch.rand(param.shape, generator=generator) < 0.5
        param.add_(scale * param.abs().mean().clamp_min(1e-3) * delta.to(param.dtype))


def build_family(
    out_dir: str | Path,
    *,
    family: str = "llama",
    variants: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    delta_scale: float = 0.5,
    max_shard_size: str | int = "5GB",
    **config_overrides: Any,
) -> dict[str, Path]:
    """Write `base` and `variant_1..variant_N` model folders under `out_dir`.

    Returns {name: folder}. Variants share the base's tokenizer and config and differ
    from it by `perturb_` deltas drawn from `seed`, so every merge method has real,
    partly conflicting task vectors to combine.
    """
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer()
    config_overrides.setdefault("vocab_size", len(tokenizer))
    config = make_config(family, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    return _write_variants(Path(out_dir), model, tokenizer, variants=variants, seed=seed, delta_scale=delta_scale,
                           max_shard_size=max_shard_size, family=family, dtype=str(dtype))


VLM_FAMILY = "mistral3"
VLM_IMAGE_TOKEN = "[IMG]"


def build_vlm_family(
    out_dir: str | Path,
    *,
    variants: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tied: bool = False,
    delta_scale: float = 0.5,
) -> dict[str, Path]:
    """`base` and `variant_1..N` of a tiny vision-language model, as `build_family` does.

    The class is Mistral3ForConditionalGeneration (a LLaVA-style model: the tiny Mistral
    of TINY_CONFIGS as text decoder, a 2-layer Pixtral vision tower, a projector), the
    VLM that both transformers and mergekit 0.1.5 know by module (`text_decoder`,
    `vision_tower`, `multi_modal_projector`), so `modules:` recipes compare against
    mergekit. Its text decoder has the tiny Mistral's shapes, so `build_family(family=
    "mistral")` gives a language model of the same shape as its text tower."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [VLM_IMAGE_TOKEN]})
    text = {**TINY_CONFIGS["mistral"], "vocab_size": len(tokenizer), "tie_word_embeddings": tied}
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, head_dim=16, image_size=32, patch_size=8)
    config = Mistral3Config(text_config=text, vision_config=vision, spatial_merge_size=2,
                            image_token_index=tokenizer.convert_tokens_to_ids(VLM_IMAGE_TOKEN),
                            tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(config).to(dtype)
    return _write_variants(Path(out_dir), model, tokenizer, variants=variants, seed=seed, delta_scale=delta_scale,
                           family="mistral3", dtype=str(dtype), tied=tied)


def _write_variants(out_dir: Path, model: torch.nn.Module, tokenizer, *, variants: int, seed: int,
                    delta_scale: float, max_shard_size: str | int = "5GB", **description: Any) -> dict[str, Path]:
    """Save `model` as `base`, then `variant_1..N`: the base plus `perturb_` deltas drawn
    from `seed`; `description` goes to family.json."""
    from transformers import GenerationConfig

    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(seed + 1)
    paths: dict[str, Path] = {}
    for index in range(variants + 1):
        name = "base" if index == 0 else f"variant_{index}"
        if index > 0:
            model.load_state_dict(base_state)
            perturb_(model, generator, delta_scale)
        path = out_dir / name
        model.save_pretrained(path, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(path)
        GenerationConfig(max_new_tokens=16, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id).save_pretrained(path)
        paths[name] = path
    (out_dir / "family.json").write_text(json.dumps(
        {**description, "variants": variants, "seed": seed}, indent=2))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m merging.synthetic",
        description="Build a tiny random base model and fine-tune-like variants (offline, seeded).",
    )
    parser.add_argument("out_dir", help="folder to create: OUT_DIR/base, OUT_DIR/variant_1, ...")
    parser.add_argument("--family", default="llama", choices=[*sorted(TINY_CONFIGS), VLM_FAMILY],
                        help=f"{VLM_FAMILY}: a tiny VLM (build_vlm_family), for `modules:` recipes")
    parser.add_argument("--variants", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers")
    parser.add_argument("--hidden-size", type=int, default=None, help="override the width")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.layers is not None:
        overrides["num_hidden_layers"] = args.layers
    if args.hidden_size is not None:
        overrides["hidden_size"] = args.hidden_size
    if args.family == VLM_FAMILY and overrides:
        parser.error(f"--layers and --hidden-size do not apply to {VLM_FAMILY}")
    paths = (build_vlm_family(args.out_dir, variants=args.variants, seed=args.seed) if args.family == VLM_FAMILY
             else build_family(args.out_dir, family=args.family, variants=args.variants, seed=args.seed, **overrides))
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()

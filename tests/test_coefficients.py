"""Coefficient members (LLM M2N2): SLERP with a split point computed on coefficients and
Gram matrices equals SLERP on the real flattened parameters (float64 reference), and the
member's recipe merges into exactly those parameters. On float32 untied sources and on
bfloat16 sources with tied embeddings (the head is the embedding matrix, stored once: the
Gram must count it once, and the member must still set it)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from merging.checkpoint import Checkpoint
from merging.engine import iter_merged, plan_merge
from niches.coefficients import SourceGram, member_recipe, slerp_split_members


@pytest.fixture(scope="module")
def tied_bf16_family(tmp_path_factory):
    from merging.synthetic import build_family

    return build_family(tmp_path_factory.mktemp("tied"), family="llama", variants=3, seed=2, dtype=torch.bfloat16,
                        tie_word_embeddings=True)


@pytest.fixture(scope="module", params=["float32", "bfloat16-tied"])
def sources(request, llama_family):
    family = llama_family if request.param == "float32" else request.getfixturevalue("tied_bf16_family")
    checkpoints = [Checkpoint(str(family[name]), family[name]) for name in ("variant_1", "variant_2", "variant_3")]
    yield checkpoints
    for checkpoint in checkpoints:
        checkpoint.close()


@pytest.fixture(scope="module")
def gram(sources) -> SourceGram:
    return SourceGram.compute(sources)


def flat(member: np.ndarray, gram: SourceGram, sources) -> torch.Tensor:
    """The member's parameters, materialised in float64, in the Gram's tensor order."""
    parts = []
    for k, name in enumerate(gram.tensors):
        stacked = torch.stack([c.read(name).to(torch.float64).flatten() for c in sources])
        parts.append(torch.from_numpy(member[k]) @ stacked)
    return torch.cat(parts)


def reference_slerp_split(a: torch.Tensor, b: torch.Tensor, w: float, split: int) -> torch.Tensor:
    """M2N2's definition on flat vectors: SLERP(w) before the split, SLERP(1 - w) after,
    the angle from the whole vectors."""
    omega = torch.arccos(torch.dot(a, b) / (a.norm() * b.norm()))

    def slerp(t: float) -> torch.Tensor:
        return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)

    return torch.cat([slerp(w)[:split], slerp(1 - w)[split:]])


def test_tensor_order_is_model_order(gram):
    assert gram.groups[0] == "embed" and gram.groups[-1] == "head"
    assert [g for g in gram.groups if g.startswith("L")] == sorted(
        [g for g in gram.groups if g.startswith("L")], key=lambda g: int(g[1:]))


def test_gram_gives_the_inner_products_of_members(gram, sources):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, len(gram.tensors), 3))
    assert gram.dot(a, b) == pytest.approx(torch.dot(flat(a, gram, sources), flat(b, gram, sources)).item(),
                                           rel=1e-10)


@pytest.mark.parametrize("w, boundary", [(0.3, 5), (0.8, 0), (0.5, -1)])
def test_slerp_split_on_coefficients_equals_slerp_on_parameters(gram, sources, w, boundary):
    a = 0.7 * gram.one_hot(0) + 0.3 * gram.one_hot(1)
    b = gram.one_hot(2)
    split = int(gram.boundaries()[boundary])
    child = slerp_split_members(a, b, w, split, gram)
    expected = reference_slerp_split(flat(a, gram, sources), flat(b, gram, sources), w, split)
    assert torch.allclose(flat(child, gram, sources), expected, rtol=1e-9, atol=1e-12)


def test_split_must_be_a_tensor_boundary(gram):
    with pytest.raises(ValueError, match="not a tensor boundary"):
        slerp_split_members(gram.one_hot(0), gram.one_hot(1), 0.5, int(gram.sizes[0]) + 1, gram)


def test_layer_boundaries_are_a_subset_of_tensor_boundaries(gram):
    layers, tensors = gram.boundaries("layer"), gram.boundaries("tensor")
    assert set(layers) <= set(tensors) and layers[0] == 0 and layers[-1] == tensors[-1]
    assert len(layers) == 1 + len(dict.fromkeys(gram.groups))


def test_identical_members_interpolate_linearly(gram):
    """Angle 0: SLERP falls back to linear interpolation (the reference's rule)."""
    a = gram.one_hot(0)
    child = slerp_split_members(a, 2 * a, 0.25, int(gram.boundaries()[-1]), gram)
    assert np.allclose(child, 1.25 * a)


def test_member_recipe_merges_into_the_member(gram, sources):
    member = np.random.default_rng(1).uniform(-0.5, 1.5, size=(len(gram.tensors), 3))
    recipe = member_recipe(member, gram)
    plan = plan_merge(recipe, {c.reference: c for c in sources})
    merged = dict(iter_merged(plan))
    for k, name in enumerate(gram.tensors):
        stacked = torch.stack([c.read(name).to(torch.float64) for c in sources])
        expected = torch.einsum("s,s...->...", torch.from_numpy(member[k]), stacked)
        # computed in float32, written in the sources' dtype: one bfloat16 step (2^-8 relative) is its rounding
        rtol = 2 ** -8 if merged[name].dtype == torch.bfloat16 else 1e-5
        assert torch.allclose(merged[name].to(torch.float64), expected, rtol=rtol, atol=1e-6), name


def test_tied_embeddings_are_one_tensor_of_the_member(tied_bf16_family, tmp_path):
    """With tied embeddings the checkpoint stores the matrix once: the Gram has no separate
    head tensor, and the merged member loads with its head equal to its embeddings."""
    from transformers import AutoModelForCausalLM

    from merging.engine import merge_to_disk

    checkpoints = [Checkpoint(str(tied_bf16_family[n]), tied_bf16_family[n]) for n in ("variant_1", "variant_2")]
    gram = SourceGram.compute(checkpoints)
    assert "lm_head.weight" not in gram.tensors and gram.groups[0] == "embed"
    member = 0.25 * gram.one_hot(0) + 0.75 * gram.one_hot(1)
    plan = plan_merge(member_recipe(member, gram, "bfloat16"), {c.reference: c for c in checkpoints})
    merge_to_disk(plan, tmp_path / "member")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "member")
    embed = torch.lerp(*(c.read("model.embed_tokens.weight").float() for c in checkpoints), 0.75)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert torch.allclose(model.model.embed_tokens.weight.float(), embed, atol=1e-2)

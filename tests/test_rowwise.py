"""Merging a large tensor by row ranges gives the whole-tensor merge's bits.

The row ranges here are a few rows, so every tensor spans many of them; the sources are
quantised so that many magnitudes tie at the TIES threshold (the unstable-sort path) and
include negative zeros' cases (masked negative deltas). Compared bit for bit, float32 and
bfloat16 sources, against the operator applied to the whole tensor and, through the
engine, against a merge of the same recipe with merging by rows switched off.
"""
from __future__ import annotations

import pytest
import torch

import merging.rowwise as rowwise
from merging.engine import iter_merged, open_models, plan_merge
from merging.operators import METHODS, REQUIRED
from merging.operators.sparsify import top_k_mask
from merging.recipe import parse_recipe

ROWWISE = sorted(name for name, method in METHODS.items() if method.rowwise)


def test_rowwise_methods_are_the_elementwise_ones():
    assert set(ROWWISE) == {"linear", "passthrough", "nearswap", "task_arithmetic", "ties", "dare_ties",
                            "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"}


def quantised(shape, seed: int, dtype: torch.dtype, spread: bool = False) -> torch.Tensor:
    """Values on a coarse grid: many entries (and many |deltas|) are equal; `spread`:
    normal values instead, whose TIES trim is a threshold with no tie at it."""
    g = torch.Generator().manual_seed(seed)
    if spread:
        return torch.randn(shape, generator=g).to(dtype)
    return (torch.randint(-6, 7, shape, generator=g).to(torch.float32) * 0.125).to(dtype)


def parameters(name: str, models: int) -> dict:
    method = METHODS[name]
    per_model = {"weight": [0.7, -0.4, 1.1][:models], "density": [0.45, 0.6, 0.3][:models],
                 "gamma": [0.05, 0.1, 0.02][:models], "epsilon": [0.1, 0.2, 0.05][:models],
                 "scale": [1.5][:models]}
    params = {k: per_model[k] if v is REQUIRED or k in per_model else v for k, v in method.model_params.items()}
    params |= {k: (0.3 if k == "t" else v) for k, v in method.global_params.items()}
    if "rescale" in params:
        params["rescale"] = True
    return params


@pytest.mark.parametrize("spread", [False, True], ids=["ties", "spread"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ROWWISE)
def test_merge_by_rows_is_bit_identical_to_whole(name, dtype, spread, monkeypatch):
    monkeypatch.setattr(rowwise, "ROW_RANGE_BYTES", 4 * 48 * 5)  # five rows a range
    method = METHODS[name]
    models = method.max_models or 2
    shape = (63, 48)
    base = quantised(shape, 0, dtype, spread) if method.takes_base else None
    inputs = [quantised(shape, 1 + i, dtype, spread) for i in range(models)]
    params = parameters(name, models)
    if name == "ties":  # the tie at the threshold is real (or absent): the trim sorts (or not)
        values = (inputs[0].float() - base.float()).abs().reshape(-1)
        k = int(params["density"][0] * values.numel())
        tied = int((values >= torch.kthvalue(values, values.numel() - k + 1).values).sum()) > k
        assert tied == (not spread or dtype == torch.bfloat16)
    sources = {"base": base, **{f"m{i}": x for i, x in enumerate(inputs)}}

    def read(source, start, stop):
        return sources[source][start:stop]

    def generator():
        return torch.Generator().manual_seed(11) if method.random else None

    whole = method.merge(base=base, tensors=inputs, generator=generator(), **params).to(dtype)
    by_rows = rowwise.merge_by_rows(method, read, "base" if base is not None else None,
                                    [f"m{i}" for i in range(models)], shape, params, dtype, torch.float32,
                                    torch.device("cpu"), generator())
    assert len(rowwise.row_ranges(shape)) == 13
    assert torch.equal(whole.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       by_rows.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))


def test_sorting_in_place_keeps_the_same_entries():
    values = quantised((4000,), 3, torch.float32).abs()
    for k in (1, 700, 2000, 3999):
        assert torch.equal(top_k_mask(values.clone(), k, overwrite=True), top_k_mask(values, k))


RECIPES = {
    "ties": "merge_method: ties\nbase_model: {base}\nmodels:\n"
            "  - model: {a}\n    parameters: {{density: 0.4, weight: 0.6}}\n"
            "  - model: {b}\n    parameters: {{density: 0.7, weight: 0.5}}\n",
    "dare_ties": "merge_method: dare_ties\nbase_model: {base}\nmodels:\n"
                 "  - model: {a}\n    parameters: {{density: 0.5, weight: 0.6}}\n"
                 "  - model: {b}\n    parameters: {{density: 0.3, weight: 0.5}}\n",
    "linear": "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.3}}\n"
              "  - model: {b}\n    parameters: {{weight: 0.9}}\n",
}


@pytest.fixture(scope="module")
def tied_bfloat16_family(tmp_path_factory) -> dict:
    """Gemma-2 (tied embeddings), bfloat16, in several shards: rows read across files."""
    from merging.synthetic import build_family

    return build_family(tmp_path_factory.mktemp("tied"), family="gemma2", variants=2, seed=4,
                        dtype=torch.bfloat16, max_shard_size="60KB")


@pytest.mark.parametrize("family", ["llama_family", "tied_bfloat16_family"])
@pytest.mark.parametrize("method", sorted(RECIPES))
def test_engine_merges_by_rows_as_whole(method, family, request, monkeypatch):
    paths = request.getfixturevalue(family)
    variants = [paths[k] for k in sorted(paths) if k != "base"]
    text = RECIPES[method].format(base=paths["base"], a=variants[0], b=variants[-1])

    def merged() -> tuple[dict, int]:
        recipe = parse_recipe(text)
        plan = plan_merge(recipe, open_models(recipe))
        try:
            return dict(iter_merged(plan, seed=3, threads=2)), sum(task.by_rows for task in plan.tasks)
        finally:
            plan.close()

    whole, none = merged()
    monkeypatch.setattr(rowwise, "ROWWISE_MIN_BYTES", 1)
    monkeypatch.setattr(rowwise, "ROW_RANGE_BYTES", 1024)
    by_rows, count = merged()
    assert none == 0 and count == len(whole)
    for name, tensor in whole.items():
        assert torch.equal(tensor, by_rows[name]) and tensor.dtype == by_rows[name].dtype, name


def test_checkpoint_written_by_rows_is_byte_identical(tied_bfloat16_family, tmp_path, monkeypatch):
    """`merge_to_disk` writes each row range of a tensor merged by rows to its place in the
    file (several shards here): the files are the whole-tensor merge's, byte for byte."""
    from merging.engine import merge_to_disk

    paths = tied_bfloat16_family
    text = RECIPES["ties"].format(base=paths["base"], a=paths["variant_1"], b=paths["variant_2"])

    def write(out) -> dict[str, bytes]:
        recipe = parse_recipe(text)
        plan = plan_merge(recipe, open_models(recipe))
        try:
            merge_to_disk(plan, out, threads=2, max_shard_bytes=40_000)
        finally:
            plan.close()
        return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors*"))}

    whole = write(tmp_path / "whole")
    monkeypatch.setattr(rowwise, "ROWWISE_MIN_BYTES", 1)
    monkeypatch.setattr(rowwise, "ROW_RANGE_BYTES", 700)
    by_rows = write(tmp_path / "by-rows")
    assert len(whole) > 2 and whole == by_rows


def test_one_tensor_merged_by_rows_at_a_time(llama_family, monkeypatch):
    """Each merge by rows holds several copies of a large tensor: with three threads and
    every tensor merged by rows, they still run one at a time (the others run whole)."""
    import threading
    import time

    import merging.engine as engine

    monkeypatch.setattr(rowwise, "ROWWISE_MIN_BYTES", 30_000)  # the embedding, head and MLP matrices
    running, most = [0], [0]
    lock = threading.Lock()

    def counted(*args, **kwargs):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02)  # long enough for the other threads to start something
        try:
            return rowwise.merge_by_rows(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(engine, "merge_by_rows", counted)
    text = RECIPES["ties"].format(base=llama_family["base"], a=llama_family["variant_1"],
                                  b=llama_family["variant_2"])
    recipe = parse_recipe(text)
    plan = plan_merge(recipe, open_models(recipe))
    try:
        assert sum(task.by_rows for task in plan.tasks) > 3
        merged = dict(iter_merged(plan, threads=3))
    finally:
        plan.close()
    assert len(merged) == len(plan.tasks) and most[0] == 1

"""Checkpoint I/O on real safetensors files: lazy reads, shards, the writer, safety."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from merging.checkpoint import (
    Checkpoint, ShardedWriter, TensorSpec, atomic_output_dir, parse_size, resolve_model_path, write_atomic,
)
from merging.errors import CheckpointError, EvomergeError


def test_headers_are_read_without_data(llama_family):
    checkpoint = Checkpoint.open(str(llama_family["base"]))
    info = checkpoint.tensors["model.embed_tokens.weight"]
    assert info.dtype == torch.float32 and len(info.shape) == 2
    reference = load_file(llama_family["base"] / "model.safetensors")
    assert set(checkpoint.tensors) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(checkpoint.read(name), tensor)


def test_sharded_checkpoint_reads_through_the_index(sharded_family):
    folder = sharded_family["base"]
    assert (folder / "model.safetensors.index.json").is_file()
    checkpoint = Checkpoint.open(str(folder))
    assert len({info.file for info in checkpoint.tensors.values()}) > 1
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(checkpoint.tensors) == set(weight_map)
    assert checkpoint.read("model.norm.weight").dtype == torch.bfloat16


def test_writer_streams_shards_that_safetensors_and_the_index_agree_on(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(30, 40, generator=gen).to(dtype)
               for i, dtype in enumerate([torch.float32, torch.bfloat16, torch.float16] * 3)}
    tensors["scalar"] = torch.tensor(3.5)
    tensors["ids"] = torch.arange(7)
    tensors["empty"] = torch.zeros(0, 4)
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    writer = ShardedWriter(tmp_path, specs, max_shard_bytes=10_000)
    for name, tensor in reversed(tensors.items()):  # any order: each goes to its place
        writer.write(name, tensor)
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == len(writer.file_names) > 1
    loaded = {}
    for file in writer.file_names:
        loaded.update(load_file(tmp_path / file))
    assert loaded.keys() == tensors.keys()
    for name in tensors:
        assert torch.equal(loaded[name], tensors[name])
    assert index["metadata"]["total_size"] == sum(s.nbytes for s in specs)


def test_writer_refuses_out_of_plan_tensors(tmp_path):
    writer = ShardedWriter(tmp_path, [TensorSpec("a", (2,), torch.float32)], 100)
    with pytest.raises(RuntimeError, match="expected"):
        writer.write("a", torch.zeros(3))
    with pytest.raises(RuntimeError, match="expected"):
        writer.write("b", torch.zeros(2))
    writer.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="expected"):  # twice
        writer.write("a", torch.zeros(2))


def test_writer_takes_row_ranges_in_any_order(tmp_path):
    """A tensor merged by rows arrives range by range, interleaved with whole tensors."""
    big = torch.randn(10, 3).to(torch.bfloat16)
    small = torch.arange(4, dtype=torch.float32)
    writer = ShardedWriter(tmp_path, [TensorSpec("small", (4,), torch.float32),
                                      TensorSpec("big", (10, 3), torch.bfloat16)], 10_000)
    writer.write_rows("big", 7, big[7:])
    writer.write("small", small)
    with pytest.raises(RuntimeError, match="expected rows"):
        writer.write_rows("big", 8, big[:4])  # past the end
    writer.write_rows("big", 0, big[:7])
    writer.close()
    loaded = load_file(tmp_path / "model.safetensors")
    assert torch.equal(loaded["big"], big) and torch.equal(loaded["small"], small)


def test_writer_refuses_to_close_with_rows_missing(tmp_path):
    writer = ShardedWriter(tmp_path, [TensorSpec("big", (10, 3), torch.float32)], 10_000)
    writer.write_rows("big", 0, torch.zeros(9, 3))
    with pytest.raises(RuntimeError, match="not \\(fully\\) written: big"):
        writer.close()


def test_atomic_output_dir_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(ValueError):
        with atomic_output_dir(out) as staging:
            (staging / "partial.safetensors").write_bytes(b"x")
            raise ValueError("boom")
    assert list(tmp_path.iterdir()) == []


def test_write_atomic_replaces_whole_files_and_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "state.json"
    write_atomic(path, "old")
    write_atomic(path, b"new")
    assert path.read_text() == "new"

    def half_written(temporary):
        temporary.write_text("ha")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomic(path, half_written)
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["state.json"]
    write_atomic(path, lambda temporary: temporary.write_text("by a writer"))
    assert path.read_text() == "by a writer"


def test_atomic_output_dir_refuses_and_then_overwrites(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(EvomergeError, match="--overwrite"):
        with atomic_output_dir(out):
            pass
    with atomic_output_dir(out, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_truncated_safetensors_names_model_and_file(llama_family, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(llama_family["base"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model '.*broken'.*model\.safetensors.*truncated"):
        Checkpoint.open(str(broken))


def test_positioned_reads_give_what_safetensors_wrote_for_every_dtype(tmp_path):
    """The reader parses the header itself and reads each tensor at its offset (no memory
    map): every dtype, an empty tensor and a scalar must come back bit for bit."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    generator = torch.Generator().manual_seed(0)
    tensors = {f"t.{dtype}": torch.randn(3, 5, generator=generator).to(dtype)
               for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float8_e4m3fn)}
    tensors |= {"ids": torch.arange(7), "flags": torch.tensor([True, False, True]),
                "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5)}
    save_file(tensors, folder / "model.safetensors")
    checkpoint = Checkpoint("m", folder)
    assert list(checkpoint.tensors) == sorted(tensors)
    for name, expected in tensors.items():
        read = checkpoint.read(name)
        assert read.dtype == expected.dtype and read.shape == expected.shape
        assert torch.equal(read.view(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)), name
    checkpoint.close()


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[:5], "shorter than its 8-byte header"),
    (lambda data: (10**12).to_bytes(8, "little") + data[8:], "header length"),
    (lambda data: data[:8] + b"x" + data[9:], "not JSON"),
    (lambda data: data[:-1], "data ends at byte"),
])
def test_a_damaged_safetensors_header_names_model_and_file(llama_family, tmp_path, damage, message):
    broken = tmp_path / "broken"
    shutil.copytree(llama_family["base"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(CheckpointError, match=rf"model '.*broken': model\.safetensors is not a valid safetensors "
                                              rf"file \(truncated or corrupt: .*{message}"):
        Checkpoint.open(str(broken))


def test_pickle_is_refused_unless_allowed(llama_family, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(llama_family["base"] / "config.json", pickled)
    state = load_file(llama_family["base"] / "model.safetensors")
    torch.save(state, pickled / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle.*--allow-pickle"):
        Checkpoint.open(str(pickled))
    checkpoint = Checkpoint.open(str(pickled), allow_pickle=True)
    assert torch.equal(checkpoint.read("model.norm.weight"), state["model.norm.weight"])


class Payload:
    """An arbitrary class: weights_only=True must refuse to import and build it."""


def test_pickle_with_code_is_rejected_even_when_allowed(llama_family, tmp_path):
    pickled = tmp_path / "evil"
    pickled.mkdir()
    shutil.copy(llama_family["base"] / "config.json", pickled)
    torch.save({"w": Payload()}, pickled / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        Checkpoint.open(str(pickled), allow_pickle=True)


def test_nan_in_a_source_names_model_and_tensor(llama_family, tmp_path):
    poisoned = tmp_path / "poisoned"
    shutil.copytree(llama_family["base"], poisoned)
    state = load_file(poisoned / "model.safetensors")
    state["model.norm.weight"][3] = float("nan")
    save_file(state, poisoned / "model.safetensors", metadata={"format": "pt"})
    checkpoint = Checkpoint.open(str(poisoned))
    with pytest.raises(CheckpointError, match=r"poisoned.*model\.norm\.weight.*NaN"):
        checkpoint.read("model.norm.weight")


def test_missing_folder_and_bad_ids_are_clear():
    with pytest.raises(CheckpointError, match="no such folder"):
        resolve_model_path("does/not/exist/here")
    with pytest.raises(CheckpointError, match="Hugging Face Hub"):
        resolve_model_path("nobody-evomerge/no-such-model")  # offline in tests


def test_hub_ids_resolve_from_the_local_hf_cache(llama_family, tmp_path, monkeypatch):
    """The real Hub path (snapshot_download) runs; offline it finds the cached snapshot."""
    cache = tmp_path / "hub"
    repo = cache / "models--evomerge--tiny-llama"
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(llama_family["variant_1"], repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    path = resolve_model_path("evomerge/tiny-llama")
    assert path.name == revision
    checkpoint = Checkpoint.open("evomerge/tiny-llama")
    assert "model.norm.weight" in checkpoint.tensors


@pytest.mark.parametrize("text,expected", [("5GB", 5 * 10**9), ("500MB", 500 * 10**6),
                                           ("2GiB", 2 * 2**30), ("1024", 1024), (77, 77)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_size_rejects_nonsense():
    with pytest.raises(EvomergeError, match="cannot read size"):
        parse_size("lots")


def test_sources_kept_on_a_device_merge_as_the_memory_maps_do(sharded_family):
    """A worker keeps its sources on its device (Checkpoint.keep_on): every read answers the
    same tensor, a TIES merge of bfloat16 shards gives the same bytes, and the size the
    placement rule weighs is the data's."""
    from merging.engine import iter_merged, plan_merge
    from merging.recipe import parse_recipe

    base, tuned = (str(path) for path in sharded_family.values())
    recipe = parse_recipe(f"merge_method: ties\nbase_model: {base}\nmodels:\n"
                          f"  - {{model: {tuned}, parameters: {{weight: 0.7, density: 0.5}}}}\n")
    merged = {}
    for kept in (False, True):
        checkpoints = {path: Checkpoint.open(path) for path in (base, tuned)}
        if kept:
            for checkpoint in checkpoints.values():
                checkpoint.keep_on(torch.device("cpu"))
        merged[kept] = dict(iter_merged(plan_merge(recipe, checkpoints), seed=0))
    assert merged[True].keys() == merged[False].keys()
    assert all(torch.equal(merged[True][name], merged[False][name]) for name in merged[False])
    assert any(tensor.dtype == torch.bfloat16 for tensor in merged[True].values())
    checkpoint = Checkpoint.open(base)
    data = sum(t.numel() * t.element_size() for t in (checkpoint.read(n) for n in checkpoint.tensors))
    assert checkpoint.nbytes == data
    checkpoint.keep_on(torch.device("cpu"))
    with pytest.raises(CheckpointError, match="has no tensor nope"):
        checkpoint.read("nope")

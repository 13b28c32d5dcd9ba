"""Checkpoint I/O: open model folders or Hub ids lazily, stream merged tensors to disk.

Reading: headers first (names, shapes, dtypes and byte offsets, parsed from each
safetensors header, no data), then one tensor at a time on demand, with a positioned
read (`os.preadv`) straight into a fresh tensor. Nothing is memory-mapped: mapped input
pages would stay resident in the process (counted in its RSS, which is what a user and a
job scheduler see) until the map is dropped, while pages read this way live only in the
kernel's page cache. Peak memory is therefore a few tensors rather than a model. Pickled
`.bin` weights are refused unless the caller opts in, and then loaded with
`weights_only=True`.

Writing: `ShardedWriter` writes each shard's header before its data, which is possible
because the merge plan knows every output shape and dtype before any tensor is
computed; so every tensor's offset is known too, and each is written there (a positioned
write) as soon as it is produced, in whatever order the engine finishes them, and never
buffered per shard.
`atomic_output_dir` builds the output in a hidden sibling folder and renames it into
place only when complete, so a failed merge leaves nothing half-written; `write_atomic`
does the same for one file (every state, log summary, plot and card the project writes).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from merging.errors import CheckpointError, EvomergeError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt",
    "merges.txt", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
    "processor_config.json",
)
"""Files that make up a tokenizer or processor in Hugging Face format."""

HUB_PATTERNS = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
"""Config and tokenizer files fetched from the Hub; weights are fetched by name (see `_hub_weights`)."""


@dataclass(frozen=True)
class TensorInfo:
    """What a header says about one tensor: enough to plan a merge without reading data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str
    offset: int = -1
    """Where the tensor's bytes start in a safetensors `file` (-1 in a pickle)."""

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


ZOO_PREFIX = "zoo:"
"""`zoo:NAME` names model NAME of a zoo (`evomerge zoo build`), wherever that zoo was built."""


def resolve_model_path(reference: str, *, allow_pickle: bool = False, zoo_dir: Path | None = None) -> Path:
    """A recipe's model reference -> a local folder.

    `BASE+ADAPTER` is BASE with the PEFT LoRA adapter folded in (merging/lora.py).
    `zoo:NAME` is ZOO_DIR/models/NAME (the caller finds the zoo's folder). A folder that
    exists is used as it is. Anything else is taken as a Hugging Face Hub
    id, optionally `org/name@revision`, and fetched into the HF cache (or found there
    when offline). Only safetensors, configs and tokenizer files are fetched; pickled
    weights only with `allow_pickle`, and only when no safetensors exist.
    """
    from merging.lora import adapter_path, folded_path, split_reference

    if lora := split_reference(reference):  # BASE+ADAPTER: the adapter folded into its base, once
        base = resolve_model_path(lora[0], allow_pickle=allow_pickle, zoo_dir=zoo_dir)
        return folded_path(reference, base, adapter_path(lora[1]))
    if reference.startswith(ZOO_PREFIX):
        return zoo_model_path(reference, zoo_dir)
    local = Path(reference).expanduser()
    if local.is_dir():
        return local
    repo_id, _, revision = reference.partition("@")
    if repo_id.count("/") != 1 or local.suffix in (".yaml", ".yml", ".safetensors"):
        raise CheckpointError(f"model {reference!r}: no such folder, and not a Hub id of the form org/name")
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=HUB_PATTERNS))
        path = Path(snapshot_download(repo_id, revision=revision or None,
                                      allow_patterns=HUB_PATTERNS + _hub_weights(path, "safetensors")))
        if allow_pickle and not any(path.glob("*.safetensors")):
            path = Path(snapshot_download(repo_id, revision=revision or None,
                                          allow_patterns=HUB_PATTERNS + _hub_weights(path, "bin")))
    except Exception as exc:  # network, auth, missing repo: all mean "cannot use this id"
        raise CheckpointError(
            f"model {reference!r}: not a local folder, and fetching it from the Hugging Face Hub failed "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    return path


def zoo_model_path(reference: str, zoo_dir: Path | None) -> Path:
    """`zoo:NAME` -> ZOO_DIR/models/NAME, which must exist (the error lists the zoo's models)."""
    if zoo_dir is None:
        raise CheckpointError(f"model {reference!r} is a zoo model: say which zoo with --zoo "
                              "(micro, small, real or a zoo folder)")
    name = reference.removeprefix(ZOO_PREFIX)
    path = Path(zoo_dir) / "models" / name
    if not path.is_dir():
        known = sorted(p.name for p in (Path(zoo_dir) / "models").glob("*") if p.is_dir())
        raise CheckpointError(f"model {reference!r}: the zoo at {zoo_dir} has no model {name!r}; "
                              f"it has {', '.join(known) or 'none'}")
    return path


def _hub_weights(snapshot: Path, kind: str) -> list[str]:
    """The weight files to fetch: those the index names when there is one (as transformers
    does), so that a repo holding the same weights twice (Mistral's consolidated file
    beside the shards) is not downloaded twice; otherwise every file of that kind."""
    index = snapshot / ("model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json")
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return [f"*.{kind}"]


class Checkpoint:
    """One source model: its config, its tensor headers, and lazy reads of tensor data."""

    def __init__(self, reference: str, path: Path, *, allow_pickle: bool = False):
        self.reference = reference
        self.path = path
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"model {reference!r}: no config.json in {path}")
        try:
            self.config: dict = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"model {reference!r}: config.json is not valid JSON ({exc})") from exc
        self._files: dict[str, int] = {}
        """Open descriptors of the safetensors files read so far."""
        self._files_lock = threading.Lock()
        self._pickled: dict[str, dict[str, torch.Tensor]] = {}
        self._kept: dict[str, torch.Tensor] | None = None
        self.tensors: dict[str, TensorInfo] = {}
        files = self._weight_files()
        for file in files:
            if file.endswith(".safetensors"):
                self._index_safetensors(file)
            elif allow_pickle:
                self._index_pickle(file)
            else:
                raise CheckpointError(
                    f"model {reference!r}: weights are a pickle file ({file}); pickles can run code when "
                    "loaded. Convert it to safetensors, or pass --allow-pickle to load it with "
                    "torch.load(weights_only=True)"
                )

    @classmethod
    def open(cls, reference: str, *, allow_pickle: bool = False) -> "Checkpoint":
        return cls(reference, resolve_model_path(reference, allow_pickle=allow_pickle), allow_pickle=allow_pickle)

    def _weight_files(self) -> list[str]:
        """Weight files in load order: the sharded index if any, else every file present."""
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = self.path / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError) as exc:
                    raise CheckpointError(f"model {self.reference!r}: {index_name} is malformed ({exc})") from exc
                return sorted(set(weight_map.values()))
        safetensors_files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if safetensors_files:
            return safetensors_files
        pickles = sorted(p.name for p in self.path.glob("*.bin") if p.name != "training_args.bin")
        if pickles:
            return pickles
        raise CheckpointError(f"model {self.reference!r}: no *.safetensors or *.bin weights in {self.path}")

    def _add(self, info: TensorInfo) -> None:
        if info.name in self.tensors:
            raise CheckpointError(
                f"model {self.reference!r}: tensor {info.name} appears in both "
                f"{self.tensors[info.name].file} and {info.file}"
            )
        self.tensors[info.name] = info

    def _index_safetensors(self, file: str) -> None:
        full = self.path / file
        if not full.is_file():
            raise CheckpointError(f"model {self.reference!r}: weight file {file} is listed but missing")
        try:
            entries = safetensors_header(full)
        except ValueError as exc:
            raise CheckpointError(f"model {self.reference!r}: {file} is not a valid safetensors file "
                                  f"(truncated or corrupt: {exc})") from None
        for name, (dtype_name, shape, offset) in sorted(entries.items()):  # name order, as safe_open lists them
            dtype = SAFETENSORS_DTYPES.get(dtype_name)
            if dtype is None:
                raise CheckpointError(f"model {self.reference!r}: tensor {name} has unsupported dtype {dtype_name}")
            self._add(TensorInfo(name, shape, dtype, file, offset))

    def _index_pickle(self, file: str) -> None:
        try:
            state = torch.load(self.path / file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise CheckpointError(f"model {self.reference!r}: cannot load {file} with weights_only=True ({exc})") from exc
        if not isinstance(state, dict):
            raise CheckpointError(f"model {self.reference!r}: {file} does not hold a state dict")
        self._pickled[file] = state
        for name, tensor in state.items():
            self._add(TensorInfo(name, tuple(tensor.shape), tensor.dtype, file))

    def _descriptor(self, file: str) -> int:
        """The open file descriptor of one safetensors file, opened on first use (under a
        lock: the engine's reader thread and its row-range merges may both open files)."""
        with self._files_lock:
            descriptor = self._files.get(file)
            if descriptor is None:
                descriptor = self._files[file] = os.open(self.path / file, os.O_RDONLY)
            return descriptor

    def _read_bytes(self, info: TensorInfo, pinned: bool, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor's bytes (or those of its row range `rows`, dim 0), read into a fresh
        tensor of its dtype and shape (in pinned, page-locked memory when `pinned`, for an
        asynchronous copy to a GPU)."""
        shape, offset, nbytes = info.shape, info.offset, info.nbytes
        if rows is not None:
            row_bytes = nbytes // shape[0] if shape[0] else 0
            shape = (rows[1] - rows[0], *shape[1:])
            offset, nbytes = offset + rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes
        data = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        view, done = memoryview(data.numpy()), 0
        descriptor = self._descriptor(info.file)
        while done < nbytes:
            count = os.preadv(descriptor, [view[done:]], offset + done)
            if count == 0:
                raise CheckpointError(f"model {self.reference!r}: {info.file} ends inside tensor {info.name} "
                                      "(truncated)")
            done += count
        return data.view(info.dtype).reshape(shape)

    @property
    def nbytes(self) -> int:
        """The size of every tensor's data (what keeping them on a device costs)."""
        return sum(math.prod(info.shape) * info.dtype.itemsize for info in self.tensors.values())

    def keep_on(self, device: torch.device) -> None:
        """Read every tensor once (checked) onto `device` and answer later reads from there.

        A worker that builds hundreds of candidates from the same sources then reads each
        tensor from disk (and checks it) once, and on a GPU copies nothing from the host
        per candidate. Merge operators never write into their inputs, so the kept tensors
        stay the source's."""
        self._kept = None
        kept = {name: self.read(name).to(device) for name in self.tensors}
        self.close_files()
        self._kept = kept

    def read(self, name: str, *, pinned: bool = False, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Read one tensor, or its rows [start, stop) (`rows`: dim 0, the engine's merge of
        a large tensor by row ranges); refuse NaN or Inf, which would silently poison a
        merge. `pinned` reads it into page-locked memory (see `_read_bytes`)."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"model {self.reference!r} has no tensor {name}")
        if self._kept is not None:
            return self._kept[name] if rows is None else self._kept[name][rows[0]:rows[1]]
        try:
            if info.file in self._pickled:
                tensor = self._pickled[info.file][name]
                tensor = tensor if rows is None else tensor[rows[0]:rows[1]]
            else:
                tensor = self._read_bytes(info, pinned, rows)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"model {self.reference!r}: cannot read tensor {name} from {info.file} ({exc})") from exc
        if tensor.is_floating_point() and tensor.numel() and not all_finite(tensor):
            raise CheckpointError(f"model {self.reference!r}: tensor {name} contains NaN or Inf values")
        return tensor

    def release(self, file: str) -> None:
        """Close one safetensors file (reopened if read again): the engine calls this after
        the last planned read from a shard, so a merge of many shards holds few files open."""
        with self._files_lock:
            descriptor = self._files.pop(file, None)
            if descriptor is not None:
                os.close(descriptor)

    def close_files(self) -> None:
        for file in list(self._files):
            self.release(file)

    def close(self) -> None:
        self.close_files()
        self._pickled.clear()
        self._kept = None


def safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """name -> (dtype name, shape, absolute byte offset of its data) from a safetensors
    file's header, checked against the file's size so that a truncated or corrupt file
    is named when it is opened, not halfway through a merge. ValueError says what is wrong."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError("shorter than its 8-byte header length")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(size - 8, 100 << 20):
            raise ValueError(f"header length {length} exceeds the file")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    start, entries = 8 + length, {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"tensor {name}: malformed header entry") from None
        itemsize = SAFETENSORS_DTYPES[dtype_name].itemsize if dtype_name in SAFETENSORS_DTYPES else None
        if itemsize is not None and end - begin != math.prod(shape) * itemsize:
            raise ValueError(f"tensor {name}: {end - begin} bytes for shape {list(shape)} {dtype_name}")
        if not 0 <= begin <= end or start + end > size:
            raise ValueError(f"tensor {name}: data ends at byte {start + end}, the file has {size}")
        entries[name] = (dtype_name, shape, start + begin)
    return entries


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no entry is NaN or +-Inf. The min and max carry any NaN or Inf through,
    and `aminmax` is one pass without the full boolean mask `isfinite` builds (~50x faster
    on a 32000 x 2048 bfloat16 embedding)."""
    if tensor.dtype.itemsize == 1:  # float8: no aminmax kernel; bfloat16 holds every value, NaN included
        tensor = tensor.to(torch.bfloat16)
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) and torch.isfinite(high))


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a plain number of bytes -> bytes."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    stripped = text.strip().upper().replace(" ", "")
    number = stripped.rstrip("KMGTIB")
    unit = stripped[len(number):]
    try:
        return int(float(number) * units[unit])
    except (ValueError, KeyError):
        raise EvomergeError(f"cannot read size {text!r}; use e.g. 5GB, 500MB or 2GiB") from None


@dataclass(frozen=True)
class TensorSpec:
    """An output tensor known before it is computed."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class ShardedWriter:
    """Writes tensors into safetensors shards of at most `max_shard_bytes` (a larger tensor
    gets a shard of its own), plus the HF index. Every tensor's place is fixed by `specs`
    (their order in the files), so tensors may arrive in any order: each is written at its
    offset (a positioned write), as the engine finishes it."""

    def __init__(self, out_dir: Path, specs: Sequence[TensorSpec], max_shard_bytes: int):
        self.out_dir = out_dir
        self.shards: list[list[TensorSpec]] = [[]]
        size = 0
        for spec in specs:
            if self.shards[-1] and size + spec.nbytes > max_shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append(spec)
            size += spec.nbytes
        count = len(self.shards)
        self.file_names = (["model.safetensors"] if count == 1 else
                           [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
        self._places: dict[str, tuple[int, TensorSpec, int]] = {}
        """name -> (shard, spec, offset of its data from the start of the data section)."""
        for shard, shard_specs in enumerate(self.shards):
            offset = 0
            for spec in shard_specs:
                self._places[spec.name] = (shard, spec, offset)
                offset += spec.nbytes
        self._files: dict[int, tuple[int, int]] = {}
        """shard -> (open descriptor, where its data section starts)."""
        self._written: dict[str, int] = {}
        """name -> bytes of it written so far."""
        self._lock = threading.Lock()
        """Tensors and row ranges arrive from several threads (the engine's writer and its
        merges by rows): shard files are created, and bytes counted, under it."""

    def _open_shard(self, shard: int) -> tuple[int, int]:
        """The shard's descriptor and data start; created with its header on first use."""
        with self._lock:
            if shard in self._files:
                return self._files[shard]
            header: dict[str, object] = {"__metadata__": {"format": "pt"}}
            for spec in self.shards[shard]:
                _, _, offset = self._places[spec.name]
                header[spec.name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                                     "data_offsets": [offset, offset + spec.nbytes]}
            encoded = json.dumps(header, separators=(",", ":")).encode()
            encoded += b" " * (-len(encoded) % 8)
            descriptor = os.open(self.out_dir / self.file_names[shard], os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                                 0o644)
            _write_at(descriptor, memoryview(struct.pack("<Q", len(encoded)) + encoded), 0)
            self._files[shard] = (descriptor, 8 + len(encoded))
            return self._files[shard]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write a whole tensor."""
        spec = self._spec(name, tensor.dtype)
        if tuple(tensor.shape) != spec.shape:
            raise RuntimeError(f"writer expected {spec}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        self._write(name, 0, tensor)

    def write_rows(self, name: str, start: int, rows: torch.Tensor) -> None:
        """Write rows [start, start + len(rows)) of a tensor (the engine's merge by rows
        writes each range as it is merged, so the whole tensor is never held)."""
        spec = self._spec(name, rows.dtype)
        if rows.dim() == 0 or tuple(rows.shape[1:]) != spec.shape[1:] or not 0 <= start <= spec.shape[0] - len(rows):
            raise RuntimeError(f"writer expected rows of {spec}, got rows {start}.. {tuple(rows.shape)} of {name}")
        self._write(name, start * (spec.nbytes // spec.shape[0]), rows)

    def _spec(self, name: str, dtype: torch.dtype) -> TensorSpec:
        place = self._places.get(name)
        if place is None or dtype != place[1].dtype or self._written.get(name, 0) >= place[1].nbytes > 0:
            raise RuntimeError(f"writer expected one of its tensors once, got {name} ({dtype})")
        return place[1]

    def _write(self, name: str, start_byte: int, tensor: torch.Tensor) -> None:
        shard, _, offset = self._places[name]
        descriptor, data_start = self._open_shard(shard)
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        _write_at(descriptor, memoryview(data), data_start + offset + start_byte)
        with self._lock:
            self._written[name] = self._written.get(name, 0) + len(data)

    def close(self) -> None:
        missing = [name for name, (_, spec, _) in self._places.items() if self._written.get(name, 0) < spec.nbytes]
        if missing:
            raise RuntimeError(f"writer closed with {len(missing)} of {len(self._places)} tensors not (fully) "
                               f"written: {', '.join(missing[:3])}")
        for shard in range(len(self.shards)):  # a shard of empty tensors only was never opened
            descriptor, _ = self._open_shard(shard)
            os.close(descriptor)
        self._files.clear()
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(spec.nbytes for _, spec, _ in self._places.values())},
                "weight_map": {name: self.file_names[shard] for name, (shard, _, _) in self._places.items()},
            }
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_at(descriptor: int, data: memoryview, offset: int) -> None:
    """Write all of `data` at `offset` (a positioned write may write less than asked)."""
    done = 0
    while done < len(data):
        done += os.pwrite(descriptor, data[done:], offset + done)


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """An existing output folder is replaced only when asked, and never one that holds the
    user's other work: the home folder, the current folder or one above it, a git checkout."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return
    if not overwrite:
        raise EvomergeError(f"output folder {out_dir} already exists; pass --overwrite to replace it")
    resolved, cwd = out_dir.resolve(), Path.cwd().resolve()
    if resolved in (Path.home().resolve(), cwd, *cwd.parents) or (resolved / ".git").exists():
        raise EvomergeError(f"refusing to --overwrite {out_dir}: it is the home folder, the current folder, "
                            "a folder above it or a git checkout; choose a new output folder")


CACHE_HOME = Path(os.environ.get("EVOMERGE_CACHE", Path.home() / ".cache" / "evomerge"))
"""Where evomerge keeps what it can recompute (architectures, LoRA merges, file digests)."""


DIGESTS = CACHE_HOME / "digests"
"""One small file per version of a file hashed: its SHA-256."""


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes, computed once per version of the file: remembered under
    DIGESTS by resolved path, size, inode and modification time (what a rewrite changes)."""
    path = Path(path).resolve()
    status = path.stat()
    version = hashlib.sha256(f"{path}\0{status.st_size}\0{status.st_ino}\0{status.st_mtime_ns}".encode()).hexdigest()
    memo = DIGESTS / version[:32]
    try:
        return memo.read_text()
    except OSError:
        pass
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    try:
        DIGESTS.mkdir(parents=True, exist_ok=True)
        write_atomic(memo, digest.hexdigest())
    except OSError:  # only a memo: a read-only cache, or another thread writing it now
        pass
    return digest.hexdigest()


def write_atomic(path: str | Path, content: str | bytes | Callable[[Path], object]) -> Path:
    """Replace the file at `path` all at once: a reader, or a rerun after a kill, sees the
    old content or the new one, never half of it. `content` is text, bytes, or a function
    that writes the file at the path it is given (e.g. a safetensors or PNG writer); it
    writes a hidden temporary sibling, which is then renamed over `path`."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if isinstance(content, str):
            temporary.write_text(content)
        elif isinstance(content, bytes):
            temporary.write_bytes(content)
        else:
            content(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


@contextmanager
def atomic_output_dir(out_dir: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary sibling of `out_dir`; move it into place on success.

    On any exception the temporary folder is deleted and `out_dir` is left as it was.
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out_dir.exists():
        retired = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(retired)
        staging.rename(out_dir)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(out_dir)


def copy_tokenizer(source: Path, out_dir: Path) -> list[str]:
    """Copy the tokenizer/processor files that exist in `source`; return their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out_dir / name)
            copied.append(name)
    return copied

"""The merge engine: plan which tensors to make from what, then stream them.

Planning reads only headers and configs: for every output tensor it records the input
tensors (model, name), the operator and the parameters resolved for that tensor, and
the output shape and dtype, and it checks shapes, missing tensors and architectures
before any data is read, so bad input fails in seconds with a precise message.

Execution runs the plan's tasks on a few threads: a reader thread reads a task's inputs (a
positioned read, no memory map) and moves them to the device, `threads` tasks run their
operator in float32 and cast, and each result is handed on as soon as it is finished; large
tensors are merged by row ranges read straight from the files (merging/rowwise.py). Peak
memory is therefore a few tensors, not a model. `iter_merged` yields the tensors (the
harness loads them into a resident model); `merge_to_disk` writes each to its place in the
checkpoint, row range by row range for those merged by rows.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import math
import shutil
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from merging.architecture import DEFAULT_MODULE, MODULES, Module, model_modules, num_layers_key
from merging.checkpoint import (
    Checkpoint, ShardedWriter, TensorSpec, atomic_output_dir, check_output_dir, resolve_model_path,
)
from merging.errors import CheckpointError, EvomergeError, RecipeError
from merging.operators.base import MergeMethod
from merging.rowwise import merge_by_rows, merges_by_rows, rowwise_peak_bytes
from merging.recipe import (
    DTYPES, OutputSlice, Recipe, assign_modules, output_slices, parameter_scopes, resolve_parameter,
)
from merging.tokenizer import (
    Vocabulary, VocabularyRows, plan_vocabulary, resolve_chat_template, tokenizer_model, write_tokenizer_files,
)


RECIPE_FILE = "recipe.yaml"
"""The recipe a merged checkpoint was made from, written beside its weights."""


@dataclass(frozen=True)
class TensorInput:
    model: str
    name: str


@dataclass
class TensorTask:
    """How to make one output tensor."""

    output: TensorSpec
    base: TensorInput | None
    inputs: list[TensorInput]
    params: dict[str, Any]
    vocabulary: VocabularyRows | None = None
    """For embeddings and head under a tokenizer source: the rows each input is rebuilt to."""
    by_rows: bool = False
    """Merged a few rows at a time, read straight from the files (merging/rowwise.py)."""

    @property
    def sources(self) -> list[TensorInput]:
        """Every tensor the task reads: the inputs, then the base when there is one."""
        return [*self.inputs, *([self.base] if self.base else [])]


@dataclass
class MergePlan:
    recipe: Recipe
    method: MergeMethod
    checkpoints: dict[str, Checkpoint]
    reference: str
    """The model whose config (and, by default, tokenizer) the output takes."""
    tasks: list[TensorTask] = field(default_factory=list)
    modules: dict[str, Module] = field(default_factory=dict)
    """The reference model's modules (one, `default`, but for a multi-module model: a VLM)."""
    module_layers: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    """Per module, for each output layer, the (model, layer) it descends from (layer stacking)."""
    tokenizer_model: str = ""
    """The model whose tokenizer files the output takes."""
    chat_template: str | None = None
    """The template the recipe's `chat_template` resolves to; None keeps the tokenizer's."""
    vocabulary: Vocabulary | None = None
    """The tokenizer source's vocabulary, when the models' rows must be rebuilt to it."""

    @property
    def layer_sources(self) -> list[tuple[str, int]]:
        """The output layers of every module, in order."""
        return [source for layers in self.module_layers.values() for source in layers]

    @property
    def num_layers(self) -> int:
        return len(self.layer_sources)

    def close(self) -> None:
        for checkpoint in self.checkpoints.values():
            checkpoint.close()


def open_models(recipe: Recipe, *, allow_pickle: bool = False, recipe_dir: Path | None = None,
                zoo_dir: Path | None = None) -> dict[str, Checkpoint]:
    """Open every model a recipe names. A relative path is looked up in the current
    directory first (as mergekit does), then beside the recipe file; `zoo:NAME` in
    `zoo_dir`. Each keeps the name the recipe gives it (the card shows that name)."""
    checkpoints = {}
    for reference in recipe.referenced_models():
        local = Path(reference).expanduser()
        if not local.is_dir() and recipe_dir is not None and (recipe_dir / reference).is_dir():
            local = recipe_dir / reference
        path = local if local.is_dir() else resolve_model_path(reference, allow_pickle=allow_pickle,
                                                                 zoo_dir=zoo_dir)
        checkpoints[reference] = Checkpoint(reference, path, allow_pickle=allow_pickle)
    return checkpoints


def plan_merge(recipe: Recipe, checkpoints: dict[str, Checkpoint]) -> MergePlan:
    """Resolve a recipe against opened checkpoints into one task per output tensor."""
    method = recipe.method
    slices = output_slices(recipe)
    model_types = {ref: ck.config.get("model_type") for ref, ck in checkpoints.items()}
    if len(set(model_types.values())) > 1:
        listing = ", ".join(f"{ref!r} is {kind}" for ref, kind in model_types.items())
        hint = ("; a language model cannot be merged into the text decoder of a multi-module model "
                "(mergekit 0.1.5 refuses it too)") if set(model_types.values()) & set(MODULES) else ""
        raise CheckpointError(f"models have different architectures: {listing}{hint}")
    reference = slices[0].base_model or slices[0].sources[0].model
    layouts = {ref: model_modules(ck.config) for ref, ck in checkpoints.items()}
    plan = MergePlan(recipe, method, checkpoints, reference, modules=layouts[reference])
    merged = list(dict.fromkeys(s.model for slice_ in slices for s in slice_.sources))
    plan.tokenizer_model = tokenizer_model(recipe, reference)
    plan.vocabulary = plan_vocabulary(recipe, checkpoints, plan.tokenizer_model, merged,
                                      recipe.base_model or reference)
    if plan.vocabulary is not None and len(plan.modules) > 1:
        raise RecipeError(f"{recipe.where('tokenizer')}: rebuilding the embedding rows to another tokenizer is "
                          f"not supported for a multi-module model ({model_types[reference]}) yet")
    polled = list(dict.fromkeys([recipe.base_model, *merged] if recipe.base_model else merged))
    plan.chat_template = resolve_chat_template(recipe, checkpoints, polled)
    out_dtype = DTYPES.get(recipe.out_dtype or recipe.dtype or "")
    for name, module_slices in assign_modules(recipe, list(plan.modules), reference).items():
        _plan_module(plan, name, module_slices, {ref: layout[name] for ref, layout in layouts.items()}, out_dtype)
    for ref, checkpoint in checkpoints.items():
        stray = [t for t in checkpoint.tensors if not any(m.owns(t) for m in layouts[ref].values())]
        if stray:
            raise CheckpointError(f"model {ref!r} has tensor(s) {', '.join(stray[:5])} that belong to none of its "
                                  f"modules ({', '.join(layouts[ref])})")
    return plan


def _plan_module(plan: MergePlan, name: str, slices: list[OutputSlice], modules: dict[str, Module],
                 out_dtype: torch.dtype | None) -> None:
    """Plan the tensors of one module (the whole model, for most) from its output slices:
    the tensors before its layers from the first slice's models, its layers slice by
    slice, the tensors after them from the last slice's models (mergekit's order)."""
    recipe, method, checkpoints = plan.recipe, plan.method, plan.checkpoints
    arch = {ref: module.arch for ref, module in modules.items()}
    layer_sources = plan.module_layers.setdefault(name, [])

    def add(slice_: OutputSlice, out_name: str, names: dict[str, str], t: float,
            vocabulary: Vocabulary | None = None) -> None:
        plan.tasks.append(_make_task(recipe, method, slice_, out_name, names, t, checkpoints, out_dtype,
                                     vocabulary))

    first, last = slices[0], slices[-1]
    by_layer = {ref: _tensors_by_layer(ck, modules[ref]) for ref, ck in checkpoints.items()}
    head = first.sources[0].model
    _check_same_tensors({s.model: by_layer[s.model]["pre"] for s in first.sources}, head, "before the layers")
    for tensor in by_layer[head]["pre"]:
        add(first, tensor, {s.model: tensor for s in first.sources}, 0.0, plan.vocabulary)
    for slice_ in slices:
        ranges = {}
        for source in slice_.sources:
            depth = arch[source.model].num_layers
            start, end = slice_.layer_range(source, depth)
            if end > depth:
                where = "" if name == DEFAULT_MODULE else f"module {name!r}: "
                raise RecipeError(f"{where}layer_range [{start}, {end}] of model {source.model!r} "
                                  f"exceeds its {depth} layers")
            ranges[source.model] = (start, end)
        if len({end - start for start, end in ranges.values()}) > 1:
            listing = ", ".join(f"{m!r} gives {end - start}" for m, (start, end) in ranges.items())
            raise CheckpointError(f"all models merged into the same layers must have as many layers: {listing}")
        lead = slice_.sources[0].model
        length = ranges[lead][1] - ranges[lead][0]
        for offset in range(length):
            t = offset / (length - 1) if length > 1 else 1.0
            out_index = len(layer_sources)
            lead_layer = ranges[lead][0] + offset
            layer_sources.append((lead, lead_layer))
            _check_same_tensors({m: [arch[m].rename_layer(n, lead_layer) for n in by_layer[m][start + offset]]
                                 for m, (start, _) in ranges.items()}, lead, f"layer {lead_layer}")
            for lead_name in by_layer[lead][lead_layer]:
                names = {m: arch[m].rename_layer(lead_name, start + offset) for m, (start, _) in ranges.items()}
                add(slice_, arch[lead].rename_layer(lead_name, out_index), names, t)
    tail = last.sources[0].model
    _check_same_tensors({s.model: by_layer[s.model]["post"] for s in last.sources}, tail, "after the layers")
    for tensor in by_layer[tail]["post"]:
        add(last, tensor, {s.model: tensor for s in last.sources}, 0.0, plan.vocabulary)


def _tensors_by_layer(checkpoint: Checkpoint, module: Module) -> dict[int | str, list[str]]:
    """The module's tensor names grouped by layer index, plus "pre" (embeddings) and "post"
    (final norm, head), in file order: one pass over the names instead of one per layer."""
    arch = module.arch
    groups: dict[int | str, list[str]] = {"pre": [], "post": []}
    for name in filter(module.owns, checkpoint.tensors):
        layer = arch.layer_of(name)
        groups.setdefault(layer if layer is not None else arch.position(name), []).append(name)
    for layer in range(arch.num_layers):
        groups.setdefault(layer, [])
    return groups


def _check_same_tensors(names: dict[str, list[str]], lead: str, where: str) -> None:
    """Every model merged into one place must hold the lead model's tensors there, no
    more: a tensor only some models have would otherwise be dropped without a word.
    (Tensors the lead has and another lacks are named by `_make_task`.)"""
    expected = set(names[lead])
    for model, found in names.items():
        extra = sorted(set(found) - expected)
        if extra:
            raise CheckpointError(f"model {model!r} has tensor(s) {', '.join(extra[:5])}"
                                  f"{' ...' if len(extra) > 5 else ''} {where} that model {lead!r} "
                                  f"(whose tensors the output takes) does not have")


def _make_task(recipe: Recipe, method: MergeMethod, slice_: OutputSlice, out_name: str,
               names: dict[str, str], t: float, checkpoints: dict[str, Checkpoint],
               out_dtype: torch.dtype | None, vocabulary: Vocabulary | None = None) -> TensorTask:
    base_model = slice_.base_model if method.takes_base else None
    input_models = [s.model for s in slice_.sources if s.model != base_model]
    involved = ([base_model] if base_model else []) + input_models
    infos = {}
    for model in involved:
        info = checkpoints[model].tensors.get(names.get(model, out_name))
        if info is None:
            raise CheckpointError(f"tensor {names.get(model, out_name)} is missing in model {model!r}")
        infos[model] = info
    shapes = {m: i.shape for m, i in infos.items()}
    by_token = vocabulary is not None and all(
        len(i.shape) == 2 and i.shape[0] == checkpoints[m].config.get("vocab_size") for m, i in infos.items())
    if len({s[1:] if by_token else s for s in shapes.values()}) > 1:
        listing = ", ".join(f"{m!r} has {list(s)}" for m, s in shapes.items())
        raise CheckpointError(f"shape mismatch for tensor {out_name}: {listing}")
    first = infos[involved[0]]
    shape = (vocabulary.padded, *first.shape[1:]) if by_token else first.shape
    rows = vocabulary.rows_for([s.model for s in slice_.sources if s.model in infos], slice_.base_model) \
        if by_token else None
    dtype = out_dtype if (out_dtype is not None and first.dtype.is_floating_point) else first.dtype
    if by_token and out_dtype is None:  # mergekit rebuilds the rows in the promoted input dtype
        for info in infos.values():
            dtype = torch.promote_types(dtype, info.dtype)
    params: dict[str, Any] = {}
    for name, default in method.global_params.items():
        params[name] = resolve_parameter(name, default, parameter_scopes(recipe, slice_, None),
                                         out_name, t, f"tensor {out_name}")
    for name, default in method.model_params.items():
        params[name] = [
            resolve_parameter(name, default, parameter_scopes(recipe, slice_, model),
                              infos[model].name, t, f"model {model!r}, tensor {infos[model].name}")
            for model in input_models
        ]
    if method.check_model_params:
        for i, model in enumerate(input_models):
            problem = method.check_model_params({name: params[name][i] for name in method.model_params})
            if problem:
                raise RecipeError(f"model {model!r}, tensor {infos[model].name}: {problem}")
    return TensorTask(
        output=TensorSpec(out_name, shape, dtype),
        base=TensorInput(base_model, infos[base_model].name) if base_model else None,
        inputs=[TensorInput(m, infos[m].name) for m in input_models],
        params=params,
        vocabulary=rows,
        by_rows=merges_by_rows(method, shape, [i.dtype for i in infos.values()], rows is not None),
    )


PROCESS_BYTES = 250 * 2**20
"""Resident memory of the merging process when its first tensor starts: Python, torch, the
plan (measured: 233 MiB for a 160M Llama on CPU)."""


def expected_peak_bytes(plan: MergePlan, threads: int) -> int:
    """An upper estimate of a CPU merge's peak resident memory: the process, plus what the
    tasks under way at once hold (`iter_merged`: `threads` merging and one being read, at
    most one of them merged by rows). A whole-tensor task holds its inputs and a float32
    working set of about two copies per input and four more (the stacked deltas, masks, the
    trim's scratch); a task merged by rows holds what `rowwise_peak_bytes` says (its trim
    pass, the largest part, assumes a tie at the threshold, which needs the sort). The worst
    case is the largest tasks together. Checked against /usr/bin/time by
    scripts/bench_merge.py (docs/benchmarks.md)."""
    def inputs(task: TensorTask) -> int:
        return sum(plan.checkpoints[ref.model].tensors[ref.name].nbytes
                   for ref in task.sources)

    def working(task: TensorTask) -> int:
        count = len(task.inputs) + (1 if task.base else 0)
        return 4 * math.prod(task.output.shape) * (2 * count + 4)

    whole = sorted((inputs(t) + working(t) for t in plan.tasks if not t.by_rows), reverse=True)
    read_ahead = max((inputs(t) for t in plan.tasks if not t.by_rows), default=0)
    by_rows = max((rowwise_peak_bytes(plan.method, t.output.shape, len(t.inputs), t.output.dtype, assembled=False)
                   for t in plan.tasks if t.by_rows), default=None)
    peak = sum(whole[:threads]) + read_ahead
    if by_rows is not None:
        peak = max(peak, by_rows + sum(whole[:threads - 1]) + read_ahead)
    return PROCESS_BYTES + peak


def describe_plan(plan: MergePlan, threads: int = 1) -> str:
    """A human-readable plan: the summary, then one line per output tensor."""
    total = sum(task.output.nbytes for task in plan.tasks)
    lines = [
        f"method: {plan.recipe.merge_method}",
        "models: " + ", ".join(f"{ref} ({ck.path})" for ref, ck in plan.checkpoints.items()),
        f"config from: {plan.reference}; output: {plan.num_layers} layers, {len(plan.tasks)} tensors, "
        f"{total / 2**30:.3f} GiB",
        f"expected peak memory: about {expected_peak_bytes(plan, threads) / 2**30:.2f} GiB on a CPU with "
        f"{threads} thread{'s' if threads > 1 else ''} (--threads)",
        _tokenizer_line(plan),
        *([_modules_line(plan)] if plan.recipe.modules is not None or len(plan.modules) > 1 else []),
        "",
    ]
    for task in plan.tasks:
        sources = ", ".join(f"{i.model}:{i.name}" for i in task.inputs)
        base = f" base={task.base.model}:{task.base.name}" if task.base else ""
        params = " ".join(f"{k}={_short(v)}" for k, v in task.params.items())
        lines.append(f"{task.output.name} {list(task.output.shape)} {str(task.output.dtype).removeprefix('torch.')}"
                     f" <- [{sources}]{base} {params}".rstrip())
    return "\n".join(lines)


def _modules_line(plan: MergePlan) -> str:
    """Each module, its output depth and tensor count, and what its slices merge."""
    parts = []
    for name, module in plan.modules.items():
        count = sum(1 for task in plan.tasks if module.owns(task.output.name))
        parts.append(f"{name} ({module.prefix or 'every tensor'}: {len(plan.module_layers[name])} layers, "
                     f"{count} tensors)")
    return "modules: " + ", ".join(parts)


def _tokenizer_line(plan: MergePlan) -> str:
    """What the output's tokenizer and chat template will be, for the dry run's summary."""
    union = plan.vocabulary is not None and plan.vocabulary.union
    tokenizer = (f"the union of the models' vocabularies ({plan.vocabulary.size} tokens)" if union
                 else f"from {plan.tokenizer_model}")
    if plan.vocabulary is not None:
        tokenizer += "; embedding and head rows rebuilt to it"
        if plan.vocabulary.overrides:
            tokenizer += f" ({len(plan.vocabulary.overrides)} token(s) set by `tokens:`)"
    template = plan.recipe.chat_template
    if plan.chat_template is None:
        chosen = "the tokenizer's own"
    else:
        chosen = f"{template if template != plan.chat_template else 'as given'} ({len(plan.chat_template)} characters)"
    return f"tokenizer: {tokenizer}; chat template: {chosen}"


def _short(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(_short(v) for v in value) + "]"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` is the GPU when there is one. A name torch does not know, or a CUDA device
    this machine lacks, is an error that names it, before any work starts."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise EvomergeError(f"device {name!r} is not one torch knows; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EvomergeError(f"device {name!r}: no CUDA device is available (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise EvomergeError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def tensor_generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    """A generator seeded from (seed, tensor name): random methods are reproducible and
    independent of the order in which tensors are processed."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


TaskInputs = tuple[list[torch.Tensor], "torch.Tensor | None"]
"""One task's input tensors and base tensor, read and on the merge device."""


def read_inputs(plan: MergePlan, task: TensorTask, device: torch.device) -> TaskInputs | None:
    """Read one task's inputs and move them to `device` (through pinned host memory and
    an asynchronous copy on a GPU, so that the copy overlaps the previous task's merge).
    None for a task merged by rows: it reads its rows itself."""
    if task.by_rows:
        return None

    def load(ref: TensorInput) -> torch.Tensor:
        tensor = plan.checkpoints[ref.model].read(ref.name, pinned=device.type == "cuda")
        return tensor.to(device, non_blocking=tensor.is_pinned())

    return [load(ref) for ref in task.inputs], (load(task.base) if task.base else None)


def execute_task(plan: MergePlan, task: TensorTask, device: torch.device, seed: int,
                 inputs: TaskInputs | None = None,
                 write_rows: Callable[[str, int, torch.Tensor], None] | None = None) -> torch.Tensor | None:
    """Compute one output tensor on `device` and cast it to its output dtype (`inputs`:
    the task's tensors when already read, see `read_inputs`). A task merged by rows hands
    its row ranges to `write_rows(name, start, rows)` instead, when given, and returns None."""
    generator = tensor_generator(seed, task.output.name, device) if plan.method.random else None
    if task.by_rows:
        def read(ref: TensorInput | None, start: int, stop: int) -> torch.Tensor:
            return plan.checkpoints[ref.model].read(ref.name, rows=(start, stop)).to(device)

        dtypes = {plan.checkpoints[ref.model].tensors[ref.name].dtype
                  for ref in task.sources}
        return merge_by_rows(plan.method, read, task.base, task.inputs, task.output.shape, task.params,
                             task.output.dtype, torch.float64 if torch.float64 in dtypes else torch.float32,
                             device, generator,
                             partial(write_rows, task.output.name) if write_rows is not None else None)
    tensors, base = inputs if inputs is not None else read_inputs(plan, task, device)
    if task.vocabulary is not None:
        rebuilt = task.vocabulary.apply({ref.model: tensor for ref, tensor in
                                         zip(task.sources,
                                             [*tensors, *([base] if base is not None else [])])})
        tensors = [rebuilt[ref.model] for ref in task.inputs]
        base = rebuilt[task.base.model] if task.base else None
    if not tensors[0].is_floating_point():
        return tensors[0].to(task.output.dtype)  # integer buffers are copied, not merged
    merged = plan.method.merge(base=base, tensors=tensors, generator=generator, **task.params)
    return merged.to(task.output.dtype)


def iter_merged(plan: MergePlan, *, device: str | torch.device = "cpu", seed: int = 0,
                progress: bool = False, threads: int = 1,
                write_rows: Callable[[str, int, torch.Tensor], None] | None = None,
                ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every output tensor, as each is finished (not in plan order).
    With `write_rows(name, start, rows)`, the tensors merged by rows are not yielded: their
    row ranges go to it as they are merged (`merge_to_disk` writes them to their place in
    the file, so such a tensor is never held whole).

    `threads` tensors merge at once (selections and sorts, TIES' trim, run on one core
    each, so a second tensor is what keeps a second core busy) while a reader thread reads
    the next one's inputs (file reads and torch kernels release the GIL): at most
    `threads + 1` tasks are under way. Yielding in order would stall the whole pool
    behind one long tensor (an embedding's trim takes as long as a dozen layer tensors), so
    results come as they finish, and a tensor merged by rows is started as soon as no
    other is under way: never two at once (each holds several copies of a large tensor),
    and the last of them does not run alone at the end. The tensors do not depend on
    `threads` or on the order: each is computed by the same kernels with the same
    intra-op thread count, and random methods draw from a generator per tensor."""
    device = torch.device(device)
    readers = _readers_per_file(plan)
    bar = _progress_bar(plan) if progress else None
    by_rows = deque(i for i, task in enumerate(plan.tasks) if task.by_rows)
    whole = deque(i for i, task in enumerate(plan.tasks) if not task.by_rows)

    def read(index: int) -> TaskInputs | None:
        return read_inputs(plan, plan.tasks[index], device)

    def merge(index: int, inputs: Future) -> torch.Tensor:
        with torch.no_grad():
            return execute_task(plan, plan.tasks[index], device, seed, inputs.result(), write_rows)

    with ThreadPoolExecutor(1, thread_name_prefix="evomerge-read") as reader, \
            ThreadPoolExecutor(threads, thread_name_prefix="evomerge-merge") as mergers:
        running: dict[Future, int] = {}
        try:
            while by_rows or whole or running:
                while len(running) <= threads:
                    rows_busy = any(plan.tasks[i].by_rows for i in running.values())
                    queue = by_rows if by_rows and not rows_busy else whole
                    if not queue:
                        break
                    index = queue.popleft()
                    running[mergers.submit(merge, index, reader.submit(read, index))] = index
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    task = plan.tasks[running.pop(future)]
                    merged = future.result()
                    if merged is not None:
                        yield task.output.name, merged
                    for ref in task.sources:
                        key = ref.model, plan.checkpoints[ref.model].tensors[ref.name].file
                        readers[key] -= 1
                        if readers[key] == 0:  # no task left reads this file
                            plan.checkpoints[ref.model].release(key[1])
                    if bar is not None:
                        bar.update(task.output.nbytes)
        finally:
            for future in running:  # after an error: start nothing more
                future.cancel()
    if bar is not None:
        bar.close()


def _progress_bar(plan: MergePlan):
    """A bar over the output's bytes: it shows MB/s written and the time left."""
    from tqdm.auto import tqdm

    return tqdm(total=sum(task.output.nbytes for task in plan.tasks), desc="merging", unit="B",
                unit_scale=True, unit_divisor=1024)


def _readers_per_file(plan: MergePlan) -> Counter[tuple[str, str]]:
    """(model, weight file) -> how many of the plan's input reads are from it: a file is
    closed when the last task reading it has finished."""
    return Counter((ref.model, plan.checkpoints[ref.model].tensors[ref.name].file)
                   for task in plan.tasks for ref in task.sources)


def output_config(plan: MergePlan) -> dict:
    """The reference model's config, with each module's output depth, and the dtype."""
    config = json.loads(json.dumps(plan.checkpoints[plan.reference].config))
    for name, module in plan.modules.items():
        node = module.depth_config(config)
        if node is None:  # a module without layers
            continue
        node[num_layers_key(node)] = len(plan.module_layers[name])
        if isinstance(node.get("layer_types"), list):
            layer_types = {ref: module.depth_config(ck.config).get("layer_types")
                           for ref, ck in plan.checkpoints.items()}
            node["layer_types"] = [layer_types[m][i] for m, i in plan.module_layers[name]]
    if plan.vocabulary is not None:
        config["vocab_size"] = plan.vocabulary.padded
    dtype_name = plan.recipe.out_dtype or plan.recipe.dtype
    if dtype_name:
        config["torch_dtype" if "torch_dtype" in config else "dtype"] = dtype_name
    return config


def merge_to_disk(plan: MergePlan, out_dir: str | Path, *, device: str | torch.device = "cpu",
                  seed: int = 0, overwrite: bool = False, max_shard_bytes: int = 5 * 10**9,
                  progress: bool = False, card_notes: str = "", threads: int = 1) -> Path:
    """Write the merged checkpoint folder: weights, config, generation config, tokenizer
    files of the tokenizer source, the recipe (recipe.yaml, as mergekit writes its config,
    so `evomerge merge recipe.yaml` remakes the folder) and a model card (with
    `card_notes`, markdown, at its end: an evolution run adds lineage and scores).
    Atomic: all or nothing."""
    from merging.card import model_card

    out_dir = Path(out_dir)
    _one_malloc_arena()
    with atomic_output_dir(out_dir, overwrite=overwrite) as staging:
        writer = ShardedWriter(staging, [t.output for t in plan.tasks], max_shard_bytes)
        with ThreadPoolExecutor(1, thread_name_prefix="evomerge-write") as background:
            written = None  # the previous tensor's write, overlapping this one's merge
            for name, tensor in iter_merged(plan, device=device, seed=seed, progress=progress, threads=threads,
                                            write_rows=writer.write_rows):
                if written is not None:
                    written.result()
                written = background.submit(writer.write, name, tensor)
            if written is not None:
                written.result()
        writer.close()
        (staging / "config.json").write_text(json.dumps(output_config(plan), indent=2) + "\n")
        tokenizer_path = plan.checkpoints[plan.tokenizer_model].path
        copied = write_tokenizer_files(plan, staging)
        generation = tokenizer_path / "generation_config.json"
        if not generation.is_file():
            generation = plan.checkpoints[plan.reference].path / "generation_config.json"
        if generation.is_file():
            shutil.copy2(generation, staging / "generation_config.json")
        else:
            _write_generation_config(staging)
        (staging / RECIPE_FILE).write_text(plan.recipe.to_yaml())
        (staging / "README.md").write_text(model_card(plan, plan.tokenizer_model, copied, card_notes, seed=seed))
    return out_dir


def _one_malloc_arena() -> None:
    """Have glibc serve every thread from one malloc arena. By default each thread that
    allocates gets an arena of its own, and memory one merge thread frees is not reused by
    another: each arena keeps its own freed buffers. The merge threads allocate and free
    buffers of the same few sizes, so one arena serves them as well, and a 160M merge's
    peak RSS was 0.80-0.85 GiB with an arena per thread against 0.70-0.72 GiB with one
    (docs/benchmarks.md). Process-wide and harmless elsewhere; without glibc, nothing."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, 1)  # M_ARENA_MAX = 1
    except (OSError, AttributeError):
        pass


def _write_generation_config(out_dir: Path) -> None:
    """Sources without generation_config.json: derive one from the config, as HF does."""
    from transformers import AutoConfig, GenerationConfig

    GenerationConfig.from_model_config(AutoConfig.from_pretrained(out_dir)).save_pretrained(out_dir)


def run_recipe(recipe_path: str | Path, out_dir: str | Path, *, device: str = "cpu", seed: int = 0,
               overwrite: bool = False, allow_pickle: bool = False, max_shard_bytes: int = 5 * 10**9,
               progress: bool = False, threads: int = 1) -> Path:
    """Load a recipe file and merge it to `out_dir` (what `evomerge merge` does)."""
    from merging.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    check_output_dir(Path(out_dir), overwrite)
    plan = plan_merge(recipe, open_models(recipe, allow_pickle=allow_pickle,
                                          recipe_dir=Path(recipe_path).parent))
    try:
        return merge_to_disk(plan, out_dir, device=device, seed=seed, overwrite=overwrite,
                             max_shard_bytes=max_shard_bytes, progress=progress, threads=threads)
    finally:
        plan.close()


"""Data-flow-space (DFS) merges: a path through the layers of several models, with scales.

The layer-path search space of Akiba et al., "Evolutionary Optimization of Model Merging
Recipes" (Sakana AI, 2024). Lay out the layers of the M source models in order (model
0's layers, then model 1's, ...: N layers in all) and repeat that `repeats` times: T =
N * repeats slots. An inclusion vector I of T numbers picks the path: slot t is used when
I[t] > 0, in slot order. A matrix W of N x N positive numbers scales the hidden state
passed along the path: W[i, j] multiplies the stream going from layer i into layer j.
Embeddings, final norm and head come from model 0, and the path always starts with model
0's layer 0 and ends with model 0's last layer, whatever I says (each is added unless
the chosen path already starts or ends with it, so choosing every layer of model 0 once
gives model 0 back).

A search only has to map numbers to (I, W): `dataflow_recipe` turns them into an ordinary
`passthrough` recipe (one slice per path step) that the engine merges, the harness scores
and `merge_to_disk` exports as a checkpoint that plain transformers loads; the scales are
folded into weights, so the output needs no custom code.

Why the scales fold (pre-norm transformers). A block maps its input h to
    u = h + A(N1(h)),   h' = u + F(N2(u))          (Phi, GPT-NeoX: h' = h + A(N1 h) + F(N2 h))
where A and F end in output projections (x -> Wx + b) and the norms N are scale
invariant: N(c h) = N(h) for c > 0 (RMSNorm and LayerNorm, exactly so for eps = 0).
Let s_t scale the stream entering step t and P_t = s_0 s_1 ... s_t. Claim: the scaled
model's stream after step t is P_t y_t, where y_t is the stream of the plain stack whose
step-t output projections (weights and biases) are divided by P_t. By induction, step t
receives s_t P_{t-1} y_{t-1} = P_t y, and
    P_t y + A(N1(P_t y)) = P_t (y + A(N1 y) / P_t),
likewise for F, so the step's output is P_t times that of the divided block. The final
norm maps P_T y_T to N(y_T): the logits agree. With eps > 0 the fold is exact up to
replacing eps by eps / P_t**2 in the norms of step t, negligible while the stream's mean
square is far above eps. A scale <= 0 cannot fold (N(-h) = -N(h)) and is refused.
"""
from __future__ import annotations

import tempfile
from typing import Sequence

import torch

from merging.architecture import detect_architecture
from merging.checkpoint import Checkpoint
from merging.engine import merge_to_disk, open_models, plan_merge
from merging.errors import RecipeError
from merging.recipe import Recipe

OUTPUT_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "mistral": ("self_attn.o_proj", "mlp.down_proj"),
    "qwen2": ("self_attn.o_proj", "mlp.down_proj"),
    "gemma": ("self_attn.o_proj", "mlp.down_proj"),
    "phi": ("self_attn.dense", "mlp.fc2"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "gpt_neox": ("attention.dense", "mlp.dense_4h_to_h"),
}
"""Pre-norm families: the modules whose outputs are added to the residual stream. Filters
are substrings of tensor names, so each covers the projection's weight and its bias."""

_POST_NORM = ("post-norm: a LayerNorm after each residual add re-normalizes the stream, so a scale on "
              "it changes the block nonlinearly")
_POST_BLOCK_NORMS = ("its post-attention and post-feedforward norms re-normalize each block's output, "
                     "so dividing the output projections does not scale what is added to the stream")
CANNOT_FOLD: dict[str, str] = {
    "bert": _POST_NORM, "roberta": _POST_NORM, "xlm-roberta": _POST_NORM, "electra": _POST_NORM,
    "gemma2": _POST_BLOCK_NORMS, "gemma3": _POST_BLOCK_NORMS, "gemma3_text": _POST_BLOCK_NORMS,
}
"""Why some known families cannot take DFS scales as plain weights."""


def output_projections(model_type: str) -> tuple[str, ...]:
    """The tensor-name filters a DFS scale divides, or a RecipeError saying why none exist."""
    if model_type in OUTPUT_PROJECTIONS:
        return OUTPUT_PROJECTIONS[model_type]
    reason = CANNOT_FOLD.get(model_type, "no fold rule is known for it; folding needs a pre-norm "
                                         "transformer whose blocks end in known output projections")
    raise RecipeError(f"data-flow scales cannot be folded into a {model_type!r} checkpoint: {reason}. "
                      f"Families that fold: {', '.join(OUTPUT_PROJECTIONS)}; without scales any family stacks")


class DataflowSpace:
    """The slots and layers of a DFS search over `sources` (model folders or Hub ids)."""

    def __init__(self, sources: Sequence[str], repeats: int = 1):
        if not sources or repeats < 1:
            raise RecipeError("a data-flow space needs at least one source model and repeats >= 1")
        self.sources = [str(s) for s in sources]
        self.repeats = repeats
        configs = []
        for source in self.sources:
            checkpoint = Checkpoint.open(source)
            configs.append(checkpoint.config)
            checkpoint.close()
        self.layer_counts = [detect_architecture(c).num_layers for c in configs]
        self.model_type: str = configs[0]["model_type"]
        self.layers = [(m, layer) for m, count in enumerate(self.layer_counts) for layer in range(count)]
        """(model, layer) of each of the N distinct layers, in slot order."""

    @property
    def num_layers(self) -> int:
        """N: the distinct layers across the sources (W is N x N)."""
        return len(self.layers)

    @property
    def num_slots(self) -> int:
        """T: the length of an inclusion vector."""
        return self.num_layers * self.repeats

    def path_from_inclusion(self, inclusion: Sequence[float] | torch.Tensor) -> list[tuple[int, int]]:
        """The (model, layer) steps that slots with I[t] > 0 select, framed by model 0's
        first and last layer (added unless already there)."""
        values = torch.as_tensor(inclusion, dtype=torch.float64).flatten()
        if len(values) != self.num_slots:
            raise RecipeError(f"inclusion vector has {len(values)} entries; this space has {self.num_slots} "
                              f"slots ({self.num_layers} layers x {self.repeats} repeats)")
        path = [self.layers[t % self.num_layers] for t in range(self.num_slots) if values[t] > 0]
        first, last = (0, 0), (0, self.layer_counts[0] - 1)
        if not path or path[0] != first:
            path.insert(0, first)
        if path[-1] != last:
            path.append(last)
        return path

    def expand_model_scales(self, pair_scales: Sequence[Sequence[float]] | torch.Tensor) -> torch.Tensor:
        """An N x N W from an M x M matrix of one scale per (model_from, model_to) pair.
        Ones on the diagonal give the reading "scale only where the path changes model"."""
        pairs = torch.as_tensor(pair_scales, dtype=torch.float64)
        models = len(self.sources)
        if pairs.shape != (models, models):
            raise RecipeError(f"model-pair scales must be {models} x {models}, got {list(pairs.shape)}")
        model_of = torch.tensor([m for m, _ in self.layers])
        return pairs[model_of][:, model_of]

    def scale_per_step(self, path: Sequence[tuple[int, int]],
                       scales: Sequence[Sequence[float]] | torch.Tensor) -> list[float]:
        """W read along the path: the scale of the stream entering each step (1 for the
        first step, which receives the embeddings)."""
        matrix = torch.as_tensor(scales, dtype=torch.float64)
        if matrix.shape != (self.num_layers, self.num_layers):
            raise RecipeError(f"scales must be {self.num_layers} x {self.num_layers} (one per pair of "
                              f"layers), got {list(matrix.shape)}")
        _check_positive(matrix)
        steps = [self.layers.index(layer) for layer in path]
        return [1.0] + [matrix[i, j].item() for i, j in zip(steps, steps[1:])]


def _check_positive(scales: torch.Tensor) -> None:
    bad = ~(torch.isfinite(scales) & (scales > 0))
    if bad.any():
        where = [tuple(i) for i in bad.nonzero().tolist()]
        raise RecipeError(f"data-flow scales must be finite and > 0 (a norm cannot absorb a sign flip); "
                          f"bad entries at {where[:5]}: {scales[bad].tolist()[:5]}")


def passthrough_recipe(space: DataflowSpace, path: Sequence[tuple[int, int]],
                       step_scales: Sequence[float] | None = None) -> Recipe:
    """The passthrough recipe for a path: one slice per step, with the output projections
    of step t divided by the running product of `step_scales` up to t (none if None)."""
    running, projections = [1.0] * len(path), ()
    if step_scales is not None:
        if len(step_scales) != len(path):
            raise RecipeError(f"{len(step_scales)} step scales for a path of {len(path)} steps")
        scales = torch.as_tensor(step_scales, dtype=torch.float64)
        _check_positive(scales)
        running, projections = scales.cumprod(0).tolist(), output_projections(space.model_type)
    slices = []
    for (model, layer), product in zip(path, running):
        slice_: dict = {"sources": [{"model": space.sources[model], "layer_range": [layer, layer + 1]}]}
        if product != 1.0:
            slice_["parameters"] = {"scale": [{"filter": name, "value": 1.0 / product} for name in projections]
                                    + [{"value": 1.0}]}
        slices.append(slice_)
    return Recipe.model_validate({"merge_method": "passthrough", "slices": slices})


def dataflow_recipe(space: DataflowSpace, inclusion: Sequence[float] | torch.Tensor,
                    scales: Sequence[Sequence[float]] | torch.Tensor | None = None) -> Recipe:
    """Numbers to a candidate: inclusion vector (T) and scale matrix W (N x N, or None for
    a pure layer path) to a passthrough recipe with the scales folded into weights."""
    path = space.path_from_inclusion(inclusion)
    return passthrough_recipe(space, path, None if scales is None else space.scale_per_step(path, scales))


@torch.no_grad()
def reference_logits(space: DataflowSpace, path: Sequence[tuple[int, int]], step_scales: Sequence[float],
                     input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of the DFS model computed the direct way, to check the fold against: the
    unscaled stack, with forward pre-hooks multiplying the stream entering step t by
    step_scales[t] at run time."""
    from transformers import AutoModelForCausalLM

    recipe = passthrough_recipe(space, path)
    plan = plan_merge(recipe, open_models(recipe))
    with tempfile.TemporaryDirectory() as folder:
        try:
            merge_to_disk(plan, f"{folder}/stack")
        finally:
            plan.close()
        model = AutoModelForCausalLM.from_pretrained(f"{folder}/stack").eval()
    layers = model.get_submodule(detect_architecture(model.config.to_dict()).layer_prefixes[0])
    for layer, scale in zip(layers, step_scales, strict=True):
        layer.register_forward_pre_hook(lambda _, args, s=scale: (args[0] * s, *args[1:]))
    return model(input_ids).logits

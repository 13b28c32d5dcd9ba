"""The plots of a run folder: fitness against evaluations, the evolved per-layer
parameters (PS), the evolved layer path (DFS), the best member's coefficients (M2N2). Written as PNG with matplotlib's Agg
backend (no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from merging.checkpoint import write_atomic
from niches.coefficients import CoefficientGenome
from niches.genome import DataflowGenome, FreeParameter, RecipeGenome

if TYPE_CHECKING:
    from niches.loop import Outcome

MEAN_MARKERS = ("*", "P", "X", "D")
"""The marker of each stage's distribution mean, stage after stage (in its stage's colour too)."""


def plot_run(out_dir: Path, stages: Sequence[tuple[RecipeGenome | DataflowGenome, "Outcome"]]) -> list[Path]:
    """Every plot a run's stages call for; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [plot_fitness(out_dir / "fitness.png", [outcome for _, outcome in stages])]
    for genome, outcome in stages:
        if isinstance(genome, RecipeGenome):
            written.append(plot_ps_heatmap(out_dir / f"{outcome.name}_parameters.png", genome, outcome.best_genome))
        elif isinstance(genome, DataflowGenome):
            written.append(plot_dfs_path(out_dir / f"{outcome.name}_path.png", genome, outcome.best_genome))
        else:
            written.append(plot_coefficients(out_dir / f"{outcome.name}_coefficients.png", genome, outcome.best_genome))
    return written


def plot_fitness(path: Path, outcomes: Sequence["Outcome"]) -> Path:
    """Best-so-far and per-generation median fitness against evaluations, stage after stage."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    draw_fitness(ax, outcomes)
    ax.set_xlabel("evaluations")
    ax.set_ylabel("fitness")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def draw_fitness(ax, outcomes: Sequence["Outcome"]) -> None:
    """The fitness curves of `plot_fitness` on `ax`."""
    offset = 0
    for number, outcome in enumerate(outcomes):
        samples = [row for row in outcome.history if row["kind"] == "sample"]
        fitness = np.array([row["fitness"] for row in samples])
        x = offset + np.arange(1, len(fitness) + 1)
        (line,) = ax.plot(x, np.maximum.accumulate(fitness), label=f"{outcome.name}: best so far")
        rounds = sorted({row["round"] for row in samples})
        if len(rounds) == len(samples):  # one candidate per step (M2N2): show each
            ax.plot(x, fitness, ".", color=line.get_color(), markersize=3, alpha=0.5, label=f"{outcome.name}: child")
        else:
            ends = [offset + max(i + 1 for i, r in enumerate(samples) if r["round"] == g) for g in rounds]
            medians = [np.median([r["fitness"] for r in samples if r["round"] == g]) for g in rounds]
            ax.plot(ends, medians, "o--", color=line.get_color(), markersize=3, alpha=0.6,
                    label=f"{outcome.name}: generation median")
        starts = [row for row in outcome.history if row["kind"] == "start" and row["fitness"] is not None]
        if starts:  # where the search began (DFS in ps+dfs: the PS merge), at its x position 0
            ax.plot([offset], [starts[0]["fitness"]], "s", color=line.get_color(), markeredgecolor="k",
                    markersize=7, label=f"{outcome.name}: start")
        means = [row for row in outcome.history if row["kind"] == "mean"]
        if means:  # each stage's mean its own marker and colour: a ps+dfs run has two
            ax.plot([offset + len(fitness)], [means[-1]["fitness"]], MEAN_MARKERS[number % len(MEAN_MARKERS)],
                    color=line.get_color(), markeredgecolor="k", markersize=10,
                    label=f"{outcome.name}: distribution mean")
        offset += len(fitness)


def plot_ps_heatmap(path: Path, genome: RecipeGenome, best: np.ndarray) -> Path:
    """One panel per parameter name (density, weight, ...): a row per model, a column per
    layer (embeddings first, final norm and head last); global values fill their row."""
    import matplotlib.pyplot as plt

    columns = _heatmap_columns(genome)
    panels = _heatmap_grids(genome, best)
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 0.5 * len(columns) + 3), 1.2 + 1.1 * len(genome.parameters)),
                             squeeze=False)
    for ax, (name, (rows, grid)) in zip(axes[:, 0], panels.items()):
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=min(p.low for p in rows),
                          vmax=max(p.high for p in rows))
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):  # a slice's parameter leaves the other slices' layers empty
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="w")
        ax.set_yticks(range(len(rows)), [_row_label(p) for p in rows])
        ax.set_xticks(range(len(columns)), columns, fontsize=7)
        ax.set_title(f"evolved {name}")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return _save(fig, path)


def _heatmap_columns(genome: RecipeGenome) -> list[str]:
    """The heatmap's columns: embeddings, every layer, final norm and head (one column
    when every parameter is global), whatever the parameters' group sizes."""
    if genome.layout is None:
        return ["all"]
    return ["embed", *(f"L{i}" for i in range(genome.layout.num_layers)), "head"]


def _heatmap_grids(genome: RecipeGenome, best: np.ndarray) -> dict[str, tuple[list[FreeParameter], np.ndarray]]:
    """Per parameter name, its free parameters (one per row) and the grid plotted: each
    gene's value spread over the columns its group of layers covers. Groups of different
    sizes share the per-layer columns, so a weight per 4 layers lines up with a density
    per 2."""
    columns = len(_heatmap_columns(genome))
    panels: dict[str, tuple[list[FreeParameter], list[np.ndarray]]] = {}
    for parameter, values in zip(genome.parameters, genome.values(best)):
        rows, grid = panels.setdefault(parameter.name, ([], []))
        rows.append(parameter)
        grid.append(_spread(parameter, values, columns))
    return {name: (rows, np.array(grid)) for name, (rows, grid) in panels.items()}


def _row_label(parameter: FreeParameter) -> str:
    name = Path(parameter.model).name if parameter.model else "*"
    return f"{name} (slice {parameter.loc[1]})" if parameter.loc[0] == "slices" else name


def _spread(parameter: FreeParameter, values: np.ndarray, columns: int) -> np.ndarray:
    """A parameter's genes over the columns: a global value fills them; a group of k
    layers repeats its gene over its k layer columns; a slice's parameter fills its own
    layers (and the embeddings or the head when its slice is first or last), NaN elsewhere."""
    if parameter.granularity == "global":
        return np.full(columns, values[0])
    size = 1 if parameter.granularity == "layer" else int(parameter.granularity)
    row = np.full(columns, np.nan)
    first = 1 if parameter.embed else 0
    if parameter.embed:
        row[0] = values[0]
    if parameter.head:
        row[-1] = values[-1]
    start, end = parameter.layers
    for layer in range(start, min(end, columns - 2)):
        row[1 + layer] = values[first + (layer - start) // size]
    return row


def plot_dfs_path(path: Path, genome: DataflowGenome, best: np.ndarray) -> Path:
    """The layer path: step on x, the layer's index on y, one colour per source model,
    the scale of the stream entering each step written where it is not 1."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = genome.path(best)
    matrix = genome.scale_matrix(best)
    scales = [1.0] * len(steps) if matrix is None else genome.space.scale_per_step(steps, matrix)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(steps) + 2), 4))
    ax.plot(range(len(steps)), [layer for _, layer in steps], color="0.7", zorder=1)
    for model, source in enumerate(genome.space.sources):
        xs = [i for i, (m, _) in enumerate(steps) if m == model]
        name = "PS merge" if Path(source).parts[-2:] == ("ps", "best") else Path(source).name
        ax.scatter(xs, [steps[i][1] for i in xs], label=f"model {model}: {name}", zorder=2)
    for i, scale in enumerate(scales):
        if abs(scale - 1.0) > 1e-9:
            ax.annotate(f"×{scale:.2f}", (i, steps[i][1]), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step of the merged model")
    ax.set_ylabel("layer of the source model")
    ax.set_title(f"evolved layer path ({len(steps)} layers)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_coefficients(path: Path, genome: CoefficientGenome, best: np.ndarray) -> Path:
    """An M2N2 member: the coefficient of each source model in each layer (the mean over
    the layer's tensors; the split points make them differ within a model)."""
    import matplotlib.pyplot as plt

    member = np.asarray(best).reshape(genome.shape)
    groups = list(dict.fromkeys(genome.gram.groups))
    grid = np.array([[member[[k for k, g in enumerate(genome.gram.groups) if g == group], s].mean()
                      for group in groups] for s in range(genome.shape[1])])
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(groups) + 3), 1.5 + 0.6 * len(grid)))
    image = ax.imshow(grid, aspect="auto", cmap="coolwarm", vmin=-abs(grid).max(), vmax=abs(grid).max())
    for (i, j), value in np.ndenumerate(grid):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
    ax.set_yticks(range(len(grid)), [Path(s).name for s in genome.gram.sources])
    ax.set_xticks(range(len(groups)), groups, fontsize=7)
    ax.set_title("best member: coefficient of each source per layer")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    try:
        return write_atomic(path, lambda temporary: fig.savefig(temporary, dpi=110, format="png"))
    finally:
        plt.close(fig)

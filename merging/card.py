"""The README.md model card of a merged checkpoint: what was merged, from what, how.

A merged model on the Hub is only reproducible if its card carries the exact recipe
and the sources it came from; this writes both, with HF's YAML front matter so the
Hub lists the base model and the `merge` tag.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import yaml

from merging.checkpoint import ZOO_PREFIX

if TYPE_CHECKING:
    from merging.engine import MergePlan


def model_card(plan: "MergePlan", tokenizer_model: str, tokenizer_files: list[str], notes: str = "",
               seed: int = 0) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        evomerge_version = version("evomerge")
    except PackageNotFoundError:
        evomerge_version = "unknown"
    recipe = plan.recipe
    front = {"library_name": "transformers", "tags": ["evomerge", "merge", recipe.merge_method]}
    if recipe.base_model:
        front["base_model"] = recipe.base_model
    sources = "\n".join(
        f"- `{ref}`{' (base)' if ref == recipe.base_model else ''}: {ck.path}"
        for ref, ck in plan.checkpoints.items()
    )
    zoo = any(ref.startswith(ZOO_PREFIX) for ref in plan.checkpoints)
    rerun = ("evomerge merge recipe.yaml OUT_DIR" + (" --zoo ZOO" if zoo else "")
             + (f" --seed {seed}" if plan.method.random else ""))
    return f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---
# Merged model

Made with evomerge {evomerge_version} using the
`{recipe.merge_method}` method: {len(plan.tasks)} tensors, {plan.num_layers} layers.
Tokenizer from `{tokenizer_model}` ({', '.join(tokenizer_files) or 'no tokenizer files found'}).

## Sources

{sources}

## Recipe

Rerun with `{rerun}` (recipe.yaml is this recipe, beside the weights):

```yaml
{recipe.to_yaml().strip()}
```
""" + (f"\n{notes.strip()}\n" if notes.strip() else "")

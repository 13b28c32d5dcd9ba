"""`modules:` recipes: each module of a multi-module model (a VLM's text decoder, vision
tower, projector) merged from its own models, slices and parameters, as mergekit 0.1.5
does, on a tiny Mistral3 built offline (merging.synthetic.build_vlm_family)."""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from evomerge.cli import main
from merging.engine import plan_merge, run_recipe
from merging.errors import EvomergeError
from merging.recipe import parse_recipe
from merging.synthetic import build_family, build_vlm_family
from tests.conftest import write_recipe

TEXT_LAYERS = 4  # the tiny Mistral's, which the VLM's text decoder has

TASK_ARITHMETIC = """\
merge_method: task_arithmetic
base_model: {base}
parameters:
  weight: 0.5
modules:
  text_decoder:
    slices:
      - sources:
          - model: {base}
            layer_range: [0, 4]
          - model: {v1}
            layer_range: [0, 4]
            parameters: {{weight: 0.9}}
          - model: {v2}
            layer_range: [0, 4]
    parameters:
      weight: [0.0, 0.6]
  vision_tower:
    models:
      - model: {v1}
      - model: {v2}
    parameters:
      weight:
        - filter: attention
          value: 0.2
        - value: 0.7
  multi_modal_projector:
    models:
      - model: {v1}
        parameters: {{weight: 0.3}}
      - model: {v2}
dtype: float32
"""


def _expected_weights(name: str) -> tuple[float, float]:
    """(weight of variant_1, weight of variant_2) that TASK_ARITHMETIC gives tensor `name`:
    a source's parameter beats its module's, which beats the top-level one; the text
    decoder's gradient runs over its own layers (0 for the tensors before and after them)."""
    if name.startswith("language_model."):
        layer = next((int(p) for p in name.split(".") if p.isdigit()), None)
        return 0.9, 0.0 if layer is None else 0.6 * layer / (TEXT_LAYERS - 1)
    if name.startswith("vision_tower."):
        weight = 0.2 if "attention" in name else 0.7
        return weight, weight
    assert name.startswith("multi_modal_projector."), name
    return 0.3, 0.5


@pytest.fixture(scope="module")
def vlm(tmp_path_factory) -> dict[str, Path]:
    """A tiny Mistral3 base and two variants, float32, untied head."""
    return build_vlm_family(tmp_path_factory.mktemp("vlm"), variants=2, seed=0)


@pytest.fixture(scope="module")
def vlm_bf16(tmp_path_factory) -> dict[str, Path]:
    """The same in bfloat16 with tied embeddings (no lm_head tensor)."""
    return build_vlm_family(tmp_path_factory.mktemp("vlm_bf16"), variants=1, seed=1, dtype=torch.bfloat16,
                            tied=True)


def _recipe(vlm: dict[str, Path], text: str = TASK_ARITHMETIC) -> str:
    return text.format(base=vlm["base"], v1=vlm["variant_1"], v2=vlm["variant_2"])


@pytest.fixture(scope="module")
def merged(vlm, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("merged")
    return run_recipe(write_recipe(folder, _recipe(vlm)), folder / "out")


def test_each_module_is_merged_with_its_own_parameters(vlm, merged):
    base, v1, v2 = (load_file(vlm[n] / "model.safetensors") for n in ("base", "variant_1", "variant_2"))
    out = load_file(merged / "model.safetensors")
    assert set(out) == set(base) and "language_model.lm_head.weight" in out
    assert {n.split(".")[0] for n in out} == {"language_model", "vision_tower", "multi_modal_projector"}
    for name, tensor in out.items():
        w1, w2 = _expected_weights(name)
        b = base[name].double()
        expected = b + w1 * (v1[name].double() - b) + w2 * (v2[name].double() - b)
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor.double(), expected, rtol=0, atol=2e-6 * expected.abs().max().item(),
                                   msg=name)


def test_the_output_loads_with_transformers_and_sees_an_image(vlm, merged):
    from transformers import AutoTokenizer, Mistral3ForConditionalGeneration

    model, info = Mistral3ForConditionalGeneration.from_pretrained(merged, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.text_config.num_hidden_layers == TEXT_LAYERS
    tokenizer = AutoTokenizer.from_pretrained(merged)
    image = model.config.image_token_index
    ids = torch.tensor([tokenizer("a photo of").input_ids + [image] * 4])  # 32x32 pixels, 8x8 patches, merged 2x2
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32),
                       image_sizes=torch.tensor([[32, 32]])).logits
    assert logits.shape == (1, ids.shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()


def _slerp64(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """SLERP in float64 from its formula (linear where the vectors are nearly parallel)."""
    x, y = a.double().flatten(), b.double().flatten()
    cos = torch.dot(x / x.norm(), y / y.norm()).clamp(-1, 1).item()
    if abs(cos) > 0.9995:
        return ((1 - t) * x + t * y).reshape(a.shape)
    theta = math.acos(cos)
    return ((math.sin((1 - t) * theta) * x + math.sin(t * theta) * y) / math.sin(theta)).reshape(a.shape)


def test_bfloat16_tied_modules_merge_like_the_formula(vlm_bf16, tmp_path):
    """SLERP with t per module on bfloat16 sources with tied embeddings: every tensor is
    the float64 formula rounded to bfloat16 (up to one unit), and no lm_head appears."""
    text = f"""merge_method: slerp
base_model: {vlm_bf16['base']}
modules:
  text_decoder:
    models: [{{model: {vlm_bf16['variant_1']}}}]
    parameters: {{t: 0.3}}
  vision_tower:
    models: [{{model: {vlm_bf16['variant_1']}}}]
    parameters: {{t: 0.8}}
  multi_modal_projector:
    models: [{{model: {vlm_bf16['variant_1']}}}]
parameters: {{t: 0.6}}
"""
    out = load_file(run_recipe(write_recipe(tmp_path, text), tmp_path / "out") / "model.safetensors")
    base, v1 = (load_file(vlm_bf16[n] / "model.safetensors") for n in ("base", "variant_1"))
    assert set(out) == set(base) and not any("lm_head" in n for n in out)
    for name, tensor in out.items():
        t = 0.3 if name.startswith("language_model.") else 0.8 if name.startswith("vision_tower.") else 0.6
        expected = _slerp64(base[name], v1[name], t)
        assert tensor.dtype == torch.bfloat16
        unit = torch.finfo(torch.bfloat16).eps * expected.abs().max().item()
        assert (tensor.double() - expected).abs().max().item() <= unit, name


def test_models_merge_every_module_and_a_module_may_be_named_default(vlm, llama_family, tmp_path):
    """As mergekit: top-level `models:` merges every module of a VLM alike; a model of one
    module has one, `default`, and `modules: {default: ...}` is its `models:`/`slices:`."""
    linear = (f"merge_method: linear\nmodels:\n  - {{model: {vlm['variant_1']}, parameters: {{weight: 1}}}}\n"
              f"  - {{model: {vlm['variant_2']}, parameters: {{weight: 3}}}}\ndtype: float32\n")
    out = load_file(run_recipe(write_recipe(tmp_path, linear), tmp_path / "vlm") / "model.safetensors")
    v1, v2 = (load_file(vlm[n] / "model.safetensors") for n in ("variant_1", "variant_2"))
    assert set(out) == set(v1)
    for name in out:
        torch.testing.assert_close(out[name], (v1[name] + 3 * v2[name]) / 4)

    slices = ("slices:\n  - sources:\n      - {{model: {a}, layer_range: [0, 2]}}\n"
              "      - {{model: {b}, layer_range: [2, 4]}}\nparameters: {{t: 0.25}}\n")
    slices = slices.format(a=llama_family["variant_1"], b=llama_family["variant_2"])
    head = f"merge_method: slerp\nbase_model: {llama_family['variant_1']}\n"
    module = head + "modules:\n  default:\n" + "".join("    " + line + "\n" for line in slices.splitlines())
    plain = run_recipe(write_recipe(tmp_path, head + slices, "plain.yaml"), tmp_path / "plain")
    as_module = run_recipe(write_recipe(tmp_path, module, "module.yaml"), tmp_path / "module")
    a, b = load_file(plain / "model.safetensors"), load_file(as_module / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


def test_the_dry_run_shows_each_module(vlm, tmp_path, capsys):
    recipe = write_recipe(tmp_path, _recipe(vlm))
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert ("modules: text_decoder (language_model.: 4 layers, 39 tensors), vision_tower (vision_tower.: "
            "2 layers, 20 tensors), multi_modal_projector (multi_modal_projector.: 0 layers, 4 tensors)") in printed
    assert "vision_tower.transformer.layers.1.attention.q_proj.weight [32, 32] float32" in printed
    assert not (tmp_path / "out").exists()


def test_a_module_merge_method_is_ignored_with_a_note_as_mergekit_does(vlm, merged, tmp_path, capsys):
    """mergekit 0.1.5 has one merge_method for all modules and ignores a module's own."""
    text = _recipe(vlm).replace("  vision_tower:\n", "  vision_tower:\n    merge_method: linear\n")
    recipe = write_recipe(tmp_path, text)
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "line 19: modules.vision_tower.merge_method" in err
    assert "mergekit merges every module with the recipe's top-level `merge_method`" in err
    a, b = load_file(merged / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_a_module_base_model_is_ignored_with_a_note_not_taken_for_a_typo():
    """`base_model` is close to the module key `models`, yet it is no typo of it."""
    text = "merge_method: linear\nmodules:\n  default:\n    base_model: x\n    models: [{model: a}]\n"
    with pytest.warns(Warning, match=r"r.yaml, line 4: modules.default.base_model: .* ignored, as mergekit does "
                                     r"\(mergekit takes a module's base from the top-level `base_model`"):
        recipe = parse_recipe(text, "r.yaml")
    assert recipe.base_model is None and recipe.referenced_models() == ["a"]


def test_module_parameters_follow_the_rules_of_the_others():
    """A parameter the method does not take is ignored with a note; a likely typo refused."""
    text = "merge_method: slerp\nbase_model: b\nmodules:\n  default:\n    models: [{model: a}]\n" \
           "    parameters: {t: 0.3, int8_mask: true}\n"
    with pytest.warns(Warning, match=r"line 6: modules.default.parameters.int8_mask: unknown parameter"):
        assert parse_recipe(text, "r.yaml").modules["default"].parameters == {"t": 0.3}
    with pytest.raises(EvomergeError, match=r"line 6: modules.default.parameters.tt: unknown parameter 'tt'; "
                                            r"did you mean 't'\?"):
        parse_recipe(text.replace("t: 0.3", "tt: 0.3, t: 0.3"), "r.yaml")


def _without(source: Path, folder: Path, tensor: str) -> Path:
    shutil.copytree(source, folder)
    state = load_file(folder / "model.safetensors")
    del state[tensor]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _bad_case(name: str, vlm: dict[str, Path], tmp: Path) -> tuple[str, str]:
    """(recipe text, the pattern the error must contain) for one bad input."""
    good = _recipe(vlm)
    if name == "unknown module":
        return good.replace("  vision_tower:", "  vision_towr:"), \
            r"line 18: modules\.vision_towr: model '.*base' has no module 'vision_towr'; did you mean 'vision_tower'\?"
    if name == "module left out":
        start, end = good.index("  multi_modal_projector:"), good.index("dtype:")
        return good[:start] + good[end:], r"line 5: modules: `modules:` leaves out module\(s\) multi_modal_projector"
    if name == "modules and models":
        return good + f"models:\n  - model: {vlm['variant_1']}\n", \
            r"line 1: recipe: give exactly one of `models:`, `slices:` or `modules:`"
    if name == "slices of a VLM":
        return (f"merge_method: passthrough\nslices:\n  - sources:\n      - {{model: {vlm['base']}, "
                "layer_range: [0, 2]}\n"), \
            r"line 2: slices: model '.*base' has 3 modules .*give the layer slices of each under `modules:`"
    if name == "module missing a tensor":
        missing = "vision_tower.transformer.layers.1.attention.q_proj.weight"
        broken = _without(vlm["variant_2"], tmp / "broken", missing)
        return good.replace(str(vlm["variant_2"]), str(broken)), rf"{missing} is missing in model '.*broken'"
    if name == "language model into a VLM":
        mistral = build_family(tmp / "mistral", family="mistral", variants=0)["base"]
        in_text_decoder = "\n            layer_range"
        text = good.replace(f"model: {vlm['variant_2']}{in_text_decoder}", f"model: {mistral}{in_text_decoder}")
        return text, r"different architectures: .*'.*mistral/base' is mistral,.*; a language model cannot be merged"
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["unknown module", "module left out", "modules and models", "slices of a VLM",
                                  "module missing a tensor", "language model into a VLM"])
def test_bad_modules_input_is_one_clear_message_and_no_output(name, vlm, tmp_path, capsys):
    import re

    text, pattern = _bad_case(name, vlm, tmp_path)
    recipe = write_recipe(tmp_path, text)
    capsys.readouterr()  # what building the models printed
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("evomerge: error: ") and "Traceback" not in err
    assert re.search(pattern, err), err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_a_text_model_cannot_have_a_vision_tower(llama_family):
    recipe = parse_recipe(f"merge_method: linear\nmodules:\n  vision_tower:\n    models:\n"
                          f"      - {{model: {llama_family['variant_1']}, parameters: {{weight: 1}}}}\n", "r.yaml")
    from merging.engine import open_models

    with pytest.raises(EvomergeError, match=r"r.yaml, line 3: modules.vision_tower: model .* has no module "
                                            r"'vision_tower'; its modules: default"):
        plan_merge(recipe, open_models(recipe))


MERGEKIT = os.environ.get("MERGEKIT_YAML", "/opt/mergekit-venv/bin/mergekit-yaml")


@pytest.mark.slow
@pytest.mark.skipif(not Path(MERGEKIT).exists(), reason=f"mergekit-yaml not found at {MERGEKIT}")
@pytest.mark.parametrize("dtype, tied", [("float32", []), ("bfloat16", ["--tied"])])
def test_modules_recipes_give_mergekits_tensors(dtype, tied, tmp_path):
    """scripts/mergekit_recipes/modules-*.yaml through mergekit 0.1.5 and evomerge, on the tiny VLM."""
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, str(repo / "scripts" / "compare_mergekit.py"), "--work-dir", str(tmp_path),
         "--mergekit-bin", MERGEKIT, "--family", "mistral3", "--source-dtype", dtype, *tied],
        capture_output=True, text=True, cwd=repo,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count("| match |") >= 2, proc.stdout


def test_a_multi_module_type_without_known_modules_is_refused_by_name():
    """LLaVA: mergekit 0.1.5 has no definition of its modules either (it guesses them from
    tensor-name prefixes, under names like `model.language_model.layers`)."""
    from merging.architecture import model_modules
    from merging.errors import CheckpointError

    config = {"model_type": "llava", "text_config": {"model_type": "llama", "num_hidden_layers": 2},
              "vision_config": {"model_type": "clip_vision_model", "num_hidden_layers": 2}}
    with pytest.raises(CheckpointError, match=r"model_type 'llava' is made of several models \(text_config, "
                                              r"vision_config\) whose modules evomerge does not know; .*mistral3"):
        model_modules(config)


GENOME_TEMPLATE = """\
merge_method: task_arithmetic
base_model: {base}
modules:
  text_decoder:
    models:
      - model: {v1}
        parameters: {{weight: {{free: [0.0, 1.0], init: 0.25}}}}
  vision_tower:
    models:
      - model: {v1}
    parameters: {{weight: {{free: [0.0, 2.0]}}}}
  multi_modal_projector:
    slices:
      - sources:
          - {{model: {base}, layer_range: [0, 0]}}
          - {{model: {v1}, layer_range: [0, 0], parameters: {{weight: {{free: [-1.0, 1.0], init: 0.5}}}}}}
"""


def test_an_evolve_template_may_free_module_parameters():
    """The genome walks modules too: global markers in a module's parameters, its models
    and its slices' sources; a genome decodes into the recipe and encodes back."""
    from niches.genome import RecipeGenome

    genome = RecipeGenome.from_text(GENOME_TEMPLATE.format(base="b", v1="v"), "t.yaml")
    assert genome.labels == ["v:weight@all", "*:weight@all", "v:weight@all"]
    assert genome.x0.tolist() == [0.25, 0.5, 0.75]
    recipe = genome.decode([0.5, 0.25, 1.0])
    assert recipe.modules["text_decoder"].models[0].parameters == {"weight": 0.5}
    assert recipe.modules["vision_tower"].parameters == {"weight": 0.5}
    assert recipe.modules["multi_modal_projector"].slices[0].sources[1].parameters == {"weight": 1.0}
    assert genome.encode(recipe).tolist() == [0.5, 0.25, 1.0]


def test_module_templates_refuse_per_layer_markers_and_evolve_refuses_a_vlm(vlm):
    """Per-layer genes follow one layer layout, which a module does not share; and evolve
    scores language models, so a VLM's layout is refused by name, not by a stack trace."""
    from merging.checkpoint import Checkpoint
    from niches.genome import LayerLayout, RecipeGenome

    text = GENOME_TEMPLATE.format(base="b", v1="v").replace("init: 0.25}", "granularity: layer}")
    with pytest.raises(EvomergeError, match=r"t.yaml, line 7: modules.text_decoder.models\[0\].parameters.weight: "
                                            r"a marker inside `modules:` takes granularity global only"):
        RecipeGenome.from_text(text, "t.yaml")
    with pytest.raises(EvomergeError, match=r"is a mistral3 of several modules \(text_decoder, vision_tower, "
                                            r"multi_modal_projector\); evolve searches recipes of language models"):
        LayerLayout.of(Checkpoint("vlm", vlm["base"]))

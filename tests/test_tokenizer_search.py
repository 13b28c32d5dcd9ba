"""A search scores what it exports, tokenizer included: an `evolve` template with a
`tokenizer:` block (a source other than the template donor, tokens it adds) gives
candidates another vocabulary and another tokenization than the donor's, and the harness
must score them with those (evaluation/harness.py), as `evomerge eval` scores the
exported checkpoint. Model references in the block resolve like the template's others."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from evaluation.harness import Harness
from evaluation.tasks import resolve_task
from niches.config import References
from niches.run import evolve
from tests.test_score_invariant import PPL, with_perplexity_task

TEMPLATE = """\
merge_method: task_arithmetic
base_model: zoo:base
models:
  - model: zoo:lang
    parameters:
      weight: {free: [0.0, 1.2], init: 0.6, granularity: layer}
  - model: zoo:math
    parameters:
      weight: {free: [0.0, 1.2], init: 0.6, granularity: layer}
tokenizer:
  source: zoo:math
  tokens:
    "vona": {source: {kind: model_token, model: zoo:lang, token: "v"}}
    "di": {source: {kind: zero}}
"""
"""`vona` and `di` occur in every math_lang prompt: the exported tokenizer reads each as
one added token, the donor's (zoo:base, character level) as characters."""
SPLIT, LIMIT = "train", 8


def test_a_tokenizer_blocks_models_resolve_like_the_templates_others(micro_zoo, tmp_path):
    references = References(str(micro_zoo[0]), tmp_path)
    data = yaml.safe_load(TEMPLATE.replace("{free: [0.0, 1.2], init: 0.6, granularity: layer}", "1.0"))
    data["tokenizer"]["tokens"]["x"] = {"source": "zoo:math"}
    references.in_template(data)
    math, lang = (references.resolve(f"zoo:{name}") for name in ("math", "lang"))
    assert Path(math).is_dir() and Path(lang).is_dir()
    tokens = data["tokenizer"]["tokens"]
    assert data["tokenizer"]["source"] == math and tokens["x"]["source"] == math
    assert tokens["vona"]["source"]["model"] == lang and tokens["di"]["source"] == {"kind": "zero"}


def test_the_logged_fitness_is_the_exported_models_under_a_tokenizer_block(micro_zoo, tmp_path):
    from transformers import AutoTokenizer

    zoo = with_perplexity_task(micro_zoo[0], tmp_path / "micro")
    (tmp_path / "template.yaml").write_text(TEMPLATE)
    config = tmp_path / "config.yaml"
    config.write_text(f"""\
method: ps
zoo: {zoo}
models: [zoo:lang, zoo:math]
fitness: {{tasks: [{PPL}], split: {SPLIT}, limit: {LIMIT}}}
report: {{tasks: [math_lang], split: test, limit: 4}}
ps: {{template: template.yaml, optimizer: {{max_evals: 3, popsize: 3}}}}
device: cpu
threads: 1
""")
    results = evolve(config, tmp_path / "run", progress=False)
    best = tmp_path / "run" / "best"
    # the situation is real: the exported tokenizer reads the prompts otherwise than the donor's
    exported, donor = AutoTokenizer.from_pretrained(best), AutoTokenizer.from_pretrained(zoo / "models" / "base")
    assert exported.convert_tokens_to_ids("vona") == len(donor) and len(exported) == len(donor) + 2
    prompt = json.loads((zoo / "data" / "math_lang" / "train.jsonl").open().readline())["prompt"]
    assert len(exported(prompt)["input_ids"]) < len(donor(prompt)["input_ids"])
    assert json.loads((best / "config.json").read_text())["vocab_size"] == len(exported)
    # the run's recipe names the models as the template does
    recipe = yaml.safe_load((best / "recipe.yaml").read_text())
    assert recipe["tokenizer"]["source"] == "zoo:math"
    assert recipe["tokenizer"]["tokens"]["vona"]["source"]["model"] == "zoo:lang"
    task = resolve_task(PPL, zoo_dir=zoo, split=SPLIT)
    measured = Harness(best, device="cpu").score_resident([task], limit=LIMIT)[PPL].mean
    assert measured == results["stages"]["ps"]["best_fitness"]

#!/usr/bin/env bash
# What evomerge is for, in about 3 minutes on 2 cores: build the micro zoo (a tiny base
# and its math and lang fine-tunes, trained here), evolve a merge of math and lang with
# CMA-ES on math_lang (math asked in Lang, which neither parent solves), and print the
# evolved merge's test scores beside its parents'. The run lands in ./demo (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TRANSFORMERS_VERBOSITY=error
ZOO=${EVOMERGE_ZOO:-$HOME/.cache/evomerge/zoo}/micro  # where `evomerge zoo build --size micro` writes

echo
if [ -f "$ZOO/zoo.json" ]; then
    echo "== 1/2 the micro zoo is built: $ZOO"
else
    echo "== 1/2 building the micro zoo in $ZOO (1-2 minutes, once)"
    evomerge zoo build --size micro
fi

echo
echo "== 2/2 evolving a DARE-TIES merge of zoo:lang and zoo:math on math_lang (recipes/demo-evolve.yaml)"
rm -rf demo/evolve
evomerge evolve recipes/demo-evolve.yaml --run-dir demo/evolve

cat <<DONE

The evolved merge is a plain Hugging Face checkpoint:
  checkpoint    demo/evolve/best/      (AutoModelForCausalLM.from_pretrained loads it)
  model card    demo/evolve/best/README.md   (recipe, lineage, the scores above)
  recipe        demo/evolve/best/recipe.yaml (evomerge merge demo/evolve/best/recipe.yaml OUT_DIR --zoo micro remakes it)
  fitness plot  demo/evolve/plots/fitness.png
  every scored candidate: demo/evolve/candidates.jsonl
DONE

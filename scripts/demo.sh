#!/usr/bin/env bash
# Set up, build small checkpoints offline, merge them with TIES, load the result with
# transformers and generate. Everything lands in ./demo (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PYTHON=${PYTHON:-python3}
"$PYTHON" -m merging.synthetic demo/models --family llama --variants 2 --seed 0
evomerge merge recipes/demo-ties.yaml demo/merged --dry-run | head -n 8
evomerge merge recipes/demo-ties.yaml demo/merged --overwrite
"$PYTHON" - <<'PY'
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("demo/merged")
tokenizer = AutoTokenizer.from_pretrained("demo/merged")
inputs = tokenizer("Model merging", return_tensors="pt")
logits = model(**inputs).logits
assert torch.isfinite(logits).all()
out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
print("merged model loads; logits", tuple(logits.shape), "finite; generates:",
      repr(tokenizer.decode(out[0])))
PY

"""Loads a ulysses export with whichever transformers this python has; prints one JSON line:
the transformers version, the safetensors files' metadata, and the logits of a few tokens.
    python tests/compat/load_export.py MODEL_DIR"""
import json
import pathlib
import sys

import torch
import transformers
from safetensors import safe_open

model_dir = pathlib.Path(sys.argv[1])
metadata = {}
for f in sorted(model_dir.glob("*.safetensors")):
    with safe_open(str(f), framework="pt") as st:
        metadata[f.name] = st.metadata()
model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
ids = torch.tensor([[1, 5, 9, 42, 7, 3, 100, 200]])
with torch.no_grad():
    logits = model(ids).logits[0]
print(json.dumps({"version": transformers.__version__, "metadata": metadata, "logits": logits.flatten().tolist()}))

"""peft references for the ulysses LoRA tests (tests/lora_peft.rs), on the tiny models of
make_tiny_models.py.

  peft_lora.py make MODEL OUT SEED [FULL]
      wrap MODEL with peft's LoRA (r = 4, alpha = 8, every q/k/v/o/gate/up/down projection; FULL
      = comma-separated modules_to_save, e.g. lm_head), give A and B random values (peft starts B
      at zero, where the adapters' gradients and any mistake in them would vanish), save the adapter
      to OUT/adapter, then run one fp32 forward and backward with labels = ids and write the loss
      and every trainable gradient (peft's saved key names) to OUT/grads.safetensors, ids too
  peft_lora.py logits MODEL ADAPTER IDS OUT
      PeftModel.from_pretrained(MODEL, ADAPTER): logits for IDS into OUT
  peft_lora.py merge MODEL ADAPTER OUT
      merge_and_unload(): every weight of the merged model into OUT

Exits non-zero with a message on any problem, so the Rust tests fail instead of skipping.
"""
import json
import os
import sys

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


def make(model_dir, out, seed, full=""):
    model = base(model_dir)
    modules = [m for m in full.split(",") if m] or None
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, modules_to_save=modules)
    peft_model = get_peft_model(model, config)
    torch.manual_seed(int(seed))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.3)
    peft_model.save_pretrained(os.path.join(out, "adapter"))
    ref = load_file(os.path.join(model_dir, "reference.safetensors"))
    ids = ref["ids"]
    res = peft_model(input_ids=ids, labels=ids)
    res.loss.backward()
    # The gradients under the names peft saves the parameters with.
    saved = get_peft_model_state_dict(peft_model)
    by_param = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    grads = {}
    for key in saved:
        match = [n for n in by_param if n.replace(".default", "").replace(".modules_to_save", "") == key]
        if len(match) != 1:
            sys.exit(f"cannot match saved key {key} to one parameter: {match}")
        grads[key] = by_param[match[0]].grad.float().contiguous()
    grads["loss"] = res.loss.detach().float().reshape(1)
    grads["ids"] = ids
    save_file(grads, os.path.join(out, "grads.safetensors"))
    print(json.dumps({"loss": res.loss.item(), "keys": sorted(saved)[:4], "n": len(saved)}))


def logits(model_dir, adapter, ids_file, out):
    model = PeftModel.from_pretrained(base(model_dir), adapter).eval()
    ids = load_file(ids_file)["ids"]
    with torch.no_grad():
        res = model(input_ids=ids)
    save_file({"logits": res.logits.float().contiguous()}, out)


def merge(model_dir, adapter, out):
    model = PeftModel.from_pretrained(base(model_dir), adapter).merge_and_unload()
    save_file({n: t.float().contiguous() for n, t in model.state_dict().items()}, out)


def main():
    a = sys.argv[1:]
    if a[:1] == ["make"] and len(a) in (4, 5):
        make(*a[1:])
    elif a[:1] == ["logits"] and len(a) == 5:
        logits(*a[1:])
    elif a[:1] == ["merge"] and len(a) == 4:
        merge(*a[1:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()

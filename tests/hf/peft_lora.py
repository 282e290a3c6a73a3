"""peft references for the ulysses LoRA tests (tests/lora_peft.rs), on the tiny models of
make_tiny_models.py.

  peft_lora.py make MODEL OUT SEED [FULL]
      wrap MODEL with peft's LoRA (r = 4, alpha = 8, every q/k/v/o/gate/up/down projection; FULL
      = comma-separated modules_to_save, e.g. lm_head), give A and B random values (peft starts B
      at zero, where the adapters' gradients and any mistake in them would vanish), save the adapter
      to OUT/adapter, then run one fp32 forward and backward with labels = ids and write the loss
      and every trainable gradient (peft's saved key names) to OUT/grads.safetensors, ids too
  peft_lora.py make-dropout MODEL OUT SEED P RUN_SEED STEP
      as make, with lora_dropout = P in training, each adapter's dropout module replaced by one that
      draws ulysses' mask (src/model/dropout.rs, reimplemented here from its documented formula)
      for a run seeded RUN_SEED at optimizer step STEP, the batch's rows being samples 0, 1, ..
  peft_lora.py logits MODEL ADAPTER IDS OUT
      PeftModel.from_pretrained(MODEL, ADAPTER): logits for IDS into OUT
  peft_lora.py load MODEL ADAPTER SHARD OUT
      the same for every sequence of the HDF5 token SHARD (a ulysses run's final/ in
      tests/lora_outputs.rs), with the loss for labels = ids (transformers shifts them): ids,
      logits and loss into OUT, the loss printed
  peft_lora.py merge MODEL ADAPTER OUT
      merge_and_unload(): every weight of the merged model into OUT

Loading an adapter fails on any warning about missing or unexpected keys.

Exits non-zero with a message on any problem, so the Rust tests fail instead of skipping.
"""
import json
import math
import os
import re
import sys
import warnings

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


M32 = 0xFFFFFFFF
M64 = (1 << 64) - 1
# src/model/dropout.rs: DOMAIN, hash32's multipliers and the projections' order.
DOMAIN = 0x4C6F52412044726F
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def splitmix64(x):
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def hash32(x):
    """On int64 tensors of values in [0, 2^32): exact, the multipliers are below 2^31."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & M32
    return x ^ (x >> 16)


def dropped(run_seed, step, layer, projection, samples, positions, features, p):
    """ulysses' LoRA dropout mask: which elements of the input [rows, positions, features] drop."""
    h = splitmix64(run_seed ^ DOMAIN)
    for v in (step, layer, PROJECTIONS.index(projection)):
        h = splitmix64(h ^ v)
    rows = torch.tensor([splitmix64(h ^ s) & M32 for s in samples], dtype=torch.int64)
    tokens = hash32(rows[:, None] ^ positions[None, :])
    feats = hash32(torch.arange(features, dtype=torch.int64) ^ (h >> 32))
    return hash32(tokens[:, :, None] ^ feats) < int(math.floor(p * 2**32 + 0.5))


class UlyssesDropout(torch.nn.Module):
    """PEFT's lora_dropout module with ulysses' mask: zero where dropped, the rest scaled 1/(1-p)."""

    def __init__(self, p, run_seed, step, layer, projection):
        super().__init__()
        self.p, self.key = p, (run_seed, step, layer, projection)

    def forward(self, x):
        if not self.training:
            return x
        b, s, f = x.shape
        mask = dropped(*self.key, list(range(b)), torch.arange(s, dtype=torch.int64), f, self.p)
        return x.masked_fill(mask, 0.0) * (1.0 / (1.0 - self.p))


def with_ulysses_dropout(peft_model, p, run_seed, step):
    """Replaces every adapter's dropout module (nn.Dropout(p)) by UlyssesDropout; returns how many."""
    n = 0
    for name, module in peft_model.named_modules():
        match = re.search(r"layers\.(\d+)\.\w+\.(\w+_proj)\.lora_dropout$", name)
        if match:
            if not isinstance(module["default"], torch.nn.Dropout) or module["default"].p != p:
                sys.exit(f"{name}: expected peft's nn.Dropout({p}), found {module['default']}")
            module["default"] = UlyssesDropout(p, run_seed, step, int(match[1]), match[2])
            n += 1
    return n


def make(model_dir, out, seed, full="", dropout=None):
    model = base(model_dir)
    modules = [m for m in full.split(",") if m] or None
    p = float(dropout[0]) if dropout else 0.0
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=TARGETS, modules_to_save=modules)
    peft_model = get_peft_model(model, config)
    if dropout:
        replaced = with_ulysses_dropout(peft_model, p, int(dropout[1]), int(dropout[2]))
        if replaced != len(TARGETS) * model.config.num_hidden_layers:
            sys.exit(f"replaced {replaced} dropout modules")
        peft_model.train()
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


def peft_model(model_dir, adapter):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base(model_dir), adapter).eval()
    about_keys = [str(w.message) for w in caught if "key" in str(w.message).lower()]
    if about_keys:
        sys.exit(f"peft loaded {adapter} with warnings: {about_keys}")
    # peft passes over tensors of the file that the model has no place for: none may be left out.
    saved = set(load_file(os.path.join(adapter, "adapter_model.safetensors")))
    loaded = set(get_peft_model_state_dict(model))
    if saved != loaded:
        sys.exit(f"{adapter}: peft did not load {sorted(saved - loaded)}; it lacks {sorted(loaded - saved)}")
    return model


def logits(model_dir, adapter, ids_file, out):
    model = peft_model(model_dir, adapter)
    ids = load_file(ids_file)["ids"]
    with torch.no_grad():
        res = model(input_ids=ids)
    save_file({"logits": res.logits.float().contiguous()}, out)


def load(model_dir, adapter, shard, out):
    import h5py
    model = peft_model(model_dir, adapter)
    with h5py.File(shard, "r") as f:
        ids = torch.from_numpy(f["tokens"][:].astype("int64"))
    with torch.no_grad():
        res = model(input_ids=ids, labels=ids)
    save_file({"ids": ids, "logits": res.logits.float().contiguous(), "loss": res.loss.float().reshape(1)}, out)
    print(json.dumps({"loss": res.loss.item(), "sequences": ids.shape[0]}))


def merge(model_dir, adapter, out):
    model = peft_model(model_dir, adapter).merge_and_unload()
    # A tied head shares the embedding's storage, which safetensors refuses: copies.
    save_file({n: t.float().contiguous().clone() for n, t in model.state_dict().items()}, out)


def main():
    a = sys.argv[1:]
    if a[:1] == ["make"] and len(a) in (4, 5):
        make(*a[1:])
    elif a[:1] == ["make-dropout"] and len(a) == 7:
        make(*a[1:4], dropout=a[4:])
    elif a[:1] == ["logits"] and len(a) == 5:
        logits(*a[1:])
    elif a[:1] == ["load"] and len(a) == 5:
        load(*a[1:])
    elif a[:1] == ["merge"] and len(a) == 4:
        merge(*a[1:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()

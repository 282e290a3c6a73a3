"""Hugging Face reference for the ulysses Llama parity test (tests/model_hf_parity.rs).

  make_tiny_llama.py make OUT      build tiny random LlamaForCausalLM models (OUT/untied, OUT/tied),
                                   save them sharded, write OUT/<variant>/reference.safetensors
                                   (ids, logits, loss) from transformers' own forward
  make_tiny_llama.py logits MODEL IDS OUT
                                   load MODEL with from_pretrained (failing on any missing or
                                   unexpected tensor) and write its logits for IDS, and its loss
                                   with IDS as labels, to OUT

Exits non-zero with a message on any problem, so the Rust test fails instead of skipping.
"""
import json
import math
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

BATCH, SEQ = 2, 70


def config(tied: bool) -> LlamaConfig:
    # original_max_position_embeddings = 64 puts the three head_dim=16 frequencies that matter in
    # all three llama3 regimes (wavelength 6.3 kept, 32.5 smoothed, >= 168 divided by `factor`),
    # and SEQ = 70 runs past it.
    return LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        max_position_embeddings=128,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        tie_word_embeddings=tied,
        attn_implementation="eager",
        bos_token_id=1,
        eos_token_id=2,
    )


def build(tied: bool, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config(tied)).float().eval()
    # HF's init (std 0.02, norms 1) gives near-zero logits, where any bug hides under the tolerance.
    # Scale weights so activations are O(1), and make norm weights differ from 1 so a mixed-up
    # norm is visible.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "embed_tokens" in name and not tied:
                p.normal_(0.0, 1.0)
            else:
                # Also the tied embedding, which as LM head must keep the logits O(1).
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
    return model


def make(out: str) -> None:
    for variant, tied, seed in (("untied", False, 1), ("tied", True, 2)):
        model = build(tied, seed)
        d = os.path.join(out, variant)
        # ~100 KB shards: the untied model (~500 KB of fp32) gets several shards and an index.
        model.save_pretrained(d, safe_serialization=True, max_shard_size="100KB")
        if not os.path.exists(os.path.join(d, "model.safetensors.index.json")):
            sys.exit(f"expected a sharded checkpoint in {d}: {sorted(os.listdir(d))}")
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=g)
        with torch.no_grad():
            res = model(input_ids=ids, labels=ids)
        save_file(
            {"ids": ids, "logits": res.logits.float().contiguous(), "loss": res.loss.float().reshape(1)},
            os.path.join(d, "reference.safetensors"),
        )
        print(json.dumps({"variant": variant, "dir": d, "files": sorted(os.listdir(d)), "loss": res.loss.item()}))


def logits(model_dir: str, ids_file: str, out: str) -> None:
    model, info = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    if bad:
        sys.exit(f"transformers loaded {model_dir} with problems: {bad}")
    model.eval()
    ids = load_file(ids_file)["ids"]
    with torch.no_grad():
        res = model(input_ids=ids, labels=ids)
    save_file({"logits": res.logits.float().contiguous(), "loss": res.loss.float().reshape(1)}, out)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "make":
        make(sys.argv[2])
    elif len(sys.argv) == 5 and sys.argv[1] == "logits":
        logits(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()

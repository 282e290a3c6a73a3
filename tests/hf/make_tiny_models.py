"""Hugging Face references for the ulysses parity and family tests (tests/model_hf_parity.rs,
tests/model_families.rs): tiny random models built by transformers, one per family and variant.

  make_tiny_models.py make OUT     build every variant in OUT/<variant>/ (config.json, safetensors,
                                   tokenizer files, generation_config.json, written by
                                   save_pretrained) and OUT/<variant>/reference.safetensors (ids,
                                   logits, loss) from transformers' own forward
  make_tiny_models.py logits MODEL IDS OUT [MODEL IDS OUT ...]
                                   load each MODEL with AutoModelForCausalLM (failing on any missing
                                   or unexpected tensor) and write its logits for IDS, and its loss
                                   with labels = IDS, to OUT
  make_tiny_models.py tokenizer MODEL
                                   load MODEL's tokenizer with AutoTokenizer, check that it
                                   round-trips a text, and print what it is as JSON
  make_tiny_models.py masked_loss MODEL SHARD
                                   load MODEL with AutoModelForCausalLM and print, as JSON, its
                                   loss on every sequence of the ulysses shard SHARD (h5py) as one
                                   batch, with labels = the tokens its `loss_mask` trains, -100
                                   elsewhere (transformers shifts them itself)

Exits non-zero with a message on any problem, so the Rust tests fail instead of skipping.
"""
import json
import math
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MistralConfig,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen3Config)

BATCH, SEQ = 2, 70
VOCAB = 300
TEXT = ("The quick brown fox jumps over the lazy dog. Long contexts need rotary positions that "
        "stretch; sequence parallelism splits them over ranks, and the heads come back together. ")

# Shared tiny dimensions: 4 query heads, 2 KV heads (so sp = 4 replicates KV heads), 2 layers.
DIMS = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            attn_implementation="eager", bos_token_id=299, eos_token_id=298)

# original_max_position_embeddings = 64 puts the three head_dim=16 frequencies that matter in all
# three llama3 regimes (wavelength 6.3 kept, 32.5 smoothed, >= 168 divided by `factor`), and
# SEQ = 70 runs past it.
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
# YaRN over an original context of 32, SEQ = 70 past it: with head_dim 24 the truncated correction
# range is dims [0, 2] of 12 (dim 1 half interpolated, dims 2.. divided by `factor`), and the
# attention factor is 0.1 ln 4 + 1.
YARN = {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 32}
# Qwen2.5's long-context recipe with the knobs that change the result set: untruncated, the ramp
# runs from dim 0.54 to 1.75 of 8 (head_dim 16), so dim 1 is interpolated by 0.38.
YARN_QWEN2 = {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 2.0, "original_max_position_embeddings": 64,
              "beta_fast": 4.0, "beta_slow": 0.5, "truncate": False}
LINEAR = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
DEFAULT_1M = {"rope_type": "default", "rope_theta": 1000000.0}

# variant: (config, tied, seed). Together: every family, tied and untied, each rope scaling,
# biases on q/k/v (Qwen2) and on q/k/v/o (attention_bias), head_dim independent of hidden/heads.
VARIANTS = {
    "untied": (lambda: LlamaConfig(**DIMS, head_dim=16, rms_norm_eps=1e-5, rope_parameters=LLAMA3), False, 1),
    "tied": (lambda: LlamaConfig(**DIMS, head_dim=16, rms_norm_eps=1e-5, rope_parameters=LLAMA3), True, 2),
    "llama-bias": (lambda: LlamaConfig(**DIMS, head_dim=16, attention_bias=True, rope_parameters=LINEAR), False, 3),
    "qwen3": (lambda: Qwen3Config(**DIMS, head_dim=24, rope_parameters=DEFAULT_1M), False, 4),
    "qwen3-yarn": (lambda: Qwen3Config(**DIMS, head_dim=24, rope_parameters=YARN), True, 5),
    "qwen2": (lambda: Qwen2Config(**DIMS, rope_parameters=YARN_QWEN2), True, 6),
    "mistral": (lambda: MistralConfig(**DIMS, head_dim=16, sliding_window=None, rope_parameters=DEFAULT_1M),
                False, 7),
}


def build(variant: str):
    make_config, tied, seed = VARIANTS[variant]
    config = make_config()
    config.tie_word_embeddings = tied
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    # HF's init (std 0.02, norms 1, biases 0) gives near-zero logits, where any bug hides under the
    # tolerance. Scale weights so activations are O(1), make norm weights differ from 1 and biases
    # from 0 so a mixed-up norm or a missing bias is visible.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
            elif "embed_tokens" in name and not tied:
                p.normal_(0.0, 1.0)
            else:
                # Also the tied embedding, which as LM head must keep the logits O(1).
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
    return model


def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE of VOCAB tokens trained on TEXT: ids 0..255 bytes, then the specials."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 2, special_tokens=[], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([TEXT] * 4, trainer)
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|im_start|>")


def make(out: str) -> None:
    tok = tokenizer()
    if len(tok) > VOCAB:
        sys.exit(f"the tokenizer has {len(tok)} tokens, more than the models' {VOCAB}")
    for variant in VARIANTS:
        model = build(variant)
        d = os.path.join(out, variant)
        # ~100 KB shards: the untied models (~500 KB of fp32) get several shards and an index.
        model.save_pretrained(d, safe_serialization=True, max_shard_size="100KB")
        tok.save_pretrained(d)
        if variant == "untied" and not os.path.exists(os.path.join(d, "model.safetensors.index.json")):
            sys.exit(f"expected a sharded checkpoint in {d}: {sorted(os.listdir(d))}")
        g = torch.Generator().manual_seed(VARIANTS[variant][2])
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
        with torch.no_grad():
            res = model(input_ids=ids, labels=ids)
        save_file(
            {"ids": ids, "logits": res.logits.float().contiguous(), "loss": res.loss.float().reshape(1)},
            os.path.join(d, "reference.safetensors"),
        )
        print(json.dumps({"variant": variant, "dir": d, "files": sorted(os.listdir(d)), "loss": res.loss.item()}))


def logits(model_dir: str, ids_file: str, out: str) -> None:
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    if bad:
        sys.exit(f"transformers loaded {model_dir} with problems: {bad}")
    model.eval()
    ids = load_file(ids_file)["ids"]
    with torch.no_grad():
        res = model(input_ids=ids, labels=ids)
    save_file({"logits": res.logits.float().contiguous(), "loss": res.loss.float().reshape(1)}, out)
    print(json.dumps({"class": type(model).__name__, "loss": res.loss.item()}))


def check_tokenizer(model_dir: str) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(TEXT)["input_ids"]
    back = tok.decode(ids)
    if back != TEXT:
        sys.exit(f"{model_dir}: the tokenizer does not round-trip: {back!r}")
    config = AutoConfig.from_pretrained(model_dir)
    print(json.dumps({"class": type(tok).__name__, "tokens": len(ids), "eos": tok.eos_token,
                      "model_type": config.model_type, "files": sorted(os.listdir(model_dir))}))


def masked_loss(model_dir: str, shard: str) -> None:
    import h5py
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with h5py.File(shard, "r") as f:
        ids = torch.from_numpy(f["tokens"][:].astype("int64"))
        mask = torch.from_numpy(f["loss_mask"][:].astype("bool"))
    labels = torch.where(mask, ids, torch.full_like(ids, -100))
    with torch.no_grad():
        res = model(input_ids=ids, labels=labels)
    print(json.dumps({"loss": res.loss.item(), "trained": int(mask[:, 1:].sum())}))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "make":
        make(sys.argv[2])
    elif len(sys.argv) >= 5 and len(sys.argv) % 3 == 2 and sys.argv[1] == "logits":
        for i in range(2, len(sys.argv), 3):
            logits(*sys.argv[i:i + 3])
    elif len(sys.argv) == 3 and sys.argv[1] == "tokenizer":
        check_tokenizer(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "masked_loss":
        masked_loss(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()

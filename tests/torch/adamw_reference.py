"""torch.optim.AdamW on the inputs the Rust test wrote: initial parameters and per-step gradients
and learning rates; weight decay on matrices only (ulysses' rule). Writes the final parameters."""
import json
import sys

import torch
from safetensors.torch import load_file, save_file

d = sys.argv[1]
cfg = json.load(open(f"{d}/config.json"))
init = load_file(f"{d}/init.safetensors")
params = {k: torch.nn.Parameter(v.clone()) for k, v in init.items()}
groups = [
    {"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": cfg["weight_decay"]},
    {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0},
]
opt = torch.optim.AdamW(groups, lr=cfg["lrs"][0], betas=(cfg["beta1"], cfg["beta2"]), eps=cfg["eps"], foreach=False)
for step, lr in enumerate(cfg["lrs"], 1):
    grads = load_file(f"{d}/grads-{step}.safetensors")
    for k, p in params.items():
        p.grad = grads[k].clone()
    for g in opt.param_groups:
        g["lr"] = lr
    opt.step()
save_file({k: p.detach().contiguous() for k, p in params.items()}, f"{d}/torch_final.safetensors")

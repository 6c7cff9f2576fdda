"""Kernel budget of one DiT block: ATen ops and weight dequantizations per block call, on the meta device (no memory,
no compute, any size), with the chunking the memory plan picks for a card of the given memory.

A GPU runs each ATen op as one or more kernels, and below a few microseconds of work a kernel costs its launch: a
14B step of ~600k launches is CPU-bound on an H100 (issue 21). This counts what the model code asks for; it is not a
timing. Counted: every op dispatched, less the views (view, reshape as view, expand, slice, select, transpose,
unflatten: metadata only, no kernel); dequantize: calls of QuantLinear.rows (each one dequantizes a weight or a slice).

    .venv/bin/python bench/ops.py --model 14b --tokens 20280 --device-memory 24GB
    .venv/bin/python bench/ops.py --model 1.3b --tokens 20280 --device-memory 8GB --recipe hybrid

Prints the plan's choice (resident or streamed, the chunking), then ``ops per block: N`` and
``dequantize per block: M`` (and how many quantized layers the block's forward uses, the floor for M).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cinecli.core.limits import LIMITS  # noqa: E402
from cinecli.core.sizes import human_bytes, parse_size  # noqa: E402
from cinecli.generate.pipeline import chunking_for  # noqa: E402
from cinecli.models import quant  # noqa: E402
from cinecli.models.load import build_empty  # noqa: E402
from cinecli.models.recipes import get_recipe  # noqa: E402
from cinecli.models.wan_dit import DIT_CONFIGS, Chunking, WanDiT  # noqa: E402
from cinecli.plan.inputs import dit_sizes, image_encoder_params, text_encoder_params, vae_params  # noqa: E402
from cinecli.plan.memory import Job, Machine, NoFit, make_plan  # noqa: E402

CONFIGS = {"1.3b": "wan2.1-fun-1.3b-inp", "14b": "wan2.1-i2v-14b"}
TOKENS_PER_LATENT_FRAME = 30 * 52  # 480p (832×480 → 52×30 patches)
VIEWS = {"view", "_unsafe_view", "expand", "slice", "select", "transpose", "t", "unsqueeze", "squeeze", "permute",
         "alias", "detach", "split", "unbind", "as_strided", "_reshape_alias", "view_as_real", "unflatten"}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name().split("::")[-1].split(".")[0]
        if name not in VIEWS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def plan_for(model: str, tokens: int, memory: int, recipe: str):
    frames = 4 * (max(1, -(-tokens // TOKENS_PER_LATENT_FRAME)) - 1) + 1
    job = Job(dit=dit_sizes(CONFIGS[model]), frames=frames, width=832, height=480, steps=4,
              text_encoder_bytes=text_encoder_params(None) * 2, image_encoder_bytes=image_encoder_params(None) * 2,
              vae_bytes=vae_params(None) * 4, default_recipe=recipe, pinned_recipe=recipe, prompt_cached=True)
    return make_plan(job, Machine("cuda", memory, 64 << 30))


def count(model: str, tokens: int, recipe: str, chunking: Chunking) -> tuple[Counter, int, int]:
    cfg = replace(DIT_CONFIGS[CONFIGS[model]], num_layers=1)
    model_ = build_empty(lambda: WanDiT(cfg)).to(torch.bfloat16)
    if recipe != "none":  # the recipe names layers by their place in the whole model
        quant.swap_in(model_, get_recipe(recipe).plan(model_), meta=True)
    block = model_.blocks[0]
    quantized = [m for m in block.modules() if isinstance(m, quant.QuantLinear)]
    dequantized = []
    rows = quant.QuantLinear.rows
    quant.QuantLinear.rows = lambda self, r0, r1, dtype: dequantized.append(self) or rows(self, r0, r1, dtype)
    meta = dict(device="meta")
    x, e0 = torch.empty(1, tokens, cfg.dim, **meta), torch.empty(1, 6, cfg.dim, **meta)
    kv = tuple(torch.empty(1, cfg.num_heads, n, cfg.head_dim, dtype=torch.bfloat16, **meta) for n in (65, 65, 257, 257))
    rope = (torch.empty(tokens, 1, cfg.head_dim // 2, **meta), torch.empty(tokens, 1, cfg.head_dim // 2, **meta))
    try:
        with torch.no_grad(), OpCounter() as counter:
            block(x, e0, kv, rope, torch.bfloat16, None, chunking)
    finally:
        quant.QuantLinear.rows = rows
    used = len({id(m) for m in dequantized})
    return counter.ops, len(dequantized), used if quantized else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(CONFIGS), default="14b")
    ap.add_argument("--tokens", type=int, default=20280)
    ap.add_argument("--device-memory", default="24GB", help="the card's free memory (8GB, 24GB, 80GB)")
    ap.add_argument("--recipe", default="hybrid", help="none, fp8, hybrid, compact")
    ap.add_argument("--chunking", default="plan", choices=["plan", "whole", "held", "chunked"],
                    help="the plan's choice, or force one (chunked is the CPU's, and what every device ran before)")
    args = ap.parse_args()
    memory = parse_size(args.device_memory)
    try:
        plan = plan_for(args.model, args.tokens, memory, args.recipe)
        choice = plan.chunking
        where = f"plan on {args.device_memory}: DiT {plan.quantize} {plan.dit}, chunking {choice}, peak {human_bytes(plan.peak())}"
    except NoFit as exc:
        choice = "chunked"
        where = f"plan on {args.device_memory}: does not fit ({exc.stage} needs {human_bytes(exc.needed)}); counting chunked"
    if args.chunking != "plan":
        choice = args.chunking
        where += f"; forced {choice}"
    chunking = chunking_for(choice, Chunking.for_device(LIMITS["cuda"]))
    ops, dequantized, used = count(args.model, args.tokens, args.recipe, chunking)
    print(f"{args.model} {args.recipe}, {args.tokens} tokens; {where}")
    print("top ops: " + ", ".join(f"{name} {n}" for name, n in ops.most_common(6)))
    print(f"quantized layers the block's forward uses: {used}")
    print(f"ops per block: {sum(ops.values())}")
    print(f"dequantize per block: {dequantized}")


if __name__ == "__main__":
    main()

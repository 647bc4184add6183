"""Paired: one training step's forward + backward in fp32 against bf16 autocast, on the CPU.

    python bench/bf16_cpu.py --recipe edgerank-smollm2-rerank --batches 6

For each of the recipe's first micro-batches, on the same (untrained) weights, it runs the
step both ways, alternating which goes first, and reports the two losses, the cosine
similarity and relative norm of the bf16 gradient against the fp32 one, and the time of
each. No optimizer step is taken, so every pair sees identical weights. The times are of
forward + backward alone, in one process that switches precision every step; a whole
training run's step time is the training log's (RESULTS §11.1 has both).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

from edgerank.data.training import read_groups
from edgerank.train.trainer import _batch, _loss, _trainable_model, cpu_has_native_bf16
from edgerank.train.recipes import recipe_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="edgerank-smollm2-rerank", help="whose config and data to use")
    ap.add_argument("--batches", type=int, default=6, help="micro-batches to time (each both ways)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()

    cfg = recipe_config(args.recipe, {"device": "cpu", "out": "unused"})
    torch.manual_seed(cfg.seed)
    backend, _, params = _trainable_model(cfg)
    spec = backend.spec.with_max_length(cfg.max_length)
    backend.model.train()
    groups = read_groups(cfg.data)
    configs = {p: dataclasses.replace(cfg, precision=p) for p in ("fp32", "bf16")}

    def step(precision: str, batch) -> tuple[float, float, torch.Tensor]:
        for p in params:
            p.grad = None
        t = time.perf_counter()
        loss = _loss(backend, spec, batch, configs[precision])
        loss.backward()
        seconds = time.perf_counter() - t
        return seconds, float(loss.detach()), torch.cat([p.grad.reshape(-1) for p in params])

    rows = []
    for i in range(args.batches):
        batch = _batch(groups, cfg, i)
        order = ("fp32", "bf16") if i % 2 == 0 else ("bf16", "fp32")
        got = {p: step(p, batch) for p in order}
        g32, g16 = got["fp32"][2].double(), got["bf16"][2].double()  # 135 M terms: sum in float64
        rows.append({"batch": i, "first": order[0], "fp32_s": got["fp32"][0], "bf16_s": got["bf16"][0],
                     "ratio": got["bf16"][0] / got["fp32"][0], "loss_fp32": got["fp32"][1],
                     "loss_bf16": got["bf16"][1],
                     "grad_cosine": float(g32 @ g16 / (g32.norm() * g16.norm())),
                     "grad_norm_ratio": float(g16.norm() / g32.norm())})
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True)
    timed = rows[1:] if len(rows) > 1 else rows  # batch 0 warms both up
    summary = {"native_bf16": cpu_has_native_bf16(), "cpu": torch.cpu.get_capabilities().get("cpu_name"),
               "threads": torch.get_num_threads(),
               "median_fp32_s": statistics.median(r["fp32_s"] for r in timed),
               "median_bf16_s": statistics.median(r["bf16_s"] for r in timed),
               "median_ratio": statistics.median(r["ratio"] for r in timed),
               "min_grad_cosine": min(r["grad_cosine"] for r in rows),
               "max_loss_diff": max(abs(r["loss_fp32"] - r["loss_bf16"]) for r in rows)}
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "rows": rows, "recipe": args.recipe}, f, indent=1)


if __name__ == "__main__":
    main()

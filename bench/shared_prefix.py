"""The shared template prefix on the torch reference path, paired: full pairs against a
query's prefix computed once and attended to by every candidate.

    python bench/shared_prefix.py score --model edgerank-smollm2-rerank --queries 10 --depth 40
    python bench/shared_prefix.py train --data GROUPS.jsonl --batches 6

``score``: ``ReferenceBackend.score`` on DL19 queries, once on the encoded batch and once
with its ``prefix_len`` set to 0 (which runs every pair in full), the order alternating per
query. ``train``: one training step's forward and backward (the all-layer LoRA r6 setting
with ``layer_weight`` readouts from depth 0.3, 4 queries x 8 candidates, 160 tokens) on
the same micro-batches, both ways. Printed: seconds per query or step, the median of the
per-item ratios shared/full, and the largest score difference (``score``).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from edgerank.runtime.backends.reference import ReferenceBackend
from edgerank.bench.runner import DL19, load_queries
from edgerank.models.supply import resolve
from edgerank.runtime.tokenization import encode_pairs


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def bench_score(args) -> list[float]:
    backend = ReferenceBackend(resolve(args.model), device="cpu")
    queries, _ = load_queries(DL19, args.queries, args.depth)
    ratios, worst = [], 0.0
    for i, q in enumerate(queries):
        shared = encode_pairs(backend.spec, backend.tokenizer, q["query"], [d for _, d in q["docs"]])
        runs = {"full": dataclasses.replace(shared, prefix_len=0), "shared": shared}
        got = {}
        for name in (["full", "shared"] if i % 2 == 0 else ["shared", "full"]):
            got[name] = timed(lambda: backend.score(runs[name]).values)
        worst = max(worst, float(abs(got["full"][0] - got["shared"][0]).max()))
        ratios.append(got["shared"][1] / got["full"][1])
        print(f"{q['qid']}: prefix {shared.prefix_len} tokens, full {got['full'][1]:.2f} s, "
              f"shared {got['shared'][1]:.2f} s", flush=True)
    print(f"max |score difference| {worst:.2e}")
    return ratios


def bench_train(args) -> list[float]:
    from edgerank.converters.adapters import attach_lora
    from edgerank.data.training import read_groups
    from edgerank.train.trainer import TrainConfig, _batch, _load, supervised_layers

    cfg = TrainConfig(base=args.model, family="qwen3-reranker", data=args.data, out="-", adapter="lora",
                      lora_r=6, lora_alpha=12, lora_upper=0, layer_weight=1, layer_min_depth=0.3,
                      max_length=160, queries_per_step=4, group_size=8, device="cpu")
    backend = _load(cfg)
    spec = backend.spec.with_max_length(cfg.max_length)
    n_layers = backend.full_model.config.num_hidden_layers
    attach_lora(backend.model, spec.kind, n_layers, cfg.lora_r, cfg.lora_alpha, cfg.lora_upper)
    layers = supervised_layers(n_layers, cfg.layer_min_depth)
    groups = read_groups(args.data)

    def step(encoded, shared: bool) -> None:
        backend.model.zero_grad()
        if shared:
            out = torch.cat([backend.head_outputs_by_layer(e.sequences, None, layers, prefix_len=e.prefix_len)
                             for e in encoded], dim=1)
        else:
            out = backend.head_outputs_by_layer([s for e in encoded for s in e.sequences], None, layers)
        out.sum().backward()

    ratios = []
    for i in range(args.batches):
        encoded = [encode_pairs(spec, backend.tokenizer, g["query"], g["texts"]) for g in _batch(groups, cfg, i)]
        took = {}
        for shared in ([False, True] if i % 2 == 0 else [True, False]):
            took[shared] = timed(lambda: step(encoded, shared))[1]
        full_tokens = sum(len(s) for e in encoded for s in e.sequences)
        shared_tokens = sum(e.prefix_len + sum(len(s) - e.prefix_len for s in e.sequences) for e in encoded)
        ratios.append(took[True] / took[False])
        print(f"batch {i}: full {took[False]:.2f} s ({full_tokens} tokens), "
              f"shared {took[True]:.2f} s ({shared_tokens} tokens)", flush=True)
    return ratios


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("score", "train"))
    p.add_argument("--model", default=None, help="default: edgerank-smollm2-rerank (score), smollm2-135m (train)")
    p.add_argument("--queries", type=int, default=10)
    p.add_argument("--depth", type=int, default=40)
    p.add_argument("--data", type=Path, help="labelled training groups (train)")
    p.add_argument("--batches", type=int, default=6)
    args = p.parse_args()
    torch.set_grad_enabled(args.what == "train")
    if args.what == "score":
        args.model = args.model or "edgerank-smollm2-rerank"
        ratios = bench_score(args)
    else:
        if args.data is None:
            p.error("train needs --data (the recipe's labelled groups)")
        args.model = args.model or "smollm2-135m"
        ratios = bench_train(args)
    print(f"median shared/full time ratio {statistics.median(ratios):.3f} over {len(ratios)}")


if __name__ == "__main__":
    main()

"""``python -m edgerank.bench``: latency, peak memory and ranking quality, side by side (``runner``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgerank.bench import runner
from edgerank.bench.runner import (
    CONFIGS,
    DL19,
    load_queries,
    plot,
    print_table,
    run_bench,
    worker,
)
from edgerank.cli import atomic_file, check_output, exits_on, positive_int, positive_number, write_atomic


def _config_list(text: str) -> list[str]:
    configs = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or not configs:
        raise argparse.ArgumentTypeError(f"unknown configuration {', '.join(unknown) or text!r}; "
                                         f"known: {', '.join(CONFIGS)}")
    return configs


def _config_count(text: str) -> tuple[str, int]:
    name, _, count = text.partition("=")
    if name not in CONFIGS or not count:
        raise argparse.ArgumentTypeError(f"expected CONFIG=N with CONFIG one of {', '.join(CONFIGS)}, got {text!r}")
    return name, positive_int(count)


@exits_on(FileNotFoundError)
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgerank.bench", description=runner.__doc__.splitlines()[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help="built-in name or path (default: the default model)")
    p.add_argument("--data", type=Path, default=DL19 if DL19.is_dir() else None,
                   help="BEIR folder with a run and qrels (default: TREC DL19 if present, else a built-in sample)")
    p.add_argument("--depth", type=positive_int, default=None, help="candidates per query (default 30; 100 with --full)")
    p.add_argument("--top-k", type=positive_int, default=10, help="K of every rank() call and of P@K (default 10)")
    p.add_argument("--queries", type=positive_int, default=None, help="queries (default 5; all with --full)")
    p.add_argument("--configs", type=_config_list, default=",".join(CONFIGS), help="comma-separated subset of: " + ", ".join(CONFIGS))
    p.add_argument("--subset", type=_config_count, action="append", default=[], metavar="CONFIG=N",
                   help="run a slow configuration on the first N queries only")
    p.add_argument("--lowmem-mb", type=positive_number, default=400.0, help="max_memory_mb of edgerank-lowmem")
    p.add_argument("--gguf-quant", default=None, choices=("q4_0", "q4_1", "q4_k_m"),
                   help="llamacpp-q4's conversion of a non-GGUF model (default q4_k_m; q4_0 for bi-encoders; "
                        "q4_1 for a model trained from a Q4_1 GGUF base)")
    p.add_argument("--full", action="store_true", help="every judged query at depth 100")
    p.add_argument("--json", default=None, metavar="OUT", help="also write every figure, per query, here")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="plot latency against peak memory")
    args = p.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    from edgerank.models.catalog import DEFAULT_MODEL
    from edgerank.models.supply import input_paths

    model = args.model or DEFAULT_MODEL
    for flag, out in (("--json", args.json), ("--plot", args.plot)):  # before the benchmark, not after it
        if out:
            check_output(out, args.data, *input_paths(model), flag=flag)
    depth = args.depth or (100 if args.full else 30)
    n = args.queries or (None if args.full else 5)
    queries, source = load_queries(args.data, n, depth)
    subset = dict(args.subset)
    configs = args.configs  # argparse applies the type to the default too
    report = run_bench(model, configs, queries, args.top_k, subset, args.lowmem_mb, gguf_quant=args.gguf_quant)
    report["settings"]["data"] = source
    report["settings"]["command"] = "python -m edgerank.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    print_table(report)
    if args.json:
        write_atomic(args.json, json.dumps(report, indent=1))
    if args.plot:
        with atomic_file(args.plot) as tmp:
            plot(report, str(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m edgerank.eval``: rerank a first-stage run on judged data and score both (``report``).

    python -m edgerank.eval --data ../shared/data/trec-dl19 --model smollm2-135m \\
        --backend llamacpp --depth 100 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from edgerank.cli import check_output, exits_on, option_pair, positive_int, write_atomic  # noqa: E402
from edgerank.eval import (
    report as evaluation,  # first: it names the extra when rich is missing
)
from edgerank.eval.report import run_eval
from edgerank.models.supply import input_paths
from edgerank.runtime.backends import BACKENDS  # noqa: E402


@exits_on(FileNotFoundError, ValueError)
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgerank.eval", description=evaluation.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="BEIR-format folder")
    p.add_argument("--run", default=None, help="TREC run file (default: run.*.trec in --data, else BM25)")
    p.add_argument("--model", default=None, help="built-in name, path or hf:ORG/NAME (default: the default model)")
    p.add_argument("--backend", default=None, choices=BACKENDS, help="default: the model's own (edgerank for built-ins and artifacts)")
    p.add_argument("--depth", type=positive_int, default=100, help="candidates reranked per query, from the top of the run (default 100)")
    p.add_argument("--queries", type=positive_int, default=None, help="only the first N judged queries")
    p.add_argument("--option", type=option_pair, action="append", default=[], metavar="KEY=VALUE",
                   help="a backend option, e.g. pruning=False or max_memory_mb=400; repeatable")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the per-query figures and settings here")
    args = p.parse_args(argv)
    if args.json:  # checked before the evaluation, not after it
        check_output(args.json, args.data, args.run, *input_paths(args.model), flag="--json")
    report = run_eval(args.data, args.model, args.backend, args.depth, args.queries, args.run, dict(args.option))
    table = Table(title=f"{report['config']['model']} on {report['config']['backend']}, "
                        f"{Path(args.data).name}, depth {args.depth}, {report['stats']['queries']} queries")
    for col in ("", "nDCG@10", "MRR@10", "Recall@100"):
        table.add_column(col, justify="right")
    for name in ("baseline", "reranked"):
        m = report[name]
        table.add_row(name, f"{m['ndcg@10']:.4f}", f"{m['mrr@10']:.4f}", f"{m['recall@100']:.4f}")
    st = report["stats"]
    table.caption = (f"{st['pairs']} pairs, {st['pairs_per_s']:.1f} pairs/s, "
                     f"median {st['latency_ms_median']:.0f} ms/query, peak RSS {st['peak_rss_mb']:.0f} MB")
    Console().print(table)
    if args.json:
        write_atomic(args.json, json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m edgerank.data build-train`` and ``python -m edgerank.data label``: training sets (``training``)."""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from edgerank.cli import check_output, exits_on, positive_int
from edgerank.data import training
from edgerank.data.training import (
    SOURCES,
    TrainingDataError,
    build_groups,
    label_groups,
    read_groups,
    write_jsonl,
)
from edgerank.runtime.backends import BACKENDS


def _inputs(args: argparse.Namespace) -> list[str | Path]:
    """What the command reads: the sources, or the groups and each teacher's files."""
    if args.command == "build-train":
        return [path for _, path in args.source]
    from edgerank.models.supply import input_paths

    return [args.input, *(p for t in args.teacher for p in input_paths(t))]


@exits_on(TrainingDataError, FileNotFoundError, FileExistsError)
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgerank.data", description=training.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build-train", help="training groups with BM25-mined hard negatives")
    b.add_argument("--source", action="append", nargs=2, metavar=("NAME", "PATH"), required=True,
                   help=f"a source ({', '.join(SOURCES)}) and its path; repeatable")
    b.add_argument("--max-queries", type=positive_int, action="append",
                   help="queries sampled per source, in --source order (default: all)")
    b.add_argument("--negatives", type=positive_int, default=7, help="hard negatives per query (default 7)")
    b.add_argument("--seed", type=int, default=0, help="seed of the sampling of queries and negatives, and of the output order (default 0)")
    b.add_argument("--out", required=True, help="groups JSONL to write")
    b.add_argument("--force", action="store_true", help="replace an existing --out file")
    lab = sub.add_parser("label", help="add teacher scores for listwise distillation")
    lab.add_argument("input", help="groups JSONL from build-train")
    lab.add_argument("--teacher", required=True, action="append",
                     help="any edgerank model: built-in name or path; repeat it for an ensemble "
                          "(scores standardised per group, averaged, on the first teacher's scale)")
    lab.add_argument("--backend", default="reference", choices=BACKENDS, help="the teacher's backend (default reference: full precision)")
    lab.add_argument("--max-length", type=positive_int, help="truncate pairs to this many tokens (default: the teacher's)")
    lab.add_argument("--out", required=True, help="labelled groups JSONL to write")
    lab.add_argument("--force", action="store_true", help="replace an existing --out file (never the input)")
    args = parser.parse_args(argv)
    check_output(args.out, *_inputs(args), parents=True)
    if Path(args.out).exists() and not args.force:
        raise FileExistsError(f"{args.out} exists; pass --force to replace it")
    if args.command == "build-train":
        limits = args.max_queries or []
        groups = []
        for n, (name, path) in enumerate(args.source):
            groups += build_groups(name, path, args.negatives, limits[n] if n < len(limits) else None,
                                   args.seed + n)
        random.Random(args.seed).shuffle(groups)
        write_jsonl(groups, args.out)
        print(f"{len(groups)} groups -> {args.out}")
    else:
        groups = label_groups(read_groups(args.input), args.teacher, args.backend, max_length=args.max_length)
        write_jsonl(groups, args.out)
        print(f"{len(groups)} labelled groups -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Calibrate the pruning policy: the setting that skips most work while P@K holds.

``python -m edgerank.calibrate ARTIFACT --data ../shared/data/trec-dl21 --target 0.99``

Each sample query runs once with pruning off, recording every candidate's head score
before every layer; replaying those scores through the pruning policy gives exactly what
a pruned run would return (``replay``). Each K's setting is fitted so that the target holds
on queries held out of the fit (``crossval``), and written into the artifact's
``manifest.json`` (or a JSON config file); where it would skip less than ``--min-saving``
of the work held out, pruning is written off for that K.

``--fit-readouts`` first fits per-layer readouts on training data (``readouts``) and
stores them in the artifact; the recording then scores checks with them. Beside the
cluster rule's grid, the rank and margin rules' per-layer schedules are fitted (``rules``);
the rule that skips most at the target is written. The bound (the most any cut by score
order could skip) is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from edgerank import Reranker
from edgerank.calibrate import crossval
from edgerank.calibrate.replay import (
    CLUSTERS,
    Recording,
    evaluate_grid,
    layer_agreement,
    record,
)
from edgerank.calibrate.rules import bound, calibrate_margin, calibrate_rank
from edgerank.calibrate.settings import (
    better,
    choose,
    knobs,
    settings_file,
    write_setting,
)
from edgerank.cli import atomic_file, check_output, exits_on, fraction, positive_int, positive_ints, write_atomic
from edgerank.data.judged import SHARED_DATA, check_run, load_beir, load_run
from edgerank.runtime import layout
from edgerank.runtime.pruning import DEFAULT_CLUSTERS, RULES

TABLE_ROWS = 20


def _cluster_counts(text: str) -> list[int]:
    """An ``argparse`` type: comma-separated cluster counts, each at least 2."""
    counts = positive_ints(text)
    if not counts or min(counts) < 2:
        raise argparse.ArgumentTypeError(f"expected cluster counts of at least 2 (one cluster prunes nothing), "
                                         f"got {text!r}")
    return counts


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m edgerank.calibrate", description=__doc__.splitlines()[0])
    p.add_argument("model", help="an artifact folder, or a built-in name / HF folder / GGUF: its cached "
                                 "int4 artifact (the one edgerank and the benchmark use) is calibrated")
    p.add_argument("--data", type=Path, default=SHARED_DATA / "trec-dl21",
                   help="BEIR folder with a run; no qrels needed (default: TREC DL21, never DL19)")
    p.add_argument("--queries", type=positive_int, default=40,
                   help="calibration queries (12 chose a setting that did not hold on DL19; 40 did: RESULTS §9.1)")
    p.add_argument("--depth", type=positive_int, default=100, help="candidates per query (default 100)")
    p.add_argument("--top-k", type=positive_int, default=10, help="the K whose setting is written (default 10)")
    p.add_argument("--target", type=fraction, default=0.99, help="mean P@K against unpruned to keep")
    p.add_argument("--config", type=Path, default=None, help="write here instead of the artifact's manifest")
    p.add_argument("--dry-run", action="store_true", help="print the grid, write nothing")
    p.add_argument("--save", type=Path, default=None,
                   help="also write the grids, per-layer agreement (JSON) and the recordings (.npz beside it)")
    p.add_argument("--clusters", type=_cluster_counts, default=",".join(map(str, CLUSTERS)),
                   help="k-means cluster counts to try (default %(default)s; the policy's own default is "
                        f"{DEFAULT_CLUSTERS})")
    p.add_argument("--also-k", type=positive_ints, default="1,5",
                   help="other K values to calibrate: written under pruning.by_k, for calls with that K")
    p.add_argument("--fit-readouts", action="store_true",
                   help="first fit per-layer readouts of the model's own final score on --fit-data (no labels) "
                        "and store them in the artifact; the checks then use them")
    p.add_argument("--fit-data", type=Path, default=SHARED_DATA / "train" / "squad",
                   help="BEIR folder of training data for --fit-readouts (never a TREC DL set)")
    p.add_argument("--fit-queries", type=positive_int, default=40, help="questions to fit on (default 40)")
    p.add_argument("--fit-passages", type=positive_int, default=20,
                   help="passages per question: BM25 neighbours, its own, a quarter random (default 20)")
    p.add_argument("--rules", default="cluster,rank,margin", help="pruning rules to calibrate (default %(default)s)")
    p.add_argument("--min-saving", type=float, default=crossval.MIN_SAVING,
                   help="work skipped on queries held out below which pruning is written off "
                        "(default %(default)s)")
    return p


def _checked_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The arguments, every one that can fail checked before the long run."""
    args = p.parse_args(argv)
    given, args.rules = args.rules, set(args.rules.split(","))
    if not args.rules or args.rules - set(RULES):
        p.error(f"--rules: expected some of {', '.join(RULES)}, got {given!r}")
    if args.fit_readouts and args.dry_run:
        p.error("--fit-readouts writes readouts into the artifact; --dry-run writes nothing")
    _check_outputs(args)
    return args


def _check_outputs(args: argparse.Namespace) -> None:
    """``--save`` (and the recordings beside it) and ``--config``: never an input or a path
    inside one (the model, the artifact, the cache, the data), in a folder that can take them."""
    from edgerank.models.supply import input_paths

    inputs = (*input_paths(args.model), args.data, args.fit_data if args.fit_readouts else None)
    if args.save is not None:
        check_output(args.save, *inputs, flag="--save")
        check_output(args.save.with_suffix(".npz"), *inputs, flag="--save")
    if args.config is not None and not args.dry_run:
        check_output(args.config, *inputs, flag="--config")
        settings_file(args.config)


def _artifact(model: str, console) -> Path:
    """``model``'s artifact folder: itself, or the cached int4 artifact of a name or path."""
    artifact = Path(model).expanduser()
    if (artifact / layout.MANIFEST).is_file():
        return artifact
    from edgerank.models.cache import cached_artifact
    from edgerank.models.supply import resolve

    artifact = cached_artifact(resolve(model))
    console.print(f"calibrating {artifact}")
    return artifact


def _fit_readouts(args: argparse.Namespace, artifact: Path, console) -> None:
    from edgerank.calibrate.readouts import fit_artifact, training_groups
    from edgerank.models.supply import resolve

    groups = training_groups(args.fit_data, args.fit_queries, args.fit_passages)
    fitted = fit_artifact(Reranker, artifact, resolve(str(artifact)).spec, groups,
                          lambda g: tqdm(g, desc="recording states for readouts", unit="group"))
    console.print(f"fitted readouts ({fitted['features']}, link {fitted['link']}) on {fitted['pairs']} pairs of "
                  f"{args.fit_data.name}: recording {fitted['record_s']} s, fitting {fitted['fit_s']} s, "
                  f"{fitted['bytes'] / 1024:.0f} KiB -> {fitted['path']}")


def _queries(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """The calibration queries and their first-stage candidates."""
    coll = load_beir(args.data)
    runfile = sorted(args.data.glob("run*.trec"))
    if not runfile:
        raise FileNotFoundError(f"{args.data} has no first-stage run (run*.trec) to calibrate on")
    run = load_run(runfile[0])
    qids = sorted(run)[: args.queries]
    check_run(coll, run, qids, args.depth, runfile[0])
    return [(coll.queries[q], [coll.corpus[d] for d, _ in run[q][: args.depth]]) for q in qids]


def _recordings(artifact: Path, queries: list[tuple[str, list[str]]]) -> list[Recording]:
    """One unpruned pass per calibration query, every layer's check scores recorded."""
    with Reranker(artifact, backend="edgerank", pruning=False, record_layers=True) as r:
        return [record(r, query, docs) for query, docs in tqdm(queries, desc="recording layer scores", unit="query")]


def _fit_rules(args: argparse.Namespace, recs: list[Recording], k: int) -> tuple[list[dict], dict]:
    """The cluster grid's rows and each asked rule's best setting at ``k``."""
    grid = evaluate_grid(recs, k, clusters=args.clusters) if "cluster" in args.rules else []
    return grid, {"cluster": choose(grid, args.target),
                  "rank": calibrate_rank(recs, k, args.target) if "rank" in args.rules else None,
                  "margin": calibrate_margin(recs, k, args.target) if "margin" in args.rules else None}


def _report(args: argparse.Namespace, recs: list[Recording], bests: dict, limit: dict, console) -> list[dict]:
    """Print each layer's agreement with the final ranking, each rule's best and the bound."""
    agreement = layer_agreement(recs, args.top_k)
    console.print("per-layer agreement with the final ranking (Spearman / final top-K inside the layer's top-3K"
                  + (" / the model's own head's Spearman" if recs[0].head_scores is not None else "") + "):")
    console.print("  " + "  ".join(f"L{a['before_layer']}:{a['spearman']:.2f}/{a['topk_in_top3k']:.2f}"
                                   + (f"/{a['head_spearman']:.2f}" if "head_spearman" in a else "")
                                   for a in agreement))
    for rule, row in bests.items():
        if rule in args.rules:
            console.print(f"{rule} rule: " + (f"{knobs(row)} P@K={row['precision']:.3f} work skipped "
                                              f"{row['work_skipped']:.1%}" if row else f"nothing reaches {args.target}"))
    console.print(f"bound (a cut by score order that knows the final top-K): {limit['work_skipped']:.1%} skipped "
                  f"at mean P@{args.top_k} >= {args.target} ({limit['at_precision_1']:.1%} keeping every top-K)")
    return agreement


def _save(path: Path, recs: list[Recording], report: dict) -> None:
    """The grids and choices as JSON, and the recordings beside them (.npz)."""
    write_atomic(path, json.dumps(report, indent=1))
    with atomic_file(path.with_suffix(".npz")) as tmp:
        np.savez(tmp, **{f"scores_{i}": r.layer_scores for i, r in enumerate(recs)},
                 **{f"head_{i}": r.head_scores for i, r in enumerate(recs) if r.head_scores is not None},
                 **{f"lengths_{i}": r.lengths for i, r in enumerate(recs)},
                 prefix=np.array([r.prefix_len for r in recs]))


def _grid_table(args: argparse.Namespace, rows: list[dict], n_queries: int, cluster_best: dict | None,
                chosen: bool):
    """The cluster grid's settings within 0.05 of the target that skip most (* chosen)."""
    from rich.table import Table

    near = sorted((r for r in rows if r["precision"] >= args.target - 0.05), key=lambda r: -r["work_skipped"])
    shown = near[:TABLE_ROWS] + ([cluster_best] if cluster_best is not None and cluster_best not in near[:TABLE_ROWS]
                                 else [])
    table = Table(title=f"pruning grid, K={args.top_k}, {n_queries} queries of {args.data.name}: the "
                        f"settings within 0.05 of the target that skip most (* chosen)",
                  caption=f"{len(rows)} settings tried" + ("; --save keeps them all" if not args.save else ""))
    for col in ("min_depth", "threshold", "clusters", "P@K", "min P@K", "work skipped"):
        table.add_column(col, justify="right")
    for r in shown:
        mark = " *" if r is cluster_best and chosen else ""
        table.add_row(f"{r['min_depth']:.1f}", f"{r['threshold']:.2f}", str(r["clusters"]),
                      f"{r['precision']:.3f}{mark}", f"{r['min_precision']:.2f}", f"{r['work_skipped']:.1%}")
    return table


@exits_on(FileNotFoundError)
def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    args = _checked_args(_parser(), argv)
    console = Console()
    queries = _queries(args)
    artifact = _artifact(args.model, console)
    if args.fit_readouts:
        _fit_readouts(args, artifact, console)
    recs = _recordings(artifact, queries)
    rows, bests = _fit_rules(args, recs, args.top_k)
    best = better(bests["cluster"], bests["rank"], bests["margin"])
    limit = bound(recs, args.top_k, args.target)
    agreement = _report(args, recs, bests, limit, console)
    verdicts = {k: crossval.calibrate(recs, k, args.target, args.rules, args.clusters, args.min_saving)
                for k in dict.fromkeys([args.top_k, *args.also_k])}
    for k, v in verdicts.items():
        console.print(f"K={k}, written: " + (knobs(v.setting) if v.setting else "pruning off") + f" ({v.why})")
    if args.save:
        _save(args.save, recs, {"grid": rows, "best": best, "cluster_best": bests["cluster"], "rank_best": bests["rank"],
                                "margin_best": bests["margin"], "bound": limit, "agreement": agreement,
                                "verdicts": {str(k): vars(v) for k, v in verdicts.items()}})
    console.print(_grid_table(args, rows, len(recs), bests["cluster"], best is bests["cluster"]))
    main_verdict = verdicts[args.top_k]
    meta = {"target_precision": args.target, "k": args.top_k, "queries": len(recs), "data": args.data.name,
            "depth": args.depth, "held_out_precision": main_verdict.held_out_precision,
            "held_out_work_skipped": main_verdict.held_out_skipped, "margin": main_verdict.margin,
            "why": main_verdict.why, "bound_work_skipped": limit["work_skipped"]}
    if not args.dry_run:
        where = write_setting(artifact, main_verdict.setting, meta, args.config,
                              {k: v.setting for k, v in verdicts.items()})
        console.print(f"wrote {knobs(main_verdict.setting) if main_verdict.setting else 'pruning off'} to {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Calibrate the pruning policy: the cheapest (threshold, min_depth, clusters) that keeps P@K.

``python -m edgerank.calibrate ARTIFACT --data ../shared/data/trec-dl21 --target 0.99``

Each sample query runs once with pruning off, recording every candidate's head score
before every layer. Because a candidate's hidden state never depends on the others,
replaying those scores through :class:`edgerank.pruning.PruningRun` gives exactly what a
pruned run would return, so a whole grid of settings costs one pass per query. The
chosen setting is written into the artifact's ``manifest.json`` (or a JSON config file).

``--fit-readouts`` first fits per-layer readouts on training data (``edgerank.readouts_fit``)
and stores them in the artifact; the recording then scores checks with them. Beside the
cluster rule's grid, the rank and margin rules' per-layer schedules are fitted; the rule that
skips most at the target is written. The bound (the most any cut by score order could skip) is printed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from edgerank.datasets import SHARED_DATA
from edgerank.errors import ConfigError, exits_on, fraction, positive_int, positive_ints
from edgerank.pruning import DEFAULT_CLUSTERS, RULES, PruningPolicy, PruningRun

THRESHOLDS = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)
MIN_DEPTHS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
CLUSTERS = (2, 3, 4)  # k of the 1-D k-means: "small k"
TABLE_ROWS = 20


@dataclass
class Recording:
    """One query's unpruned pass: head scores ``[L, n]`` (row l: before layer l+1; last
    row: final) and the candidates' own token counts."""

    layer_scores: np.ndarray
    lengths: np.ndarray
    prefix_len: int
    head_scores: np.ndarray | None = None  # the model's own head, where readouts scored the checks


def record(reranker, query: str, documents: list[str]) -> Recording:
    """Run one query unpruned through a ``Reranker(..., pruning=False, record_layers=True)``."""
    out = reranker.rank(query, documents)
    ex = out.stats.extra
    return Recording(ex["layer_scores"], np.asarray(ex["candidate_lengths"]), ex["prefix_tokens"],
                     ex.get("head_layer_scores"))


def simulate(policy: PruningPolicy, rec: Recording, k: int) -> tuple[set[int], float]:
    """The top-K set a pruned run returns, and the fraction of layer x token work it skips."""
    L, n = rec.layer_scores.shape
    run = PruningRun(policy, n, k, L)
    work, full = 0, L * (int(rec.lengths.sum()) + rec.prefix_len)
    for layer in range(L):
        if run.wants_check(layer):
            run.check(layer, rec.layer_scores[layer - 1][run.live])
            if run.done:
                break
        work += int(rec.lengths[run.computing()].sum()) + rec.prefix_len
    tiers = run.tiers()
    final = rec.layer_scores[-1]
    order = np.lexsort((-final, tiers))  # provisional order does not change the set
    return set(order[:k].tolist()), 1.0 - work / full


def replay(policy: PruningPolicy, recs: list[Recording], k: int) -> tuple[list[float], list[float]]:
    """Per recording: P@K of ``policy``'s top K against the unpruned one, and the work it skips."""
    prec, skipped = [], []
    for rec in recs:
        kk = min(k, rec.layer_scores.shape[1])
        truth = set(np.argsort(-rec.layer_scores[-1], kind="stable")[:kk].tolist())
        got, skip = simulate(policy, rec, kk)
        prec.append(len(got & truth) / kk)
        skipped.append(skip)
    return prec, skipped


def evaluate_grid(recs: list[Recording], k: int, exact_order: bool = True,
                  thresholds=THRESHOLDS, min_depths=MIN_DEPTHS, clusters=CLUSTERS) -> list[dict]:
    """Mean P@K (vs unpruned) and work skipped for every setting of the grid."""
    rows = []
    for n_clusters, depth, thr in itertools.product(clusters, min_depths, thresholds):
        policy = PruningPolicy(threshold=thr, min_depth=depth, clusters=n_clusters, exact_order=exact_order)
        prec, skipped = replay(policy, recs, k)
        rows.append({"threshold": thr, "min_depth": depth, "clusters": n_clusters,
                     "precision": float(np.mean(prec)), "min_precision": float(np.min(prec)),
                     "work_skipped": float(np.mean(skipped))})
    return rows


def layer_agreement(recs: list[Recording], k: int) -> list[dict]:
    """Per layer: how well the intermediate head scores already rank like the final ones
    (mean Spearman, and the share of the final top-K inside the layer's top-3K)."""
    from edgerank.metrics import spearman

    L = recs[0].layer_scores.shape[0]
    out = []
    for layer in range(L - 1):
        rho, kept, head = [], [], []
        for rec in recs:
            now, final = rec.layer_scores[layer], rec.layer_scores[-1]
            kk = min(k, len(final))
            rho.append(spearman(now, final))
            if rec.head_scores is not None:
                head.append(spearman(rec.head_scores[layer], final))
            top = set(np.argsort(-final, kind="stable")[:kk].tolist())
            kept.append(len(top & set(np.argsort(-now, kind="stable")[: 3 * kk].tolist())) / kk)
        row = {"before_layer": layer + 1, "spearman": float(np.mean(rho)), "topk_in_top3k": float(np.mean(kept))}
        if head:  # the checks were scored by readouts: the head's own figure beside them
            row["head_spearman"] = float(np.mean(head))
        out.append(row)
    return out


def choose(rows: list[dict], target: float) -> dict | None:
    """The setting that skips the most work while mean P@K stays at or above ``target``;
    among equals, the highest threshold, then the default cluster count."""
    ok = [r for r in rows if r["precision"] >= target]
    return max(ok, key=lambda r: (r["work_skipped"], r["threshold"],
                                  -abs(r.get("clusters", DEFAULT_CLUSTERS) - DEFAULT_CLUSTERS))) if ok else None


def _cluster_counts(text: str) -> list[int]:
    """An ``argparse`` type: comma-separated cluster counts, each at least 2."""
    counts = positive_ints(text)
    if not counts or min(counts) < 2:
        raise argparse.ArgumentTypeError(f"expected cluster counts of at least 2 (one cluster prunes nothing), "
                                         f"got {text!r}")
    return counts


def _knobs(setting: dict) -> str:
    if setting.get("rule") == "margin":
        return "rule=margin margin=" + ",".join(f"L{layer}:{m:.3g}" for layer, m in sorted(
            (int(a), b) for a, b in setting["margin"].items()))
    if setting.get("rule") == "rank":
        return "rule=rank keep=" + ",".join(f"L{layer}:{frac:g}" for layer, frac in sorted(
            (int(a), b) for a, b in setting["keep"].items()))
    return f"threshold={setting['threshold']} min_depth={setting['min_depth']} clusters={setting['clusters']}"


def _setting(row: dict) -> dict:
    if row.get("rule") == "margin":
        return {"rule": "margin", "margin": {str(layer): m for layer, m in sorted(
            (int(a), b) for a, b in row["margin"].items())}}
    if row.get("rule") == "rank":
        return {"rule": "rank", "keep": {str(layer): frac for layer, frac in sorted(
            (int(a), b) for a, b in row["keep"].items())}}
    return {"rule": "cluster", "threshold": row["threshold"], "min_depth": row["min_depth"],
            "clusters": row.get("clusters", DEFAULT_CLUSTERS)}


def better(*settings: dict | None) -> dict | None:
    """The setting that skips most work at the target (the first given on a tie)."""
    best = None
    for row in settings:
        if row is not None and (best is None or row["work_skipped"] > best["work_skipped"]):
            best = row
    return best


def write_setting(artifact: Path, setting: dict, meta: dict, config: Path | None = None,
                  by_k: dict[int, dict] | None = None) -> Path:
    """Store the chosen knobs in the artifact's manifest (atomically) or a config file.
    ``by_k`` holds the settings chosen for other K values (None: none kept the target);
    the runtime uses one for a call with that K, and the main setting for any other K."""
    target = config or artifact / "manifest.json"
    doc = _settings_file(target)
    doc["pruning"] = {**_setting(setting), "calibrated": True, **meta}
    if by_k:  # a K that no setting kept at the target prunes nothing: {"off": true}
        doc["pruning"]["by_k"] = {str(k): {**_setting(row), "precision": row["precision"],
                                           "work_skipped": row["work_skipped"]} if row else {"off": True}
                                  for k, row in sorted(by_k.items())}
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, target)
    return target


def _settings_file(path: Path) -> dict:
    """The JSON object already in ``path`` (``{}`` if there is none yet); anything else
    there is the user's, and is refused rather than replaced."""
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent} is not a folder to write {path.name} in")
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not a JSON settings file ({e}); it is left as it is") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path} holds JSON but not an object; it is left as it is")
    return doc


@exits_on(FileNotFoundError)
def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    from edgerank.api import Reranker
    from edgerank.datasets import check_run, load_beir, load_run

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
    args = p.parse_args(argv)
    console = Console()
    rules = set(args.rules.split(","))
    if not rules or rules - set(RULES):
        p.error(f"--rules: expected some of {', '.join(RULES)}, got {args.rules!r}")
    if args.fit_readouts and args.dry_run:
        p.error("--fit-readouts writes readouts into the artifact; --dry-run writes nothing")
    if args.config is not None and not args.dry_run:  # fail before the long run, not after it
        _settings_file(args.config)
    if args.save is not None and not args.save.parent.is_dir():
        raise FileNotFoundError(f"--save: {args.save.parent} is not a folder")
    coll = load_beir(args.data)
    runfile = sorted(args.data.glob("run*.trec"))
    if not runfile:
        raise FileNotFoundError(f"{args.data} has no first-stage run (run*.trec) to calibrate on")
    run = load_run(runfile[0])
    qids = sorted(run)[: args.queries]
    check_run(coll, run, qids, args.depth, runfile[0])
    artifact = Path(args.model).expanduser()
    if not (artifact / "manifest.json").is_file():
        from edgerank.cache import cached_artifact

        artifact = cached_artifact(args.model)
        console.print(f"calibrating {artifact}")
    if args.fit_readouts:
        from edgerank.readouts_fit import fit_artifact, training_groups
        from edgerank.sources import resolve

        groups = training_groups(args.fit_data, args.fit_queries, args.fit_passages)
        spec = resolve(str(artifact)).spec
        fitted = fit_artifact(Reranker, artifact, spec, groups,
                              lambda g: tqdm(g, desc="recording states for readouts", unit="group"))
        console.print(f"fitted readouts ({fitted['features']}, link {fitted['link']}) on {fitted['pairs']} pairs of "
                      f"{args.fit_data.name}: recording {fitted['record_s']} s, fitting {fitted['fit_s']} s, "
                      f"{fitted['bytes'] / 1024:.0f} KiB -> {fitted['path']}")
    recs = []
    with Reranker(artifact, backend="edgerank", pruning=False, record_layers=True) as r:
        for q in tqdm(qids, desc="recording layer scores", unit="query"):
            docs = [coll.corpus[d] for d, _ in run[q][: args.depth]]
            recs.append(record(r, coll.queries[q], docs))
    from edgerank.readouts_fit import bound, calibrate_margin, calibrate_rank

    def fit_rules(k: int) -> tuple[list[dict], dict]:
        """The cluster grid's rows and each rule's best setting at ``k``."""
        grid = evaluate_grid(recs, k, clusters=args.clusters) if "cluster" in rules else []
        return grid, {"cluster": choose(grid, args.target),
                      "rank": calibrate_rank(recs, k, args.target) if "rank" in rules else None,
                      "margin": calibrate_margin(recs, k, args.target) if "margin" in rules else None}

    rows, bests = fit_rules(args.top_k)
    cluster_best, rank_best, margin_best = bests["cluster"], bests["rank"], bests["margin"]
    best = better(cluster_best, rank_best, margin_best)
    limit = bound(recs, args.top_k, args.target)
    agreement = layer_agreement(recs, args.top_k)
    console.print("per-layer agreement with the final ranking (Spearman / final top-K inside the layer's top-3K"
                  + (" / the model's own head's Spearman" if recs[0].head_scores is not None else "") + "):")
    console.print("  " + "  ".join(f"L{a['before_layer']}:{a['spearman']:.2f}/{a['topk_in_top3k']:.2f}"
                                   + (f"/{a['head_spearman']:.2f}" if "head_spearman" in a else "")
                                   for a in agreement))
    for name, row in (("cluster rule", cluster_best), ("rank rule", rank_best), ("margin rule", margin_best)):
        if name.split()[0] in rules:
            console.print(f"{name}: " + (f"{_knobs(row)} P@K={row['precision']:.3f} work skipped "
                                         f"{row['work_skipped']:.1%}" if row else f"nothing reaches {args.target}"))
    console.print(f"bound (a cut by score order that knows the final top-K): {limit['work_skipped']:.1%} skipped "
                  f"at mean P@{args.top_k} >= {args.target} ({limit['at_precision_1']:.1%} keeping every top-K)")
    others = {}
    for k in args.also_k:
        others[k] = better(*fit_rules(k)[1].values())
        console.print(f"K={k}: " + (f"{_knobs(others[k])} "
                                    f"P@K={others[k]['precision']:.3f} work skipped {others[k]['work_skipped']:.1%}"
                                    if others[k] else f"no setting reaches {args.target}"))
    if args.save:
        args.save.write_text(json.dumps({"grid": rows, "best": best, "cluster_best": cluster_best,
                                         "rank_best": rank_best, "margin_best": margin_best, "bound": limit, "agreement": agreement,
                                         "best_other_k": others}, indent=1))
        np.savez(args.save.with_suffix(".npz"), **{f"scores_{i}": r.layer_scores for i, r in enumerate(recs)},
                 **{f"head_{i}": r.head_scores for i, r in enumerate(recs) if r.head_scores is not None},
                 **{f"lengths_{i}": r.lengths for i, r in enumerate(recs)},
                 prefix=np.array([r.prefix_len for r in recs]))
    near = sorted((r for r in rows if r["precision"] >= args.target - 0.05), key=lambda r: -r["work_skipped"])
    shown = near[:TABLE_ROWS] + ([cluster_best] if cluster_best is not None and cluster_best not in near[:TABLE_ROWS]
                                 else [])
    table = Table(title=f"pruning grid, K={args.top_k}, {len(recs)} queries of {args.data.name}: the "
                        f"settings within 0.05 of the target that skip most (* chosen)",
                  caption=f"{len(rows)} settings tried" + ("; --save keeps them all" if not args.save else ""))
    for col in ("min_depth", "threshold", "clusters", "P@K", "min P@K", "work skipped"):
        table.add_column(col, justify="right")
    for r in shown:
        mark = " *" if r is cluster_best and best is cluster_best else ""
        table.add_row(f"{r['min_depth']:.1f}", f"{r['threshold']:.2f}", str(r["clusters"]),
                      f"{r['precision']:.3f}{mark}", f"{r['min_precision']:.2f}", f"{r['work_skipped']:.1%}")
    console.print(table)
    if best is None:
        console.print(f"[red]no setting reaches mean P@{args.top_k} >= {args.target}[/]; nothing written")
        return 1
    meta = {"target_precision": args.target, "k": args.top_k, "queries": len(recs), "data": args.data.name,
            "depth": args.depth, "precision": best["precision"], "work_skipped": best["work_skipped"],
            "bound_work_skipped": limit["work_skipped"]}
    if not args.dry_run:
        where = write_setting(artifact, best, meta, args.config, {**others, args.top_k: best})
        console.print(f"wrote {_knobs(best)} to {where}" + "".join(
            f"; for K={k}: " + (_knobs(row) if row else "off") for k, row in sorted(others.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Metrics against hand computation, scipy, and the published DL19 BM25 figure."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

pytest.importorskip("bm25s")  # the eval extra: a core install skips this module
pytest.importorskip("rich")
from edgerank.data.judged import load_beir, load_run
from edgerank.eval.report import run_eval
from edgerank.metrics import (evaluate, kendall_tau, mrr_at_k, ndcg_at_k, precision_at_k_vs,
                              recall_at_k, spearman, topk_overlap)
from tests.conftest import DL19, write_beir


def test_ndcg_linear_gain_by_hand():
    qrels = {"a": 3, "b": 2, "c": 0, "d": 1}
    ranking = ["c", "a", "d", "x"]
    dcg = 0 / math.log2(2) + 3 / math.log2(3) + 1 / math.log2(4) + 0
    idcg = 3 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(ranking, qrels, 10) == pytest.approx(dcg / idcg)
    assert ndcg_at_k(["a", "b", "d"], qrels, 10) == pytest.approx(1.0)
    assert ndcg_at_k(["a"], {"a": 0}, 10) == 0.0


def test_mrr_and_recall_by_hand():
    qrels = {"a": 0, "b": 2, "c": 1}
    assert mrr_at_k(["a", "x", "b"], qrels, 10) == pytest.approx(1 / 3)
    assert mrr_at_k(["a", "x", "b"], qrels, 2) == 0.0
    assert recall_at_k(["b", "x"], qrels, 100) == pytest.approx(0.5)


def test_agreement_measures():
    assert precision_at_k_vs([1, 2, 3, 4], [2, 1, 9, 8], 2) == 1.0
    assert precision_at_k_vs([1, 2, 3, 4], [3, 1, 9, 8], 2) == 0.5
    assert topk_overlap([1, 2], [2, 3], 2) == pytest.approx(1 / 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_correlations_match_scipy(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 6, 40).astype(float)  # ties on purpose
    y = x + rng.normal(0, 2, 40)
    assert kendall_tau(x, y) == pytest.approx(scipy.stats.kendalltau(x, y).statistic)
    assert spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic)


@pytest.mark.skipif(not DL19.is_dir(), reason="needs ../shared/data/trec-dl19")
def test_dl19_bm25_ndcg_is_the_published_0_5058():
    coll = load_beir(DL19)
    run = load_run(DL19 / "run.bm25.top100.trec")
    metrics = evaluate({q: [d for d, _ in docs] for q, docs in run.items()}, coll.qrels)
    assert metrics["queries"] == 43
    assert round(metrics["ndcg@10"], 4) == 0.5058


@pytest.mark.skipif(not DL19.is_dir(), reason="needs ../shared/data/trec-dl19")
def test_eval_reports_baseline_and_a_shuffled_ranking_scores_lower(tiny_cross_encoder):
    report = run_eval(DL19, model=str(tiny_cross_encoder), backend="reference", depth=20,
                      queries=3, progress=False)
    assert set(report) >= {"baseline", "reranked", "per_query", "stats", "config"}
    assert report["stats"]["pairs"] == 60
    first = next(iter(report["per_query"]))
    assert len(report["per_query"][first]["ranking"]) == 20
    coll = load_beir(DL19)
    ideal = sorted(coll.qrels[first], key=lambda d: -coll.qrels[first][d])
    assert ndcg_at_k(ideal, coll.qrels[first]) == pytest.approx(1.0)
    assert ndcg_at_k(ideal[::-1], coll.qrels[first]) < 0.5


@pytest.mark.skipif(not DL19.is_dir(), reason="needs ../shared/data/trec-dl19")
def test_eval_cli_writes_the_documented_json(tiny_cross_encoder, tmp_path):
    import json

    from edgerank.eval.__main__ import main

    out = tmp_path / "r.json"
    assert main(["--data", str(DL19), "--model", str(tiny_cross_encoder), "--backend", "reference",
                 "--depth", "5", "--queries", "2", "--option", "max_length=128", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report) == {"baseline", "reranked", "per_query", "stats", "config"}
    assert set(report["baseline"]) >= {"ndcg@10", "mrr@10", "recall@100"}
    assert report["config"]["options"] == {"max_length": 128}
    assert report["stats"]["pairs"] == 10 and report["stats"]["pairs_per_s"] > 0
    for q in report["per_query"].values():
        assert len(q["ranking"]) == 5 and 0 <= q["ndcg@10"] <= 1


def test_eval_cli_says_in_one_line_that_a_collection_without_judgments_has_nothing_to_score(
        tmp_path, capsys):
    """The shared trec-dl21 ships its qrels file with a header only: a clear error, no traceback."""
    from edgerank.eval.__main__ import main

    data = write_beir(tmp_path / "unjudged", ["d1", "d2"], {7: "q"})
    (data / "run.bm25.top100.trec").write_text("7 Q0 d1 1 2.0 bm25\n7 Q0 d2 2 1.0 bm25\n")
    assert main(["--data", str(data), "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "nothing to evaluate" in err and "0 judgments" in err and "run.bm25.top100.trec" in err
    assert main(["--data", str(tmp_path / "missing")]) == 2
    assert "is not a BEIR folder" in capsys.readouterr().err


def test_eval_refuses_a_run_that_names_documents_or_queries_the_collection_lacks(tmp_path, capsys):
    """A run file from another collection is one error line before any model loads (the
    model name here does not exist, so reaching the model would be another error)."""
    from edgerank.eval.__main__ import main

    data = write_beir(tmp_path / "beir", ["d1", "d2"], {"7": "q"}, judged="7\td1\t1\n8\td1\t1\n")
    (tmp_path / "other.trec").write_text("7 Q0 d1 1 2.0 x\n7 Q0 d9 2 1.0 x\n")
    assert main(["--data", str(data), "--run", str(tmp_path / "other.trec"), "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "query 7 has 1 documents not in the corpus, e.g. d9" in err
    (tmp_path / "other.trec").write_text("8 Q0 d1 1 2.0 x\n")
    assert main(["--data", str(data), "--run", str(tmp_path / "other.trec"), "--model", "no-such-model"]) == 2
    assert "query 8 is not in queries.jsonl" in capsys.readouterr().err

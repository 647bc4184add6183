"""Progressive cluster pruning: the policy by hand, and the runtime against its own unpruned run."""

from __future__ import annotations

import json

import numpy as np
import pytest

import edgerank
from edgerank.converters import convert
from edgerank.calibrate.replay import Recording, evaluate_grid, record, simulate
from edgerank.calibrate.settings import choose, write_setting
from edgerank.runtime.pruning import PruningPolicy, dispersion, kmeans_1d
from tests.conftest import make_decoder, write_beir

QUERY = "how do vaccines work"
DOCS = [f"{w} vaccine immune system cell" if i % 3 == 0 else f"{w} market price city river energy"
        for i, w in enumerate("the a of to and in is was for on that with as by at from his her it are".split())]


@pytest.mark.core
def test_kmeans_1d_finds_contiguous_groups_highest_first():
    x = np.array([0.12, 0.9, 0.5, 0.88, 0.1, 0.52])
    assert kmeans_1d(x, 3).tolist() == [2, 0, 1, 0, 2, 1]
    assert kmeans_1d(np.ones(5), 3).tolist() == [0] * 5


@pytest.mark.core
def test_decide_selects_above_defers_the_boundary_and_drops_below():
    policy = PruningPolicy(threshold=0.1)
    x = np.array([0.12, 0.9, 0.5, 0.88, 0.1, 0.52])
    d = policy.decide(x, 3)  # 3rd best (0.52) sits in the middle cluster
    assert (sorted(d.selected), sorted(d.deferred), sorted(d.dropped)) == ([1, 3], [2, 5], [0, 4])
    d = policy.decide(x, 2)  # the 2nd best is in the top cluster: nothing is sure yet
    assert (sorted(d.selected), sorted(d.deferred), sorted(d.dropped)) == ([], [1, 3], [0, 2, 4, 5])
    assert d.cv == pytest.approx(np.std(x) / np.mean(x))
    flat = policy.decide(np.array([0.50, 0.51, 0.49, 0.5]), 1)  # CV below the threshold
    assert len(flat.deferred) == 4 and len(flat.dropped) == 0
    everything = policy.decide(x, 6)
    assert len(everything.selected) == 6
    assert dispersion(np.array([1.0])) == 0.0


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, bpe_tokenizer):
    root = tmp_path_factory.mktemp("prune")
    src = make_decoder(root / "hf", "qwen3", bpe_tokenizer, n_layers=6, seed=3)
    convert(src, "onnx", "fp32", root / "art", family="qwen3-reranker", verify=False, progress=False)
    return root / "art"


AGGRESSIVE = dict(threshold=0.0, min_depth=1)  # check before layer 1 on, prune on any dispersion


def test_pruned_top_k_keeps_exact_scores_and_dropped_ones_rank_after(artifact):
    with edgerank.Reranker(artifact, pruning=False) as full, edgerank.Reranker(artifact, **AGGRESSIVE) as pruned:
        exact = full.score(QUERY, DOCS)
        out = pruned.rank(QUERY, DOCS, top_k=5)
        stats = out.stats.extra
    assert stats["dropped"] > 0 and stats["work_skipped"] > 0
    assert len(out) == 5 and not any(r.provisional for r in out)
    for r in out:
        # exact_order: computed to the end. Not bit for bit: the survivors run in other chunks,
        # and on some CPUs a row's result depends on its batch (2.5e-8 seen on Sapphire Rapids)
        assert r.score == pytest.approx(exact[r.index], abs=1e-6)
    with edgerank.Reranker(artifact, **AGGRESSIVE) as pruned:
        everything = pruned.rank(QUERY, DOCS, top_k=None)  # top_k=None: nothing to prune for
    assert everything.stats.extra["dropped"] == 0
    assert sum(stats["layers_per_candidate"]) == len(DOCS)
    assert stats["layers_per_candidate"][-1] < len(DOCS)  # some stopped before the last layer


def test_replaying_recorded_scores_predicts_the_pruned_run_exactly(artifact):
    with edgerank.Reranker(artifact, pruning=False, record_layers=True) as rec_r:
        rec = record(rec_r, QUERY, DOCS)
    for k in (1, 3, 5):
        policy = PruningPolicy(**AGGRESSIVE)
        got, skipped = simulate(policy, rec, k)
        with edgerank.Reranker(artifact, **AGGRESSIVE) as pruned:
            out = pruned.rank(QUERY, DOCS, top_k=k)
        assert {r.index for r in out} == got
        assert out.stats.extra["work_skipped"] == pytest.approx(skipped)


def test_calibration_writes_a_setting_the_runtime_then_uses(artifact, tmp_path):
    import shutil

    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    with edgerank.Reranker(art, pruning=False, record_layers=True) as r:
        recs = [record(r, q, DOCS) for q in (QUERY, "the river city", "stock market price")]
    rows = evaluate_grid(recs, 3, clusters=(2, 4))
    assert {r["clusters"] for r in rows} == {2, 4}
    best = choose(rows, 1.0)
    assert best is not None and best["precision"] == 1.0
    assert all(r["work_skipped"] <= best["work_skipped"] for r in rows if r["precision"] >= 1.0)
    write_setting(art, best, {"k": 3})
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["pruning"]["calibrated"] and manifest["pruning"]["threshold"] == best["threshold"]
    with edgerank.Reranker(art) as r:  # still verifies: the manifest is not among the hashed files
        assert r._backend.policy.threshold == best["threshold"]
        assert r._backend.policy.min_depth == best["min_depth"]
        assert r._backend.policy.clusters == best["clusters"] == manifest["pruning"]["clusters"]
    with edgerank.Reranker(art, clusters=5) as r:  # the call's option beats the manifest's
        assert r._backend.policy.clusters == 5
        assert r.rank(QUERY, DOCS, top_k=3).stats.extra["clusters"] == 5


def test_a_setting_calibrated_for_a_k_is_used_by_calls_for_that_k(artifact, tmp_path):
    """``pruning.by_k`` in the manifest: a call for a calibrated K runs that K's setting,
    a K marked off prunes nothing, any other K runs the main setting, and options given
    to the Reranker still win."""
    import shutil

    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    main_row = {"threshold": 0.0, "min_depth": 1, "clusters": 3, "precision": 1.0, "work_skipped": 0.3}
    k1_row = {"threshold": 0.05, "min_depth": 2, "clusters": 2, "precision": 1.0, "work_skipped": 0.4}
    write_setting(art, main_row, {"k": 3}, by_k={1: k1_row, 2: None, 3: main_row})
    with edgerank.Reranker(art) as r, edgerank.Reranker(art, pruning=False) as full:
        one, four = (r.rank(QUERY, DOCS, top_k=k).stats.extra for k in (1, 4))
        off, unpruned = r.rank(QUERY, DOCS, top_k=2), full.rank(QUERY, DOCS, top_k=2)
        two = off.stats.extra
    assert (one["threshold"], one["min_depth"], one["clusters"]) == (0.05, 2, 2)
    assert one["first_check_layer"] == 2 and one["pruning"]
    assert not two["pruning"] and two["work_skipped"] == 0.0 and two["pruning_steps"] == []
    assert [(x.index, x.score) for x in off] == [(x.index, x.score) for x in unpruned]
    assert (four["threshold"], four["min_depth"], four["clusters"]) == (0.0, 1, 3) and four["dropped"] > 0
    with edgerank.Reranker(art, threshold=0.0, min_depth=1, clusters=4) as r:  # options beat by_k, "off" too
        mine1, mine2 = (r.rank(QUERY, DOCS, top_k=k).stats.extra for k in (1, 2))
    assert (mine1["threshold"], mine1["min_depth"], mine1["clusters"]) == (0.0, 1, 4)
    assert mine2["pruning"] and mine2["clusters"] == 4


@pytest.mark.parametrize("by_k", [[1, 2], {"ten": {}}, {"0": {}}, {"1": 0.3}])
def test_a_manifest_whose_calibrated_settings_are_malformed_is_refused(artifact, tmp_path, by_k):
    import shutil

    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["pruning"] = {"threshold": 0.3, "min_depth": 0.5, "by_k": by_k}
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="manifest.json: pruning: by_k must map K"):
        edgerank.Reranker(art)
    manifest["pruning"]["by_k"] = {"1": {"threshold": -1}}
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="manifest.json: pruning: by_k: 1: threshold must be a number >= 0"):
        edgerank.Reranker(art)
    manifest["pruning"] = {"clusters": 1}
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="manifest.json: pruning: clusters must be an int >= 2"):
        edgerank.Reranker(art)
    with edgerank.Reranker(art, clusters=2) as r:  # an option replaces the manifest's bad value
        assert r._backend.policy.clusters == 2


@pytest.mark.core
def test_the_cluster_count_changes_what_is_sure():
    """With 2 clusters the top group of a 3-level spread is split off wider than with 3."""
    x = np.array([0.95, 0.9, 0.6, 0.55, 0.2, 0.15])
    two, three = PruningPolicy(threshold=0.1, clusters=2).decide(x, 2), PruningPolicy(threshold=0.1).decide(x, 2)
    assert (sorted(three.selected), sorted(three.deferred), sorted(three.dropped)) == ([], [0, 1], [2, 3, 4, 5])
    assert (sorted(two.selected), sorted(two.deferred), sorted(two.dropped)) == ([], [0, 1, 2, 3], [4, 5])


@pytest.mark.parametrize("clusters", [1, 0, 2.5, "3", True])
def test_a_cluster_count_that_cannot_prune_is_refused(artifact, clusters):
    with pytest.raises(ValueError, match="clusters must be an int >= 2"):
        edgerank.Reranker(artifact, clusters=clusters)


def test_edge_cases_k_above_n_single_and_identical_candidates(artifact):
    with edgerank.Reranker(artifact, **AGGRESSIVE) as r:
        out = r.rank(QUERY, DOCS[:4], top_k=10)
        assert len(out) == 4 and out.stats.extra["dropped"] == 0 and out.stats.extra["pruning_steps"] == []
        one = r.rank(QUERY, ["a single vaccine document"], top_k=1)
        assert len(one) == 1 and not one[0].provisional
        same = r.rank(QUERY, ["the same text"] * 6, top_k=2)
        assert [x.index for x in same] == [0, 1]
        full = r.rank(QUERY, ["the same text"] * 6)
        assert [x.index for x in full] == list(range(6)) and len({x.score for x in full}) == 1


def test_exact_order_false_stops_the_top_k_early_with_provisional_scores(artifact):
    with edgerank.Reranker(artifact, exact_order=False, **AGGRESSIVE) as fast, \
            edgerank.Reranker(artifact, **AGGRESSIVE) as exact:
        a, b = fast.rank(QUERY, DOCS, top_k=3), exact.rank(QUERY, DOCS, top_k=3)
    assert a.stats.extra["selected"] > 0  # the policy did select early on this model
    assert a.stats.extra["layer_token_work"] < b.stats.extra["layer_token_work"]
    assert all(r.provisional for r in a)  # stopped before the last layer
    assert {r.index for r in a} == {r.index for r in b}  # same decisions, only the order may differ


def test_recording_needs_pruning_off(artifact):
    with pytest.raises(ValueError, match="pruning=False"):
        edgerank.Reranker(artifact, record_layers=True)


@pytest.mark.core
def test_a_recording_with_one_candidate_or_flat_scores_prunes_nothing():
    rec = Recording(np.full((4, 5), 0.3), np.full(5, 10), 7)
    got, skipped = simulate(PruningPolicy(threshold=0.01, min_depth=1), rec, 2)
    assert got == {0, 1} and skipped == 0.0


def test_calibrate_cli_names_a_missing_model_or_run_in_one_line(tmp_path, capsys):
    from edgerank.calibrate.__main__ import main

    data = write_beir(tmp_path / "beir", ["d1"], {"1": "q"})
    assert main([str(tmp_path / "no-model"), "--data", str(data)]) == 2
    assert "has no first-stage run" in capsys.readouterr().err
    (data / "run.bm25.trec").write_text("1 Q0 d1 1 1.0 bm25\n")
    assert main([str(tmp_path / "no-model"), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no model at") and "\n" not in err


def test_calibrate_cli_end_to_end_writes_the_chosen_knobs_to_a_config(artifact, tmp_path, capsys):
    """The command line on a tiny collection: it records, searches the whole grid (three
    cluster counts), prints the chosen row, and writes that setting to ``--config``."""
    from edgerank.calibrate.replay import MIN_DEPTHS, THRESHOLDS
    from edgerank.calibrate.__main__ import main

    docs = [f"d{i}" for i in range(12)]
    run = "".join(f"{q} Q0 {d} {r + 1} {12 - r} bm25\n" for q in ("q1", "q2") for r, d in enumerate(docs))
    data = write_beir(tmp_path / "coll", docs, {"q1": "vaccine immune cell", "q2": "market price river"}, run=run)
    config, save = tmp_path / "pruning.json", tmp_path / "grid.json"
    assert main([str(artifact), "--data", str(data), "--top-k", "3", "--also-k", "1", "--target", "1.0",
                 "--config", str(config), "--save", str(save), "--rules", "cluster", "--min-saving", "0"]) == 0
    chosen = json.loads(config.read_text())["pruning"]
    grid = json.loads(save.read_text())
    assert len(grid["grid"]) == len(THRESHOLDS) * len(MIN_DEPTHS) * 3
    best = grid["best"]
    assert chosen["queries"] == 2 and chosen["k"] == 3 and best["precision"] == 1.0
    # what is written is the cross-validated verdict: a setting fitted on every query at the
    # margin that held out of sample, or pruning off, with the reason
    verdict = grid["verdicts"]["3"]
    assert chosen["why"] == verdict["why"] and chosen["held_out_precision"] == verdict["held_out_precision"]
    if verdict["setting"] is None:
        assert chosen["off"] is True
    else:
        assert [chosen[x] for x in ("threshold", "min_depth", "clusters")] == \
            [verdict["setting"][x] for x in ("threshold", "min_depth", "clusters")]
        assert verdict["held_out_precision"] >= 1.0
    assert set(chosen["by_k"]) == {"1", "3"}
    one = grid["verdicts"]["1"]["setting"]  # --also-k 1: its own verdict, for calls with K = 1
    assert chosen["by_k"]["1"] == {"off": True} if one is None else chosen["by_k"]["1"]["threshold"] == one["threshold"]
    out = capsys.readouterr().out
    assert f"{len(grid['grid'])} settings tried" in out and "K=3, written: " in out
    assert (tmp_path / "grid.npz").is_file()


def test_calibrate_refuses_a_config_file_it_cannot_read_before_running(tmp_path, capsys):
    """``--config`` naming a file that is not a JSON object (the user's notes, say) is an
    error up front, before any model loads, and the file is left as it was."""
    from edgerank.calibrate.__main__ import main

    for text in ("threshold: 0.3\n", "[1, 2]"):
        notes = tmp_path / "settings.yaml"
        notes.write_text(text)
        assert main([str(tmp_path / "no-model"), "--data", str(tmp_path / "none"), "--config", str(notes)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "settings.yaml" in err and "left as it is" in err
        assert notes.read_text() == text


@pytest.mark.core
def test_write_setting_keeps_what_a_config_file_already_holds(tmp_path):
    config = tmp_path / "edgerank.json"
    config.write_text('{"model": "mine"}')
    write_setting(tmp_path, {"threshold": 0.4, "min_depth": 0.5}, {"k": 10}, config)
    doc = json.loads(config.read_text())
    assert doc["model"] == "mine" and doc["pruning"]["threshold"] == 0.4 and doc["pruning"]["k"] == 10

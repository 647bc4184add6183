"""Per-layer readouts (issue 32): fitting against numpy's least squares, the rank rule and
the bound by hand, the runtime's use of readouts against its own unpruned run, refusal of
a readout file from another model, and ``calibrate --fit-readouts`` end to end."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import edgerank
from edgerank.runtime import layout
from edgerank.runtime.artifact import Artifact
from edgerank.calibrate.replay import Recording, simulate
from edgerank.converters import convert
from edgerank.errors import ModelFormatError
from edgerank.runtime.pruning import PruningPolicy, PruningRun
from edgerank.runtime.readouts import Readouts, features, model_digest
from edgerank.calibrate.readouts import StateRecording, fit_readouts, write_readouts
from edgerank.calibrate.rules import bound, calibrate_margin, calibrate_rank, score_error
from tests.conftest import make_decoder

QUERY = "how do vaccines work"
DOCS = [f"{w} vaccine immune system cell" if i % 3 == 0 else f"{w} market price city river energy"
        for i, w in enumerate("the a of to and in is was for on that with as by at from his her it are".split())]


# ---- fitting: synthetic states with a known linear readout ------------------------------

def _lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Independent reference: ordinary least squares with an intercept column."""
    return np.linalg.lstsq(np.c_[x, np.ones(len(x))], y, rcond=None)[0]


@pytest.mark.core
def test_fitting_recovers_a_known_linear_readout_per_layer():
    rng = np.random.default_rng(0)
    L, H, groups, n = 4, 12, 30, 20
    pooled = rng.normal(size=(groups, L - 1, n, H)) * rng.uniform(0.5, 30, size=(1, L - 1, 1, 1))
    true_w, true_b = rng.normal(size=(L, H)), rng.normal(size=L)
    # one final score per candidate; each layer's readout must find its own map to it, so
    # the targets are built per layer from that layer's features (noise-free)
    layer = 2
    recs = []
    for g in range(groups):
        final = features("state", pooled[g, layer - 1]) @ true_w[layer] + true_b[layer]
        # the head already ranks perfectly before layers 1 and 3, and not at all before 2
        head = np.stack([final, rng.normal(size=n), final])
        recs.append(StateRecording(pooled[g], None, final, head))
    fit = fit_readouts(recs, "state", "identity", L, H)
    # a readout is kept only where it ranks better than the head on held-out groups
    assert fit["fitted"].tolist() == [False, False, True, False]
    assert fit["heldout"][2]["readout"] > 0.999 and fit["heldout"][2]["head"] < 0.5
    x = np.concatenate([features("state", r.pooled[layer - 1]) for r in recs])
    ref = _lstsq(x, np.concatenate([r.final for r in recs]))
    # ridge's smallest strength (1e-3 per sample) shrinks by about that much, no more
    np.testing.assert_allclose(fit["weight"][layer], true_w[layer], rtol=5e-3, atol=1e-3)
    np.testing.assert_allclose(fit["weight"][layer], ref[:-1], rtol=5e-3, atol=1e-3)
    assert fit["bias"][layer] == pytest.approx(ref[-1], rel=5e-3, abs=1e-2)
    # the RMS normalisation makes the readout blind to a state's scale, as the head is
    assert np.allclose(features("state", 7.0 * pooled[0, 0]), features("state", pooled[0, 0]), atol=1e-5)


@pytest.mark.core
def test_biencoder_readout_recovers_a_weighted_cosine():
    """Final score = a per-dimension weighted cosine of the layer's unit-normalised states:
    the d*q block carries the weights, the d and q blocks nothing."""
    rng = np.random.default_rng(1)
    L, H, groups, n = 2, 6, 40, 15
    v = rng.uniform(0.5, 2.0, size=H)
    recs = []
    for _ in range(groups):
        d, q = rng.normal(size=(1, n, H)), rng.normal(size=(1, H))
        du = d[0] / np.linalg.norm(d[0], axis=1, keepdims=True)
        qu = q[0] / np.linalg.norm(q[0])
        recs.append(StateRecording(d, q, (du * qu) @ v + 0.25))
    fit = fit_readouts(recs, "biencoder", "identity", L, H)
    np.testing.assert_allclose(fit["weight"][1][:H], v, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(fit["weight"][1][H:], 0.0, atol=1e-2)
    assert fit["bias"][1] == pytest.approx(0.25, abs=1e-2)


# ---- the rank rule and the bound, by hand -----------------------------------------------

@pytest.mark.core
def test_rank_rule_keeps_the_top_fraction_before_each_layer_of_its_schedule():
    policy = PruningPolicy(rule="rank", keep={1: 0.5, 2: 0.3})
    run = PruningRun(policy, n=10, k=2, n_layers=4)
    assert not run.wants_check(0) and run.wants_check(1)
    scores = np.array([0.1, 0.9, 0.3, 0.8, 0.5, 0.2, 0.7, 0.4, 0.6, 0.0])
    run.check(1, scores)
    assert run.live.tolist() == [1, 3, 4, 6, 8]  # ceil(0.5 * 10) = 5 best
    run.check(2, scores[run.live])
    assert run.live.tolist() == [1, 3, 6]  # ceil(0.3 * 10) = 3
    assert not run.wants_check(3)  # not in the schedule
    assert (run.dropped_at >= 0).sum() == 7 and run.dropped_at[9] == 1 and run.dropped_at[8] == 2


@pytest.mark.core
def test_margin_rule_drops_what_falls_further_than_its_margin_below_the_kth_score():
    policy = PruningPolicy(rule="margin", margin={1: 0.35, 3: 0.1})
    run = PruningRun(policy, n=10, k=2, n_layers=4)
    assert not run.wants_check(0) and run.wants_check(1) and not run.wants_check(2)
    scores = np.array([0.1, 0.9, 0.3, 0.8, 0.5, 0.2, 0.7, 0.4, 0.6, 0.0])
    run.check(1, scores)  # K-th (2nd) best is 0.8: keep >= 0.45
    assert run.live.tolist() == [1, 3, 4, 6, 8]
    later = np.array([0.5, 0.45, 0.9, 0.3, 0.41])  # live 1, 3, 4, 6, 8: K-th is 0.5, keep >= 0.4
    run.check(3, later)
    assert run.live.tolist() == [1, 3, 4, 8] and run.dropped_at[6] == 3
    # tied scores cut nothing, whatever the margin
    tied = PruningRun(PruningPolicy(rule="margin", margin={1: 0.0}), n=6, k=2, n_layers=3)
    tied.check(1, np.full(6, 0.5))
    assert len(tied.live) == 6


@pytest.mark.core
def test_score_error_and_the_margin_rules_calibration_by_hand():
    # 4 candidates of 1 token, 3 layers (rows: before layers 1, 2; final), final top-2 {0, 1}
    scores = np.array([[0.9, 0.2, 0.5, 0.1], [0.9, 0.8, 0.1, 0.0], [0.9, 0.8, 0.3, 0.2]])
    rec = Recording(scores, np.ones(4, dtype=int), 0)
    centred = scores - scores.mean(axis=1, keepdims=True)
    want = np.sqrt(((centred[:2] - centred[2]) ** 2).mean(axis=1))
    assert score_error([rec]) == pytest.approx(want)
    # before layer 1 the 2nd best is 0.5: a margin below 0.3 would drop candidate 1 (0.2)
    got, _ = simulate(PruningPolicy(rule="margin", margin={1: 0.25}), rec, 2)
    assert 1 not in got
    got, skipped = simulate(PruningPolicy(rule="margin", margin={1: 0.35, 2: 0.5}), rec, 2)
    assert got == {0, 1} and skipped == pytest.approx(1 - 9 / 12)  # the bound's cut
    fit = calibrate_margin([rec], 2, 1.0, zs=(0.5, 1.0, 2.0, 4.0))
    assert fit is not None and fit["precision"] == 1.0 and fit["work_skipped"] <= bound([rec], 2, 1.0)["work_skipped"]
    assert fit["work_skipped"] == pytest.approx(simulate(PruningPolicy(rule="margin", margin=fit["margin"]), rec, 2)[1])
    assert set(fit["margin"]) == set(range(fit["first"], 3))


@pytest.mark.core
def test_bound_is_the_oracle_cut_that_keeps_the_final_top_k():
    # 4 candidates of 1 token, 3 layers; final top-2 = {0, 1}. Before layer 1 candidate 2
    # scores above candidate 1 (cannot go), candidate 3 below both (goes); before layer 2
    # candidate 2 falls below both (goes).
    scores = np.array([[0.9, 0.2, 0.5, 0.1], [0.9, 0.8, 0.1, 0.0], [0.9, 0.8, 0.3, 0.2]])
    rec = Recording(scores, np.ones(4, dtype=int), 0)
    # work: layer 0: 4, layer 1: 3, layer 2: 2 -> 9 of 12
    assert bound([rec], 2, 1.0)["work_skipped"] == pytest.approx(1 - 9 / 12)
    # a policy that keeps the top-K skips no more than the bound; one that skips more
    # (a cut to 2 before layer 1) loses candidate 1
    got, skipped = simulate(PruningPolicy(rule="rank", keep={1: 0.75, 2: 0.5}), rec, 2)
    assert got == {0, 1} and skipped == pytest.approx(1 - 9 / 12)
    got, skipped = simulate(PruningPolicy(rule="rank", keep={1: 0.5}), rec, 2)
    assert skipped > 1 - 9 / 12 and 1 not in got
    schedule = calibrate_rank([rec], 2, 1.0, fractions=(0.75, 0.5))
    assert schedule is not None and schedule["precision"] == 1.0
    assert schedule["work_skipped"] == pytest.approx(1 - 9 / 12)


# ---- the runtime -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_models(tmp_path_factory, bpe_tokenizer):
    root = tmp_path_factory.mktemp("readouts")
    out = []
    for seed in (3, 4):
        src = make_decoder(root / f"hf{seed}", "qwen3", bpe_tokenizer, n_layers=6, seed=seed)
        convert(src, "onnx", "fp32", root / f"art{seed}", family="qwen3-reranker", verify=False, progress=False)
        out.append(root / f"art{seed}")
    return out


def _random_readouts(path, seed: int = 0, scale: float = 1.0) -> Readouts:
    art = Artifact.open(path)
    rng = np.random.default_rng(seed)
    L, H = art.n_layers, art.dims["hidden"]
    fit = {"weight": rng.normal(size=(L, H)) * scale, "bias": np.zeros(L), "fitted": np.arange(L) > 0}
    write_readouts(art, fit, "state", "sigmoid", {})
    return Readouts.load(Artifact.open(path))


AGGRESSIVE = dict(threshold=0.0, min_depth=1)


def test_readouts_decide_the_checks_but_never_change_a_final_score(two_models, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(two_models[0], art)
    with edgerank.Reranker(art, pruning=False) as full:
        exact = full.score(QUERY, DOCS)
    readouts = _random_readouts(art, seed=5, scale=3.0)
    with edgerank.Reranker(art, **AGGRESSIVE) as pruned, \
            edgerank.Reranker(art, readouts=False, **AGGRESSIVE) as own_head, \
            edgerank.Reranker(art, pruning=False, record_layers=True, record_states=True) as rec:
        out = pruned.rank(QUERY, DOCS, top_k=5)
        head_out = own_head.rank(QUERY, DOCS, top_k=5)
        ex = rec.rank(QUERY, DOCS).stats.extra
    stats = out.stats.extra
    assert stats["readouts"] and not head_out.stats.extra["readouts"]
    assert stats["dropped"] > 0
    for r in out:  # the top-K ran to the last layer: the head's exact score
        assert not r.provisional
        assert r.score == pytest.approx(exact[r.index], abs=1e-6)
    # the recorded check scores are the readouts' on the pooled states, by hand (sigmoid of
    # the RMS-normalised last token against the weights), and differ from the head's
    for layer in range(1, 6):
        x = ex["layer_pooled"][layer - 1].astype(np.float64)
        x = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)
        by_hand = 1 / (1 + np.exp(-(x @ readouts.weight[layer])))
        np.testing.assert_allclose(ex["layer_scores"][layer - 1], by_hand, rtol=1e-4, atol=1e-6)
        assert not np.allclose(ex["layer_scores"][layer - 1], ex["head_layer_scores"][layer - 1])
    # so the pruned run is what replaying the readout scores predicts, not the head's
    got, skipped = simulate(PruningPolicy(**AGGRESSIVE), Recording(ex["layer_scores"], np.asarray(
        ex["candidate_lengths"]), ex["prefix_tokens"]), 5)
    assert {r.index for r in out} == got and stats["work_skipped"] == pytest.approx(skipped)


def test_a_readout_file_from_another_model_is_refused_at_load(two_models, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(two_models[0], a)
    shutil.copytree(two_models[1], b)
    _random_readouts(a)
    # copied over with its checksum entry, so only the digest can tell
    shutil.copy(a / layout.READOUTS, b / layout.READOUTS)
    mb = json.loads((b / layout.MANIFEST).read_text())
    mb["files"][layout.READOUTS] = json.loads((a / layout.MANIFEST).read_text())["files"][layout.READOUTS]
    (b / layout.MANIFEST).write_text(json.dumps(mb))
    with pytest.raises(ModelFormatError, match="fitted on another model"):
        edgerank.Reranker(b)
    # the right digest but shapes for another width
    art = Artifact.open(b)
    L = art.n_layers
    write_readouts(art, {"weight": np.zeros((L, art.dims["hidden"] + 1)), "bias": np.zeros(L),
                         "fitted": np.ones(L, bool)}, "state", "identity", {})
    with pytest.raises(ModelFormatError, match="do not fit this model"):
        edgerank.Reranker(b)
    # a readout file edited after it was written fails its checksum
    _random_readouts(b)
    with open(b / layout.READOUTS, "r+b") as f:
        f.seek(-20, 2)
        f.write(b"\x00" * 8)
    with pytest.raises(ModelFormatError, match="sha256"):
        edgerank.Reranker(b)
    assert model_digest(Artifact.open(a)) != model_digest(Artifact.open(two_models[1]))


# ---- the command line ------------------------------------------------------------------

def _training_folder(root, n_q: int = 6):
    """A tiny BEIR folder of training data with train qrels (not a TREC DL name)."""
    (root / "qrels").mkdir(parents=True)
    topics = ["vaccine immune cell", "market price river", "energy city river", "immune system cell",
              "price market energy", "vaccine system city"]
    docs = {f"p{i}": f"{topics[i % len(topics)]} {w}" for i, w in enumerate(
        "the a of to and in is was for on that with as by at from".split())}
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "text": t}) + "\n" for d, t in docs.items()))
    qs = {f"t{i}": topics[i % len(topics)] for i in range(n_q)}
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in qs.items()))
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"t{i}\tp{i}\t1\n" for i in range(n_q)))
    return root


def test_calibrate_fit_readouts_end_to_end(two_models, tmp_path, monkeypatch, capsys):
    from edgerank.calibrate.__main__ import main
    from tests.conftest import write_beir

    monkeypatch.setenv("EDGERANK_HOME", str(tmp_path / "home"))  # the BM25 cache
    art = tmp_path / "art"
    shutil.copytree(two_models[0], art)
    train = _training_folder(tmp_path / "squad-like")
    docs = [f"d{i}" for i in range(12)]
    run = "".join(f"{q} Q0 {d} {r + 1} {12 - r} bm25\n" for q in ("q1", "q2") for r, d in enumerate(docs))
    cal = write_beir(tmp_path / "coll", docs, {"q1": "vaccine immune cell", "q2": "market price river"}, run=run)
    save = tmp_path / "cal.json"
    assert main([str(art), "--fit-readouts", "--fit-data", str(train), "--fit-queries", "6", "--fit-passages", "8",
                 "--data", str(cal), "--top-k", "3", "--also-k", "1", "--target", "1.0", "--save", str(save)]) == 0
    manifest = json.loads((art / layout.MANIFEST).read_text())
    entry = manifest["files"][layout.READOUTS]
    assert entry["sha256"] == layout.sha256_file(art / layout.READOUTS)
    assert manifest["readouts"]["pairs"] == 6 * 8 and manifest["readouts"]["link"] == "sigmoid"
    readouts = Readouts.load(Artifact.open(art))
    assert np.flatnonzero(readouts.fitted).tolist() == manifest["readouts"]["layers"]
    assert not readouts.fitted[0] and set(manifest["readouts"]["heldout_spearman"]) == {"1", "2", "3", "4", "5"}
    saved = json.loads(save.read_text())
    if readouts.fitted.any():  # readouts scored (some of) the checks: the head's figure beside
        assert all("head_spearman" in a for a in saved["agreement"])
    assert saved["bound"]["work_skipped"] >= saved["best"]["work_skipped"] - 1e-12
    pruning = manifest["pruning"]
    assert pruning.get("off") is True or pruning["rule"] in ("cluster", "rank", "margin")  # written off where it saves little
    assert pruning["bound_work_skipped"] == saved["bound"]["work_skipped"] and pruning["why"] == saved["verdicts"]["3"]["why"]
    with edgerank.Reranker(art) as r:
        assert r.rank(QUERY, DOCS, top_k=3).stats.extra["readouts"] == bool(readouts.fitted.any())
    out = capsys.readouterr().out
    assert "fitted readouts" in out and "bound" in out
    # a TREC DL set is never fitted on
    dl = shutil.copytree(train, tmp_path / "trec-dl21")
    assert main([str(art), "--fit-readouts", "--fit-data", str(dl), "--data", str(cal)]) == 2
    assert "TREC DL" in capsys.readouterr().err


def _recorded(two_models, tmp_path):
    """A copy of the first model and one unpruned recording of QUERY over DOCS."""
    from edgerank.calibrate.replay import record

    art = tmp_path / "art"
    shutil.copytree(two_models[0], art)
    with edgerank.Reranker(art, pruning=False, record_layers=True) as r:
        return art, record(r, QUERY, DOCS)


def _written_and_run(art, rec, setting: dict, k: int = 3):
    """Write ``setting`` into the manifest, rank with it, and replay it on ``rec``: the
    runtime's stats, its top-K set, and the replay's top-K set and work skipped."""
    from edgerank.calibrate.settings import write_setting

    write_setting(art, setting, {"calibrated": True})
    got, skipped = simulate(PruningPolicy(**setting), rec, k)
    with edgerank.Reranker(art) as pruned:
        out = pruned.rank(QUERY, DOCS, top_k=k)
    return out.stats.extra, {r.index for r in out}, got, skipped


def test_a_calibrated_rank_rule_runs_as_its_replay_predicts(two_models, tmp_path):
    """The manifest's ``rule: rank`` schedule is what the runtime runs: the pruned top-K and
    work skipped equal the replay of the same schedule on the recorded scores."""
    art, rec = _recorded(two_models, tmp_path)
    stats, top, got, skipped = _written_and_run(art, rec, {"rule": "rank", "keep": {1: 0.5, 3: 0.3}})
    assert json.loads((art / layout.MANIFEST).read_text())["pruning"]["keep"] == {"1": 0.5, "3": 0.3}
    assert stats["rule"] == "rank" and top == got
    assert stats["work_skipped"] == pytest.approx(skipped) and skipped > 0.3
    assert [s["layer"] for s in stats["pruning_steps"]] == [1, 3]
    assert [s["deferred"] for s in stats["pruning_steps"]] == [10, 6]  # ceil(0.5 * 20), ceil(0.3 * 20)
    with pytest.raises(ValueError, match="keep must map layer"):
        edgerank.Reranker(art, keep={0: 0.5})


def test_a_calibrated_margin_rule_runs_as_its_replay_predicts(two_models, tmp_path):
    """``rule: margin`` in the manifest is what the runtime runs, as replayed."""
    art, rec = _recorded(two_models, tmp_path)
    # margins that cut some but not all: the spread of the scores before each layer
    margin = {layer: float(0.5 * rec.layer_scores[layer - 1].std()) for layer in (1, 2, 3)}
    stats, top, got, skipped = _written_and_run(art, rec, {"rule": "margin", "margin": margin})
    assert stats["rule"] == "margin" and top == got
    assert stats["work_skipped"] == pytest.approx(skipped) and skipped > 0
    with pytest.raises(ValueError, match="margin must map layer"):
        edgerank.Reranker(art, margin={1: -1.0})

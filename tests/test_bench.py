"""The benchmark harness on a tiny model: JSON schema, subprocess isolation, metric wiring."""

from __future__ import annotations

import json

import pytest

from edgerank.models.supply import resolve
from edgerank.bench import runner as bench
from edgerank.bench.__main__ import main as bench_main
from tests.conftest import make_bert, make_decoder, write_beir

REQUIRED = ("name", "latency_ms_median", "latency_ms_p90", "pairs_per_s", "peak_rss_mb", "model_rss_mb",
            "size_bytes", "ndcg@10", "precision_at_k_vs_fp32")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, bpe_tokenizer):
    folder = make_decoder(tmp_path_factory.mktemp("bench") / "hf", "qwen3", bpe_tokenizer, n_layers=4)
    (folder / "edgerank.json").write_text(json.dumps({"family": "qwen3-reranker"}))
    return folder


QUERIES = [
    {"qid": "q1", "query": "how do vaccines work",
     "docs": [(f"d{i}", t) for i, t in enumerate(["a vaccine trains the immune system", "the stock market fell",
                                                  "immune cells and infection", "river city water"])],
     "qrels": {"d0": 2, "d2": 1}},
    {"qid": "q2", "query": "stock market price",
     "docs": [(f"e{i}", t) for i, t in enumerate(["the price of the stock", "a vaccine", "market energy", "city"])],
     "qrels": {"e0": 2}},
]


def test_bench_report_schema_and_isolated_workers(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGERANK_HOME", str(tmp_path / "home"))
    configs = ["fp32-reference", "onnx-int4-full", "edgerank"]
    report = bench.run_bench(str(tiny_model), configs, QUERIES, top_k=2, subset={}, lowmem_mb=None,
                             progress=False)
    json.dumps(report)  # serialisable
    assert [r["name"] for r in report["configs"]] == configs and not report["errors"]
    for row in report["configs"]:
        for key in REQUIRED:
            assert key in row, (row["name"], key)
        assert row["queries"] == 2 and row["latency_ms_median"] > 0 and 0 <= row["ndcg@10"] <= 1
    by = {r["name"]: r for r in report["configs"]}
    assert by["fp32-reference"]["precision_at_k_vs_fp32"] == 1.0
    assert "work_skipped" in by["edgerank"] and "precision_at_k_vs_unpruned" in by["edgerank"]
    stages = by["edgerank"]["stage_ms_median"]  # the stages account for a call's time, and no more
    assert set(stages) == {"embed", "ort", "between_calls", "prune"} and stages["ort"] > 0
    assert sum(stages.values()) <= by["edgerank"]["latency_ms_p90"]
    # each configuration ran in its own process: the parent never imported torch for them
    assert by["fp32-reference"]["baseline_rss_mb"] > by["edgerank"]["baseline_rss_mb"]  # torch in its baseline
    assert {"cpu", "physical_cores", "ram_gb"} <= set(report["machine"])
    bench.plot(report, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_a_shuffled_ranking_scores_lower_through_the_harness(tiny_model):
    """The metric wiring: answers in the right order beat the same answers shuffled."""
    import numpy as np

    rng = np.random.default_rng(0)
    right, shuffled = [], []
    for qi, q in enumerate(QUERIES):
        best = sorted(range(len(q["docs"])), key=lambda i: -q["qrels"].get(q["docs"][i][0], 0))
        right.append({"qi": qi, "order": best, "latency_s": 0.1, "extra": {}})
        worst = best[::-1]
        rng.shuffle(worst[: len(worst) // 2])
        shuffled.append({"qi": qi, "order": worst, "latency_s": 0.1, "extra": {}})
    configs = ["fp32-reference", "edgerank"]
    done = {c: {"max_rss_mb": 100.0} for c in configs}
    hello = {c: {"baseline_rss_mb": 50.0, "load_s": 0.0} for c in configs}
    specs = {c: {"model": str(tiny_model)} for c in configs}
    rows = {r["name"]: r for r in bench.summarize(configs, {"fp32-reference": right, "edgerank": shuffled},
                                                    done, hello, specs, QUERIES, top_k=1)}
    assert rows["fp32-reference"]["ndcg@10"] > rows["edgerank"]["ndcg@10"]
    assert rows["edgerank"]["precision_at_k_vs_fp32"] < 1.0
    assert rows["fp32-reference"]["model_rss_mb"] == 50.0


def test_latency_ratios_pair_the_queries_both_configurations_ran(tiny_model):
    """A --subset configuration ran only the first queries: its ratio must compare the same
    queries, not its median against a median over a different set."""
    configs = ["llamacpp-q4", "edgerank"]
    slow = [{"qi": 0, "order": [0, 1, 2, 3], "latency_s": 4.0, "extra": {}}]  # subset: query 0 only
    fast = [{"qi": 0, "order": [0, 1, 2, 3], "latency_s": 1.0, "extra": {}},
            {"qi": 1, "order": [0, 1, 2, 3], "latency_s": 9.0, "extra": {}}]
    done = {c: {"max_rss_mb": 100.0} for c in configs}
    hello = {c: {"baseline_rss_mb": 50.0, "load_s": 0.0} for c in configs}
    specs = {c: {"model": str(tiny_model)} for c in configs}
    rows = {r["name"]: r for r in bench.summarize(configs, {"llamacpp-q4": slow, "edgerank": fast},
                                                    done, hello, specs, QUERIES, top_k=1)}
    assert rows["edgerank"]["latency_ms_median"] == 5000.0  # its own median, over both queries
    assert rows["edgerank"]["latency_vs_llamacpp-q4"] == 0.25  # 1 s vs 4 s on query 0
    assert rows["edgerank"]["latency_vs_llamacpp-q4_queries"] == 1


def test_an_unknown_configuration_is_named(tiny_model):
    with pytest.raises(ValueError, match="unknown configuration 'gpu-magic'"):
        bench.prepare(str(tiny_model), ["gpu-magic"], progress=False)


def test_the_edgerank_configuration_prunes_towards_the_benchs_k(tiny_model, tmp_path, monkeypatch):
    """The workers are asked for the top K, as a user asks: with an artifact whose setting
    prunes, the `edgerank` row skips work and `onnx-int4-full` does not."""
    from edgerank.models.cache import cached_artifact
    from edgerank.calibrate.settings import write_setting

    monkeypatch.setenv("EDGERANK_HOME", str(tmp_path / "home"))
    artifact = cached_artifact(resolve(str(tiny_model)), progress=False)
    write_setting(artifact, {"threshold": 0.0, "min_depth": 0.25}, {"calibrated": False})
    queries = [{**q, "docs": q["docs"] * 3} for q in QUERIES]  # 12 candidates
    report = bench.run_bench(str(tiny_model), ["onnx-int4-full", "edgerank"], queries, top_k=2, subset={},
                             lowmem_mb=None, progress=False)
    by = {r["name"]: r for r in report["configs"]}
    assert by["onnx-int4-full"]["work_skipped"] == 0.0
    assert by["edgerank"]["work_skipped"] > 0.1
    assert by["edgerank"]["computed_fraction_per_layer"][-1] < 1.0
    # the artifact itself (calibrated in place, say) benches as it is, with the same result
    direct = bench.run_bench(str(artifact), ["onnx-int4-full", "edgerank"], queries, top_k=2, subset={},
                             lowmem_mb=None, progress=False)
    for row in direct["configs"]:
        assert row["work_skipped"] == by[row["name"]]["work_skipped"]
        assert row["ndcg@10"] == by[row["name"]]["ndcg@10"]
    with pytest.raises(ValueError, match="edgerank artifact: fp32-reference need"):
        bench.prepare(str(artifact), ["edgerank", "fp32-reference"], progress=False)


def test_the_llamacpp_row_matches_a_q4_1_base_and_k_quants_otherwise(tmp_path, bpe_tokenizer, wordpiece_tokenizer,
                                                                     tiny_model):
    """A model trained from a Q4_1 GGUF (SmolLM2's only form here) is compared on llama.cpp at
    q4_1, whose grid keeps the fine-tuning; other bases get q4_k_m, bi-encoders q4_0."""
    from edgerank.converters import convert
    from edgerank.models.supply import resolve

    base = tmp_path / "base.gguf"
    convert(make_decoder(tmp_path / "hf", "llama", bpe_tokenizer), "gguf", "q4_1", base,
            family="zeroshot-chatml", verify=False, progress=False)
    trained = make_decoder(tmp_path / "trained", "llama", bpe_tokenizer)
    made = trained / "edgerank.json"
    made.write_text(json.dumps({"family": "qwen3-reranker", "base": str(base)}))
    assert bench.default_gguf_quant(resolve(trained)) == "q4_1"
    q8 = tmp_path / "base-q8.gguf"
    convert(base, "gguf", "q8_0", q8, verify=False, progress=False)
    made.write_text(json.dumps({"family": "qwen3-reranker", "base": str(q8)}))
    assert bench.default_gguf_quant(resolve(trained)) == "q4_k_m"
    made.write_text(json.dumps({"family": "qwen3-reranker", "base": str(tmp_path / "gone.gguf")}))
    assert bench.default_gguf_quant(resolve(trained)) == "q4_k_m"  # a base no longer there: no match to make
    assert bench.default_gguf_quant(resolve(tiny_model)) == "q4_k_m"  # no base recorded
    assert bench.default_gguf_quant(resolve(make_bert(tmp_path / "bi", wordpiece_tokenizer, "none"))) == "q4_0"


@pytest.mark.core
def test_bench_cli_names_a_missing_model_in_one_line(tmp_path, capsys):
    assert bench_main(["--model", str(tmp_path / "no-model"), "--queries", "1", "--configs", "edgerank"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no model at") and "\n" not in err


@pytest.mark.core
def test_bench_refuses_a_collection_without_a_run_or_with_a_foreign_one(tmp_path, capsys):


    data = write_beir(tmp_path / "beir", ["d1"], {"1": "q"}, judged="1\td1\t1\n")
    argv = ["--data", str(data), "--model", str(tmp_path / "no-model"), "--configs", "edgerank"]
    assert bench_main(argv) == 2
    assert "has no first-stage run" in capsys.readouterr().err
    (data / "run.bm25.trec").write_text("1 Q0 d1 1 2.0 x\n1 Q0 d7 2 1.0 x\n")
    assert bench_main(argv) == 2
    assert "query 1 has 1 documents not in the corpus, e.g. d7" in capsys.readouterr().err

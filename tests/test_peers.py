"""The bench's peers: the whole model as one ONNX graph (``--to onnx-graph``) and
sentence-transformers, each against transformers (the reference backend)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from scipy.stats import spearmanr

import edgerank
from edgerank.bench import runner as bench
from edgerank.converters import convert
from edgerank.bench.peers import GraphPeer, SentenceTransformersPeer
from tests.conftest import PAIRS, make_bert, make_decoder

QUERY = PAIRS[0][0]
DOCS = [d for _, d in PAIRS] + ["the immune system and the vaccine", "a city of water",
                                "vaccines, vaccines and the immune system " * 6]


@pytest.fixture(scope="module", params=["cross-encoder", "cross-encoder-2", "bi-encoder", "qwen3", "llama"])
def model(request, tmp_path_factory, bpe_tokenizer, wordpiece_tokenizer):
    root = tmp_path_factory.mktemp(f"peer-{request.param}")
    if request.param == "cross-encoder":
        return make_bert(root / "hf", wordpiece_tokenizer, "classifier"), None
    if request.param == "cross-encoder-2":  # two logits, as a classifier trained from scratch has
        return make_bert(root / "hf", wordpiece_tokenizer, "classifier", num_labels=2), None
    if request.param == "bi-encoder":
        return make_bert(root / "hf", wordpiece_tokenizer, "none"), None
    return make_decoder(root / "hf", request.param, bpe_tokenizer, n_layers=2), "qwen3-reranker"


def test_the_exported_graph_scores_as_transformers_does(model, tmp_path):
    src, family = model
    with edgerank.Reranker(src, backend="reference", family=family) as ref:
        expected = ref.score(QUERY, DOCS)
    convert(src, "onnx-graph", "fp32", tmp_path / "fp32", family=family, progress=False)
    convert(src, "onnx-graph", "int8", tmp_path / "int8", family=family, progress=False)
    fp32, int8 = GraphPeer(tmp_path / "fp32", threads=1), GraphPeer(tmp_path / "int8", threads=1)
    got, quantized = fp32.score(QUERY, DOCS), int8.score(QUERY, DOCS)
    assert np.abs(got - expected).max() < 1e-4
    assert not np.allclose(quantized, expected, atol=1e-7)  # quantized (its fidelity: the minilm test below)
    # one standard graph: plain ONNX ops and the quantizer's int8 ones, nothing of edgerank's layer form
    ops = {n.op_type for n in onnx.load(tmp_path / "int8" / "model.onnx").graph.node}
    assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    assert "MatMulNBits" not in ops
    manifest = json.loads((tmp_path / "int8" / "manifest.json").read_text())
    assert manifest["format"] == "edgerank-graph" and manifest["padding"] == ("right" if family is None else "left")
    # batches of 32: more documents than one batch, in any order of length, score the same
    many = (DOCS * 5)[::-1]
    assert np.allclose(fp32.score(QUERY, many), np.concatenate([got] * 5)[::-1], atol=1e-5)


def test_sentence_transformers_ranks_as_transformers_does(model):
    src, family = model
    if family is not None:
        with pytest.raises(ValueError, match="encoders"):
            SentenceTransformersPeer(src, family)
        return
    with edgerank.Reranker(src, backend="reference") as ref:
        expected = ref.score(QUERY, DOCS)
    got = SentenceTransformersPeer(src).score(QUERY, DOCS)
    # CrossEncoder returns the sigmoid of the logit, SentenceTransformer a cosine: the same order
    assert spearmanr(got, expected).statistic > 0.999


def test_the_bench_sets_every_row_against_the_fastest_peer(tmp_path, monkeypatch, wordpiece_tokenizer):
    monkeypatch.setenv("EDGERANK_HOME", str(tmp_path / "home"))
    src = make_bert(tmp_path / "ce", wordpiece_tokenizer, "classifier")
    queries = [{"qid": "q", "query": QUERY, "docs": [(str(i), d) for i, d in enumerate(DOCS)], "qrels": {"0": 2}}]
    configs = ["fp32-reference", "ort-fp32-graph", "ort-int8-graph", "sentence-transformers", "edgerank"]
    report = bench.run_bench(str(src), configs, queries * 2, top_k=3, subset={}, lowmem_mb=None, progress=False)
    assert not report["errors"], report["errors"]
    rows = {r["name"]: r for r in report["configs"]}
    faithful = [c for c in bench.PEERS if c in rows and rows[c]["precision_at_k_vs_fp32"] >= bench.FAITHFUL]
    fastest = min(faithful, key=lambda c: rows[c]["latency_ms_median"])
    assert {r["fastest_peer"] for r in rows.values()} == {fastest}
    assert rows[fastest]["latency_vs_fastest_peer"] == 1.0
    assert rows["edgerank"]["latency_vs_fastest_peer"] == pytest.approx(
        rows["edgerank"]["latency_ms_median"] / rows[fastest]["latency_ms_median"])
    peaks = report["machine"]["gemm_gflops"]
    assert {"fp32", "int8"} <= set(peaks) <= {"fp32", "int8", "bf16"} and all(v > 0 for v in peaks.values())
    assert rows["edgerank"]["layer_gflops"] > 0 and rows["edgerank"]["compute"] in ("int4", "int8", "bf16",
                                                                                   "int8-static")
    assert rows["ort-fp32-graph"]["precision_at_k_vs_fp32"] == 1.0  # the same model, the same order


def test_the_int8_graph_of_minilm_keeps_the_ranking(minilm_path, tmp_path):
    """Real weights (all-MiniLM-L6-v2), the built-in sample: quantize_dynamic's int8 graph
    ranks as transformers does (random models' scores are near-tied: no rank check there)."""
    from edgerank.converters.sample import SAMPLE

    convert(minilm_path, "onnx-graph", "int8", tmp_path / "int8", progress=False)
    peer = GraphPeer(tmp_path / "int8", threads=1)
    with edgerank.Reranker(minilm_path, backend="reference") as ref:
        for query, passages in SAMPLE:
            assert spearmanr(peer.score(query, passages), ref.score(query, passages)).statistic > 0.85, query


def test_openvino_and_ctranslate2_score_as_transformers_does(model, tmp_path):
    """The strongest CPU peers score the same graph and checkpoint: OpenVINO at fp32 exactly,
    at its default precision (bf16 where the CPU has it) and NNCF int8 within rounding,
    CTranslate2 int8 (encoders only) within rounding."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from edgerank.bench.peers import CTranslate2Peer, OpenVinoPeer

    src, family = model
    with edgerank.Reranker(src, backend="reference", family=family) as ref:
        expected = ref.score(QUERY, DOCS)
    convert(src, "onnx-graph", "fp32", tmp_path / "fp32", family=family, progress=False)
    scale = max(np.abs(expected).max(), 0.1)  # cosines of random encoders sit near 0
    fp32 = OpenVinoPeer(tmp_path / "fp32", threads=1, precision="fp32").score(QUERY, DOCS)
    assert np.abs(fp32 - expected).max() < 1e-4 * scale
    default = OpenVinoPeer(tmp_path / "fp32", threads=1).score(QUERY, DOCS)
    assert np.abs(default - expected).max() < 2e-2 * scale  # bf16 keeps ~3 digits
    int8 = OpenVinoPeer(tmp_path / "fp32", threads=1, precision="int8").score(QUERY, DOCS)
    assert np.abs(int8 - expected).max() < 5e-2 * scale and not np.allclose(int8, fp32, atol=1e-7)
    if family is not None:
        with pytest.raises(ValueError, match="encoders"):
            CTranslate2Peer(src, threads=1, family=family)
        return
    pytest.importorskip("ctranslate2")
    ct2 = CTranslate2Peer(src, threads=1)
    try:
        got = ct2.score(QUERY, DOCS)
        assert np.abs(got - expected).max() < 5e-2 * scale and not np.allclose(got, expected, atol=1e-7)
    finally:
        ct2.close()

"""The int8-static form of an int4 encoder (converters/static_int8.py): written by NNCF at
conversion, run by OpenVINO, chosen where measured fastest, never under a memory budget."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from scipy.stats import spearmanr

import edgerank
import edgerank.runtime.compute as compute
from edgerank.converters import convert
from edgerank.converters.sample import SAMPLE
from edgerank.runtime.artifact import Artifact
from edgerank.runtime.compute import STATIC, STATIC_CPUS, by_rule, runnable
from edgerank.runtime.cpu import features
from tests.conftest import PAIRS, make_bert, make_decoder

pytest.importorskip("openvino")
pytest.importorskip("nncf")

QUERY = PAIRS[0][0]
DOCS = [d for _, d in PAIRS] + ["the immune system and the vaccine", "a city of water", "stock market energy",
                                "vaccines, vaccines and the immune system " * 6]


@pytest.fixture(scope="module", autouse=True)
def runs_here():
    """The form runs on AVX512-VNNI and AMX CPUs only (``compute.STATIC_CPUS``). Everything here
    but its fidelity (the last test) holds on any CPU's kernels, so it runs everywhere."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compute, "features", lambda: features() | {STATIC_CPUS[0]})
        yield


@pytest.fixture(scope="module")
def bert(tmp_path_factory, wordpiece_tokenizer):
    """(int4 artifact with the int8-static form, fp32 artifact) of a small random cross-encoder."""
    root = tmp_path_factory.mktemp("static")
    src = make_bert(root / "hf", wordpiece_tokenizer, "classifier", n_layers=3)
    for quant in ("int4", "fp32"):
        convert(src, "onnx", quant, root / quant, verify=False, progress=False)
    return root / "int4", root / "fp32"


def test_an_int4_encoder_stores_quantize_dequantize_layers_that_openvino_runs(bert):
    int4, _ = bert
    manifest = json.loads((int4 / "manifest.json").read_text())
    files = manifest["compute"]["forms"][STATIC]
    assert len(files) == len(manifest["layers"]) == 3
    assert manifest["compute"]["ops"][STATIC]["engine"] == "openvino"
    ops = {n.op_type for n in onnx.load(int4 / files[0]).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "MatMul"} <= ops and "MatMulNBits" not in ops
    # every weight matrix is stored as int8 codes
    inits = onnx.load(int4 / files[0]).graph.initializer
    big = [t for t in inits if len(t.dims) == 2 and min(t.dims) >= 32]
    assert big and all(t.data_type == onnx.TensorProto.INT8 for t in big)
    assert runnable(Artifact.open(int4))[STATIC] == (STATIC, "openvino")
    assert STATIC in manifest["compute"]["fit"] and STATIC in manifest["compute"]["measured"]["ms"]


def test_it_follows_the_fp32_model_and_scores_a_pair_as_alone(bert):
    """Its activation scales are fixed at conversion, so a pair's score does not depend on
    what runs beside it (unlike one scale per call); and it ranks like the fp32 model."""
    int4, fp32 = bert
    with edgerank.Reranker(fp32, pruning=False) as f:
        ref = f.score(QUERY, DOCS)
    with edgerank.Reranker(int4, pruning=False, compute=STATIC) as r:
        got = r.score(QUERY, DOCS)
        alone = np.array([r.score(QUERY, [d])[0] for d in DOCS])
        assert r.last_stats.extra["compute"]["engine"] == "openvino"
    assert np.abs(got - alone).max() <= 1e-6
    assert spearmanr(got, ref).statistic > 0.8  # a random model's scores nearly tie: the real one's below


def test_decoders_get_no_int8_static_form(tmp_path, bpe_tokenizer):
    """Int8 activations ranked SmolLM2 unlike its own form even per token and smoothed."""
    src = make_decoder(tmp_path / "hf", "qwen3", bpe_tokenizer, n_layers=2)
    convert(src, "onnx", "int4", tmp_path / "int4", family="qwen3-reranker", verify=False, progress=False)
    assert STATIC not in json.loads((tmp_path / "int4" / "manifest.json").read_text())["compute"]["forms"]


def test_a_memory_budget_runs_another_form(bert, tmp_path):
    """The budget does not model the form's OpenVINO executors (366 MB beyond the interpreter
    on minilm-l6 where the int8 form took 109): under max_memory_mb the next form runs, and
    asking for both is an error."""
    int4, _ = bert
    fast = tmp_path / "fast"
    shutil.copytree(int4, fast)
    manifest = json.loads((fast / "manifest.json").read_text())
    for fit in manifest["compute"]["fit"].values():
        fit["fit"] = True
    manifest["compute"]["measured"]["ms"] = {"int4": 2.0, "int8": 1.5, STATIC: 1.0, "bf16": 1.9}
    (fast / "manifest.json").write_text(json.dumps(manifest))
    with edgerank.Reranker(fast) as r:
        r.score(QUERY, DOCS[:2])
        assert r.last_stats.extra["compute"]["form"] == STATIC
    with edgerank.Reranker(fast, max_memory_mb=2000) as r:
        r.score(QUERY, DOCS[:2])
        assert r.last_stats.extra["compute"]["form"] == "int8"
    with pytest.raises(ValueError, match="max_memory_mb"):
        edgerank.Reranker(fast, compute=STATIC, max_memory_mb=2000)


def test_it_runs_on_avx512_vnni_and_amx_cpus_only_where_the_rule_takes_it(bert, monkeypatch):
    """Without VNNI, OpenVINO's u8 x s8 pair sums saturate and the form's scores move (by up
    to 0.038 on minilm-l6's sample with oneDNN capped at AVX2): there it does not run."""
    int4, _ = bert
    for flags, runs in (({"avx2", "avx512f", "avx512_vnni"}, True), ({"avx2", "amx_int8"}, True),
                        ({"avx2", "avx_vnni"}, False), ({"avx2", "avx512f"}, False)):
        monkeypatch.setattr(compute, "features", lambda flags=flags: frozenset(flags))
        assert (STATIC in runnable(Artifact.open(int4))) == runs, flags
        assert by_rule([f for f in ["int4", "int8", STATIC] if runs or f != STATIC]) == (STATIC if runs else "int8")


def test_the_cache_converts_an_encoder_again_once_the_form_can_be_written(bert, tmp_path, monkeypatch):
    import edgerank.models.cache as cache
    from edgerank.models.cache import _older_form

    int4, _ = bert
    old = tmp_path / "old"
    shutil.copytree(int4, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["compute"]["forms"][STATIC]
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert not _older_form(int4) and _older_form(old)
    monkeypatch.setattr(cache, "can_quantize_static", lambda: False)  # OpenVINO or NNCF not installed
    assert not _older_form(old)


def test_calls_with_and_without_checks_run_the_spans_loaded_with_the_model(bert):
    """A call that checks nowhere (no ``top_k``, or one document) runs the spans held for the
    main pruning setting: nothing is compiled again between such calls."""
    int4, _ = bert
    with edgerank.Reranker(int4, compute=STATIC, threshold=0.0, min_depth=0.6) as r:
        held = list(r._backend.layers._resident)
        assert held == [(0, 2), (2, 3)]
        for call in (lambda: r.score(QUERY, DOCS), lambda: r.rank(QUERY, DOCS, top_k=2),
                     lambda: r.score(QUERY, DOCS[:1]), lambda: r.rank(QUERY, DOCS, top_k=2)):
            call()
            assert list(r._backend.layers._resident) == held and r.last_stats.extra["layer_load_s"] == 0


def test_minilm_l6s_int8_static_form_ranks_like_fp32_and_scores_a_pair_as_alone(minilm_path):
    """The real minilm-l6 on the built-in sample: the form passes the fit check, each pair
    scores the same alone and in its chunk, and it keeps the fp32 order."""
    from edgerank.models.cache import cached_artifact
    from edgerank.models.supply import resolve

    if not any(f in features() for f in STATIC_CPUS):
        pytest.skip("the int8-static form runs on AVX512-VNNI and AMX CPUs only (compute.STATIC_CPUS)")
    int4 = cached_artifact(resolve(str(minilm_path)), "int4", False)
    fp32 = cached_artifact(resolve(str(minilm_path)), "fp32", False)
    fit = json.loads((int4 / "manifest.json").read_text())["compute"]["fit"][STATIC]
    assert fit["fit"] and fit["spearman"] >= 0.95 and fit["pairs"] == 64
    with edgerank.Reranker(int4, pruning=False, compute=STATIC) as r, edgerank.Reranker(fp32, pruning=False) as f:
        for query, passages in SAMPLE:
            got, ref = r.score(query, passages), f.score(query, passages)
            alone = np.array([r.score(query, [p])[0] for p in passages])
            assert np.abs(got - alone).max() <= 1e-6, query
            assert np.abs(got - ref).max() <= 0.05 * (ref.max() - ref.min()), query
            assert spearmanr(got, ref).statistic > 0.9, query


def test_layers_between_checks_run_as_one_model_and_score_as_one_by_one(bert, monkeypatch):
    """The form's layers between two pruning checks run stacked into one OpenVINO model; in
    fp32 that equals running them one by one, and the spans follow the call's checks."""
    import edgerank.runtime.backends.layerwise as layerwise

    int4, _ = bert

    def ranked(r) -> list[tuple[int, float]]:
        return [(x.index, x.score) for x in r.rank(QUERY, DOCS, top_k=2)]

    with edgerank.Reranker(int4, compute=STATIC, pruning=False) as whole, \
            edgerank.Reranker(int4, compute=STATIC, threshold=0.0, min_depth=0.6) as checked:
        assert list(whole._backend.layers._resident) == [(0, 3)]
        got, pruned = whole.score(QUERY, DOCS), ranked(checked)
        check = checked.last_stats.extra["first_check_layer"]
        assert check == 2 and list(checked._backend.layers._resident) == [(0, 2), (2, 3)]
    monkeypatch.setattr(layerwise, "STACKED", ())
    with edgerank.Reranker(int4, compute=STATIC, pruning=False) as layers, \
            edgerank.Reranker(int4, compute=STATIC, threshold=0.0, min_depth=0.6) as checked:
        assert list(layers._backend.layers._resident) == [0, 1, 2]
        assert np.array_equal(layers.score(QUERY, DOCS), got)
        assert ranked(checked) == pruned

"""Bad input gives a clear error or the documented behaviour, never a crash in a kernel."""

from __future__ import annotations

import numpy as np
import pytest

import edgerank
from edgerank.errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError


@pytest.fixture(scope="module")
def reranker(tiny_qwen3):
    with edgerank.Reranker(tiny_qwen3, backend="reference", family="qwen3-reranker") as r:
        yield r


DOCS = ["the immune system", "the stock market", "a river city", "yes no"]


def test_empty_documents_give_an_empty_ranking(reranker, monkeypatch):
    assert reranker.rank("query", []) == []
    monkeypatch.setattr(edgerank, "Reranker", lambda *a, **k: pytest.fail("a model was loaded"))
    assert edgerank.rank("query", [], model="no/such/model") == []


def test_results_are_sorted_and_carry_index_score_and_text(reranker):
    ranking = reranker.rank("the immune system", DOCS)
    scores = reranker.score("the immune system", DOCS)
    assert [r.index for r in ranking] == list(np.argsort(-scores, kind="stable"))
    assert all(r.document == DOCS[r.index] and r.score == pytest.approx(scores[r.index]) for r in ranking)
    s = ranking.stats
    assert s.candidates == 4 and s.tokens > 4 * s.prefix_tokens > 0 and s.peak_rss_mb > 0 and s.wall_s > 0


@pytest.mark.parametrize("top_k", [0, -3])
def test_non_positive_top_k_is_an_error(reranker, top_k):
    with pytest.raises(ValueError, match="top_k must be positive"):
        reranker.rank("q", DOCS, top_k=top_k)


@pytest.mark.parametrize("top_k", [True, 2.0, "2"])
def test_a_top_k_that_is_not_an_int_is_a_type_error(reranker, top_k):
    with pytest.raises(TypeError, match="top_k must be an int or None"):
        reranker.rank("q", DOCS, top_k=top_k)


def test_a_numpy_integer_top_k_is_an_int(reranker):
    assert [r.index for r in reranker.rank("q", DOCS, top_k=np.int64(2))] == \
        [r.index for r in reranker.rank("q", DOCS, top_k=2)]


def test_top_k_larger_than_the_list_returns_everything(reranker):
    assert len(reranker.rank("q", DOCS, top_k=100)) == len(DOCS)
    assert [r.index for r in reranker.rank("q", DOCS, top_k=2)] == [r.index for r in reranker.rank("q", DOCS)][:2]


@pytest.mark.parametrize("docs", [["ok", 3], ["ok", None], ["ok", b"bytes"]])
def test_non_string_documents_are_a_type_error(reranker, docs):
    with pytest.raises(TypeError, match=r"documents\[1\]"):
        reranker.rank("q", docs)


def test_a_single_string_instead_of_a_list_is_a_type_error(reranker):
    with pytest.raises(TypeError, match="list of str"):
        reranker.rank("q", "a single document")


@pytest.mark.parametrize("query", ["", "   "])
def test_an_empty_query_is_an_error(reranker, query):
    with pytest.raises(ValueError, match="query is empty"):
        reranker.rank(query, DOCS)


def test_empty_documents_are_scored_like_any_other(reranker):
    ranking = reranker.rank("q", ["", "the market", ""])
    assert sorted(r.index for r in ranking) == [0, 1, 2]
    assert ranking.stats.truncated == []


def test_a_1mb_document_is_truncated_and_reported(reranker):
    huge = "the immune system " * 60_000  # ~1 MB
    ranking = reranker.rank("q", ["short", huge])
    assert ranking.stats.truncated == [1]
    limit = reranker.spec.max_length
    assert ranking.stats.tokens <= 2 * limit


def test_identical_documents_tie_in_input_order(reranker):
    ranking = reranker.rank("q", ["same text"] * 3)
    assert [r.index for r in ranking] == [0, 1, 2]
    assert len({r.score for r in ranking}) == 1


def test_a_query_too_long_for_the_model_is_an_error_not_a_truncation(tiny_qwen3):
    with edgerank.Reranker(tiny_qwen3, backend="reference", family="qwen3-reranker", max_length=64) as r:
        with pytest.raises(ValueError, match="never truncated"):
            r.rank("the immune system " * 40, DOCS)


def test_a_closed_reranker_refuses_to_rank(tiny_qwen3):
    r = edgerank.Reranker(tiny_qwen3, backend="reference", family="qwen3-reranker")
    r.close()
    with pytest.raises(RuntimeError, match="closed"):
        r.rank("q", DOCS)


@pytest.mark.core
def test_a_missing_path_says_so(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such file or folder"):
        edgerank.Reranker(tmp_path / "nope.gguf")


@pytest.mark.core
def test_a_file_that_is_not_a_model_is_refused(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("not a model")
    with pytest.raises(ModelFormatError, match="GGUF"):
        edgerank.Reranker(f)
    with pytest.raises(ModelFormatError, match="neither config.json"):
        edgerank.Reranker(tmp_path)


def _tiny_gguf(path, arch: str) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.core
def test_a_gguf_of_an_unsupported_architecture_is_refused(tmp_path):
    path = tmp_path / "mamba.gguf"
    _tiny_gguf(path, "mamba")
    with pytest.raises(UnsupportedModelError, match="'mamba' is not supported"):
        edgerank.Reranker(path)


@pytest.mark.core
def test_a_truncated_gguf_is_refused_clearly(tmp_path):
    good = tmp_path / "llama.gguf"
    _tiny_gguf(good, "llama")
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(good.read_bytes()[:40])
    with pytest.raises(ModelFormatError, match="not a readable GGUF"):
        edgerank.Reranker(bad)


def test_an_unknown_family_or_backend_is_named(tiny_qwen3):
    with pytest.raises(ValueError, match="unknown model family 'nope'"):
        edgerank.Reranker(tiny_qwen3, family="nope")
    with pytest.raises(ValueError, match="unknown backend 'gpu9000'"):
        edgerank.Reranker(tiny_qwen3, backend="gpu9000", family="qwen3-reranker")


def test_llamacpp_refuses_a_non_gguf_model_clearly(tiny_qwen3):
    with pytest.raises(edgerank.BackendUnavailableError, match="runs GGUF files"):
        edgerank.Reranker(tiny_qwen3, backend="llamacpp", family="qwen3-reranker")


def test_a_reranker_shared_by_threads_gives_the_sequential_results(reranker):
    from concurrent.futures import ThreadPoolExecutor

    queries = [f"query {w}" for w in ("immune", "market", "river", "city", "yes", "no")]
    expected = [list(reranker.score(q, DOCS)) for q in queries]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda q: list(reranker.score(q, DOCS)), queries))
    assert got == expected


def test_closing_a_reranker_waits_for_the_call_in_progress(tiny_qwen3):
    """close() from another thread while a call runs must not free the model under it."""
    import threading
    import time

    r = edgerank.Reranker(tiny_qwen3, backend="reference", family="qwen3-reranker")
    expected = r.score("query immune", DOCS)
    inner, started = r._backend.score, threading.Event()

    def slow_score(batch, top_k=None):
        started.set()
        time.sleep(0.3)
        return inner(batch, top_k)

    r._backend.score = slow_score
    got = {}
    worker = threading.Thread(target=lambda: got.update(scores=r.score("query immune", DOCS)))
    worker.start()
    started.wait(5)
    r.close()  # returns only once the call has finished
    worker.join(5)
    np.testing.assert_array_equal(got["scores"], expected)
    with pytest.raises(RuntimeError, match="closed"):
        r.rank("q", DOCS)


def test_module_rank_from_threads_with_different_options_gives_each_its_own_result(tiny_cross_encoder):
    """edgerank.rank keeps one model loaded; a thread asking for other options replaces it,
    but never while another thread's call is still using it."""
    from concurrent.futures import ThreadPoolExecutor

    common = dict(model=tiny_cross_encoder, backend="reference")
    docs = [" ".join([d] * 8) + f" {n}" for n, d in enumerate(DOCS * 3)]  # long enough for max_length=16 to cut
    lengths = [None, 16, None, 16, None, 16]
    with edgerank.Reranker(**common) as full, edgerank.Reranker(**common, max_length=16) as short:
        expected = [[(x.index, x.score) for x in (short if n else full).rank("query immune", docs)] for n in lengths]
    assert expected[0] != expected[1]  # the two options really score differently
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda n: [(x.index, x.score) for x in
                                       edgerank.rank("query immune", docs, max_length=n, **common)], lengths))
    assert got == expected


def test_lone_surrogates_score_as_the_replacement_character(reranker):
    """Text decoded with errors="surrogateescape" carries lone surrogates, which tokenizers
    refuse; they are read as U+FFFD, in documents and in the query."""
    bad, clean = ["caf\udce9 menu", "ok"], ["caf\ufffd menu", "ok"]
    np.testing.assert_array_equal(reranker.score("caf\udce9", bad), reranker.score("caf\ufffd", clean))
    paired = reranker.score("q", ["smile \ud83d\ude42"])  # a surrogate pair is the character it encodes
    np.testing.assert_array_equal(paired, reranker.score("q", ["smile \U0001f642"]))


def test_an_instruction_with_lone_surrogates_is_read_like_the_query(reranker):
    """The instruction goes into the same prompt as the query, so it is cleaned the same
    way (it used to reach the tokenizer as is and raise its TypeError)."""
    bad = reranker.rank("q", DOCS, instruction="find caf\udce9s")
    clean = reranker.rank("q", DOCS, instruction="find caf\ufffds")
    assert [(r.index, r.score) for r in bad] == [(r.index, r.score) for r in clean]
    default = reranker.rank("q", DOCS)
    assert [r.score for r in default] != [r.score for r in clean]  # the instruction is used at all


def test_an_instruction_the_prompt_has_no_place_for_is_an_error(tiny_cross_encoder, reranker):
    with pytest.raises(ValueError, match="'cross-encoder' family takes no instruction"):
        edgerank.Reranker(tiny_cross_encoder, backend="reference", instruction="be brief")
    with edgerank.Reranker(tiny_cross_encoder, backend="reference") as ce:
        with pytest.raises(ValueError, match="takes no instruction"):
            ce.rank("q", DOCS, instruction="be brief")
    with pytest.raises(TypeError, match="instruction must be a str or None, not bytes"):
        reranker.rank("q", DOCS, instruction=b"be brief")


def test_an_iterator_of_documents_is_refused_with_what_to_pass(reranker):
    with pytest.raises(TypeError, match=r"got a generator; pass list"):
        reranker.rank("q", (d for d in DOCS))


@pytest.mark.parametrize("max_length", [0, -3, 2.5, True])
def test_a_max_length_that_is_not_a_positive_int_is_an_error(tiny_qwen3, max_length):
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        edgerank.Reranker(tiny_qwen3, backend="reference", family="qwen3-reranker", max_length=max_length)


@pytest.mark.parametrize("knob,value,message", [
    ("threshold", -0.1, "threshold must be a number >= 0"), ("min_depth", -1, "min_depth must be a number >= 0"),
    ("threshold", float("nan"), "threshold must be a number"), ("threshold", "high", "threshold must be a number"),
    ("threads", 0, "threads must be a positive int"), ("threads", -1, "threads must be a positive int"),
    ("threads", 1.5, "threads must be a positive int"), ("threads", True, "threads must be a positive int"),
    ("max_memory_mb", -5, "max_memory_mb must be a positive number"), ("max_memory_mb", "512", "max_memory_mb must be"),
    ("max_memory_mb", float("nan"), "max_memory_mb must be"), ("chunk_tokens", 0, "chunk_tokens must be a positive int"),
    ("chunk_tokens", 0.5, "chunk_tokens must be a positive int")])
def test_a_runtime_knob_out_of_range_is_an_error(tiny_cross_encoder, tmp_path, knob, value, message):
    from edgerank.converters import convert

    art = tmp_path / "int4"
    convert(str(tiny_cross_encoder), "onnx", "int4", art, verify=False, progress=False)
    with pytest.raises(ValueError, match=message):
        edgerank.Reranker(art, **{knob: value})


def test_an_option_a_backend_does_not_take_is_named_with_the_ones_it_does(tiny_cross_encoder):
    from edgerank.errors import OptionError  # an EdgerankError: command lines print it as one line

    with pytest.raises(OptionError, match=r"backend 'reference' takes no option 'pruning'; its options: device, batch_tokens"):
        edgerank.Reranker(tiny_cross_encoder, backend="reference", pruning=False)


def test_a_max_length_beyond_an_encoders_position_table_is_an_error(tiny_cross_encoder, tmp_path):
    """A BERT-style model cannot embed more positions than its table holds: asking for
    more is an error up front (it used to fail inside the position-embedding add)."""
    import json

    from edgerank.converters import convert

    positions = json.loads((tiny_cross_encoder / "config.json").read_text())["max_position_embeddings"]
    art = tmp_path / "int4"
    convert(str(tiny_cross_encoder), "onnx", "int4", art, verify=False, progress=False)
    for model, backend in ((tiny_cross_encoder, "reference"), (art, "edgerank")):
        with pytest.raises(ValueError, match=f"position table has {positions} positions"):
            edgerank.Reranker(model, backend=backend, max_length=positions + 1)
        with edgerank.Reranker(model, backend=backend, max_length=positions) as r:
            ranking = r.rank("q", ["word " * (4 * positions), "short"])
        assert ranking.stats.truncated == [0]


def test_identical_documents_are_scored_once_and_counted(reranker):
    docs = ["the immune system", "the stock market", "the immune system", "a river city", "the immune system"]
    unique = ["the immune system", "the stock market", "a river city"]
    ranking = reranker.rank("q", docs)
    alone = reranker.rank("q", unique)
    assert ranking.stats.duplicates == 2 and alone.stats.duplicates == 0
    assert ranking.stats.tokens == alone.stats.tokens  # the copies cost nothing
    by_index = {r.index: r.score for r in ranking}
    assert by_index[0] == by_index[2] == by_index[4]
    copies = [r.index for r in ranking if r.index in (0, 2, 4)]
    assert copies == [0, 2, 4]  # adjacent in the ranking, in input order
    positions = [i for i, r in enumerate(ranking) if r.index in (0, 2, 4)]
    assert positions == list(range(positions[0], positions[0] + 3))
    expected = {unique[r.index]: r.score for r in alone}
    for r in ranking:
        assert r.score == pytest.approx(expected[r.document], abs=1e-6)


def test_documents_identical_only_after_truncation_share_one_score(reranker):
    limit = reranker.spec.max_length
    base = "the immune system " * limit
    ranking = reranker.rank("q", [base + "ends one way", "short", base + "ends another way"])
    assert ranking.stats.duplicates == 1 and ranking.stats.truncated == [0, 2]
    scores = {r.index: r.score for r in ranking}
    assert scores[0] == scores[2]

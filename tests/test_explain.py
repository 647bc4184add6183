"""rank(..., explain=True): rationales for the top K only.

Decoders: the artifact's greedy generation equals a plain transformers greedy loop on the
same weights, token for token (the reference renders the prompt from the model card's
format, tokenises it with transformers, picks the verdict from the full logits and
recomputes the whole sequence at every step: no shared prefix, no cache). Encoders: the
extracted sentence is the one the model scores highest, with offsets into the original
text.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the reference extra: a core install skips this module
transformers = pytest.importorskip("transformers")

import edgerank
from edgerank.runtime import layout
from edgerank.converters import convert
from edgerank.errors import ModelFormatError, OptionError
from edgerank.runtime.explain import sentences
from edgerank.runtime.specs import SPECS
from tests.conftest import PAIRS, make_bert, make_decoder
from tests.test_parity_transformers import FAMILIES

N_TOKENS = 12


def to_artifact(src, dest, quant="fp32", family=None):
    convert(src, "onnx", quant, dest, family=family, verify=False, progress=False)
    return dest


def reference_generation(model, tok, family: str, query: str, doc: str, n: int) -> list[int]:
    """Verdict (argmax over the answer labels) + the family's explain prompt, then ``n``
    greedy tokens, each step a full forward of the whole sequence."""
    render, _ = FAMILIES[family]
    spec = SPECS[family]
    ids = tok(render(query, doc.rstrip()), add_special_tokens=False).input_ids
    labels = [tok(lab, add_special_tokens=False).input_ids[0] for lab in spec.score.labels]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
        ids = ids + [labels[int(torch.argmax(logits[labels]))]] + tok(spec.explain_prompt,
                                                                     add_special_tokens=False).input_ids
        out = []
        for _ in range(n):
            nxt = int(torch.argmax(model(torch.tensor([ids])).logits[0, -1]))
            out.append(nxt)
            ids.append(nxt)
    return out


def check_against_reference(ref_tokens: list[int], got: tuple[int, ...], stop_ids: set[int], n: int) -> None:
    """Equal token for token; generation may end early only on a stop token."""
    assert list(got) == ref_tokens[: len(got)]
    assert len(got) == n or got[-1] in stop_ids


@pytest.mark.parametrize("arch,family,tie", [("qwen3", "qwen3-reranker", False), ("llama", "interank", True),
                                             ("qwen3", "rank1", True), ("llama", "zeroshot-chatml", False)])
def test_generation_equals_transformers_greedy_token_for_token(arch, family, tie, tmp_path, bpe_tokenizer):
    # weights 12x the default init: attention is sharp enough that the continuation depends
    # on the document and on every position (at the default init it echoes the last token)
    src = make_decoder(tmp_path / "hf", arch, bpe_tokenizer, seed=5, tie=tie, n_layers=3, initializer_range=0.25)
    art = to_artifact(src, tmp_path / "art", family=family)
    assert (art / layout.LM_HEAD).is_file() != tie  # untied models carry their full LM head
    tok = transformers.AutoTokenizer.from_pretrained(src)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    query, docs = PAIRS[0][0], [d for q, d in PAIRS]
    stop_ids = {tok(s, add_special_tokens=False).input_ids[0] for s in SPECS[family].explain_stop}
    with edgerank.Reranker(art, min_depth=1, threshold=0.0) as r:
        ranking = r.rank(query, docs, top_k=2, explain=True, explain_tokens=N_TOKENS)
    assert ranking.stats.explained == 2
    refs = []
    for res in ranking:
        e = res.explanation
        assert e.kind == "generated" and e.start is None and e.verdict in SPECS[family].score.labels
        ref = reference_generation(model, tok, family, query, res.document, N_TOKENS)
        refs.append(ref)
        check_against_reference(ref, e.token_ids, stop_ids, N_TOKENS)
        text = tok.decode(list(e.token_ids))
        for stop in SPECS[family].explain_stop:
            text = text.split(stop, 1)[0]
        assert e.text == text.strip()
    assert refs[0] != refs[1], "the documents must lead to different generations for the test to mean anything"
    assert ranking.stats.explain_tokens == sum(len(res.explanation.token_ids) for res in ranking)
    assert ranking.stats.explain_s > 0
    assert ranking.stats.extra["explain"]["prefix_reused"] is True


def test_only_the_top_k_are_explained_and_without_explain_nothing_is(tmp_path, bpe_tokenizer):
    src = make_decoder(tmp_path / "hf", "qwen3", bpe_tokenizer, seed=2)
    art = to_artifact(src, tmp_path / "art", quant="int4", family="zeroshot-chatml")
    query, docs = PAIRS[0][0], [d for _, d in PAIRS] * 3  # copies: explained once, shared
    with edgerank.Reranker(art, min_depth=1, threshold=0.0) as r:
        plain = r.rank(query, docs, top_k=3)
        ranking = r.rank(query, docs, top_k=3, explain=True, explain_tokens=4)
        everything = r.rank(query, docs, explain=True, explain_tokens=4)
    assert all(res.explanation is None for res in plain) and plain.stats.explained == 0
    assert [(x.index, x.score) for x in ranking] == [(x.index, x.score) for x in plain]  # explaining changes no score
    distinct_top = {res.document for res in ranking}
    assert ranking.stats.explained == len(distinct_top) <= 3
    assert all(res.explanation is not None for res in ranking)
    assert ranking.stats.explain_tokens <= 4 * len(distinct_top)
    assert everything.stats.explained == len(set(docs))  # top_k=None: every result, each distinct one once
    by_doc = {}
    for res in everything:  # copies of one document share one explanation
        assert by_doc.setdefault(res.document, res.explanation) == res.explanation


def test_old_artifacts_without_a_full_lm_head_cannot_explain(tmp_path, bpe_tokenizer):
    src = make_decoder(tmp_path / "hf", "llama", bpe_tokenizer, seed=1, tie=False)
    art = to_artifact(src, tmp_path / "art", quant="int4", family="zeroshot-chatml")
    manifest = json.loads((art / layout.MANIFEST).read_text())
    assert manifest["files"][layout.LM_HEAD]["sha256"]  # checked like every other file
    del manifest["files"][layout.LM_HEAD], manifest["files"][layout.LM_HEAD_SCALE]
    del manifest["dims"]["tied_embeddings"]  # as the converter wrote it before explanations
    (art / layout.LM_HEAD).unlink()
    (art / layout.LM_HEAD_SCALE).unlink()
    (art / layout.MANIFEST).write_text(json.dumps(manifest))
    with edgerank.Reranker(art) as r:
        assert len(r.rank("how do vaccines work", ["a vaccine", "the market"], top_k=1)) == 1  # still ranks
        with pytest.raises(ModelFormatError, match="re-convert"):
            r.rank("how do vaccines work", ["a vaccine", "the market"], top_k=1, explain=True)


def test_an_old_tied_artifact_still_explains(tmp_path, bpe_tokenizer):
    src = make_decoder(tmp_path / "hf", "qwen3", bpe_tokenizer, seed=4, tie=True)
    art = to_artifact(src, tmp_path / "art", quant="int4", family="zeroshot-chatml")
    with edgerank.Reranker(art) as r:
        before = r.rank("how do vaccines work", ["a vaccine", "the market"], top_k=1, explain=True, explain_tokens=6)
    manifest = json.loads((art / layout.MANIFEST).read_text())
    del manifest["dims"]["tied_embeddings"]
    (art / layout.MANIFEST).write_text(json.dumps(manifest))
    with edgerank.Reranker(art) as r:
        after = r.rank("how do vaccines work", ["a vaccine", "the market"], top_k=1, explain=True, explain_tokens=6)
    assert after[0].explanation == before[0].explanation and len(before[0].explanation.token_ids) > 0


def _drop_past_mask_input(art) -> None:
    """Rewrite the layer graphs as the converter wrote them before batched decoding: no
    ``past_mask`` input (its zero default stays as a constant), manifest digests updated,
    and no ``layer_inputs`` in the manifest."""
    import onnx

    manifest = json.loads((art / layout.MANIFEST).read_text())
    for path in sorted((art / "layers").glob("*.onnx")):
        model = onnx.load(path)
        keep = [i for i in model.graph.input if i.name != layout.PAST_MASK]
        assert len(keep) == len(model.graph.input) - 1
        del model.graph.input[:]
        model.graph.input.extend(keep)
        onnx.save(model, path)
        entry = manifest["files"][path.relative_to(art).as_posix()]
        entry.update(size=path.stat().st_size, sha256=layout.sha256_file(path))
    del manifest["layer_inputs"]
    (art / layout.MANIFEST).write_text(json.dumps(manifest))


def test_the_top_k_decode_as_one_batch_and_equal_one_at_a_time(tmp_path, bpe_tokenizer):
    src = make_decoder(tmp_path / "hf", "llama", bpe_tokenizer, seed=5, n_layers=3, initializer_range=0.25)
    art = to_artifact(src, tmp_path / "art", family="interank")
    query = PAIRS[0][0]
    docs = [d for _, d in PAIRS] + ["short", "a much longer document " * 6]  # lengths differ: rows are padded
    with edgerank.Reranker(art, min_depth=1, threshold=0.0) as r:
        batched = r.rank(query, docs, top_k=4, explain=True, explain_tokens=N_TOKENS)
    assert batched.stats.extra["explain"]["decode_rows"] > 1
    _drop_past_mask_input(art)
    with edgerank.Reranker(art, min_depth=1, threshold=0.0) as r:
        single = r.rank(query, docs, top_k=4, explain=True, explain_tokens=N_TOKENS)
    assert single.stats.extra["explain"]["decode_rows"] == 1
    assert [x.index for x in single] == [x.index for x in batched]
    for a, b in zip(batched, single):
        assert a.explanation.token_ids == b.explanation.token_ids and a.explanation.text == b.explanation.text
    assert len({r.explanation.token_ids for r in batched}) > 1, "the rows must generate different text"


def test_rows_that_stop_early_leave_the_batch_and_the_rest_decode_on(tmp_path, bpe_tokenizer, monkeypatch):
    from edgerank.runtime.backends import generate

    src = make_decoder(tmp_path / "hf", "llama", bpe_tokenizer, seed=5, n_layers=3, initializer_range=0.25)
    art = to_artifact(src, tmp_path / "art", family="interank")
    query = PAIRS[0][0]
    docs = [d for _, d in PAIRS] + ["short", "a much longer document " * 6]

    def explain():
        with edgerank.Reranker(art, min_depth=1, threshold=0.0) as r:
            return r.rank(query, docs, top_k=4, explain=True, explain_tokens=N_TOKENS)

    free = explain()
    stop = free[0].explanation.token_ids[2]  # becomes a stop token: the top row ends by its third token
    init = generate.Generator.__init__

    def with_stop(self, backend):
        init(self, backend)
        self.stop_ids = self.stop_ids | {stop}

    monkeypatch.setattr(generate.Generator, "__init__", with_stop)
    batched = explain()
    monkeypatch.setattr(generate, "DECODE_ROWS", 1)
    single = explain()
    assert batched.stats.extra["explain"]["decode_rows"] == 4 and single.stats.extra["explain"]["decode_rows"] == 1
    lengths = [len(x.explanation.token_ids) for x in batched]
    assert lengths[0] <= 3 and max(lengths) == N_TOKENS, f"rows must stop at different steps: {lengths}"
    for a, b, f in zip(batched, single, free):
        assert a.explanation.token_ids == b.explanation.token_ids
        n = len(a.explanation.token_ids)
        assert a.explanation.token_ids == f.explanation.token_ids[:n]  # the same text, cut at the stop
        assert n == N_TOKENS or a.explanation.token_ids[-1] == stop


def test_decoders_explain_on_the_edgerank_backend_only(tiny_qwen3):
    with edgerank.Reranker(tiny_qwen3, backend="reference", family="qwen3-reranker") as r:
        with pytest.raises(OptionError, match="backend='edgerank'"):
            r.rank("q", ["a"], explain=True)
        with pytest.raises(ValueError, match="explain_tokens"):
            r.rank("q", ["a"], explain=True, explain_tokens=0)


def test_sentence_spans_point_into_the_text():
    text = "  Paris is big.  It has the Seine!\nA line without stop\n\n3.5 million live there? e.g. this"
    spans = sentences(text)
    assert [text[a:b] for a, b in spans] == ["Paris is big.", "It has the Seine!", "A line without stop",
                                             "3.5 million live there?", "e.g.", "this"]
    assert sentences("") == [] and sentences(" \n ") == []


def test_cross_encoder_rationale_is_the_sentence_transformers_scores_highest(tmp_path, wordpiece_tokenizer):
    folder = make_bert(tmp_path / "ce", wordpiece_tokenizer, "classifier", seed=3)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    query = "how do vaccines work"
    docs = ["The river city has water. A vaccine trains the immune system! Stock price fell.",
            "Energy and water.  The market was higher.\nThe body fights infection.",
            "one sentence only", ""]
    with edgerank.Reranker(folder) as r:  # the int4 artifact, converted on first use
        ranking = r.rank(query, docs, explain=True)
    assert ranking.stats.explained == 4
    for res in ranking:
        e = res.explanation
        if not res.document:
            assert e is None
            continue
        spans = sentences(res.document)
        texts = [res.document[a:b] for a, b in spans]
        with torch.no_grad():
            ref = model(**tok([query] * len(texts), texts, padding=True, return_tensors="pt")).logits[:, 0].numpy()
        assert e.kind == "extractive" and res.document[e.start:e.end] == e.text
        assert (e.start, e.end) == spans[int(np.argmax(ref))] or abs(float(ref.max()) - e.score) < 2e-2
    spread = [len(sentences(d)) for d in docs]
    assert max(spread) > 1


@pytest.mark.slow
def test_real_minilm_points_at_the_relevant_sentence(minilm_path):
    query = "how do vaccines train the immune system"
    relevant = "Vaccines expose the immune system to a harmless piece of a pathogen, so it learns to fight it."
    docs = [f"The stock market closed higher on Friday. {relevant} Gutenberg built a printing press.",
            f"Puppies learn fast when rewarded.\n{relevant}\nThe Seine flows through Paris.",
            "Booster shots remind the immune system of an antigen. Paris is the capital of France."]
    with edgerank.Reranker("minilm-l6") as r:
        ranking = r.rank(query, docs, top_k=3, explain=True)
    by_index = {res.index: res.explanation for res in ranking}
    for i in (0, 1):
        e = by_index[i]
        assert e.text == relevant and docs[i][e.start:e.end] == relevant
    assert by_index[2].text == "Booster shots remind the immune system of an antigen."


@pytest.mark.slow
def test_real_smollm2_fp32_generation_equals_transformers_on_the_same_gguf(smollm2_path, tmp_path):
    art = to_artifact(smollm2_path, tmp_path / "smol-fp32")
    assert not (art / layout.LM_HEAD).is_file()  # SmolLM2 ties its LM head to the embedding
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name,
                                                             dtype=torch.float32).eval()
    query = "how do vaccines train the immune system"
    docs = ["Vaccines expose the immune system to a harmless piece of a pathogen, so it learns to fight it.",
            "The stock market closed higher on Friday after strong earnings reports.",
            "Booster shots remind the immune system of an antigen so memory B cells stay ready."]
    n = 24
    stop_ids = {tok(s, add_special_tokens=False).input_ids[0] for s in SPECS["zeroshot-chatml"].explain_stop}
    with edgerank.Reranker(art, pruning=False) as r:
        ranking = r.rank(query, docs, top_k=2, explain=True, explain_tokens=n)
    for res in ranking:
        ref = reference_generation(model, tok, "zeroshot-chatml", query, res.document, n)
        check_against_reference(ref, res.explanation.token_ids, stop_ids, n)
        assert len(res.explanation.token_ids) >= 3 and res.explanation.text


def test_decode_rows_follow_the_memory_budget():
    from edgerank.runtime.budget import MB, Plan, Shape, decode_rows

    shape = Shape(hidden=64, ffn=128, n_heads=4, n_kv_heads=2, head_dim=16, n_layers=2, layer_bytes=[0, 0],
                  head_bytes=0)
    plan = Plan(stream=False, cache_rows=0, chunk_tokens=1024, weights_mb=1.0, fixed_mb=1.0)
    # per row, by hand: keys/values 4 B x 2 x 2 layers x 2 heads x 16 x 100 positions = 51,200 B, one
    # layer's again while assembled (x 1.5) = 76,800; activations 1.25 x 4 x (3x128 + 8x64 + 2x4x100)
    # = 8,480 B per token x 50 own tokens = 424,000; 500,800 B in all
    assert decode_rows(shape, plan, None, 50, 100, 16) == 16  # no budget: as many as asked
    assert decode_rows(shape, plan, 2 + 1_258_291 / MB, 50, 100, 16) == 2  # 1,258,291 B of room: 2.51 rows
    assert decode_rows(shape, plan, 2 + 0.1, 50, 100, 16) == 1  # never fewer than one
    assert decode_rows(shape, plan, 2 + 100, 50, 100, 3) == 3  # never more than asked

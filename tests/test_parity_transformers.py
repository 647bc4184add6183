"""Every family's template and head match a plain transformers computation within 1e-4.

The references here are written from the model cards, independent of edgerank: the full
prompt string is rendered in one piece, tokenised in one piece by transformers, run
through the unmodified HF model one pair at a time, and scored by hand.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")  # the reference extra: a core install skips this module
transformers = pytest.importorskip("transformers")

import edgerank
from tests.conftest import DECODER_CONFIGS, PAIRS, make_bert, make_decoder

INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
QWEN3_SYSTEM = ('Judge whether the Document meets the requirements based on the Query and the '
                'Instruct provided. Note that the answer can only be "yes" or "no".')


def qwen3_prompt(q: str, d: str) -> str:
    return (f"<|im_start|>system\n{QWEN3_SYSTEM}<|im_end|>\n<|im_start|>user\n"
            f"<Instruct>: {INSTRUCTION}\n<Query>: {q}\n<Document>: {d}"
            "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")


def zeroshot_prompt(q: str, d: str) -> str:
    return (f"<|im_start|>system\n{QWEN3_SYSTEM}<|im_end|>\n<|im_start|>user\n"
            f"<Instruct>: {INSTRUCTION}\n<Query>: {q}\n<Document>: {d}"
            "<|im_end|>\n<|im_start|>assistant\n")


def rank1_prompt(q: str, d: str) -> str:
    return ("Determine if the following passage is relevant to the query. Answer only with "
            f"'true' or 'false'.\nQuery: {q}\nPassage: {d}\n<think>\n\n</think>")


def interank_prompt(q: str, d: str) -> str:
    return ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nRate how relevant the "
            "passage is to the query with one label: 0 (not relevant), 1 (partially relevant) or "
            f"2 (highly relevant).\n\nQuery: {q}\nPassage: {d}<|eot_id|><|start_header_id|>"
            "assistant<|end_header_id|>\n\n")


def yes_no(logits, tok, pos: str, neg: str) -> float:
    ids = [tok.convert_tokens_to_ids(tok.tokenize(neg))[0], tok.convert_tokens_to_ids(tok.tokenize(pos))[0]]
    return torch.log_softmax(logits[ids], dim=0)[1].exp().item()


def expected_label(logits, tok) -> float:
    ids = [tok.convert_tokens_to_ids(tok.tokenize(str(i)))[0] for i in range(3)]
    return (torch.softmax(logits[ids], dim=0) * torch.arange(3.0)).sum().item()


FAMILIES = {
    "qwen3-reranker": (qwen3_prompt, lambda lg, tok: yes_no(lg, tok, "yes", "no")),
    "zeroshot-chatml": (zeroshot_prompt, lambda lg, tok: yes_no(lg, tok, "yes", "no")),
    "rank1": (rank1_prompt, lambda lg, tok: yes_no(lg, tok, " true", " false")),
    "interank": (interank_prompt, expected_label),
}


def reference_decoder_scores(folder, family: str) -> list[float]:
    render, score = FAMILIES[family]
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for q, d in PAIRS:
            ids = tok(render(q, d.rstrip()), add_special_tokens=False, return_tensors="pt").input_ids
            out.append(score(model(ids).logits[0, -1].double(), tok))
    return out


@pytest.fixture(scope="module", params=sorted(DECODER_CONFIGS))
def decoder_folder(request, tmp_path_factory, bpe_tokenizer):
    return make_decoder(tmp_path_factory.mktemp(request.param), request.param, bpe_tokenizer)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_decoder_family_scores_match_transformers(decoder_folder, family):
    expected = reference_decoder_scores(decoder_folder, family)
    with edgerank.Reranker(decoder_folder, backend="reference", family=family) as r:
        got = r.score(PAIRS[0][0], [d for q, d in PAIRS if q == PAIRS[0][0]])
        got_all = [r.score(q, [d])[0] for q, d in PAIRS]
    assert got_all == pytest.approx(expected, abs=1e-4)
    # batched (padded, several candidates per forward) equals one-at-a-time
    assert list(got) == pytest.approx(expected[: len(got)], abs=1e-4)
    assert max(expected) - min(expected) > 1e-3, "scores must spread for the test to mean anything"


def test_tied_embeddings_head_matches_transformers(tmp_path, bpe_tokenizer):
    folder = make_decoder(tmp_path, "qwen3", bpe_tokenizer, seed=3, tie=True)
    expected = reference_decoder_scores(folder, "qwen3-reranker")
    with edgerank.Reranker(folder, backend="reference", family="qwen3-reranker") as r:
        assert [r.score(q, [d])[0] for q, d in PAIRS] == pytest.approx(expected, abs=1e-4)


def test_cross_encoder_matches_transformers(tiny_cross_encoder):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_cross_encoder)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_cross_encoder).eval()
    query = PAIRS[0][0]
    docs = [d for _, d in PAIRS]
    with torch.no_grad():
        enc = tok([query] * len(docs), docs, padding=True, return_tensors="pt")
        expected = model(**enc).logits[:, 0].tolist()
    with edgerank.Reranker(tiny_cross_encoder, backend="reference") as r:
        assert r.spec.family == "cross-encoder"
        assert list(r.score(query, docs)) == pytest.approx(expected, abs=1e-4)


def mean_pooled(model, tok, texts: list[str]) -> torch.Tensor:
    enc = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def test_bi_encoder_matches_transformers(tmp_path, wordpiece_tokenizer):
    folder = make_bert(tmp_path, wordpiece_tokenizer, "none")
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder).eval()
    query, docs = PAIRS[0][0], [d for _, d in PAIRS]
    expected = (mean_pooled(model, tok, docs) @ mean_pooled(model, tok, [query])[0]).tolist()
    with edgerank.Reranker(folder, backend="reference") as r:
        assert r.spec.family == "bi-encoder"
        assert list(r.score(query, docs)) == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow
def test_real_minilm_matches_transformers(minilm_path):
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path)
    model = transformers.AutoModel.from_pretrained(minilm_path).eval()
    query = "how do vaccines train the immune system"
    docs = ["Vaccines teach the immune system to recognise a pathogen.", "Stocks rose on Friday.",
            "An immune response produces antibodies."]
    expected = (mean_pooled(model, tok, docs) @ mean_pooled(model, tok, [query])[0]).tolist()
    with edgerank.Reranker("minilm-l6", backend="reference") as r:
        got = r.score(query, docs)
    assert list(got) == pytest.approx(expected, abs=1e-4)
    assert got[0] > got[1]  # a real model, a real preference

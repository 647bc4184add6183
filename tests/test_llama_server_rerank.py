"""The GGUF the converter writes, as llama-server's /v1/rerank reads it.

llama-server (tools/server/server-common.cpp, ``format_prompt_rerank``) takes the file's
``tokenizer.chat_template.rerank``, replaces every ``{query}`` by the query, then every
``{document}`` by the document (plain, non-overlapping string replacement), and tokenises
the result in one piece with special tokens parsed and nothing added (no BOS). It then
decodes it with rank pooling and returns component 0 of the pooled output as
``relevance_score``. These tests do exactly that with the gguf reader and llama.cpp
(llama-cpp-python), independently of edgerank's backends, and compare with edgerank.
"""

from __future__ import annotations

import ctypes
import json

import numpy as np
import pytest

import edgerank
from edgerank.converters import convert
from edgerank.models.supply import resolve
from edgerank.converters.gguf_export import RELEVANCE_KEY, RERANK_TEMPLATE_KEY
from edgerank.runtime.tokenization import HFTokenizer, encode_pairs
from edgerank.runtime.specs import get_spec
from tests.conftest import PAIRS, make_decoder

LONG = " ".join(["the vaccine trains the immune system, and the body fights infection."] * 40)
QUERIES = ["how do vaccines work", "naïve café: 東京 — 😀 \"quotes\" & <tags> \\ back\tslash",
           "stock {price} {{today}} }{", "what is {query}?"]
# A control token written in a document: llama-server tokenizes the whole prompt with
# control tokens parsed, so there it closes the turn; edgerank tokenizes document text with
# them off (issue 33), so a document cannot answer for itself. The one documented difference.
CONTROL = "<|im_end|>"
DOCS = ["a vaccine trains the immune system to fight infection", "", "  leading spaces and trailing spaces",
        "{document} and {query} inside a document, <|im_end|> too", "line one\n\nline two:\tend (est.)",
        "ünïcödé ½ ≠ ∑ 日本語のテキスト 🚀🚀", LONG]


def llama_server_prompt(template: str, query: str, document: str) -> str:
    """``format_prompt_rerank``: std::string replacement, ``{query}`` first, then ``{document}``."""
    return template.replace("{query}", query).replace("{document}", document)


def gguf_strings(path) -> dict[str, str]:
    """The file's string metadata, read with the gguf package."""
    from gguf import GGUFReader, GGUFValueType

    fields = GGUFReader(str(path)).fields
    return {k: f.contents() for k, f in fields.items() if f.types == [GGUFValueType.STRING]}


class LlamaVocab:
    """llama.cpp's tokenizer of a GGUF (vocabulary only), called as the server calls it."""

    def __init__(self, path) -> None:
        import llama_cpp as L

        L.llama_backend_init()
        params = L.llama_model_default_params()
        params.vocab_only = True
        self._L, self._model = L, L.llama_model_load_from_file(str(path).encode(), params)
        assert self._model
        self._vocab = L.llama_model_get_vocab(self._model)

    def tokenize(self, text: str, specials: bool = True) -> list[int]:
        """As the server tokenizes a prompt: no BOS added, control tokens parsed (``specials``)."""
        L = self._L
        raw = text.encode()
        n_max = len(raw) + 16
        buf = (L.llama_token * n_max)()
        n = L.llama_tokenize(self._vocab, raw, len(raw), buf, n_max, False, specials)
        assert n >= 0
        return list(ctypes.cast(buf, ctypes.POINTER(ctypes.c_int32))[:n])

    def close(self) -> None:
        self._L.llama_model_free(self._model)


def llama_rank_pooling(gguf_path, token_lists: list[list[int]]) -> tuple[int, list[float]]:
    """(n_cls_out, component 0 of the rank-pooled output per sequence): llama-server's
    ``send_rerank`` reads ``llama_get_embeddings_seq(...)[0]``. One sequence per decode;
    weights kept out of llama.cpp's AMX buffers where those crash."""
    import llama_cpp as L

    from edgerank.runtime.backends.llamacpp import extra_buffers_are_safe

    L.llama_backend_init()
    mparams = L.llama_model_default_params()
    mparams.use_extra_bufts = extra_buffers_are_safe(L.llama_print_system_info().decode())
    model = L.llama_model_load_from_file(str(gguf_path).encode(), mparams)
    n = max(map(len, token_lists))
    cparams = L.llama_context_default_params()
    cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = max(512, n)
    cparams.embeddings = True
    cparams.pooling_type = L.LLAMA_POOLING_TYPE_RANK  # what --reranking sets
    ctx = L.llama_init_from_model(model, cparams)
    batch = L.llama_batch_init(max(512, n), 0, 1)
    out = []
    try:
        n_cls = L.llama_model_n_cls_out(model)
        for ids in token_lists:
            L.llama_memory_clear(L.llama_get_memory(ctx), True)
            for i, t in enumerate(ids):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, i, 1
                batch.seq_id[i][0], batch.logits[i] = 0, True
            batch.n_tokens = len(ids)
            assert L.llama_decode(ctx, batch) == 0
            out.append(float(L.llama_get_embeddings_seq(ctx, 0)[0]))
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        L.llama_model_free(model)
    return n_cls, out


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def logit(p):
    p = np.asarray(p, dtype=np.float64)
    return np.log(p) - np.log1p(-p)


# (arch, family): every decoder family, on the archs with and without llama.cpp's rank head
FAMILIES = [("qwen3", "qwen3-reranker"), ("llama", "qwen3-reranker"), ("qwen2", "zeroshot-chatml"),
            ("llama", "rank1"), ("qwen3", "interank")]


@pytest.fixture(scope="module")
def decoders(tmp_path_factory, bpe_tokenizer):
    """HF folder per arch, built once."""
    root = tmp_path_factory.mktemp("decoders")
    return {arch: make_decoder(root / arch, arch, bpe_tokenizer, seed=5) for arch in ("qwen3", "llama", "qwen2")}


@pytest.mark.parametrize("arch,family", FAMILIES)
def test_llama_server_prompt_is_edgerank_prompt_token_for_token(arch, family, decoders, tmp_path):
    spec = get_spec(family)
    out = tmp_path / "m.gguf"
    convert(decoders[arch], "gguf", "f16", out, family=family, verify=False, progress=False)
    template = gguf_strings(out)[RERANK_TEMPLATE_KEY]
    hf = HFTokenizer.from_file(decoders[arch] / "tokenizer.json")
    vocab = LlamaVocab(out)
    try:
        checked = 0
        for query in QUERIES:
            for doc in DOCS:
                server = vocab.tokenize(llama_server_prompt(template, query, doc.rstrip()))
                for tok in (hf, vocab):  # the reference/edgerank backends' tokenizer and the llamacpp one's
                    batch = encode_pairs(spec, tok if tok is hf else _Enc(vocab), query, [doc])
                    assert batch.truncated == []
                    if CONTROL in doc:  # the server parses it as a control token; edgerank reads text
                        assert batch.sequences[0] != server, (family, query, doc)
                    else:
                        assert batch.sequences[0] == server, (family, query, doc)
                checked += 1
        assert checked == len(QUERIES) * len(DOCS)
    finally:
        vocab.close()


class _Enc:
    """A LlamaVocab as edgerank's Tokenizer protocol."""

    def __init__(self, vocab: LlamaVocab) -> None:
        self.encode = vocab.tokenize  # encode(text, specials=True)


def test_a_query_with_document_placeholder_gets_the_document_in_llama_server(decoders, tmp_path):
    """llama-server replaces ``{query}`` first, so a ``{document}`` inside the query is then
    replaced by the document: the server scores the query with the document pasted in.
    (edgerank keeps the text; a client that needs equality must not send such queries.)"""
    spec = get_spec("qwen3-reranker")
    out = tmp_path / "m.gguf"
    convert(decoders["qwen3"], "gguf", "f16", out, family="qwen3-reranker", verify=False, progress=False)
    template = gguf_strings(out)[RERANK_TEMPLATE_KEY]
    hf = HFTokenizer.from_file(decoders["qwen3"] / "tokenizer.json")
    vocab = LlamaVocab(out)
    try:
        query, doc = "find {document} now", "the river city"
        server = vocab.tokenize(llama_server_prompt(template, query, doc))
        assert server != encode_pairs(spec, hf, query, [doc]).sequences[0]
        assert server == encode_pairs(spec, hf, query.replace("{document}", doc), [doc]).sequences[0]
    finally:
        vocab.close()


def test_llama_server_does_not_truncate_what_edgerank_truncates(decoders, tmp_path):
    """edgerank cuts a document to the family's token budget; the server takes all of it.
    The two agree on the kept tokens: edgerank's prompt is the server's with the document's
    tail dropped."""
    spec = get_spec("zeroshot-chatml").with_max_length(160)
    out = tmp_path / "m.gguf"
    convert(decoders["llama"], "gguf", "f16", out, family="zeroshot-chatml", verify=False, progress=False)
    template = gguf_strings(out)[RERANK_TEMPLATE_KEY]
    hf = HFTokenizer.from_file(decoders["llama"] / "tokenizer.json")
    vocab = LlamaVocab(out)
    try:
        batch = encode_pairs(spec, hf, QUERIES[0], [LONG])
        server = vocab.tokenize(llama_server_prompt(template, QUERIES[0], LONG))
        suffix = hf.encode(spec.template.suffix)
        kept = len(batch.sequences[0]) - len(suffix)
        assert batch.truncated == [0] and len(server) > 160 == len(batch.sequences[0])
        assert batch.sequences[0] == server[:kept] + suffix
    finally:
        vocab.close()


@pytest.fixture(scope="module")
def qwen2_regex_decoder(tmp_path_factory):
    """A decoder whose tokenizer splits like Qwen2's (punctuation takes the newlines after it:
    ``?[^\\s\\p{L}\\p{N}]+[\\r\\n]*``), with merges for ".\\n"; converted as pre-tokenizer "qwen2"."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from edgerank.converters.vocab import _QWEN2_REGEX
    from tests.conftest import _corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([f"{line}.\n{line})\n" for line in _corpus()], trainer)
    assert len(tok.encode(".\n").ids) == 1 and len(tok.encode(" true").ids) == 1
    return make_decoder(tmp_path_factory.mktemp("qwen2-regex"), "qwen2", tok, seed=6)


def test_rank1_documents_ending_in_punctuation_differ_with_a_qwen2_tokenizer(qwen2_regex_decoder, tmp_path):
    """rank1's suffix starts with a newline. A Qwen2/Llama-3 pre-tokenizer joins newlines to
    the punctuation before them, so llama-server, tokenising the prompt whole, can merge a
    document's last "." with it; edgerank tokenises the document and the suffix apart. With
    such a tokenizer the server's rank1 prompt equals edgerank's only for documents ending
    in a letter or digit. (GPT-2-style pre-tokenizers, SmolLM2's included, never join them:
    test_llama_server_prompt_is_edgerank_prompt_token_for_token covers every document.)
    Families whose suffix starts with a special token are exact either way."""
    out = tmp_path / "m.gguf"
    convert(qwen2_regex_decoder, "gguf", "f16", out, family="rank1", verify=False, progress=False)
    template = gguf_strings(out)[RERANK_TEMPLATE_KEY]
    hf = HFTokenizer.from_file(qwen2_regex_decoder / "tokenizer.json")
    vocab = LlamaVocab(out)
    try:
        for doc, same in [("the river city", True), ("the river city.", False), ("the end (est.)", False)]:
            server = vocab.tokenize(llama_server_prompt(template, QUERIES[0], doc))
            assert (encode_pairs(get_spec("rank1"), hf, QUERIES[0], [doc]).sequences[0] == server) is same, doc
    finally:
        vocab.close()
    out2 = tmp_path / "z.gguf"
    convert(qwen2_regex_decoder, "gguf", "f16", out2, family="zeroshot-chatml", verify=False, progress=False)
    template = gguf_strings(out2)[RERANK_TEMPLATE_KEY]
    vocab = LlamaVocab(out2)
    try:
        for doc in (d for d in DOCS if CONTROL not in d):
            assert vocab.tokenize(llama_server_prompt(template, QUERIES[0], doc.rstrip())) == \
                encode_pairs(get_spec("zeroshot-chatml"), hf, QUERIES[0], [doc]).sequences[0], doc
    finally:
        vocab.close()


def test_instruction_is_written_into_the_template(decoders, tmp_path):
    spec = get_spec("qwen3-reranker")
    out = tmp_path / "m.gguf"
    instruction = "Find passages for a curious child"
    report = convert(decoders["qwen3"], "gguf", "f16", out, family="qwen3-reranker", verify=False, progress=False,
                     instruction=instruction)
    template = gguf_strings(out)[RERANK_TEMPLATE_KEY]
    assert report["rerank_template"] == template and "curious child" in template
    hf = HFTokenizer.from_file(decoders["qwen3"] / "tokenizer.json")
    vocab = LlamaVocab(out)
    try:
        for query, doc in [(QUERIES[0], DOCS[0]), (QUERIES[3], DOCS[3].replace(CONTROL, ""))]:
            assert vocab.tokenize(llama_server_prompt(template, query, doc)) == \
                encode_pairs(spec, hf, query, [doc], instruction=instruction).sequences[0]
    finally:
        vocab.close()
    with pytest.raises(ValueError, match="document"):
        convert(decoders["qwen3"], "gguf", "f16", tmp_path / "x.gguf", family="qwen3-reranker", verify=False,
                progress=False, instruction="rank {document}")
    with pytest.raises(ValueError, match="no instruction slot"):
        convert(decoders["qwen3"], "gguf", "f16", tmp_path / "y.gguf", family="rank1", verify=False,
                progress=False, instruction="anything")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()


SCORED = [(q, d) for q in QUERIES[:3] for d in DOCS if CONTROL not in d]


@pytest.mark.parametrize("arch,quant", [("qwen3", "f16"), ("llama", "f16"), ("qwen2", "f16"), ("llama", "q8_0")])
def test_llama_rank_pooling_scores_the_template_as_edgerank_does(arch, quant, decoders, tmp_path):
    """relevance_score, computed as the server computes it, against edgerank's score: on
    qwen3 p(yes) itself (llama.cpp's cls.output + softmax); on llama/qwen2 the yes-minus-no
    logit (the converter's rotated readout), whose sigmoid is edgerank's score."""
    from tests.test_parity_transformers import reference_decoder_scores

    family = "qwen3-reranker"
    out = tmp_path / "m.gguf"
    report = convert(decoders[arch], "gguf", quant, out, family=family, verify=False, progress=False)
    meta = gguf_strings(out)
    template = meta[RERANK_TEMPLATE_KEY]
    vocab = LlamaVocab(out)
    try:
        tokens = [vocab.tokenize(llama_server_prompt(template, q, d.rstrip())) for q, d in SCORED]
    finally:
        vocab.close()
    n_cls, relevance = llama_rank_pooling(out, tokens)
    if arch == "qwen3":
        assert meta[RELEVANCE_KEY] == report["relevance_score"] == "probability" and n_cls == 2
        got = logit(relevance)
    else:
        assert meta[RELEVANCE_KEY] == report["relevance_score"] == "logit" and n_cls == 1
        assert "rank_readout" in report
        got = np.array(relevance)
    with edgerank.Reranker(out, backend="llamacpp") as r:  # the family comes from the file
        assert r.spec.family == family
        ours = logit([r.score(q, [d])[0] for q, d in SCORED])
        on_pairs = np.array([r.score(q, [d])[0] for q, d in PAIRS])
    # compared as logits: a random model's p(yes) sits near 0, where probabilities say little
    assert np.ptp(ours) > 1, "the model must spread its scores for the check to mean anything"
    assert np.max(np.abs(got - ours)) < 0.02, (got, ours)
    # and the file still scores like the HF model it came from (the rotation is exact)
    expected = reference_decoder_scores(decoders[arch], family)
    assert np.max(np.abs(on_pairs - expected)) < (0.01 if quant == "f16" else 0.03), (on_pairs, expected)


def test_a_quantised_source_keeps_its_grid_by_default_and_warns_on_another(decoders, tmp_path):
    q41 = tmp_path / "q41.gguf"
    convert(decoders["llama"], "gguf", "q4_1", q41, family="zeroshot-chatml", verify=False, progress=False)
    report = convert(q41, "gguf", None, tmp_path / "again.gguf", verify=False, progress=False)
    assert report["source_quant"] == "Q4_1" and report["quant"] == "q4_1" and "warnings" not in report
    assert report["rank_readout"].startswith("kept")  # rotated once, not twice
    other = convert(q41, "gguf", "q4_0", tmp_path / "other.gguf", verify=False, progress=False)
    assert other["quant"] == "q4_0" and "Q4_1" in other["warnings"][0] and "--quant q4_1" in other["warnings"][0]
    wider = convert(q41, "gguf", "q8_0", tmp_path / "wider.gguf", verify=False, progress=False)
    assert "warnings" not in wider
    on_disk = json.loads((tmp_path / "other.gguf.conversion_report.json").read_text())
    assert on_disk["warnings"] == other["warnings"]
    # an unrotated 4-bit source stays unrotated at 4 bits unless asked (the rotation re-rounds)
    plain = tmp_path / "plain.gguf"
    convert(decoders["llama"], "gguf", "q4_1", plain, family="zeroshot-chatml", verify=False, progress=False,
            rank_readout=False)
    kept = convert(plain, "gguf", None, tmp_path / "kept.gguf", verify=False, progress=False)
    assert kept["rank_readout"].startswith("not applied") and "relevance_score" not in kept
    assert RELEVANCE_KEY not in gguf_strings(tmp_path / "kept.gguf")
    rotated = convert(plain, "gguf", None, tmp_path / "rot.gguf", verify=False, progress=False, rank_readout=True)
    assert rotated["rank_readout"].startswith("residual") and rotated["relevance_score"] == "logit"


@pytest.mark.slow
def test_smollm2_in_qwen3_reranker_form_scores_under_llama_rank_pooling(smollm2_path, tmp_path):
    """The real SmolLM2 (a Q4_1 llama GGUF) in qwen3-reranker form, at f16: there the rotated
    readout and the LM head agree to 1e-3 (measured 7e-4). At q8_0 llama.cpp rounds each
    matmul's activations to 8 bits, and the readout's large component 0 makes that rounding
    differ between the two paths: up to 0.04 in p on two README documents (RESULTS §12)."""
    out = tmp_path / "smol.gguf"
    report = convert(resolve("smollm2-135m", family="qwen3-reranker"), "gguf", "f16", out, progress=False)
    assert report["source_quant"] == "Q4_1" and report["spearman"] >= 0.95
    template = gguf_strings(out)[RERANK_TEMPLATE_KEY]
    query = "how do vaccines train the immune system"
    docs = [d for d in DOCS[:-1] if CONTROL not in d] + [LONG[:2000]]  # the documented difference
    vocab = LlamaVocab(out)
    try:
        tokens = [vocab.tokenize(llama_server_prompt(template, query, d.rstrip())) for d in docs]
    finally:
        vocab.close()
    n_cls, relevance = llama_rank_pooling(out, tokens)
    with edgerank.Reranker(out, backend="llamacpp") as r:
        batch_tokens = encode_pairs(r.spec, r._backend.tokenizer, query, docs).sequences
        ours = r.score(query, docs)
    assert batch_tokens == tokens
    assert n_cls == 1 and np.max(np.abs(sigmoid(relevance) - ours)) < 2e-3, (sigmoid(relevance), ours)


def test_the_command_line_takes_instruction_and_warns_on_another_4bit_grid(decoders, tmp_path, capsys):
    from edgerank.converters.__main__ import main

    q41 = tmp_path / "q41.gguf"
    convert(decoders["qwen3"], "gguf", "q4_1", q41, family="qwen3-reranker", verify=False, progress=False)
    out = tmp_path / "q40.gguf"
    assert main([str(q41), "--to", "gguf", "--quant", "q4_0", "--out", str(out), "--no-verify",
                 "--instruction", "Judge passages for a child"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "Q4_1" in warnings[0] and "--quant q4_1" in warnings[0]
    assert "Judge passages for a child" in gguf_strings(out)[RERANK_TEMPLATE_KEY]

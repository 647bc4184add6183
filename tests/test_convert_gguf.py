"""GGUF conversion: llama.cpp loads what we write and scores as the HF reference does."""

from __future__ import annotations

import json

import numpy as np
import pytest

import edgerank
from edgerank.converters import OutputExistsError, convert
from edgerank.converters import gguf_export
from edgerank.models.supply import resolve
from edgerank.errors import ModelFormatError
from tests.conftest import PAIRS, make_bert, make_decoder
pytest.importorskip("torch")  # its reference scores need the reference extra: a core install skips this module
from tests.test_parity_transformers import reference_decoder_scores, qwen3_prompt


def llama_rank_pooling_p_yes(gguf_path, prompts: list[str]) -> list[float]:
    """p(yes) as llama.cpp's own rank pooling computes it (independent of edgerank's backend).

    With two classifier labels llama.cpp returns their softmax, [p(yes), p(no)]. Straight
    C API calls, one prompt per decode; weights are kept out of llama.cpp's AMX buffers
    where those crash (edgerank/runtime/backends/llamacpp.py)."""
    import llama_cpp as L

    from edgerank.runtime.backends.llamacpp import extra_buffers_are_safe

    L.llama_backend_init()
    mparams = L.llama_model_default_params()
    mparams.use_extra_bufts = extra_buffers_are_safe(L.llama_print_system_info().decode())
    model = L.llama_model_load_from_file(str(gguf_path).encode(), mparams)
    cparams = L.llama_context_default_params()
    cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = 512
    cparams.embeddings = True
    cparams.pooling_type = L.LLAMA_POOLING_TYPE_RANK
    ctx = L.llama_init_from_model(model, cparams)
    vocab = L.llama_model_get_vocab(model)
    batch = L.llama_batch_init(512, 0, 1)
    out = []
    try:
        assert L.llama_model_n_cls_out(model) == 2
        for prompt in prompts:
            raw = prompt.encode()
            ids = (L.llama_token * 512)()
            n = L.llama_tokenize(vocab, raw, len(raw), ids, 512, False, True)
            assert 0 < n <= 512
            L.llama_memory_clear(L.llama_get_memory(ctx), True)
            for i in range(n):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = ids[i], i, 1
                batch.seq_id[i][0], batch.logits[i] = 0, True
            batch.n_tokens = n
            assert L.llama_decode(ctx, batch) == 0
            ptr = L.llama_get_embeddings_seq(ctx, 0)
            assert abs(ptr[0] + ptr[1] - 1) < 1e-5
            out.append(float(ptr[0]))
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        L.llama_model_free(model)
    return out


@pytest.fixture(scope="module")
def qwen3_256(tmp_path_factory, bpe_tokenizer):
    """A small Qwen3-Reranker-format model whose rows fit K-quant blocks (256)."""
    import transformers

    folder = tmp_path_factory.mktemp("qwen3-256")
    make_decoder(folder, "qwen3", bpe_tokenizer, seed=1)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(hidden_size=256, intermediate_size=512, head_dim=64, num_attention_heads=4, num_key_value_heads=2)
    import torch

    torch.manual_seed(1)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**{k: v for k, v in cfg.items()
                                                                         if k not in ("architectures", "transformers_version")}))
    model.save_pretrained(folder)
    return folder


def test_qwen3_reranker_q4_k_m_serves_under_llama_cpp_rank_pooling(qwen3_256, tmp_path):
    out = tmp_path / "rr.gguf"
    report = convert(qwen3_256, "gguf", "q4_k_m", out, family="qwen3-reranker", progress=False)
    expected = reference_decoder_scores(qwen3_256, "qwen3-reranker")
    got = llama_rank_pooling_p_yes(out, [qwen3_prompt(q, d.rstrip()) for q, d in PAIRS])
    assert np.ptp(expected) > 0.02, "the model must spread its scores for the check to mean anything"
    assert np.max(np.abs(np.array(got) - expected)) < 0.03, (got, expected)
    assert report["rank_pooling"] == ["yes", "no"]
    assert report["pairs"] > 0 and "spearman" in report
    on_disk = json.loads((tmp_path / "rr.gguf.conversion_report.json").read_text())
    assert on_disk["size_bytes"] == out.stat().st_size < report["source_size_bytes"]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_f16_gguf_scores_like_the_hf_model_on_llama_cpp(arch, tmp_path, bpe_tokenizer):
    src = make_decoder(tmp_path / "hf", arch, bpe_tokenizer, seed=2)
    out = tmp_path / "m.gguf"
    convert(src, "gguf", "f16", out, family="zeroshot-chatml", verify=False, progress=False)
    expected = reference_decoder_scores(src, "zeroshot-chatml")
    with edgerank.Reranker(out, backend="llamacpp", family="zeroshot-chatml") as r:
        got = [r.score(q, [d])[0] for q, d in PAIRS]
    assert np.max(np.abs(np.array(got) - expected)) < 0.01, (got, expected)


def test_q4_0_reports_tensors_kept_at_higher_precision(tmp_path, bpe_tokenizer):
    src = make_decoder(tmp_path / "hf", "qwen2", bpe_tokenizer)  # hidden 64: q4_0 blocks fit
    report = convert(src, "gguf", "q4_0", tmp_path / "m.gguf", family="zeroshot-chatml", verify=False, progress=False)
    assert report["fallbacks"] == {}  # every 2-D tensor's rows are multiples of 32


def test_a_q4_1_gguf_re_exports_to_q4_1_without_loss(tmp_path, bpe_tokenizer):
    """GGUF -> q4_1 -> GGUF (dequantized) -> q4_1: every quantized tensor comes back bit for bit."""
    from gguf import GGMLQuantizationType, GGUFReader

    src = make_decoder(tmp_path / "hf", "llama", bpe_tokenizer)
    first, second = tmp_path / "a.gguf", tmp_path / "b.gguf"
    convert(src, "gguf", "q4_1", first, family="zeroshot-chatml", verify=False, progress=False)
    convert(first, "gguf", "q4_1", second, verify=False, progress=False)
    a = {t.name: t for t in GGUFReader(str(first)).tensors}
    b = {t.name: t for t in GGUFReader(str(second)).tensors}
    quantized = [n for n, t in a.items() if t.tensor_type == GGMLQuantizationType.Q4_1]
    assert len(quantized) >= 14 and a.keys() == b.keys()
    for name in quantized:
        assert b[name].tensor_type == GGMLQuantizationType.Q4_1
        assert np.array_equal(np.asarray(a[name].data), np.asarray(b[name].data)), name


def test_existing_output_is_refused_without_force_and_replaced_with_it(tiny_qwen3, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"user's file")
    with pytest.raises(OutputExistsError, match="--force"):
        convert(tiny_qwen3, "gguf", "f16", out, family="qwen3-reranker", verify=False, progress=False)
    assert out.read_bytes() == b"user's file"
    with pytest.raises(OutputExistsError, match="not an edgerank"):  # force replaces only a GGUF (issue 33)
        convert(tiny_qwen3, "gguf", "f16", out, family="qwen3-reranker", verify=False, progress=False, force=True)
    assert out.read_bytes() == b"user's file"
    out.write_bytes(b"GGUF an older conversion")
    convert(tiny_qwen3, "gguf", "f16", out, family="qwen3-reranker", verify=False, progress=False, force=True)
    assert out.read_bytes()[:4] == b"GGUF" and len(out.read_bytes()) > 100


def test_an_interrupted_conversion_leaves_nothing_and_keeps_the_old_output(tiny_qwen3, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"GGUF previous")
    real = gguf_export.write_gguf

    def interrupted(src, dest, *a, **k):
        dest.write_bytes(b"GGUF half written")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_export, "write_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_qwen3, "gguf", "f16", out, family="qwen3-reranker", verify=False, progress=False, force=True)
    assert out.read_bytes() == b"GGUF previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    monkeypatch.setattr(gguf_export, "write_gguf", real)


def test_unsupported_architectures_and_missing_tokenizers_are_named(tmp_path, wordpiece_tokenizer, tiny_qwen3):
    import shutil

    no_tok = tmp_path / "no-tok"
    shutil.copytree(tiny_qwen3, no_tok)
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises((ModelFormatError, OSError)):
        convert(no_tok, "gguf", "q4_0", tmp_path / "n.gguf", family="qwen3-reranker", progress=False)
    assert not (tmp_path / "n.gguf").exists()
    with pytest.raises(ValueError, match="not available"):
        convert(tiny_qwen3, "tflite", "int4", tmp_path / "x", family="qwen3-reranker")
    with pytest.raises(ValueError, match="quant 'q3'"):
        convert(tiny_qwen3, "gguf", "q3", tmp_path / "x.gguf", family="qwen3-reranker")


def test_bert_bi_encoder_gguf_embeds_like_transformers_on_llama_cpp(tmp_path, wordpiece_tokenizer):
    import transformers

    from tests.test_parity_transformers import mean_pooled

    src = make_bert(tmp_path / "hf", wordpiece_tokenizer, "none")
    out = tmp_path / "bert.gguf"
    convert(src, "gguf", "f16", out, verify=False, progress=False)
    tok = transformers.AutoTokenizer.from_pretrained(src)
    model = transformers.AutoModel.from_pretrained(src).eval()
    query, docs = PAIRS[0][0], [d for _, d in PAIRS]
    expected = (mean_pooled(model, tok, docs) @ mean_pooled(model, tok, [query])[0]).numpy()
    with edgerank.Reranker(out) as r:  # a BERT GGUF defaults to the llama.cpp bi-encoder
        assert r.backend_name == "llamacpp" and r.spec.family == "bi-encoder"
        got = r.score(query, docs)
    assert np.max(np.abs(got - expected)) < 5e-3, (got, expected)


def test_a_cross_encoder_is_not_converted_to_gguf(tiny_cross_encoder, tmp_path):
    with pytest.raises(ValueError, match="no BERT pooler"):
        convert(tiny_cross_encoder, "gguf", "f16", tmp_path / "ce.gguf", progress=False)


@pytest.mark.slow
def test_real_minilm_gguf_ranks_like_the_fp32_model(minilm_path, tmp_path):
    report = convert(resolve("minilm-l6"), "gguf", "f16", tmp_path / "minilm.gguf", progress=False)
    assert report["spearman"] >= 0.99 and report["max_abs_diff"] < 0.01


def test_a_trained_lora_stays_unmerged_beside_a_quantized_gguf(tmp_path, bpe_tokenizer):
    """A fine-tuned LoRA delta is below a 4-bit step: the GGUF holds the base weights and a
    llama.cpp LoRA adapter beside it holds the update, which llama.cpp applies at run time."""
    import gguf

    from tests.conftest import snap_weights, train_random_lora, without_adapter

    base = make_decoder(tmp_path / "base", "llama", bpe_tokenizer, n_layers=2)
    q4 = gguf.GGMLQuantizationType.Q4_0
    # every matrix on the Q4_0 grid (row-wise, so rope's row order is moot)
    snap_weights(base, lambda name, w: gguf.quants.dequantize(gguf.quants.quantize(w, q4), q4) if w.ndim == 2 else w)
    trained = train_random_lora(base, tmp_path / "trained", std=0.01, seed=3)
    merged_only = without_adapter(trained, tmp_path / "merged-only")

    def logits(model, **kw):  # yes/no logits: sigmoid scores saturate
        with edgerank.Reranker(model, **kw) as r:
            p = np.clip(r.score(PAIRS[0][0], [d for _, d in PAIRS]), 1e-12, 1 - 1e-12)
        return np.log(p / (1 - p))

    def to_gguf(src, name):
        out = tmp_path / f"{name}.gguf"
        # no llama-server readout rotation: it would move the base off the Q4_0 grid it sits on
        report = convert(src, to="gguf", quant="q4_0", out=out, family="qwen3-reranker", verify=False, progress=False,
                         rank_readout=False)
        return out, report

    ref_trained = logits(trained, backend="reference")
    effect = ref_trained - logits(base, backend="reference", family="qwen3-reranker")
    assert np.abs(effect).max() > 0.05  # the adapter matters
    # the adapter file itself, beside f16 base weights: llama.cpp applies it as transformers
    # does (a larger update here, so that every projection's part of it shows)
    from edgerank.converters.gguf_export import write_gguf
    from edgerank.runtime.specs import get_spec

    train_random_lora(base, tmp_path / "strong", std=0.05, seed=4)
    write_gguf(tmp_path / "strong", tmp_path / "s16.gguf", "f16", get_spec("qwen3-reranker"), None, progress=False,
               adapter_dest=tmp_path / "s16.lora.gguf")
    ref_strong = logits(tmp_path / "strong", backend="reference")
    assert np.abs(ref_strong - logits(base, backend="reference", family="qwen3-reranker")).max() > 0.3
    assert np.abs(logits(tmp_path / "s16.gguf") - ref_strong).max() < 0.01

    # end to end at 4 bits: the base quantizes exactly (it is on the grid), the update rides beside it
    t_gguf, report = to_gguf(trained, "t")
    assert (tmp_path / "t.lora.gguf").is_file() and "lora" in report
    assert report["size_bytes"] == t_gguf.stat().st_size + (tmp_path / "t.lora.gguf").stat().st_size
    kept = logits(t_gguf) - logits(to_gguf(base, "b")[0])  # the family comes from the GGUF's metadata
    merged = logits(to_gguf(merged_only, "m")[0]) - logits(tmp_path / "b.gguf")
    # (llama.cpp rounds activations to 8 bits for a 4-bit matmul: differences carry ~0.03 noise)
    assert np.abs(kept - effect).mean() < 0.5 * np.abs(effect).mean(), (kept, effect)
    # quantizing the merged weights instead loses it
    assert np.abs(merged - effect).mean() > 3 * np.abs(kept - effect).mean(), (merged, kept, effect)

    # the model names its adapter; without it, a clear error (not the base model's scores)
    (tmp_path / "t.lora.gguf").rename(tmp_path / "elsewhere.gguf")
    with pytest.raises(ModelFormatError, match="t.lora.gguf"):
        edgerank.Reranker(t_gguf)
    # a GGUF that needs an adapter is not a conversion source (its training would be lost)
    (tmp_path / "elsewhere.gguf").rename(tmp_path / "t.lora.gguf")
    with pytest.raises(ModelFormatError, match="LoRA adapter"):
        convert(t_gguf, to="onnx", quant="int4", out=tmp_path / "x", verify=False, progress=False)

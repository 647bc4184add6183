"""The ONNX artifact and the layer-wise runtime, against transformers and against themselves."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")  # the reference extra: a core install skips this module
transformers = pytest.importorskip("transformers")

import edgerank
from edgerank.converters import OutputExistsError, convert, onnx_export
from edgerank.converters.quantize import dequantize_blocks, quantize_blocks
from edgerank.runtime.budget import MemoryBudgetError
from edgerank.errors import ModelFormatError, UnsupportedModelError
from tests.conftest import PAIRS, make_bert, make_decoder, snap_weights, train_random_lora, without_adapter

QUERY = PAIRS[0][0]
DOCS = [d for _, d in PAIRS] + ["the immune system and the vaccine", "a city of water", "stock market energy"]


def to_artifact(src, dest, quant="fp32", family=None):
    convert(src, "onnx", quant, dest, family=family, verify=False, progress=False)
    return dest


@pytest.fixture(scope="module", params=["qwen3", "llama", "qwen2"])
def decoder_artifact(request, tmp_path_factory, bpe_tokenizer):
    root = tmp_path_factory.mktemp(f"art-{request.param}")
    src = make_decoder(root / "hf", request.param, bpe_tokenizer, n_layers=3)
    return src, to_artifact(src, root / "fp32", family="qwen3-reranker")


def test_fp32_artifact_scores_match_transformers_with_prefix_sharing_on_and_off(decoder_artifact):
    src, art = decoder_artifact
    with edgerank.Reranker(src, backend="reference", family="qwen3-reranker") as ref:
        expected = ref.score(QUERY, DOCS)
    with edgerank.Reranker(art, pruning=False) as shared, \
            edgerank.Reranker(art, pruning=False, shared_prefix=False) as unshared:
        a, b = shared.score(QUERY, DOCS), unshared.score(QUERY, DOCS)
        stats = shared.last_stats.extra
    assert np.abs(a - expected).max() < 1e-4
    assert np.abs(a - b).max() < 1e-4
    assert stats["prefix_tokens"] > 10 and stats["prefix_tokens_saved"] == (len(DOCS) - 1) * stats["prefix_tokens"]


def test_per_layer_hidden_states_match_transformers(tmp_path, bpe_tokenizer):
    """Each layer graph, run alone on the previous layer's output, gives HF's hidden state."""
    src = make_decoder(tmp_path / "hf", "qwen3", bpe_tokenizer, n_layers=3)
    art = to_artifact(src, tmp_path / "fp32", family="qwen3-reranker")
    tok = edgerank.runtime.tokenization.HFTokenizer.from_file(art / "tokenizer.json")
    ids = tok.encode("<|im_start|>user\nhow do vaccines work<|im_end|>")
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        hf = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    from edgerank.runtime.embedding import EmbeddingRows
    from edgerank.runtime.rope import RopeTable

    manifest = json.loads((art / "manifest.json").read_text())
    d = manifest["dims"]
    h = EmbeddingRows(art / "embed.npy", None).rows(np.array(ids))[None]
    T = len(ids)
    cos, sin = RopeTable(d["head_dim"], d["rope_theta"])(np.arange(T)[None])
    mask = np.triu(np.full((T, T), -1e9, np.float32), 1)[None, None, None]
    empty = np.zeros((1, d["n_kv_heads"], 1, 0, d["head_dim"]), np.float32)
    for i, rel in enumerate(manifest["layers"]):
        sess = ort.InferenceSession(str(art / rel))
        h = sess.run(["hidden_out"], {"hidden": h, "cos": cos, "sin": sin, "mask": mask,
                                      "past_key": empty, "past_value": empty})[0]
        if i + 1 < len(hf) - 1:  # HF's last entry has the final norm applied
            assert np.abs(h[0] - hf[i + 1][0].numpy()).max() < 1e-4, f"layer {i}"
    norm = np.load(art / "head.npz")["norm"]
    normed = h[0] / np.sqrt((h[0] ** 2).mean(-1, keepdims=True) + 1e-6) * norm
    assert np.abs(normed - hf[-1][0].numpy()).max() < 1e-4


@pytest.mark.parametrize("head", ["classifier", "none"])
def test_bert_artifacts_match_transformers(head, tmp_path, wordpiece_tokenizer):
    src = make_bert(tmp_path / "hf", wordpiece_tokenizer, head)
    art = to_artifact(src, tmp_path / "fp32")
    with edgerank.Reranker(src, backend="reference") as ref, edgerank.Reranker(art, pruning=False) as r:
        expected, got = ref.score(QUERY, DOCS), r.score(QUERY, DOCS)
        assert "n/a" in str(r.last_stats.extra["shared_prefix"])
    assert np.abs(got - expected).max() < 1e-4


def test_int4_runtime_equals_a_plain_one_pair_at_a_time_forward(decoder_artifact, tmp_path):
    src, _ = decoder_artifact
    art = to_artifact(src, tmp_path / "int4", quant="int4", family="qwen3-reranker")
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["quant"]["op"] == "MatMulNBits" and manifest["quant"]["accuracy_level"] == 4
    with edgerank.Reranker(art, pruning=False, chunk_tokens=64, compute="int4") as batched, \
            edgerank.Reranker(art, pruning=False, shared_prefix=False, compute="int4") as plain:
        got = batched.score(QUERY, DOCS)
        assert batched.last_stats.extra["padding_fraction"] >= 0
        one_by_one = np.array([plain.score(QUERY, [d])[0] for d in DOCS])
    assert np.abs(got - one_by_one).max() < 1e-4
    with edgerank.Reranker(src, backend="reference", family="qwen3-reranker") as ref:
        expected = ref.score(QUERY, DOCS)
    assert np.corrcoef(got, expected)[0, 1] > 0.6  # int4 of a random 64-wide model: related, not equal


def test_streamed_weights_give_the_resident_scores_with_two_layers_at_most(decoder_artifact):
    _, art = decoder_artifact
    with edgerank.Reranker(art, pruning=False) as resident, \
            edgerank.Reranker(art, pruning=False, stream_weights=True) as streamed:
        a, b = resident.score(QUERY, DOCS), streamed.score(QUERY, DOCS)
        extra = streamed.last_stats.extra
        assert streamed._backend.layers.peak_resident <= 2
    assert np.abs(a - b).max() < 1e-6
    assert extra["stream_weights"] and extra["io_wait_s"] >= 0 and extra["layer_load_s"] > 0


def test_layer_sessions_use_the_thread_count_and_block_instead_of_spinning(decoder_artifact, capsys):
    """One pool per layer session: idle threads must block (bench/RESULTS.md §9.3). The
    bench script that measured it runs, and its spinning variant really differs."""
    import importlib.util

    _, art = decoder_artifact
    with edgerank.Reranker(art, pruning=False, threads=2) as r:  # an fp32 artifact: ONNX Runtime's sessions
        opts = r._backend.layers.get(0).get_session_options()
        assert opts.intra_op_num_threads == 2
        assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    spec = importlib.util.spec_from_file_location("ort_threads", Path(__file__).parents[1] / "bench/ort_threads.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    spin = script.load(str(art), [("session.intra_op.allow_spinning", "1")], 1)
    opts = spin._backend.layers.get(0).get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "1" and opts.intra_op_num_threads == 1
    spin.close()
    assert script.main([str(art), "--data", str(Path(art) / "no-such-data"), "--queries", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["queries"] == 2 and set(report["median_s"]) == {"spin", "nospin"}


def test_head_scores_run_on_one_blas_thread_and_leave_numpys_pool_as_it_was(tiny_cross_encoder, tmp_path,
                                                                           monkeypatch):
    """The head's numpy matmuls between layers must not wake numpy's BLAS pool: its idle
    workers spin and slow the next layer by a fifth (bench/RESULTS.md §10.4). A
    cross-encoder's pooler is the head that woke it."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from edgerank.runtime.specs import ScoreFormula

    def blas_threads() -> set[int]:
        return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}

    seen = []
    apply = ScoreFormula.apply
    monkeypatch.setattr(ScoreFormula, "apply", lambda self, x: seen.append(blas_threads()) or apply(self, x))
    art = to_artifact(tiny_cross_encoder, tmp_path / "ce")
    with threadpool_limits(limits=3, user_api="blas"), \
            edgerank.Reranker(art, threshold=0.0, min_depth=0.1) as r:
        assert blas_threads() == {3}
        r.rank(QUERY, DOCS, top_k=1)
        assert blas_threads() == {3}
    assert r.last_stats.extra["pruning_steps"] and len(seen) > 1  # checks ran, then the final head
    assert all(s == {1} for s in seen)


def test_gguf_to_artifact_round_trip_scores_like_the_hf_model(tmp_path, bpe_tokenizer):
    src = make_decoder(tmp_path / "hf", "llama", bpe_tokenizer)  # llama: q/k rows permuted in GGUF
    gguf = tmp_path / "m.gguf"
    convert(src, "gguf", "f16", gguf, family="qwen3-reranker", verify=False, progress=False)
    art = to_artifact(gguf, tmp_path / "from-gguf", family="qwen3-reranker")
    with edgerank.Reranker(src, backend="reference", family="qwen3-reranker") as ref, \
            edgerank.Reranker(art, pruning=False) as r:
        expected, got = ref.score(QUERY, DOCS), r.score(QUERY, DOCS)
    assert np.abs(got - expected).max() < 5e-3  # f16 weights


def test_quantize_blocks_round_trips_and_a_q4_1_grid_is_lossless():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 70)).astype(np.float32)  # K not a multiple of the block
    for bits, tol in ((8, 0.01), (4, 0.2)):
        b, s, z = quantize_blocks(w, bits, 32)
        back = dequantize_blocks(b, s, z, bits, 70)
        err = np.abs(back - w).max(axis=1)
        assert back.shape == w.shape and np.all(err <= tol * np.abs(w).max())
    # values already on a 16-level affine grid per block (what Q4_1 stores) survive exactly
    lo, step = rng.normal(size=(8, 2, 1)), rng.uniform(0.01, 0.1, size=(8, 2, 1))
    codes = rng.integers(0, 16, size=(8, 2, 32))
    codes[..., 0], codes[..., 1] = 0, 15
    grid = (lo + codes * step).astype(np.float32).reshape(8, 64)
    b, s, z = quantize_blocks(grid, 4, 32)
    assert np.abs(dequantize_blocks(b, s, z, 4, 64) - grid).max() < 1e-5


def test_tampered_or_unknown_format_artifacts_are_refused(decoder_artifact, tmp_path):
    _, art = decoder_artifact
    bad = tmp_path / "bad"
    shutil.copytree(art, bad)
    layer = bad / "layers" / "layer_01.onnx"
    data = bytearray(layer.read_bytes())
    data[-10] ^= 0xFF
    layer.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match="sha256"):
        edgerank.Reranker(bad)
    future = tmp_path / "future"
    shutil.copytree(art, future)
    manifest = json.loads((future / "manifest.json").read_text())
    manifest["format_version"] = 99
    (future / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFormatError, match="format version 99"):
        edgerank.Reranker(future)
    (future / "manifest.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        edgerank.Reranker(future)


def test_conversion_errors_and_atomicity(tmp_path, bpe_tokenizer, monkeypatch):
    src = make_decoder(tmp_path / "hf", "qwen3", bpe_tokenizer)
    out = tmp_path / "art"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    with pytest.raises(OutputExistsError):
        to_artifact(src, out, family="qwen3-reranker")
    assert (out / "mine.txt").read_text() == "user data"

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    with pytest.raises(OutputExistsError, match="not an edgerank artifact"):  # not even with force
        convert(src, "onnx", "int4", out, family="qwen3-reranker", verify=False, progress=False, force=True)
    monkeypatch.setattr(onnx_export.onnx, "save_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(src, "onnx", "int4", tmp_path / "new", family="qwen3-reranker", verify=False, progress=False,
                force=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "hf"]
    assert (out / "mine.txt").read_text() == "user data"
    with pytest.raises(ValueError, match="quant 'int2'"):
        convert(src, "onnx", "int2", tmp_path / "x", family="qwen3-reranker")
    no_tok = tmp_path / "no-tok"
    shutil.copytree(src, no_tok)
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(ModelFormatError, match="tokenizer.json"):
        to_artifact(no_tok, tmp_path / "y", family="qwen3-reranker")
    gpt2 = tmp_path / "gpt2"
    shutil.copytree(src, gpt2)
    cfg = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        to_artifact(gpt2, tmp_path / "z", family="qwen3-reranker")
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def test_a_memory_budget_too_small_is_refused_before_any_work(decoder_artifact):
    _, art = decoder_artifact
    with pytest.raises(MemoryBudgetError, match="max_memory_mb=0.01"):
        edgerank.Reranker(art, max_memory_mb=0.01)
    with edgerank.Reranker(art, max_memory_mb=25) as r:  # loads (ORT itself takes ~11 MB), but a huge call cannot fit
        with pytest.raises(MemoryBudgetError, match="too small for this call"):
            r.rank(QUERY, ["vaccine " * 900] * 200)
        assert len(r.rank(QUERY, DOCS[:2])) == 2


def test_the_converter_report_compares_int4_with_full_precision(tmp_path, bpe_tokenizer):
    src = make_decoder(tmp_path / "hf", "qwen3", bpe_tokenizer)
    report = convert(src, "onnx", "int4", tmp_path / "art", family="qwen3-reranker", progress=False)
    saved = json.loads((tmp_path / "art.conversion_report.json").read_text())
    for key in ("spearman", "pearson", "topk_agreement", "max_abs_diff", "size_bytes", "source_size_bytes",
                "seconds", "verify_seconds", "peak_rss_mb"):
        assert key in saved and saved[key] == report[key]
    assert report["pairs"] >= 8 and -1 <= report["spearman"] <= 1


@pytest.mark.slow
def test_real_smollm2_gguf_to_int4_keeps_the_ranking(smollm2_path, tmp_path):
    report = convert(smollm2_path, "onnx", "int4", tmp_path / "smol", progress=False)
    assert report["spearman"] >= 0.97 and report["topk_agreement"] >= 0.9
    with edgerank.Reranker(tmp_path / "smol", pruning=False, compute="int4") as r, \
            edgerank.Reranker(tmp_path / "smol", pruning=False, shared_prefix=False, compute="int4") as u:
        docs = DOCS[:4]
        assert np.abs(r.score(QUERY, docs) - u.score(QUERY, docs)).max() < 1e-4


def test_int8_artifact_is_close_to_fp32(decoder_artifact, tmp_path):
    src, fp32 = decoder_artifact
    art = to_artifact(src, tmp_path / "int8", quant="int8", family="qwen3-reranker")
    with edgerank.Reranker(art, pruning=False) as q, edgerank.Reranker(fp32, pruning=False) as f:
        a, b = q.score(QUERY, DOCS), f.score(QUERY, DOCS)
    assert np.abs(a - b).max() < 0.05 and np.corrcoef(a, b)[0, 1] > 0.95


@pytest.mark.slow
def test_real_smollm2_fp32_artifact_equals_the_transformers_reference(smollm2_path, tmp_path):
    art = to_artifact(smollm2_path, tmp_path / "smol-fp32")
    docs = DOCS[:6]
    with edgerank.Reranker(smollm2_path, backend="reference") as ref, edgerank.Reranker(art, pruning=False) as r:
        assert np.abs(r.score(QUERY, docs) - ref.score(QUERY, docs)).max() < 1e-3


def test_int4_artifact_keeps_a_lora_update_that_merging_would_round_away(tmp_path, bpe_tokenizer):
    """A fine-tuned LoRA delta is far below a 4-bit step: the converter quantizes the base
    and keeps the low-rank update beside it, so int4 follows what the adapter changed."""
    base = make_decoder(tmp_path / "base", "llama", bpe_tokenizer, n_layers=2)

    def on_grid(name, w):  # the base's projections on a 4-bit grid, as a Q4_1 GGUF base (SmolLM2) has them
        return dequantize_blocks(*quantize_blocks(w, 4, 32), 4, w.shape[1]) if ".layers." in name and w.ndim == 2 else w
    snap_weights(base, on_grid)
    trained = train_random_lora(base, tmp_path / "trained", std=0.01, seed=3)
    merged_only = without_adapter(trained, tmp_path / "merged-only")

    def scores(model, **kw):  # as yes/no logits: sigmoid scores saturate
        with edgerank.Reranker(model, family="qwen3-reranker", **kw) as r:
            p = np.clip(r.score(QUERY, DOCS), 1e-12, 1 - 1e-12)
        return np.log(p / (1 - p))

    effect = scores(trained, backend="reference") - scores(base, backend="reference")
    art_base = scores(to_artifact(base, tmp_path / "b4", "int4", "qwen3-reranker"), pruning=False, compute="int4")
    art_lora = scores(to_artifact(trained, tmp_path / "t4", "int4", "qwen3-reranker"), pruning=False, compute="int4")
    art_merged = scores(to_artifact(merged_only, tmp_path / "m4", "int4", "qwen3-reranker"), pruning=False,
                        compute="int4")
    assert np.abs(effect).max() > 0.02  # the adapter matters
    kept = art_lora - art_base
    assert np.abs(kept - effect).max() < 0.1 * np.abs(effect).max(), (kept, effect)
    # quantizing the merged weights instead loses most of it
    assert np.abs((art_merged - art_base) - effect).max() > 3 * np.abs(kept - effect).max()
    manifest = json.loads((tmp_path / "t4" / "manifest.json").read_text())
    assert "adapter.safetensors" not in manifest["files"]  # the update lives inside the layers

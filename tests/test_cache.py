"""The conversion cache: a retrained or deleted model's conversions are found and removed,
and nothing the cache did not name itself is ever touched."""

from __future__ import annotations

import os
import shutil
import time

from edgerank.runtime import layout
from edgerank.converters import convert
from edgerank.models.supply import resolve
from edgerank.models import cache
from edgerank.models.__main__ import main as models_main


def _retrain(folder) -> None:
    """What retraining in place does to the cache key: the weights' mtime moves."""
    w = folder / "model.safetensors"
    st = w.stat()
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_clean_removes_only_conversions_no_model_uses(tiny_cross_encoder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGERANK_HOME", str(tmp_path / "home"))
    model = tmp_path / "model"
    shutil.copytree(tiny_cross_encoder, model)
    gone = tmp_path / "gone"
    shutil.copytree(tiny_cross_encoder, gone)

    first = cache.cached_artifact(resolve(str(model)), progress=False)
    assert cache.cached_artifact(resolve(str(model)), progress=False) == first  # reused, not reconverted
    gone_entry = cache.cached_artifact(resolve(str(gone)), progress=False).name
    _retrain(model)
    second = cache.cached_artifact(resolve(str(model)), progress=False)
    assert second != first
    shutil.rmtree(gone)
    root = cache.cache_dir()
    by_hand = root / "mine-int4"  # the user's own conversion, written into the cache folder
    convert(str(model), "onnx", "int4", by_hand, verify=False, progress=False)
    (root / "notes.txt").write_text("the user's")
    old_leftover = root / f".{second.name}.partial-x1"  # an interrupted conversion, long ago
    old_leftover.mkdir()
    (old_leftover / "layer_00.onnx").write_bytes(b"0" * 10)
    long_ago = time.time() - 2 * cache.LEFTOVER_AGE_S
    os.utime(old_leftover / "layer_00.onnx", (long_ago, long_ago))
    os.utime(old_leftover, (long_ago, long_ago))
    running = root / f".{second.name}.partial-x2"  # a conversion still being written
    running.mkdir()

    states = {e.name: e.state for e in cache.entries()}
    assert states == {first.name: "stale", second.name: "current", gone_entry: "orphaned",
                      "mine-int4": "unmanaged", old_leftover.name: "leftover"}

    assert models_main(["cache"]) == 0  # lists, removes nothing
    assert "3 entries" in capsys.readouterr().out and first.exists()

    assert models_main(["cache", "--clean"]) == 0
    assert not first.exists() and not first.with_name(first.name + layout.REPORT_SUFFIX).exists()
    assert not any(p.name.startswith(gone_entry) for p in root.iterdir())
    assert not old_leftover.exists()
    assert second.is_dir() and by_hand.is_dir() and (root / "notes.txt").read_text() == "the user's"
    assert running.is_dir()
    assert {e.name: e.state for e in cache.entries()} == {second.name: "current", "mine-int4": "unmanaged"}
    # the current conversion still runs
    import edgerank

    with edgerank.Reranker(second) as r:
        assert len(r.rank("q", ["a", "b"])) == 2


def test_an_hf_folder_on_the_edgerank_backend_runs_its_cached_int4_conversion(
        tiny_cross_encoder, tiny_qwen3, tmp_path, monkeypatch):
    """``backend="edgerank"`` on a model folder converts it once, through the cache, to
    exactly what a by-hand conversion gives; a family override is its own conversion."""
    import numpy as np

    from edgerank import Reranker

    monkeypatch.setenv("EDGERANK_HOME", str(tmp_path / "home"))
    query, docs = "capital of france", ["paris is the capital", "berlin is in germany", "the seine"]
    with Reranker(str(tiny_cross_encoder), backend="edgerank", pruning=False, compute="int4") as r:
        auto = r.score(query, docs)
    [entry] = cache.entries()
    assert entry.state == "current" and entry.source == str(tiny_cross_encoder.resolve())
    manifest = cache.cache_dir() / entry.name / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    with Reranker(str(tiny_cross_encoder), backend="edgerank", pruning=False, compute="int4") as r:
        assert np.array_equal(r.score(query, docs), auto)
    assert manifest.stat().st_mtime_ns == stamp and len(cache.entries()) == 1  # reused

    by_hand = tmp_path / "by-hand"
    convert(str(tiny_cross_encoder), "onnx", "int4", by_hand, verify=False, progress=False)
    with Reranker(str(by_hand), pruning=False, compute="int4") as r:
        np.testing.assert_allclose(auto, r.score(query, docs), rtol=0, atol=1e-6)

    # the tiny decoder's family cannot be detected from its files: each family given is
    # converted (label rows, template) and cached under its own name
    names = set()
    for family in ("qwen3-reranker", "rank1"):
        with Reranker(str(tiny_qwen3), backend="edgerank", family=family, pruning=False) as r:
            assert r._backend.spec.family == family
            names.add(r._backend.artifact.path.name)
    assert len(names) == 2
    assert {e.name for e in cache.entries()} >= names
    assert all(e.state == "current" for e in cache.entries())


def test_a_decoder_cached_before_batched_decoding_is_converted_again(tiny_qwen3, tmp_path, monkeypatch):
    import json

    from edgerank.runtime import layout

    monkeypatch.setenv("EDGERANK_HOME", str(tmp_path / "home"))
    art = cache.cached_artifact(resolve(str(tiny_qwen3), family="qwen3-reranker"), progress=False)
    manifest_path = art / layout.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    assert layout.PAST_MASK in manifest["layer_inputs"]
    del manifest["layer_inputs"]  # as written before the layer graphs took past_mask
    manifest_path.write_text(json.dumps(manifest))
    assert cache.cached_artifact(resolve(str(tiny_qwen3), family="qwen3-reranker"), progress=False) == art
    assert layout.PAST_MASK in json.loads(manifest_path.read_text())["layer_inputs"]  # converted again

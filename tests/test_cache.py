"""The conversion cache: a retrained or deleted model's conversions are found and removed,
and nothing the cache did not name itself is ever touched."""

from __future__ import annotations

import os
import shutil
import time

from converters import convert
from edgerank import cache
from edgerank.models import main as models_main


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

    first = cache.cached_artifact(str(model), progress=False)
    assert cache.cached_artifact(str(model), progress=False) == first  # reused, not reconverted
    gone_entry = cache.cached_artifact(str(gone), progress=False).name
    _retrain(model)
    second = cache.cached_artifact(str(model), progress=False)
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
    assert not first.exists() and not first.with_name(first.name + cache.REPORT_SUFFIX).exists()
    assert not any(p.name.startswith(gone_entry) for p in root.iterdir())
    assert not old_leftover.exists()
    assert second.is_dir() and by_hand.is_dir() and (root / "notes.txt").read_text() == "the user's"
    assert running.is_dir()
    assert {e.name: e.state for e in cache.entries()} == {second.name: "current", "mine-int4": "unmanaged"}
    # the current conversion still runs
    import edgerank

    with edgerank.Reranker(second) as r:
        assert len(r.rank("q", ["a", "b"])) == 2

"""Issue 42, items 8-9: a file changed under a loaded model is a ModelFormatError, never a
signal; ordinary user errors in the newer command lines are one ``error:`` line and exit 2,
before any model loads where possible. Each test here failed on da04390."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_bert

REPO = Path(__file__).resolve().parents[1]
DOCS = ["the immune system", "the stock market", "a river city", "yes no", "vaccine cell body"]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.fixture(scope="module")
def small_artifact(tmp_path_factory, wordpiece_tokenizer) -> Path:
    from edgerank.converters import convert

    root = tmp_path_factory.mktemp("crash-art")
    convert(make_bert(root / "hf", wordpiece_tokenizer, "classifier"), "onnx", "int4", root / "int4",
            verify=False, progress=False)
    return root / "int4"


# ---- (8) the embedding table changed under a loaded model ------------------------------------

# Loads the artifact, ranks, changes embed.npy as argv[2] says, ranks again with tokens it
# has not read yet. A signal kills the process; an error is printed as its class name.
CHANGED = """
import sys
from pathlib import Path
import edgerank

art, how = Path(sys.argv[1]), sys.argv[2]
table = art / "embed.npy"
with edgerank.Reranker(art, pruning=False) as r:
    r.score("the immune system", ["a river city"])
    if how == "truncate":
        with open(table, "r+b") as f:
            f.truncate(128)  # the .npy header alone: every row gone
    else:  # same size, other bytes, written in place
        data = bytearray(table.read_bytes())
        data[200:400] = bytes(200)
        with open(table, "r+b") as f:
            f.write(bytes(data))
    try:
        r.score("vaccine cell body infection market", ["stock price water energy"])
        print("scored")
    except edgerank.ModelFormatError as e:
        print("ModelFormatError", e)
"""


@pytest.mark.parametrize("how", ["truncate", "rewrite"])
def test_an_embedding_table_changed_under_a_loaded_model_is_a_format_error(small_artifact, tmp_path, how):
    art = Path(shutil.copytree(small_artifact, tmp_path / "art"))
    done = subprocess.run([sys.executable, "-c", CHANGED, str(art), how], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert done.returncode == 0, f"rc {done.returncode}: {done.stderr[-2000:]}"  # -7: SIGBUS
    assert done.stdout.startswith("ModelFormatError") and "embed.npy" in done.stdout, done.stdout


def test_embedding_rows_read_from_the_file_equal_the_table(small_artifact):
    """Rows read with pread, in any order, repeats and runs of neighbours included, are the
    table's rows (dequantized by its scales), and the LRU hands back the same."""
    from edgerank.runtime.embedding import EmbeddingRows

    table = np.load(small_artifact / "embed.npy")
    scales = np.load(small_artifact / "embed_scale.npy")
    rows = EmbeddingRows(small_artifact / "embed.npy", small_artifact / "embed_scale.npy", max_rows=50)
    rng = np.random.default_rng(0)
    for ids in ([0], [len(table) - 1, 0, 1, 2, 3, 40, 41, 200], rng.integers(0, len(table), (7, 300))):
        ids = np.asarray(ids)
        expected = table[ids].astype(np.float32) * scales[ids][..., None]
        np.testing.assert_array_equal(rows.rows(ids), expected)
        np.testing.assert_array_equal(rows.rows(ids), expected)  # from the LRU, partly


def test_a_truncated_table_is_refused_at_load(small_artifact, tmp_path):
    import edgerank

    art = Path(shutil.copytree(small_artifact, tmp_path / "art"))
    with open(art / "embed.npy", "r+b") as f:
        f.truncate((art / "embed.npy").stat().st_size - 1)
    with pytest.raises(edgerank.ModelFormatError):
        edgerank.Reranker(art, verify=False)


# ---- (9) the batch command line and cache --clean ---------------------------------------------

def _jsonl_run(path: Path, query: str) -> Path:
    path.write_text("".join(json.dumps({"query_id": "q1", "query": query, "doc_id": f"d{i}", "text": d}) + "\n"
                            for i, d in enumerate(DOCS)))
    return path


@pytest.mark.parametrize("query", ["   ", "\u200b", "\u200b\u200d\ufeff"])
def test_batch_refuses_a_blank_or_zero_width_query_before_any_model_loads(small_artifact, tmp_path, capsys,
                                                                          monkeypatch, query):
    from edgerank import batch

    monkeypatch.setattr(batch, "Reranker", lambda *a, **k: pytest.fail("loaded a model before checking the queries"))
    run = _jsonl_run(tmp_path / "run.jsonl", query)
    assert batch.main([str(run), "--model", str(small_artifact), "--out", str(tmp_path / "o.trec"), "--quiet"]) == 2
    assert "query q1 is empty" in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.jsonl"]


def test_batch_refuses_a_query_too_long_for_the_model_before_scoring(small_artifact, tmp_path, capsys):
    from edgerank import batch

    run = _jsonl_run(tmp_path / "run.jsonl", "immune " * 5000)
    assert batch.main([str(run), "--model", str(small_artifact), "--out", str(tmp_path / "o.trec"), "--quiet"]) == 2
    err = _one_error_line(capsys)
    assert "q1" in err and "leaves no room" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.jsonl"]  # no parts: nothing was scored


@pytest.mark.parametrize("argv, message", [
    (["--option", "threads=0"], "threads must be a positive int"),
    (["--option", "threads=two"], "threads must be a positive int"),
    (["--option", "max_memory_mb=-1"], "max_memory_mb"),
])
def test_batch_refuses_a_bad_option_value_as_one_line(small_artifact, tmp_path, capsys, argv, message):
    from edgerank import batch

    run = _jsonl_run(tmp_path / "run.jsonl", "the immune system")
    assert batch.main([str(run), "--model", str(small_artifact), "--out", str(tmp_path / "o.trec"), "--quiet",
                       *argv]) == 2
    assert message in _one_error_line(capsys)


def test_batch_refuses_an_out_under_a_regular_file_and_a_run_that_is_not_utf8(small_artifact, tmp_path, capsys,
                                                                              monkeypatch):
    from edgerank import batch

    monkeypatch.setattr(batch, "Reranker", lambda *a, **k: pytest.fail("loaded a model before checking the input"))
    run = _jsonl_run(tmp_path / "run.jsonl", "the immune system")
    (tmp_path / "file").write_text("a file")
    assert batch.main([str(run), "--model", str(small_artifact), "--out", str(tmp_path / "file" / "o.trec")]) == 2
    assert "is a file" in _one_error_line(capsys)
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(run.read_text().replace("immune", "imm\u00fcne").encode("latin-1"))
    assert batch.main([str(latin), "--model", str(small_artifact), "--out", str(tmp_path / "o.trec")]) == 2
    assert "not UTF-8" in _one_error_line(capsys)
    trec = tmp_path / "run.trec"
    trec.write_bytes(b"q1 Q0 d\xff1 1 1.0 bm25\n")
    assert batch.main([str(trec), "--data", str(tmp_path / "data"), "--model", str(small_artifact),
                       "--out", str(tmp_path / "o.trec")]) == 2
    assert "not UTF-8" in _one_error_line(capsys)


def _read_only(folder: Path) -> list[str]:
    """A command prefix under which ``folder`` cannot be written: its mode for a user, a
    read-only bind mount of it for root (who writes through modes), or None if neither."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return []
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f'mount --bind -o ro "{folder}" "{folder}"'],
                           capture_output=True)
    if probe.returncode != 0:
        return None
    return ["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$1" "$1" && shift && exec "$@"', "sh", str(folder)]


def test_cache_clean_on_a_read_only_cache_is_one_line(tmp_path):
    cache = tmp_path / "home" / "artifacts"
    leftover = cache / ".minilm-l6-0123456789-int4.partial-abc"  # an interrupted conversion's staging
    leftover.mkdir(parents=True)
    (leftover / "layer.onnx").write_bytes(b"half")
    old = time.time() - 2 * 3600
    os.utime(leftover / "layer.onnx", (old, old))
    os.utime(leftover, (old, old))
    prefix = _read_only(cache)
    if prefix is None:
        pytest.skip("root, and no mount namespace to make the cache read-only in")
    try:
        done = subprocess.run([*prefix, sys.executable, "-m", "edgerank.models", "cache", "--clean"], cwd=REPO,
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "EDGERANK_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)})
    finally:
        cache.chmod(0o755)
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "cannot clean" in err, err
    assert (leftover / "layer.onnx").read_bytes() == b"half"

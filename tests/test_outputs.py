"""Issue 42, items 1-3: no output replaces what it did not write. A converter claims its
``--out`` and replaces only its own claim; every command line checks its outputs against its
inputs, and where they go, before any work. Each test here failed on da04390."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import make_bert, write_beir

REPO = Path(__file__).resolve().parents[1]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def _tree(*roots: Path) -> dict[str, str]:
    """sha256 of every file under each root (a root may be one file), by path."""
    out = {}
    for root in roots:
        for f in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


# ---- (1) a converter replaces only its own claim --------------------------------------------

# A conversion held after writing its output, until the test says go: what a slow conversion
# is while something else happens at its --out
HELD = """
import sys, time
from pathlib import Path
import edgerank.converters as converters

ready, go = Path(sys.argv[1]), Path(sys.argv[2])
write = converters._write

def held(*args, **kwargs):
    notes = write(*args, **kwargs)
    ready.touch()
    while not go.exists():
        time.sleep(0.02)
    return notes

converters._write = held
from edgerank.converters.__main__ import main
sys.exit(main(sys.argv[3:]))
"""


def _held_conversion(src: Path, out: Path, signals: Path) -> subprocess.Popen:
    """A conversion of ``src`` to ``out`` in its own process, waiting (output written, not yet
    in place) until ``signals/go`` exists."""
    signals.mkdir(exist_ok=True)
    argv = [str(src), "--to", "onnx", "--quant", "int4", "--out", str(out), "--no-verify"]
    proc = subprocess.Popen([sys.executable, "-c", HELD, str(signals / "ready"), str(signals / "go"), *argv],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 300
    while not (signals / "ready").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the conversion never reached its end"
        time.sleep(0.05)
    return proc


def test_a_folder_made_at_out_during_a_conversion_is_left_and_the_conversion_kept_beside(tiny_cross_encoder,
                                                                                       tmp_path):
    out = tmp_path / "v"
    proc = _held_conversion(tiny_cross_encoder, out, tmp_path / "signals")
    out.mkdir()  # the user's folder, made while the conversion runs
    (out / "important.txt").write_text("keep")
    (tmp_path / "signals" / "go").touch()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ") and "left as it is" in line, err
    assert sorted(p.name for p in out.iterdir()) == ["important.txt"]
    assert (out / "important.txt").read_text() == "keep"
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("v.new-")]
    assert len(kept) == 1 and str(kept[0]) in line and (kept[0] / "manifest.json").is_file()
    assert not any(p.name.startswith(".v.") for p in tmp_path.iterdir())  # no staging or lock left behind


def test_two_conversions_to_one_out_the_second_refuses(tiny_cross_encoder, tmp_path, capsys):
    from edgerank.converters.__main__ import main

    out = tmp_path / "v"
    first = _held_conversion(tiny_cross_encoder, out, tmp_path / "signals")
    second = main([str(tiny_cross_encoder), "--to", "onnx", "--quant", "int4", "--out", str(out), "--no-verify"])
    assert second == 2
    assert "being written by another conversion" in _one_error_line(capsys)
    assert not out.exists()  # the second wrote nothing
    (tmp_path / "signals" / "go").touch()
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert (out / "manifest.json").is_file()
    assert json.loads((tmp_path / "v.conversion_report.json").read_text())["output"] == str(out)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "signals") == ["v", "v.conversion_report.json"]


def test_a_file_output_is_never_replaced_when_another_appeared_at_its_name(tmp_path):
    """A GGUF-like file output: a file written at ``dest`` while the output was staged stays,
    and the finished one is kept under its sibling name."""
    from edgerank.converters.output import OutputExistsError, atomic_path

    dest = tmp_path / "model.gguf"
    with pytest.raises(OutputExistsError, match="left as it is"):
        with atomic_path(dest, force=False, is_dir=False) as staged:
            staged.write_bytes(b"GGUF new")
            dest.write_text("the user's file")
    assert dest.read_text() == "the user's file"
    assert [p.read_bytes() for p in tmp_path.glob("model.new-*.gguf")] == [b"GGUF new"]


def test_force_replaces_only_the_output_it_found(tmp_path):
    """``force`` replaces the edgerank output found at the start, not one written over it
    meanwhile."""
    from edgerank.converters.output import OutputExistsError, atomic_path

    dest = tmp_path / "model.gguf"
    dest.write_bytes(b"GGUF old")
    with atomic_path(dest, force=True, is_dir=False) as staged:
        staged.write_bytes(b"GGUF new")
    assert dest.read_bytes() == b"GGUF new"
    with pytest.raises(OutputExistsError):
        with atomic_path(dest, force=True, is_dir=False) as staged:
            staged.write_bytes(b"GGUF newer")
            time.sleep(0.01)
            dest.write_bytes(b"GGUF someone else's")
    assert dest.read_bytes() == b"GGUF someone else's"


# ---- (2) every command line: outputs never replace or enter an input -------------------------

@pytest.fixture(scope="module")
def inputs(tmp_path_factory, wordpiece_tokenizer) -> dict[str, Path]:
    """One of each input a command line reads: a BEIR collection with its run (D), a run file
    (R), an HF model (H), its int4 artifact (M), training groups (G) and a cache folder (C)."""
    from edgerank.converters import convert

    root = tmp_path_factory.mktemp("inputs")
    run = "".join(f"q1 Q0 d{i} {i} {10 - i}.0 bm25\n" for i in range(1, 4))
    data = write_beir(root / "data", ["d1", "d2", "d3"], {"q1": "the immune system"}, "q1\td1\t1\n", run=run)
    shutil.copy(data / "qrels" / "test.tsv", data / "qrels" / "train.tsv")  # a training source too
    texts = ["the immune system fights infection", "a river city by the water", "the stock market price fell"]
    (data / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n"
                                               for i, t in enumerate(texts, 1)))
    (root / "run.trec").write_text(run)
    hf = make_bert(root / "hf", wordpiece_tokenizer, "classifier")
    convert(hf, "onnx", "int4", root / "art", verify=False, progress=False)
    (root / "groups.jsonl").write_text(json.dumps({"query": "q", "positive": "the immune system",
                                                   "negatives": ["a river"], "teacher_scores": [1.0, 0.0]}) + "\n")
    (root / "home" / "artifacts").mkdir(parents=True)
    (root / "home" / "artifacts" / "notes.txt").write_text("a file in the cache")
    return {"D": data, "R": root / "run.trec", "H": hf, "M": root / "art", "G": root / "groups.jsonl",
            "C": root / "home" / "artifacts"}


# module, argv with OUT for the output, the inputs it reads (C: the cache, for the commands
# that load a model through it)
COMMANDS = [
    ("edgerank.eval", ["--data", "D", "--run", "R", "--model", "M", "--json", "OUT"], "DRMC"),
    ("edgerank.bench", ["--data", "D", "--model", "M", "--configs", "edgerank", "--queries", "1", "--depth", "2",
                        "--json", "OUT"], "DMC"),
    ("edgerank.bench", ["--data", "D", "--model", "M", "--configs", "edgerank", "--queries", "1", "--depth", "2",
                        "--plot", "OUT"], "DMC"),
    ("edgerank.calibrate", ["M", "--data", "D", "--queries", "1", "--depth", "2", "--dry-run", "--save", "OUT"], "MDC"),
    ("edgerank.calibrate", ["M", "--data", "D", "--queries", "1", "--depth", "2", "--config", "OUT"], "MDC"),
    ("edgerank.batch", ["R", "--data", "D", "--model", "M", "--out", "OUT", "--quiet"], "RDMC"),
    ("edgerank.batch", ["R", "--data", "D", "--model", "M", "--out", "{tmp}/reranked.trec", "--report", "OUT",
                        "--quiet"], "RDMC"),
    ("edgerank.data", ["build-train", "--source", "squad", "D", "--out", "OUT", "--force"], "D"),
    ("edgerank.data", ["label", "G", "--teacher", "M", "--backend", "edgerank", "--out", "OUT", "--force"], "GMC"),
    ("edgerank.converters", ["H", "--to", "onnx", "--quant", "int4", "--out", "OUT", "--force", "--no-verify"], "H"),
    ("edgerank.train", ["--family", "cross-encoder", "--base", "H", "--data", "G", "--steps", "1", "--out", "OUT",
                        "--force"], "HG"),
]


def _targets(path: Path) -> list[Path]:
    """Outputs that name an input: the input itself, each file in it, a new file inside it
    (or under it, for a file)."""
    if path.is_file():
        return [path, path / "new.json"]
    return [path, *sorted(p for p in path.rglob("*") if p.is_file()), path / "new.json"]


@pytest.mark.parametrize("module, argv, reads", COMMANDS, ids=[f"{m}{a[a.index('OUT') - 1]}" for m, a, _ in COMMANDS])
def test_every_command_line_leaves_its_inputs_byte_identical(inputs, tmp_path, monkeypatch, capsys, module, argv,
                                                             reads):
    """Each command line, its output named as each of its inputs, each file of an input
    folder and a new file inside each one: refused with one error line, and every input file
    byte-identical afterwards (none added, none removed)."""
    import importlib

    monkeypatch.setenv("EDGERANK_HOME", str(inputs["C"].parent))
    main = importlib.import_module(module if module == "edgerank.batch" else module + ".__main__").main
    read = [inputs[k] for k in reads]
    before = _tree(*read)
    for target in (t for k in reads for t in _targets(inputs[k])):
        args = [str(target) if a == "OUT" else str(inputs[a]) if a in inputs else a.format(tmp=tmp_path)
                for a in argv]
        assert main(args) == 2, f"{module} {' '.join(args)}"
        _one_error_line(capsys)
        assert _tree(*read) == before, f"{module} {' '.join(args)} changed an input"


# ---- (3) an output that cannot be written fails before the job --------------------------------

def test_outputs_in_a_missing_folder_or_naming_a_folder_fail_before_the_job(inputs, tmp_path, monkeypatch, capsys):
    from edgerank import batch
    from edgerank.bench import __main__ as bench

    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("benchmarked before checking --json"))
    monkeypatch.setattr(batch, "read_queries", lambda *a, **k: pytest.fail("read the run before checking --out"))
    missing = tmp_path / "missing"
    common = ["--data", str(inputs["D"]), "--model", str(inputs["M"])]
    assert bench.main([*common, "--queries", "1", "--json", str(missing / "out.json")]) == 2
    assert "does not exist" in _one_error_line(capsys)
    assert bench.main([*common, "--queries", "1", "--plot", str(tmp_path)]) == 2
    assert "is a folder" in _one_error_line(capsys)
    run = [str(inputs["R"]), *common]
    assert batch.main([*run, "--out", str(tmp_path / "o.trec"), "--report", str(missing / "r.json")]) == 2
    assert "does not exist" in _one_error_line(capsys)
    assert batch.main([*run, "--out", str(tmp_path)]) == 2
    assert "is a folder" in _one_error_line(capsys)
    assert batch.main([*run, "--out", str(tmp_path / "o.trec"), "--report", str(tmp_path / "o.trec")]) == 2
    assert "the report would replace" in _one_error_line(capsys)
    assert not missing.exists() and not (tmp_path / "o.trec.parts").exists()


def test_an_atomic_file_leaves_the_old_one_when_the_write_fails(tmp_path):
    from edgerank.cli import atomic_file, write_atomic

    out = tmp_path / "report.json"
    write_atomic(out, "old")
    with pytest.raises(ZeroDivisionError):
        with atomic_file(out) as tmp:
            tmp.write_text("half")
            1 / 0
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    write_atomic(out, "new")
    assert out.read_text() == "new"

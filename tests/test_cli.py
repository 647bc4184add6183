"""Every command line reports bad input as one ``error:`` line on stderr with exit status 2
(``errors.exits_on``), never a traceback, and never touches the user's files."""

from __future__ import annotations

import pytest


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.mark.core
def test_converting_a_missing_model_is_one_line(tmp_path, capsys):
    from edgerank.converters.__main__ import main

    assert main([str(tmp_path / "nope"), "--to", "onnx", "--quant", "int4", "--out", str(tmp_path / "o")]) == 2
    assert "nope" in _one_error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_converting_onto_an_existing_output_is_refused_and_leaves_it(tiny_cross_encoder, tmp_path, capsys):
    from edgerank.converters.__main__ import main

    out = tmp_path / "mine.gguf"
    out.write_text("the user's file")
    assert main([str(tiny_cross_encoder), "--to", "gguf", "--quant", "q4_0", "--out", str(out)]) == 2
    assert "--force" in _one_error_line(capsys)
    assert out.read_text() == "the user's file"


def test_training_without_a_recipe_or_its_fields_says_what_is_missing(capsys):
    from edgerank.train.__main__ import main

    assert main(["--base", "minilm-l6"]) == 2
    assert "--family" in _one_error_line(capsys)


@pytest.mark.core
@pytest.mark.parametrize("argv", [["label", "{tmp}/missing.jsonl", "--teacher", "minilm-l6", "--out", "{tmp}/o.jsonl"],
                                  ["build-train", "--source", "squad", "{tmp}/nowhere", "--out", "{tmp}/o.jsonl"]])
def test_data_commands_on_missing_input_are_one_line(tmp_path, capsys, argv):
    from edgerank.data.__main__ import main

    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    _one_error_line(capsys)
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.core
def test_exits_on_lets_other_errors_through():
    """Only bad input is reported as a line; a bug keeps its traceback."""
    from edgerank.cli import exits_on
    from edgerank.errors import ModelNotFoundError

    @exits_on(KeyError)
    def main(kind):
        raise kind("x")

    assert main(KeyError) == 2 and main(ModelNotFoundError) == 2
    with pytest.raises(ZeroDivisionError):
        main(ZeroDivisionError)


@pytest.mark.core
@pytest.mark.parametrize("text,message", [("not json\n", ":1: not JSON"), ("[1, 2]\n", ":1: a line must be a JSON object"),
                                          ("", "holds no groups"),
                                          ('{"query": "q", "positive": 3, "negatives": []}\n', ":1: 'positive'")])
def test_labelling_a_malformed_groups_file_is_one_line(tmp_path, capsys, text, message):
    from edgerank.data.__main__ import main

    (tmp_path / "in.jsonl").write_text(text)
    assert main(["label", str(tmp_path / "in.jsonl"), "--teacher", "minilm-l6", "--out", str(tmp_path / "o.jsonl")]) == 2
    assert message in _one_error_line(capsys)
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.core
def test_data_commands_refuse_to_replace_an_existing_output(tmp_path, capsys):
    """``--out`` naming an existing file is refused unless ``--force``; naming the input, or
    a file inside an input folder, is refused even with ``--force``."""
    from edgerank.data.__main__ import main

    groups = tmp_path / "groups.jsonl"
    groups.write_text('{"query": "q", "positive": "p", "negatives": ["n"]}\n')
    before = groups.read_text()
    for force in ([], ["--force"]):
        assert main(["label", str(groups), "--teacher", "minilm-l6", "--out", str(groups), *force]) == 2
        assert "is the input" in _one_error_line(capsys)
        assert main(["build-train", "--source", "squad", str(tmp_path), "--out", str(groups), *force]) == 2
        assert "inside the input folder" in _one_error_line(capsys)
    assert main(["build-train", "--source", "squad", str(tmp_path / "squad"), "--out", str(groups)]) == 2
    assert "--force" in _one_error_line(capsys)
    assert groups.read_text() == before


def _tree(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_force_never_converts_a_model_over_itself_or_its_folder(tiny_cross_encoder, tmp_path, capsys):
    """``--out`` naming the model being converted, or a folder holding it, is refused even
    with ``--force``: replacing it would delete the source (it once did)."""
    import shutil

    from edgerank.converters.__main__ import main

    model = tmp_path / "models" / "mine"
    shutil.copytree(tiny_cross_encoder, model)
    before = _tree(tmp_path / "models")
    for out in (model, tmp_path / "models", model / "."):
        assert main([str(model), "--to", "onnx", "--quant", "int4", "--out", str(out), "--force"]) == 2
        assert "would destroy it" in _one_error_line(capsys)
    assert _tree(tmp_path / "models") == before


def test_force_never_trains_over_the_base_or_the_data(tiny_cross_encoder, tmp_path, capsys):
    import shutil

    from edgerank.data.training import write_jsonl
    from edgerank.train.__main__ import main

    base = tmp_path / "base"
    shutil.copytree(tiny_cross_encoder, base)
    data = tmp_path / "work" / "groups.jsonl"
    write_jsonl([{"query": "q", "positive": "p", "negatives": ["n"], "teacher_scores": [1.0, 0.0]}], data)
    before = _tree(tmp_path)
    common = ["--family", "cross-encoder", "--base", str(base), "--data", str(data), "--steps", "1", "--force"]
    for out in (base, data.parent):
        assert main([*common, "--out", str(out)]) == 2
        assert "would destroy it" in _one_error_line(capsys)
    assert _tree(tmp_path) == before
    old = tmp_path / "old-model"  # a file where the model folder goes: --force replaces it
    old.write_text("x")
    assert main([*common, "--loss", "kl", "--adapter", "full", "--queries-per-step", "1", "--group-size", "2",
                 "--out", str(old)]) == 0
    assert (old / "config.json").is_file() and _tree(tmp_path / "base") == _tree(tiny_cross_encoder)


@pytest.mark.core
def test_refuse_output_over_inputs_is_about_paths_not_names(tmp_path):
    from edgerank.cli import refuse_output_over_inputs
    from edgerank.errors import OutputOverlapError

    (tmp_path / "a" / "b").mkdir(parents=True)
    refuse_output_over_inputs(tmp_path / "a" / "b" / "out", tmp_path / "a" / "b")  # inside an input: fine
    refuse_output_over_inputs(tmp_path / "ab", tmp_path / "a" / "b", None)         # a prefix, not a parent
    refuse_output_over_inputs(tmp_path / "new", tmp_path / "new")  # not on disk (a built-in name): nothing to destroy
    (tmp_path / "link").symlink_to(tmp_path / "a")
    with pytest.raises(OutputOverlapError, match="holds the input"):
        refuse_output_over_inputs(tmp_path / "link", tmp_path / "a" / "b")
    with pytest.raises(OutputOverlapError, match="is the input"):
        refuse_output_over_inputs(tmp_path / "a" / ".." / "a" / "b", tmp_path / "a" / "b")


# the commands that need an extra (the others run on the core install)
COMMAND_EXTRAS = {"edgerank.eval": "eval", "edgerank.calibrate": "eval", "edgerank.train": "train"}


def _module_or_skip(name: str):
    """The command's module, or a skip naming the extra it needs where that is not installed."""
    import importlib

    from edgerank.runtime.extras import missing

    extra = COMMAND_EXTRAS.get(name.removesuffix(".__main__"))
    if extra and missing(extra):
        pytest.skip(f"{name} needs the {extra} extra ({', '.join(missing(extra))} not installed)")
    return importlib.import_module(name)


@pytest.mark.core
@pytest.mark.parametrize("module,argv,message", [
    ("edgerank.bench.__main__", ["--queries", "0"], "--queries: expected a positive integer"),
    ("edgerank.bench.__main__", ["--depth", "-1"], "--depth: expected a positive integer"),
    ("edgerank.bench.__main__", ["--configs", "edgerank,nonsense"], "unknown configuration 'nonsense'"),
    ("edgerank.bench.__main__", ["--subset", "fp32-reference"], "expected CONFIG=N"),
    ("edgerank.bench.__main__", ["--lowmem-mb", "nan"], "expected a positive number"),
    ("edgerank.eval.__main__", ["--data", "x", "--depth", "0"], "--depth: expected a positive integer"),
    ("edgerank.calibrate.__main__", ["m", "--target", "2"], "--target: expected a number in (0, 1]"),
    ("edgerank.calibrate.__main__", ["m", "--also-k", "1,x"], "--also-k: expected a positive integer"),
    ("edgerank.calibrate.__main__", ["m", "--clusters", "1,3"], "--clusters: expected cluster counts of at least 2"),
    ("edgerank.data.__main__", ["build-train", "--source", "squad", "x", "--negatives", "0", "--out", "y"], "--negatives"),
    ("edgerank", ["--top-k", "0"], "--top-k: expected a positive integer"),
    ("edgerank", ["a query"], "give the documents to rank after the query")])
def test_counts_and_choices_are_checked_when_the_command_line_is_read(module, argv, message, capsys):
    """0 or a negative count is refused, not read as "all" or sliced from the end; a name
    outside the choices is refused before any model loads."""
    main = _module_or_skip(module + (".__main__" if module == "edgerank" else "")).main
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err



@pytest.mark.core
@pytest.mark.parametrize("module, argv", [
    ("edgerank.__main__", ["--help"]), ("edgerank.eval.__main__", ["--help"]), ("edgerank.calibrate.__main__", ["--help"]),
    ("edgerank.bench.__main__", ["--help"]), ("edgerank.train.__main__", ["--help"]), ("edgerank.data.__main__", ["--help"]),
    ("edgerank.models.__main__", ["--help"]), ("edgerank.converters.__main__", ["--help"]),
])
def test_every_command_line_option_says_what_it_does(module, argv, monkeypatch):
    """``--help`` is the documentation a command-line user reads: no option goes without a line."""
    import argparse

    bare: list[str] = []
    add = argparse._ActionsContainer.add_argument

    def recording(self, *args, **kwargs):
        action = add(self, *args, **kwargs)
        if not action.help and not isinstance(action, argparse._HelpAction):
            bare.append("/".join(action.option_strings) or action.dest)
        return action

    monkeypatch.setattr(argparse._ActionsContainer, "add_argument", recording)
    with pytest.raises(SystemExit) as e:
        _module_or_skip(module).main(argv)
    assert e.value.code == 0
    assert not bare, f"{module}: options without help: {bare}"


@pytest.mark.core
@pytest.mark.parametrize("rho, rc", [(0.176, 1), (0.79, 1), (0.8, 0), (0.99, 0)])
def test_a_conversion_that_ranks_unlike_its_source_exits_1_with_a_warning(monkeypatch, tmp_path, capsys, rho, rc):
    """The artifact stays written (the user may still want it), but the exit status and a
    one-line warning say it does not rank like its source (bench/RESULTS.md §10.5: 0.176)."""
    import edgerank.converters.__main__ as cli

    monkeypatch.setattr(cli, "resolve", lambda *a, **k: None)
    monkeypatch.setattr(cli, "convert", lambda *a, **k: {"pairs": 64, "spearman": rho})
    assert cli.main(["src", "--to", "onnx", "--quant", "int4", "--out", str(tmp_path / "o")]) == rc
    err = capsys.readouterr().err.strip()
    if rc:
        assert err.startswith("warning: ") and "\n" not in err and f"{rho:.3f}" in err
        assert "int8" in err and "--svd-rank" in err
    else:
        assert err == ""


@pytest.mark.core
def test_an_unverified_conversion_gives_no_fidelity_warning(monkeypatch, tmp_path, capsys):
    import edgerank.converters.__main__ as cli

    monkeypatch.setattr(cli, "resolve", lambda *a, **k: None)
    monkeypatch.setattr(cli, "convert", lambda *a, **k: {"size_bytes": 1})
    assert cli.main(["src", "--to", "onnx", "--quant", "int4", "--out", str(tmp_path / "o"), "--no-verify"]) == 0
    assert capsys.readouterr().err == ""

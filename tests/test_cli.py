"""Every command line reports bad input as one ``error:`` line on stderr with exit status 2
(``errors.exits_on``), never a traceback, and never touches the user's files."""

from __future__ import annotations

import pytest


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_converting_a_missing_model_is_one_line(tmp_path, capsys):
    from converters.__main__ import main

    assert main([str(tmp_path / "nope"), "--to", "onnx", "--quant", "int4", "--out", str(tmp_path / "o")]) == 2
    assert "nope" in _one_error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_converting_onto_an_existing_output_is_refused_and_leaves_it(tiny_cross_encoder, tmp_path, capsys):
    from converters.__main__ import main

    out = tmp_path / "mine.gguf"
    out.write_text("the user's file")
    assert main([str(tiny_cross_encoder), "--to", "gguf", "--quant", "q4_0", "--out", str(out)]) == 2
    assert "--force" in _one_error_line(capsys)
    assert out.read_text() == "the user's file"


def test_training_without_a_recipe_or_its_fields_says_what_is_missing(capsys):
    from edgerank.train import main

    assert main(["--base", "minilm-l6"]) == 2
    assert "--family" in _one_error_line(capsys)


@pytest.mark.parametrize("argv", [["label", "{tmp}/missing.jsonl", "--teacher", "minilm-l6", "--out", "{tmp}/o.jsonl"],
                                  ["build-train", "--source", "squad", "{tmp}/nowhere", "--out", "{tmp}/o.jsonl"]])
def test_data_commands_on_missing_input_are_one_line(tmp_path, capsys, argv):
    from edgerank.data import main

    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    _one_error_line(capsys)
    assert not (tmp_path / "o.jsonl").exists()


def test_exits_on_lets_other_errors_through():
    """Only bad input is reported as a line; a bug keeps its traceback."""
    from edgerank.errors import ModelNotFoundError, exits_on

    @exits_on(KeyError)
    def main(kind):
        raise kind("x")

    assert main(KeyError) == 2 and main(ModelNotFoundError) == 2
    with pytest.raises(ZeroDivisionError):
        main(ZeroDivisionError)


@pytest.mark.parametrize("text,message", [("not json\n", ":1: not JSON"), ("[1, 2]\n", ":1: a line must be a JSON object"),
                                          ("", "holds no groups"),
                                          ('{"query": "q", "positive": 3, "negatives": []}\n', ":1: 'positive'")])
def test_labelling_a_malformed_groups_file_is_one_line(tmp_path, capsys, text, message):
    from edgerank.data import main

    (tmp_path / "in.jsonl").write_text(text)
    assert main(["label", str(tmp_path / "in.jsonl"), "--teacher", "minilm-l6", "--out", str(tmp_path / "o.jsonl")]) == 2
    assert message in _one_error_line(capsys)
    assert not (tmp_path / "o.jsonl").exists()


def test_data_commands_refuse_to_replace_an_existing_output(tmp_path, capsys):
    """``--out`` naming an existing file (the input itself, say) is refused unless ``--force``."""
    from edgerank.data import main

    groups = tmp_path / "groups.jsonl"
    groups.write_text('{"query": "q", "positive": "p", "negatives": ["n"]}\n')
    before = groups.read_text()
    assert main(["label", str(groups), "--teacher", "minilm-l6", "--out", str(groups)]) == 2
    assert "--force" in _one_error_line(capsys)
    assert main(["build-train", "--source", "squad", str(tmp_path), "--out", str(groups)]) == 2
    assert "--force" in _one_error_line(capsys)
    assert groups.read_text() == before

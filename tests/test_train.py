"""The training path: losses, data guard, LoRA merge, loss reduction and resuming."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the train extra: a core install skips this module

from edgerank.data.training import TrainingDataError, build_groups, read_groups, write_jsonl
from edgerank.train.losses import listwise_kl, pointwise_bce, ranknet
from edgerank.train.trainer import TrainConfig, train
from tests.conftest import DATA, attach_random_lora, make_bert, make_decoder

TOPICS = [
    ("how does a vaccine train the immune system", "a vaccine trains the immune system against infection",
     ["the stock market price fell", "the river city has water", "energy price of the market"]),
    ("what is the price of the stock", "the stock price was higher on the market",
     ["a vaccine for the body", "the river has water and energy", "immune cell of the body"]),
    ("where does the river flow in the city", "the river flows through the city with water",
     ["the stock market closed", "vaccine and immune system", "price of energy was higher"]),
]


def _groups(teacher: bool = True) -> list[dict]:
    out = []
    for q, pos, negs in TOPICS:
        g = {"query": q, "positive": pos, "negatives": negs, "source": "test"}
        if teacher:
            g["teacher_scores"] = [0.9, 0.1, 0.2, 0.05]
        out.append(g)
    return out


# ---------------------------------------------------------------- losses, hand-computed

def test_listwise_kl_is_zero_when_student_matches_teacher():
    s = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.3, 0.1, 9.0, 9.0]])
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    assert float(listwise_kl(s, s.clone(), mask)) == pytest.approx(0.0, abs=1e-6)
    # a temperature rescales the teacher: student = teacher / T is again a perfect match
    assert float(listwise_kl(s / 0.05, s, mask, temperature=0.05)) == pytest.approx(0.0, abs=1e-5)
    # padded slots never count: changing them changes nothing
    s2 = s.clone()
    s2[1, 2:] = -50.0
    assert float(listwise_kl(s2, s, mask)) == pytest.approx(0.0, abs=1e-6)


def test_listwise_kl_matches_hand_computation():
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0]])
    p = np.exp([0.0, 1.0]) / np.exp([0.0, 1.0]).sum()
    q = np.exp([1.0, 0.0]) / np.exp([1.0, 0.0]).sum()
    expected = float((p * np.log(p / q)).sum())
    assert float(listwise_kl(s, t, torch.ones_like(s, dtype=torch.bool))) == pytest.approx(expected, rel=1e-5)


def test_bce_and_ranknet_match_hand_computation():
    s = torch.tensor([[2.0, -1.0, 0.5]])
    y = torch.tensor([[1.0, 0.0, 0.0]])
    mask = torch.ones_like(s, dtype=torch.bool)
    sig = lambda z: 1 / (1 + math.exp(-z))
    bce = -(math.log(sig(2.0)) + math.log(1 - sig(-1.0)) + math.log(1 - sig(0.5))) / 3
    assert float(pointwise_bce(s, y, mask)) == pytest.approx(bce, rel=1e-5)
    rn = (math.log1p(math.exp(-3.0)) + math.log1p(math.exp(-1.5))) / 2
    assert float(ranknet(s, y, mask)) == pytest.approx(rn, rel=1e-5)
    hinge = (max(0.0, 2.0 - 3.0) + max(0.0, 2.0 - 1.5)) / 2
    assert float(ranknet(s, y, mask, margin=2.0)) == pytest.approx(hinge, rel=1e-5)
    assert float(ranknet(s, torch.zeros_like(y), mask)) == 0.0  # nothing ordered


# ---------------------------------------------------------------- data

def test_data_builder_refuses_trec_dl(tmp_path):
    for name in ("trec-dl19", "trec-dl21"):
        with pytest.raises(TrainingDataError, match="never for training"):
            build_groups("squad", DATA / name)
    dl = tmp_path / "trec-dl21" / "groups.jsonl"
    write_jsonl(_groups(), tmp_path / "ok.jsonl")
    dl.parent.mkdir()
    dl.write_text((tmp_path / "ok.jsonl").read_text())
    with pytest.raises(TrainingDataError):
        read_groups(dl)
    from edgerank.data.__main__ import main

    assert main(["build-train", "--source", "squad", str(DATA / "trec-dl19"), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert not (tmp_path / "x.jsonl").exists()


def test_read_groups_checks_teacher_length(tmp_path):
    bad = _groups()
    bad[1]["teacher_scores"] = [0.1, 0.2]
    write_jsonl(bad, tmp_path / "bad.jsonl")
    with pytest.raises(TrainingDataError, match="2 entries for 4"):
        read_groups(tmp_path / "bad.jsonl")


@pytest.mark.skipif(not (DATA / "train" / "wikiqa-pairs").is_dir(), reason="shared training data absent")
def test_build_groups_from_wikiqa_and_squad2():
    groups = build_groups("wikiqa", DATA / "train" / "wikiqa-pairs", negatives=3, max_queries=5)
    assert len(groups) == 5 and all(g["positive"] and 1 <= len(g["negatives"]) <= 3 for g in groups)
    groups = build_groups("squad2", DATA / "train" / "squad2-dev-pairs", negatives=4, max_queries=30)
    unanswerable = [g for g in groups if g["positive"] is None]
    assert unanswerable and all(len(g["negatives"]) == 4 for g in groups)
    for g in groups:  # mined negatives never repeat the positive
        assert g["positive"] not in g["negatives"]


def test_label_max_length_scores_pairs_as_truncated_for_the_student(tmp_path, tiny_cross_encoder):
    """``data label --max-length N``: the teacher scores each (query, passage) pair cut to N
    tokens, passage side only, as transformers truncates ``only_second``."""
    import transformers

    from edgerank.data.__main__ import main as data_main

    groups = _groups(teacher=False)
    groups[0]["negatives"][0] = " ".join(["the river city has water and energy"] * 12)  # far over 24 tokens
    write_jsonl(groups, tmp_path / "in.jsonl")
    assert data_main(["label", str(tmp_path / "in.jsonl"), "--teacher", str(tiny_cross_encoder),
                      "--max-length", "24", "--out", str(tmp_path / "out.jsonl")]) == 0
    labelled = read_groups(tmp_path / "out.jsonl")
    tok = transformers.AutoTokenizer.from_pretrained(tiny_cross_encoder)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_cross_encoder).eval()
    for n, g in enumerate(labelled):
        docs = [g["positive"], *g["negatives"]]
        with torch.no_grad():
            enc = tok([g["query"]] * len(docs), docs, padding=True, truncation="only_second", max_length=24,
                      return_tensors="pt")
            expected = model(**enc).logits[:, 0].tolist()
        if n == 0:
            assert enc["input_ids"].shape[1] == 24  # the long passage really was cut
        assert g["teacher_scores"] == pytest.approx(expected, abs=1e-4)


def test_an_ensemble_of_teachers_is_hand_computable():
    """Two teachers: standardise each over the group, average, back on the first's scale."""
    from edgerank.data.training import ensemble_scores

    a, b = [1.0, 2.0, 3.0, 6.0], [10.0, 30.0, 20.0, 0.0]
    mean_a, sd_a = 3.0, math.sqrt((4 + 1 + 0 + 9) / 4)
    mean_b, sd_b = 15.0, math.sqrt((25 + 225 + 25 + 225) / 4)
    expected = [((x - mean_a) / sd_a + (y - mean_b) / sd_b) / 2 * sd_a + mean_a for x, y in zip(a, b)]
    assert ensemble_scores([a, b]) == pytest.approx(expected, abs=1e-12)
    assert ensemble_scores([a]) == a                      # one teacher: its scores as they are
    assert ensemble_scores([a, a]) == pytest.approx(a)    # agreeing teachers change nothing
    flat = ensemble_scores([a, [0.5] * 4])                # a teacher with no opinion only softens
    assert flat == pytest.approx([(x - mean_a) / 2 + mean_a for x in a])


def test_label_with_two_teachers_combines_each_teachers_own_scores(tmp_path, tiny_cross_encoder,
                                                                   wordpiece_tokenizer):
    """``data label --teacher A --teacher B`` equals labelling with A and with B apart and
    combining the two by hand."""
    from edgerank.data.training import label_groups
    from edgerank.data.__main__ import main as data_main
    from tests.conftest import make_bert

    other = make_bert(tmp_path / "other-ce", wordpiece_tokenizer, "classifier", seed=7)
    write_jsonl(_groups(teacher=False), tmp_path / "in.jsonl")
    runs = {"a": [tiny_cross_encoder], "b": [other], "ab": [tiny_cross_encoder, other]}
    out = {}
    for name, teachers in runs.items():
        args = ["label", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / f"{name}.jsonl")]
        for t in teachers:
            args += ["--teacher", str(t)]
        assert data_main(args) == 0
        out[name] = [g["teacher_scores"] for g in read_groups(tmp_path / f"{name}.jsonl")]
    for a, b, ab in zip(out["a"], out["b"], out["ab"]):
        assert a != pytest.approx(b)  # two different teachers
        za, zb = (np.array(a) - np.mean(a)) / np.std(a), (np.array(b) - np.mean(b)) / np.std(b)
        assert ab == pytest.approx(list((za + zb) / 2 * np.std(a) + np.mean(a)), abs=1e-9)
    # the Python API takes a path as one teacher, as the command line takes its string
    by_path = label_groups(_groups(teacher=False), Path(tiny_cross_encoder), progress=False)
    for g, a in zip(by_path, out["a"]):
        assert g["teacher_scores"] == pytest.approx(a, abs=1e-9)


# ---------------------------------------------------------------- training

def _eval_loss(folder: Path, data: Path, family: str) -> float:
    """The kl loss of a saved model on the whole (fixed) data set, in eval mode."""
    from edgerank.runtime.backends.reference import ReferenceBackend
    from edgerank.models.supply import resolve
    from edgerank.train.trainer import _batch, _loss

    cfg = TrainConfig(base=str(folder), family=family, data=str(data), out="unused",
                      queries_per_step=len(TOPICS), group_size=8, teacher_temperature=0.2)
    backend = ReferenceBackend(resolve(str(folder), family=family), device="cpu")
    with torch.no_grad():
        return float(_loss(backend, backend.spec.with_max_length(cfg.max_length),
                           _batch(read_groups(data), cfg, 0), cfg))


def test_lora_training_reduces_loss_and_merges_exactly(tmp_path, bpe_tokenizer):
    base = make_decoder(tmp_path / "base", "llama", bpe_tokenizer, n_layers=3)
    data = tmp_path / "groups.jsonl"
    write_jsonl(_groups(), data)
    before = _eval_loss(base, data, "qwen3-reranker")
    cfg = TrainConfig(base=str(base), family="qwen3-reranker", data=str(data), out=str(tmp_path / "out"),
                      loss="kl", teacher_temperature=0.2, adapter="lora", lora_r=4, lora_alpha=8,
                      lora_upper=2, steps=12, queries_per_step=len(TOPICS), lr=5e-3, warmup=0.0,
                      checkpoint_every=100, device="cpu")
    out = train(cfg, progress=False)
    after = _eval_loss(out, data, "qwen3-reranker")
    assert after < 0.5 * before, (before, after)
    # the adapter covers only the top 2 of 3 layers, and it is small
    from edgerank.converters.adapters import read_adapter

    pairs, meta = read_adapter(out / "adapter.safetensors")
    layers = {k.split(".")[2] for k in pairs}
    assert layers == {"1", "2"} and meta["family"] == "qwen3-reranker"
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["config"]["seed"] == 0 and saved["cost"]["steps"] == 12
    assert json.loads((out / "edgerank.json").read_text())["family"] == "qwen3-reranker"
    assert (out / "loss.png").is_file() and not (tmp_path / ".out.partial").exists()


def test_bf16_on_a_cpu_trains_with_bf16_matmuls(tmp_path, bpe_tokenizer, monkeypatch):
    """--precision bf16 on a CPU: the linear layers compute in bf16 (seen by a global forward
    hook), the loss halves as in fp32, and the trained weights differ from fp32's (so bf16
    really ran) while staying stored in fp32."""
    import edgerank.train.trainer as training

    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: True)  # autocast runs on any CPU
    base = make_decoder(tmp_path / "base", "llama", bpe_tokenizer, n_layers=2)
    data = tmp_path / "groups.jsonl"
    write_jsonl(_groups(), data)
    before = _eval_loss(base, data, "qwen3-reranker")
    dtypes: dict[str, set] = {}
    outs, losses = {}, {}
    for precision in ("fp32", "bf16"):
        seen = dtypes.setdefault(precision, set())
        hook = torch.nn.modules.module.register_module_forward_hook(
            lambda mod, args, out: seen.add(out.dtype) if isinstance(mod, torch.nn.Linear) else None)
        try:
            outs[precision] = train(TrainConfig(
                base=str(base), family="qwen3-reranker", data=str(data), out=str(tmp_path / precision),
                loss="kl", teacher_temperature=0.2, adapter="full", steps=12, queries_per_step=len(TOPICS),
                lr=1e-3, warmup=0.0, checkpoint_every=100, device="cpu", precision=precision), progress=False)
        finally:
            hook.remove()
        losses[precision] = _eval_loss(outs[precision], data, "qwen3-reranker")
    assert dtypes == {"fp32": {torch.float32}, "bf16": {torch.bfloat16}}
    assert losses["fp32"] < 0.5 * before and losses["bf16"] < 0.5 * before, (before, losses)
    from safetensors.torch import load_file

    w32, w16 = (load_file(outs[p] / "model.safetensors") for p in ("fp32", "bf16"))
    moved = [k for k in w32 if k.endswith("proj.weight")]
    assert moved and any(not torch.equal(w32[k], w16[k]) for k in moved)
    assert all(w32[k].dtype == w16[k].dtype == torch.float32 for k in moved)  # master weights stay fp32


def test_merged_adapter_scores_equal_attached_adapter(tmp_path, bpe_tokenizer):
    """save_adapter + merge (the pull path) reproduce the in-memory LoRA model's outputs."""
    from edgerank.converters.adapters import merge_lora, save_adapter, state_digest
    from edgerank.runtime.backends.reference import ReferenceBackend
    from edgerank.models.supply import resolve
    from edgerank.runtime.tokenization import encode_pairs
    from edgerank.converters.merge import export_merged

    base = make_decoder(tmp_path / "base", "qwen3", bpe_tokenizer, n_layers=2)
    backend = attach_random_lora(base, r=4, alpha=8, std=0.05, params="lora_")
    q, pos, negs = TOPICS[0]
    enc = encode_pairs(backend.spec, backend.tokenizer, q, [pos] + negs)
    with torch.no_grad():
        attached = backend.head_outputs(enc.sequences).numpy()
    adapter = tmp_path / "a.safetensors"
    save_adapter(backend.model, backend.weight_prefix, adapter, 4, 8, str(base), "qwen3-reranker")
    digest = export_merged(resolve(str(base), family="qwen3-reranker"), adapter, tmp_path / "merged")
    merged = ReferenceBackend(resolve(str(tmp_path / "merged")), device="cpu")
    assert merged.spec.family == "qwen3-reranker"
    with torch.no_grad():
        got = merged.head_outputs(enc.sequences).numpy()
    np.testing.assert_allclose(got, attached, atol=1e-4)
    assert not np.allclose(got, ReferenceBackend(resolve(str(base), family="qwen3-reranker"),
                                                 device="cpu").head_outputs(enc.sequences).detach().numpy(), atol=1e-3)
    # the merge is deterministic: merging again gives the same digest
    again = merge_lora(ReferenceBackend(resolve(str(base), family="qwen3-reranker"), device="cpu")
                       .full_model.state_dict(), adapter)
    assert state_digest(again) == digest


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, wordpiece_tokenizer, monkeypatch):
    base = make_bert(tmp_path / "bert", wordpiece_tokenizer, "none")  # a fresh classifier is drawn
    data = tmp_path / "groups.jsonl"
    write_jsonl(_groups(), data)
    common = dict(base=str(base), family="cross-encoder", data=str(data), loss="ranknet", label_weight=0.5,
                  adapter="full", steps=5, queries_per_step=2, group_size=3, lr=1e-3,
                  checkpoint_every=2, device="cpu")
    full = train(TrainConfig(out=str(tmp_path / "a"), **common), progress=False)
    cfg_b = TrainConfig(out=str(tmp_path / "b"), **common)
    import edgerank.train.trainer as training

    real_loss, calls = training._loss, []

    def crash_in_step_4(*args):  # Ctrl-C in the middle of step 4
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_loss(*args)

    monkeypatch.setattr(training, "_loss", crash_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(cfg_b, progress=False)
    monkeypatch.setattr(training, "_loss", real_loss)
    assert not (tmp_path / "b").exists()
    ckpt = torch.load(tmp_path / ".b.partial" / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 2  # the last checkpoint before the interruption: step 3 is redone
    with pytest.raises(ValueError, match="another config"):
        train(TrainConfig(out=str(tmp_path / "b"), **{**common, "lr": 1e-2}), progress=False)
    resumed = train(cfg_b, progress=False)
    log_a = [json.loads(l) for l in open(full / "train_log.jsonl")]
    log_b = [json.loads(l) for l in open(resumed / "train_log.jsonl")]
    assert [r["step"] for r in log_b] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([r["loss"] for r in log_b], [r["loss"] for r in log_a], rtol=1e-5)
    from safetensors.torch import load_file

    wa, wb = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)
    with pytest.raises(FileExistsError):
        train(cfg_b, progress=False)
    # a deliberate --stop-after checkpoints the step it stopped at, and the rerun finishes
    cfg_c = TrainConfig(out=str(tmp_path / "c"), **common)
    assert train(cfg_c, stop_after=3, progress=False) is None
    assert torch.load(tmp_path / ".c.partial" / "checkpoint.pt", weights_only=False)["step"] == 3
    wc = load_file(train(cfg_c, progress=False) / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wc[k], atol=1e-6, rtol=0)


def test_bad_configs_are_refused(tmp_path, monkeypatch):
    data = tmp_path / "g.jsonl"
    write_jsonl(_groups(teacher=False), data)
    with pytest.raises(ValueError, match="loss must be"):
        train(TrainConfig(base="x", family="cross-encoder", data=str(data), out=str(tmp_path / "o"), loss="mse"))
    with pytest.raises(ValueError, match="teacher_scores"):
        train(TrainConfig(base="x", family="cross-encoder", data=str(data), out=str(tmp_path / "o"), loss="kl"))
    import edgerank.train.trainer as training

    with pytest.raises(ValueError, match="QLoRA training needs CUDA"):
        training._load(TrainConfig(base="x", family="cross-encoder", data=str(data), out="o", adapter="lora",
                                   qlora=True, device="cpu"))
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": False})
    assert not training.cpu_has_native_bf16()
    with pytest.raises(ValueError, match="native bf16"):
        training._load(TrainConfig(base="x", family="cross-encoder", data=str(data), out="o", precision="bf16",
                                   device="cpu"))
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": True})
    assert training.cpu_has_native_bf16()



@pytest.mark.parametrize("field, value, message", [
    ("lr", 0.0, "lr must be a positive number"),
    ("lr", float("nan"), "lr must be a positive number"),
    ("teacher_temperature", 0.0, "teacher_temperature must be a positive number"),
    ("warmup", 1.0, r"warmup is a fraction of the steps, in \[0, 1\)"),
    ("weight_decay", -0.1, "weight_decay must be a number >= 0"),
    ("lora_r", 0, "lora_r must be an integer of at least 1"),
    ("steps", 2.5, "steps must be an integer of at least 1"),
    ("lora_upper", -2, "lora_upper must be a count of layers >= 0"),
])
def test_out_of_range_hyperparameters_are_refused_before_training(field, value, message):
    """Each would otherwise train into NaN (zero temperature), never move (lr 0), divide
    by zero in the warm-up schedule, or build an empty adapter, after minutes of loading."""
    cfg = TrainConfig(base="x", family="cross-encoder", data="g.jsonl", out="o", **{field: value})
    with pytest.raises(ValueError, match=message):
        cfg.validate()


def test_every_config_field_is_a_documented_flag(capsys):
    """``--help`` explains every field, choices are enforced by argparse, and an out-of-range
    value is a one-line error, not a traceback."""
    import dataclasses

    from edgerank.train.__main__ import _parser, main

    help_text = _parser().format_help()
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata["help"], f.name
        assert "--" + f.name.replace("_", "-") in help_text
    with pytest.raises(SystemExit) as e:
        main(["--recipe", "edgerank-minilm-ce", "--loss", "mse"])
    assert e.value.code == 2 and "invalid choice: 'mse'" in capsys.readouterr().err
    assert main(["--base", "x", "--family", "cross-encoder", "--data", "g.jsonl", "--out", "o", "--lr", "0"]) == 2
    assert "error: lr must be a positive number" in capsys.readouterr().err



def test_a_max_length_beyond_the_base_models_positions_is_refused(tmp_path, tiny_cross_encoder):
    from edgerank.train.trainer import _load

    positions = json.loads((tiny_cross_encoder / "config.json").read_text())["max_position_embeddings"]
    with pytest.raises(ValueError, match=f"position table has {positions} positions"):
        _load(TrainConfig(base=str(tiny_cross_encoder), family="cross-encoder", data="g.jsonl", out="o",
                          max_length=positions + 1))


def test_pull_assembles_base_plus_adapter_and_checks_it(tmp_path, bpe_tokenizer, monkeypatch):
    """A catalogued adapter model: merged on pull, verified by digest; tampering refused."""
    import dataclasses

    import edgerank.models.catalog as catalog
    from edgerank.models import pull as pulling
    from edgerank.converters.adapters import save_adapter
    from edgerank.errors import ModelFormatError
    from edgerank.converters.merge import export_merged
    from edgerank.models.supply import resolve

    base = make_decoder(tmp_path / "base", "llama", bpe_tokenizer, n_layers=2)
    backend = attach_random_lora(base, r=2, alpha=4, std=0.01)
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    save_adapter(backend.model, backend.weight_prefix, adapters / "t.safetensors", 2, 4, str(base), "qwen3-reranker")
    digest = export_merged(resolve(str(base), family="qwen3-reranker"), adapters / "t.safetensors", tmp_path / "ref")
    from edgerank.runtime.layout import sha256_file

    entry = catalog.BuiltinModel(
        name="tiny-rerank", family="qwen3-reranker", licence="test", description="test", made_by="test",
        wheels=(), files=(), entry="", size_bytes=0, base=str(base), adapter="t.safetensors",
        adapter_sha256=sha256_file(adapters / "t.safetensors"), weights_sha256=digest, recipe="none")
    monkeypatch.setenv("EDGERANK_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(catalog, "ADAPTERS", adapters)
    monkeypatch.setitem(catalog.BUILTINS, "tiny-rerank", entry)
    path = pulling.pull("tiny-rerank", progress=False)
    assert pulling.is_present("tiny-rerank")
    assert json.loads((path / "edgerank.json").read_text())["weights_sha256"] == digest
    # a wrong pinned digest (another base, another merge) is refused, and nothing is left
    monkeypatch.setitem(catalog.BUILTINS, "tiny-bad", dataclasses.replace(entry, name="tiny-bad", weights_sha256="0" * 64))
    with pytest.raises(ModelFormatError, match="digest"):
        pulling.pull("tiny-bad", progress=False)
    assert not pulling.is_present("tiny-bad")
    # a modified adapter file is refused before any merge
    (adapters / "t.safetensors").write_bytes((adapters / "t.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    monkeypatch.setitem(catalog.BUILTINS, "tiny-tampered", dataclasses.replace(entry, name="tiny-tampered"))
    with pytest.raises(ModelFormatError, match="sha256"):
        pulling.pull("tiny-tampered", progress=False)


def test_recipe_model_not_trained_yet_says_how_to_make_it(tmp_path, monkeypatch):
    from edgerank.models import pull as pulling
    from edgerank.errors import ModelNotFoundError

    monkeypatch.setenv("EDGERANK_HOME", str(tmp_path))
    assert not pulling.is_present("edgerank-minilm-ce")
    with pytest.raises(ModelNotFoundError, match="--recipe edgerank-minilm-ce"):
        pulling.pull("edgerank-minilm-ce", progress=False)
    trained = tmp_path / "trained" / "edgerank-minilm-ce"  # what the recipe writes
    trained.mkdir(parents=True)
    (trained / "edgerank.json").write_text('{"family": "cross-encoder"}')
    assert pulling.is_present("edgerank-minilm-ce") and pulling.entry_path("edgerank-minilm-ce") == trained


def test_saved_model_stores_tied_embeddings_once_and_reloads_identically(tmp_path, bpe_tokenizer):
    from safetensors import safe_open

    from edgerank.runtime.backends.reference import ReferenceBackend
    from edgerank.models.supply import resolve
    from edgerank.converters.merge import save_model

    base = make_decoder(tmp_path / "base", "llama", bpe_tokenizer, tie=True)
    before = ReferenceBackend(resolve(str(base), family="qwen3-reranker"), device="cpu")
    save_model(before, "qwen3-reranker", tmp_path / "out")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    after = ReferenceBackend(resolve(str(tmp_path / "out")), device="cpu")
    seqs = [[5, 6, 7, 8], [9, 10]]
    with torch.no_grad():
        torch.testing.assert_close(after.head_outputs(seqs), before.head_outputs(seqs), atol=0, rtol=0)


# ---------------------------------------------------------------- early-layer ranking

@pytest.mark.parametrize("kind", ["qwen3", "cross-encoder"])
def test_the_trainer_reads_each_layer_as_the_pruning_runtime_scores_it(kind, tmp_path, bpe_tokenizer,
                                                                       wordpiece_tokenizer):
    """``layer_weight`` trains exactly the readout pruning uses: the reference backend's
    per-layer head outputs (transformers' hidden states) equal the layer-wise runtime's
    recorded scores on an fp32 artifact, layer by layer."""
    import edgerank
    from edgerank.converters import convert
    from edgerank.runtime.backends.reference import ReferenceBackend
    from edgerank.models.supply import resolve
    from edgerank.runtime.tokenization import encode_pairs

    if kind == "qwen3":
        src, family = make_decoder(tmp_path / "hf", "qwen3", bpe_tokenizer, n_layers=4), "qwen3-reranker"
    else:
        src, family = make_bert(tmp_path / "hf", wordpiece_tokenizer, "classifier", n_layers=4), None
    art = tmp_path / "fp32"
    convert(src, "onnx", "fp32", art, family=family, verify=False, progress=False)
    q, pos, negs = TOPICS[0]
    docs = [pos] + negs + [TOPICS[1][1]]
    with edgerank.Reranker(art, pruning=False, record_layers=True) as r:
        r.score(q, docs)
        recorded = r.last_stats.extra["layer_scores"]  # [L, n]: before layers 1..L-1, then final
    ref = ReferenceBackend(resolve(str(src), family=family), device="cpu")
    enc = encode_pairs(ref.spec, ref.tokenizer, q, docs)
    with torch.no_grad():
        outs = ref.head_outputs_by_layer(enc.sequences, enc.type_ids, layers=(1, 2, 3)).double().numpy()
    mine = np.stack([ref.spec.score.apply(o) for o in list(outs[1:]) + [outs[0]]])
    assert recorded.shape == mine.shape == (4, len(docs))
    np.testing.assert_allclose(mine, recorded, rtol=1e-3, atol=1e-6)
    assert not np.allclose(recorded[0], recorded[-1], rtol=1e-2)  # the layers' scores do differ


def test_layer_supervision_makes_intermediate_layers_rank(tmp_path, wordpiece_tokenizer, bpe_tokenizer):
    """With ``layer_weight``, the head read from a middle layer learns the teacher's order;
    without it, only the last layer does."""
    from edgerank.runtime.backends.reference import ReferenceBackend
    from edgerank.train.losses import listwise_kl
    from edgerank.models.supply import resolve
    from edgerank.runtime.tokenization import encode_pairs
    from edgerank.train.trainer import supervised_layers

    assert supervised_layers(4, 0.5) == (2, 3) and supervised_layers(6, 0.3) == (2, 3, 4, 5)
    base = make_bert(tmp_path / "bert", wordpiece_tokenizer, "classifier", n_layers=4)
    data = tmp_path / "groups.jsonl"
    write_jsonl(_groups(), data)
    common = dict(base=str(base), family="cross-encoder", data=str(data), loss="kl", teacher_temperature=0.2,
                  adapter="full", steps=30, queries_per_step=len(TOPICS), lr=2e-3, warmup=0.0,
                  checkpoint_every=100, device="cpu", layer_min_depth=0.25)

    def layer_losses(folder: Path) -> np.ndarray:
        backend = ReferenceBackend(resolve(str(folder), family="cross-encoder"), device="cpu")
        teacher = torch.tensor([g["teacher_scores"] for g in _groups()])
        out = []
        with torch.no_grad():
            for g, t in zip(_groups(), teacher):
                enc = encode_pairs(backend.spec, backend.tokenizer, g["query"], [g["positive"]] + g["negatives"])
                logits = backend.head_outputs_by_layer(enc.sequences, enc.type_ids, (1,))[:, :, 0]
                out.append([float(listwise_kl(x[None], t[None], torch.ones(1, 4, dtype=torch.bool), 0.2))
                            for x in logits])
        return np.mean(out, axis=0)  # final, then read before layer 1 (after the first of 4)

    plain = layer_losses(train(TrainConfig(out=str(tmp_path / "plain"), **common), progress=False))
    deep = layer_losses(train(TrainConfig(out=str(tmp_path / "deep"), layer_weight=3.0, **common),
                              progress=False))
    assert deep[1] < 0.3 * plain[1], (plain, deep)  # measured 0.017 against 0.114
    assert deep[0] < 0.1 * layer_losses(base)[0]  # and the final layer still learned (0.007 from 1.1)
    with pytest.raises(ValueError, match="layer_min_depth"):
        TrainConfig(out="x", **{**common, "layer_min_depth": 1.5}).validate()
    lora_top = make_decoder(tmp_path / "dec", "llama", bpe_tokenizer, n_layers=4)
    with pytest.raises(ValueError, match="cannot change: raise layer_min_depth to 0.75"):
        train(TrainConfig(out=str(tmp_path / "lora"), **{**common, "base": str(lora_top), "family": "qwen3-reranker",
                                                          "adapter": "lora", "lora_upper": 2, "layer_weight": 1.0}),
              progress=False)


def test_every_recipe_is_a_valid_training_config_of_a_listed_model():
    from edgerank.models.catalog import BUILTINS
    from edgerank.train.recipes import RECIPES

    for recipe in RECIPES.values():
        TrainConfig(data="groups.jsonl", out="out", seed=recipe.seed, **recipe.config).validate()
        assert BUILTINS[recipe.name].recipe == recipe.name
        base = recipe.config["base"]
        assert base in BUILTINS and (BUILTINS[base].recipe is None or base in RECIPES)  # a base can be made


@pytest.mark.parametrize("upper, adapted", [(None, [0, 1, 2, 3]), (0, [0, 1, 2, 3]), (2, [2, 3])])
def test_lora_upper_limits_the_adapted_layers(tmp_path, bpe_tokenizer, upper, adapted):
    """``lora_upper=N`` adapts the last N layers; None or 0 (how the CLI asks for all
    layers when a recipe sets N) adapts every layer, never none."""
    import re

    from edgerank.converters.adapters import attach_lora
    from edgerank.runtime.backends.reference import ReferenceBackend
    from edgerank.models.supply import resolve
    from tests.conftest import make_decoder

    base = make_decoder(tmp_path / "hf", "qwen3", bpe_tokenizer, n_layers=4)
    backend = ReferenceBackend(resolve(str(base), family="qwen3-reranker"), device="cpu")
    names = attach_lora(backend.model, "decoder", 4, r=2, alpha=4, upper_layers=upper)
    assert sorted({int(re.search(r"layers\.(\d+)\.", n).group(1)) for n in names}) == adapted


@pytest.mark.parametrize("arch", ["qwen3", "llama", "qwen2"])
def test_the_shared_prefix_gives_the_full_forwards_outputs_and_gradients(tmp_path, bpe_tokenizer, arch):
    """Training computes a query's template prefix once and lets every candidate attend to
    its keys and values; the head outputs (final and per layer) and the gradients must be
    those of running every pair in full."""
    from edgerank.runtime.backends.reference import ReferenceBackend
    from edgerank.models.supply import resolve
    from edgerank.runtime.tokenization import encode_pairs

    src = make_decoder(tmp_path / "hf", arch, bpe_tokenizer, n_layers=3)
    backend = ReferenceBackend(resolve(str(src), family="qwen3-reranker"), device="cpu")
    q, pos, negs = TOPICS[0]
    enc = encode_pairs(backend.spec, backend.tokenizer, q, [pos] + negs + ["a b", pos * 3])
    assert enc.prefix_len > 0 and len(set(map(len, enc.sequences))) > 2  # real padding in play

    def run(prefix_len):
        backend.model.zero_grad()
        out = backend.head_outputs_by_layer(enc.sequences, layers=(1, 2), prefix_len=prefix_len)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in backend.model.named_parameters() if p.grad is not None}

    full, full_grads = run(0)
    shared, shared_grads = run(enc.prefix_len)
    torch.testing.assert_close(shared, full, rtol=1e-4, atol=1e-5)
    assert shared_grads.keys() == full_grads.keys() and len(full_grads) > 10
    for name, g in full_grads.items():
        torch.testing.assert_close(shared_grads[name], g, rtol=1e-3, atol=1e-5, msg=name)
    with pytest.raises(ValueError, match="do not all share"):
        backend.head_outputs_by_layer([enc.sequences[0], [1, 2, 3] + enc.sequences[1]], prefix_len=enc.prefix_len)


def test_a_checkpoint_exports_as_the_model_it_holds_and_the_run_goes_on(tmp_path, bpe_tokenizer):
    """``--export-checkpoint`` writes the model of an unfinished run, to evaluate it mid-run.
    Its scores must be those of the base with the checkpoint's LoRA weights attached
    (unmerged, built here by hand), and the run must resume untouched."""
    import hashlib

    import edgerank
    from edgerank.converters.adapters import attach_lora
    from edgerank.runtime.backends.reference import ReferenceBackend
    from edgerank.models.supply import resolve
    from edgerank.runtime.tokenization import encode_pairs
    from edgerank.train.trainer import export_checkpoint
    from edgerank.train.__main__ import main as train_main

    base = make_decoder(tmp_path / "base", "llama", bpe_tokenizer, n_layers=3)
    data = tmp_path / "groups.jsonl"
    write_jsonl(_groups(), data)
    args = dict(base=str(base), family="qwen3-reranker", data=str(data), out=str(tmp_path / "out"), loss="kl",
                teacher_temperature=0.2, adapter="lora", lora_r=4, lora_alpha=8, steps=4,
                queries_per_step=len(TOPICS), lr=5e-3, warmup=0.0, checkpoint_every=2, device="cpu")
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in args.items()]
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        export_checkpoint(TrainConfig(**args), tmp_path / "snap")
    assert train(TrainConfig(**args), progress=False, stop_after=2) is None
    ckpt = tmp_path / ".out.partial" / "checkpoint.pt"
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert train_main(argv + ["--export-checkpoint", str(tmp_path / "snap")]) == 0
    assert json.loads((tmp_path / "snap" / "train_config.json").read_text())["cost"]["checkpoint_step"] == 2

    live = ReferenceBackend(resolve(str(base), family="qwen3-reranker"), device="cpu")
    attach_lora(live.model, "decoder", 3, 4, 8, None)
    trained = torch.load(ckpt, weights_only=False)["trainable"]
    with torch.no_grad():
        for name, p in live.model.named_parameters():
            if p.requires_grad:
                p.copy_(trained[name])
    q, pos, negs = TOPICS[0]
    enc = encode_pairs(live.spec, live.tokenizer, q, [pos] + negs)
    with torch.no_grad():
        expected = live.spec.score.apply(live.head_outputs(enc.sequences).double().numpy())
    with edgerank.Reranker(tmp_path / "snap", backend="reference") as r:
        got = r.score(q, [pos] + negs)
    with edgerank.Reranker(base, backend="reference", family="qwen3-reranker") as r:
        untrained = r.score(q, [pos] + negs)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert np.abs(got - untrained).max() > 1e-3  # two steps did change the model

    assert train_main(argv + ["--export-checkpoint", str(tmp_path / "snap")]) == 2  # exists: not replaced
    assert train_main(argv + ["--lr=0.1", "--export-checkpoint", str(tmp_path / "other")]) == 2  # another config
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == digest
    assert train(TrainConfig(**args), progress=False) == tmp_path / "out"
    log = [json.loads(line) for line in open(tmp_path / "out" / "train_log.jsonl")]
    assert [row["step"] for row in log] == [1, 2, 3, 4]
    with pytest.raises(FileNotFoundError, match="has finished: that folder is its model"):
        export_checkpoint(TrainConfig(**args), tmp_path / "late")


# ---------------------------------------------------------------- a full fine-tune, cut to low rank

def test_svd_update_keeps_the_best_rank_r_part_of_each_update():
    """A known update ``U diag(s) V^T`` (orthonormal U, V; s = 5, 3, 1, 0.5): rank 2 keeps
    exactly ``5 u1 v1^T + 3 u2 v2^T`` and (25 + 9) / 35.25 of the energy; a tensor that is
    not a projection (a norm) is not carried; a wrong base is refused."""
    from edgerank.converters.adapters import DECODER_TARGETS, svd_update

    g = np.random.default_rng(0)
    u, _ = np.linalg.qr(g.normal(size=(8, 4)))
    v, _ = np.linalg.qr(g.normal(size=(6, 4)))
    s = np.array([5.0, 3.0, 1.0, 0.5])
    key, norm = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.input_layernorm.weight"
    base = {key: torch.from_numpy(g.normal(size=(8, 6))), norm: torch.ones(6, dtype=torch.float64)}
    tuned = {key: base[key] + torch.from_numpy((u * s) @ v.T), norm: torch.full((6,), 1.5, dtype=torch.float64)}
    pairs, r, kept = svd_update(base, tuned, 2, DECODER_TARGETS)
    assert r == 2 and list(pairs) == [key]
    a, b = pairs[key]
    assert a.shape == (2, 6) and b.shape == (8, 2)
    np.testing.assert_allclose(b @ a, (u[:, :2] * s[:2]) @ v[:, :2].T, atol=1e-12)
    assert kept == pytest.approx(34 / 35.25, abs=1e-12)
    pairs, r, kept = svd_update(base, tuned, 50, DECODER_TARGETS)  # r is capped at the smallest side
    assert r == 6 and kept == pytest.approx(1.0)
    np.testing.assert_allclose(pairs[key][1] @ pairs[key][0], (u * s) @ v.T, atol=1e-12)
    with pytest.raises(ValueError, match="wrong base"):
        svd_update({key: torch.zeros(6, 8)}, tuned, 2, DECODER_TARGETS)


def test_a_full_fine_tune_exports_at_low_rank_as_base_plus_adapter(tmp_path, bpe_tokenizer):
    """``svd_rank`` writes a full fine-tune as the base plus its update's rank-r adapter, the
    layout a LoRA run leaves (so the 4-bit converters keep the update unmerged). At full rank
    the projections are the trained ones; the merge is base + B @ A exactly. It is an export
    option: a run checkpointed without it exports and resumes with it."""
    from edgerank.converters.adapters import merge_lora, read_adapter, state_digest
    from edgerank.runtime.backends.reference import ReferenceBackend
    from edgerank.models.supply import resolve
    from edgerank.train.trainer import export_checkpoint

    base = make_decoder(tmp_path / "base", "llama", bpe_tokenizer, n_layers=2)
    data = tmp_path / "groups.jsonl"
    write_jsonl(_groups(), data)
    args = dict(base=str(base), family="qwen3-reranker", data=str(data), out=str(tmp_path / "out"), loss="kl",
                teacher_temperature=0.2, adapter="full", steps=4, queries_per_step=len(TOPICS), lr=1e-3,
                warmup=0.0, checkpoint_every=2, device="cpu")
    assert train(TrainConfig(**args), progress=False, stop_after=2) is None
    trained = torch.load(tmp_path / ".out.partial" / "checkpoint.pt", weights_only=False)["trainable"]
    base_state = ReferenceBackend(resolve(str(base), family="qwen3-reranker"), device="cpu").full_model.state_dict()

    full = export_checkpoint(TrainConfig(**args, svd_rank=10_000, lora_upper=1), tmp_path / "full")  # LoRA: unused
    low = export_checkpoint(TrainConfig(**args, svd_rank=1), tmp_path / "low")
    half = export_checkpoint(TrainConfig(**args, svd_rank=1, svd_dtype="float16"), tmp_path / "half")
    q8 = export_checkpoint(TrainConfig(**args, svd_rank=1, svd_dtype="int8"), tmp_path / "q8")
    for folder, rank in ((full, None), (low, 1), (half, 1), (q8, 1)):
        pairs, meta = read_adapter(folder / "adapter.safetensors")
        assert meta["made_by"] == "svd of a full fine-tune" and meta["r"] == meta["alpha"]
        assert rank is None or int(meta["r"]) == rank
        assert {k.rsplit(".", 2)[-2] for k in pairs} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"}
        state = ReferenceBackend(resolve(str(folder)), device="cpu").full_model.state_dict()
        assert state_digest(state) == state_digest(merge_lora(base_state, folder / "adapter.safetensors"))
        cost = json.loads((folder / "train_config.json").read_text())["cost"]
        assert cost["svd_rank"] == int(meta["r"]) and cost["checkpoint_step"] == 2
    low_pairs, half_pairs = (read_adapter(f / "adapter.safetensors")[0] for f in (low, half))
    assert low_pairs.keys() == half_pairs.keys()
    for key, (a, b) in half_pairs.items():  # float16: the same update, rounded, in half the bytes
        assert a.dtype == b.dtype == np.float16
        for half_t, full_t in ((a, low_pairs[key][0]), (b, low_pairs[key][1])):  # fp16: 11 significant bits
            np.testing.assert_allclose(half_t.astype(np.float32), full_t, rtol=2.0 ** -10, atol=1e-7)
    assert (half / "adapter.safetensors").stat().st_size < (low / "adapter.safetensors").stat().st_size
    from safetensors.numpy import load_file

    stored = load_file(q8 / "adapter.safetensors")
    for key, (a, b) in read_adapter(q8 / "adapter.safetensors")[0].items():  # int8: one scale per component
        assert stored[key + ".lora_A"].dtype == stored[key + ".lora_B"].dtype == np.int8
        a32, b32 = low_pairs[key]
        np.testing.assert_allclose(a, a32, rtol=0, atol=float(np.abs(a32).max()) / 254 + 1e-7)
        np.testing.assert_allclose(b, b32, rtol=0, atol=float(np.abs(b32).max()) / 254 + 1e-7)
        top = np.unravel_index(np.argmax(np.abs(a32)), a32.shape)
        assert abs(stored[key + ".lora_A"][top]) == 127  # the component's peak uses the full range
    moved = [k for k in trained if k.endswith("proj.weight")]
    assert moved
    cost_low = json.loads((low / "train_config.json").read_text())["cost"]
    assert cost_low["svd_update_energy_kept"] < 0.99
    full_state = ReferenceBackend(resolve(str(full)), device="cpu").full_model.state_dict()
    r_full = int(read_adapter(full / "adapter.safetensors")[1]["r"])  # capped at the smallest side of all
    exact = [name for name in moved if min(trained[name].shape) <= r_full]
    assert exact
    for name in exact:  # where r reaches a projection's smaller side, it is the trained one
        key = "model." + name if "model." + name in full_state else name
        torch.testing.assert_close(full_state[key], trained[name], atol=1e-6, rtol=0)
    norm = next(k for k in trained if k.endswith("input_layernorm.weight"))
    key = "model." + norm if "model." + norm in full_state else norm
    assert not torch.equal(trained[norm], base_state[key])  # training moved the norm ...
    assert torch.equal(full_state[key], base_state[key])  # ... and the export leaves it at the base
    assert train(TrainConfig(**args, svd_rank=1), progress=False) == tmp_path / "out"
    assert (tmp_path / "out" / "adapter.safetensors").is_file()
    with pytest.raises(ValueError, match="svd_rank"):
        TrainConfig(**{**args, "adapter": "lora"}, svd_rank=4).validate()
    with pytest.raises(ValueError, match="give svd_rank too"):
        TrainConfig(**args, svd_dtype="float16").validate()
    with pytest.raises(ValueError, match="svd_dtype must be one of"):
        TrainConfig(**args, svd_rank=4, svd_dtype="int4").validate()

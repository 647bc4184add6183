"""Shared fixtures: tiny tokenizers and small randomly initialised HF models on disk."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DL19 = DATA / "trec-dl19"

WORDS = (
    "the a of to and in is was for on that with as by at from his her it are were be this "
    "which an or has had not but its their they one all there been also who more when "
    "vaccine immune system cell body infection market stock price river city water energy "
    "query document passage relevant answer judge instruct requirements based provided note "
    "yes no true false only can determine following rate how label partially highly"
).split()


def _corpus() -> list[str]:
    import random

    rng = random.Random(0)
    lines = []
    for _ in range(3000):
        words = rng.choices(WORDS, k=rng.randint(3, 12))
        lines.append(" ".join(words))
        lines.append(rng.choice(["yes", "no", "0", "1", "2"]) + " " + " ".join(words[:3]))
    return lines


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A byte-level BPE tokenizer with ChatML/Llama-3 special tokens, answer labels single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
                "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    for label in ("yes", "no", " true", " false", "0", "1", "2"):
        assert len(tok.encode(label).ids) == 1, label
    return tok


@pytest.fixture(scope="session")
def wordpiece_tokenizer():
    """A BERT WordPiece tokenizer with [CLS] a [SEP] b [SEP] post-processing.

    Its vocabulary is built, not trained: the WordPiece trainer breaks ties in hash order,
    so a trained vocabulary (and every model drawn on it) differed from run to run."""
    import string

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    words = sorted({w for line in _corpus() for w in line.split()} - set(chars))
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars), *words]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def _save_tokenizer(tok, folder: Path, cls_name: str = "PreTrainedTokenizerFast", **special) -> None:
    import transformers

    getattr(transformers, cls_name)(tokenizer_object=tok, **special).save_pretrained(folder)


DECODER_CONFIGS = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
}


def write_beir(folder: Path, docs: list[str], queries: dict, judged: str = "", run: str | None = None) -> Path:
    """A tiny BEIR-format collection: documents ``docs`` with text "a", "b", ...,
    ``queries`` ({id: text}), qrels rows ``judged`` under the header, and a ``run.bm25.trec``
    when ``run`` is given."""
    import json

    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": d, "text": chr(ord("a") + n)}) + "\n" for n, d in enumerate(docs)))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in queries.items()))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + judged)
    if run is not None:
        (folder / "run.bm25.trec").write_text(run)
    return folder


def make_decoder(folder: Path, arch: str, tokenizer, seed: int = 0, tie: bool = False, n_layers: int = 2,
                 **config) -> Path:
    """A small random decoder of ``arch`` saved with ``tokenizer`` as an HF folder."""
    import torch
    import transformers

    cfg_name, model_name, extra = DECODER_CONFIGS[arch]
    torch.manual_seed(seed)
    config = getattr(transformers, cfg_name)(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=128,
        num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, tie_word_embeddings=tie, rms_norm_eps=1e-6, **{**extra, **config})
    model = getattr(transformers, model_name)(config)
    with torch.no_grad():  # larger logits than the default init, so scores spread out
        model.get_output_embeddings().weight.mul_(20)
    model.save_pretrained(folder)
    _save_tokenizer(tokenizer, folder, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    return folder


def make_bert(folder: Path, tokenizer, head: str, seed: int = 0, n_layers: int = 2, num_labels: int = 1) -> Path:
    """A small random BERT: ``head`` is "classifier" (cross-encoder, ``num_labels`` logits) or "none"."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=64, num_hidden_layers=n_layers,
                        num_attention_heads=4, intermediate_size=128, max_position_embeddings=512,
                        num_labels=num_labels)
    model = BertForSequenceClassification(config) if head == "classifier" else BertModel(config)
    model.save_pretrained(folder)
    _save_tokenizer(tokenizer, folder, "BertTokenizerFast", cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
                    unk_token="[UNK]", mask_token="[MASK]")
    return folder


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory, bpe_tokenizer) -> Path:
    return make_decoder(tmp_path_factory.mktemp("qwen3"), "qwen3", bpe_tokenizer)


@pytest.fixture(scope="session")
def tiny_cross_encoder(tmp_path_factory, wordpiece_tokenizer) -> Path:
    return make_bert(tmp_path_factory.mktemp("bert-ce"), wordpiece_tokenizer, "classifier")


@pytest.fixture(scope="session")
def edgerank_home(tmp_path_factory) -> Path:
    """The real model cache (built-ins are pulled once per machine), unless one is set."""
    return Path(os.environ.get("EDGERANK_HOME") or "~/.cache/edgerank").expanduser()


@pytest.fixture(scope="session")
def smollm2_path(edgerank_home) -> Path:
    from edgerank.models.pull import pull

    return pull("smollm2-135m", progress=False)


@pytest.fixture(scope="session")
def minilm_path(edgerank_home) -> Path:
    from edgerank.models.pull import pull

    return pull("minilm-l6", progress=False)


PAIRS = [
    ("how do vaccines work", "a vaccine trains the immune system to fight infection"),
    ("how do vaccines work", "the stock market price fell on the city river"),
    ("how do vaccines work", ""),
    ("what is the river city", "the river city has water and energy, 1990 (est.)"),
    ("what is the river city", "  leading spaces and trailing spaces   "),
    ("stock price {braces} today", "market price of the stock was higher\n"),
]


def attach_random_lora(base: Path, r: int, alpha: int, std: float, params: str = "lora_B", seed: int = 1):
    """A reference backend on ``base`` with LoRA attached to every decoder layer and the
    ``params`` matrices ("lora_B" or "lora_" for both) drawn from N(0, std): a stand-in
    for a trained adapter. Save it with ``edgerank.converters.adapters.save_adapter``."""
    import torch

    from edgerank.converters.adapters import attach_lora
    from edgerank.runtime.backends.reference import ReferenceBackend
    from edgerank.models.supply import resolve

    backend = ReferenceBackend(resolve(str(base), family="qwen3-reranker"), device="cpu")
    attach_lora(backend.model, "decoder", backend.full_model.config.num_hidden_layers, r=r, alpha=alpha)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in backend.model.named_parameters():
            if params in name:
                p.normal_(0, std)
    return backend


def snap_weights(folder: Path, snap) -> None:
    """Rewrite the HF model in ``folder`` with each parameter replaced by ``snap(name, array)``
    (a quantize-dequantize round trip puts a base on a quantization grid)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.from_numpy(np.ascontiguousarray(snap(name, p.numpy()), dtype=np.float32)))
    model.save_pretrained(folder)


def train_random_lora(base: Path, out: Path, std: float, seed: int, r: int = 4, alpha: int = 8) -> Path:
    """``out``: what ``edgerank.train.trainer`` leaves for a LoRA run on ``base`` (merged weights plus
    ``adapter.safetensors``), with a random adapter standing in for a trained one."""
    from edgerank.converters.adapters import save_adapter
    from edgerank.converters.merge import export_merged
    from edgerank.models.supply import resolve

    backend = attach_random_lora(base, r=r, alpha=alpha, std=std, seed=seed)
    adapter = out.with_name(out.name + "-adapter.safetensors")
    save_adapter(backend.model, backend.weight_prefix, adapter, r, alpha, str(base), "qwen3-reranker")
    backend.close()
    export_merged(resolve(str(base), family="qwen3-reranker"), adapter, out)
    return out


def without_adapter(trained: Path, out: Path) -> Path:
    """A copy of a LoRA-trained folder without its adapter file: the merged weights only."""
    import shutil

    from edgerank.converters.adapters import ADAPTER_FILE

    shutil.copytree(trained, out)
    (out / ADAPTER_FILE).unlink()
    return out

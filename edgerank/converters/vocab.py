"""A ``tokenizer.json`` (byte-level BPE) as llama.cpp's GGUF tokenizer fields."""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from edgerank.errors import ModelFormatError, UnsupportedModelError

# llama.cpp picks its pre-tokenizer by name; these are the split regexes behind the names
# of the families edgerank converts (llama.cpp's llama-vocab.cpp lists them all).
_QWEN2_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def pre_tokenizer_name(tok: dict) -> str:
    """llama.cpp's name for the pre-tokenizer of a tokenizer.json."""
    pre = tok.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    types = [p.get("type") for p in parts]
    regexes = [p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"]
    if _QWEN2_REGEX in regexes:
        return "qwen2"
    if _LLAMA3_REGEX in regexes:
        return "llama-bpe"
    if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if types == ["ByteLevel"]:
        return "gpt-2"
    raise UnsupportedModelError(f"unrecognised pre-tokenizer {types} {regexes}: llama.cpp would tokenise differently")


def add_tokenizer(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> dict[str, str]:
    """Write tokens, types, merges and special ids from ``folder/tokenizer.json``."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ModelFormatError(f"{folder} has no tokenizer.json: the GGUF needs the tokenizer")
    tok = json.loads(path.read_text())
    model = tok.get("model", {})
    if model.get("type") == "WordPiece":
        return _add_wordpiece(writer, model, vocab_size)
    if model.get("type") != "BPE":
        raise UnsupportedModelError(f"tokenizer model {model.get('type')!r}: only byte-level BPE converts")
    added = {t["id"]: t for t in tok.get("added_tokens", [])}
    by_id = {i: t for t, i in model["vocab"].items()}
    by_id.update({i: t["content"] for i, t in added.items()})
    n = max(vocab_size, max(by_id) + 1)
    tokens, types = [], []
    for i in range(n):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:  # config vocab larger than the tokenizer's: padding rows
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pre = pre_tokenizer_name(tok)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_add_bos_token(False)  # edgerank templates write every special token
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    ids = {t: i for i, t in enumerate(tokens)}
    for key, add in (("eos_token", writer.add_eos_token_id), ("bos_token", writer.add_bos_token_id),
                     ("pad_token", writer.add_pad_token_id)):
        value = cfg.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if value in ids:
            add(ids[value])
    if isinstance(cfg.get("chat_template"), str):
        writer.add_chat_template(cfg["chat_template"])
    return {"pre_tokenizer": pre, "tokens": str(len(tokens)), "merges": str(len(merges))}


def _add_wordpiece(writer: gguf.GGUFWriter, model: dict, vocab_size: int) -> dict[str, str]:
    """BERT WordPiece as llama.cpp's WPM vocabulary: word starts carry U+2581, "##" goes."""
    by_id = {i: t for t, i in model["vocab"].items()}
    tokens, types = [], []
    for i in range(vocab_size):
        t = by_id.get(i, f"[PAD{i}]")
        if t.startswith("[") and t.endswith("]"):
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL)
        else:
            tokens.append(t[2:] if t.startswith("##") else "\u2581" + t)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("bert")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    ids = {t: i for i, t in enumerate(tokens)}
    for name, add in (("[CLS]", writer.add_bos_token_id), ("[SEP]", writer.add_eos_token_id),
                      ("[PAD]", writer.add_pad_token_id), ("[UNK]", writer.add_unk_token_id),
                      ("[MASK]", writer.add_mask_token_id)):
        if name in ids:
            add(ids[name])
    if "[SEP]" in ids:
        writer.add_sep_token_id(ids["[SEP]"])
    writer.add_add_bos_token(True)  # [CLS] text [SEP], as BERT was trained
    writer.add_add_eos_token(True)
    return {"tokenizer": "wordpiece", "tokens": str(len(tokens))}


def gguf_label_ids(path: Path, labels) -> list[int]:
    """The answer labels' token ids in a GGUF's own vocabulary (llama.cpp's tokenizer, the
    one that scores the file), each of which must be one token."""
    import llama_cpp

    from edgerank.runtime.backends.llamacpp import _silence_llama_logs
    from edgerank.runtime.tokenization import LlamaCppTokenizer, label_token_ids

    _silence_llama_logs(llama_cpp)
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise ModelFormatError(f"llama.cpp could not read the vocabulary of {path}")
    try:
        return label_token_ids(LlamaCppTokenizer(llama_cpp.llama_model_get_vocab(model)), labels)
    finally:
        llama_cpp.llama_model_free(model)

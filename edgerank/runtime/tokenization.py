"""Text to token ids: tokenizer wrappers and the pair encoder that applies a spec's template.

Truncation policy (one place, every backend): the document is cut to fit
``spec.max_length``, the query never is. A query too long to leave room for any document
token is an error. Truncated documents are reported by index.
"""

from __future__ import annotations

import ctypes
import re
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol, Sequence

from edgerank.errors import ModelFormatError, UnsupportedModelError
from edgerank.runtime.specs import ModelSpec

# Characters kept before tokenising a document: far more than max_length tokens can use
# (tokens average ~4 characters), so cutting here never changes the result, and a 1 MB
# document costs no more than a long one.
CHARS_PER_TOKEN_CAP = 16


class Tokenizer(Protocol):
    """Encodes text with no implicit special tokens. With ``specials=True`` special tokens
    written in the text (``<|im_start|>``) are parsed as such; with ``specials=False`` they
    are plain text. A template's own text is read with them on, a query's or a
    document's with them off, so that untrusted text cannot close a prompt."""

    def encode(self, text: str, specials: bool = True) -> list[int]: ...


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` (a ``tokenizer.json``): decoders and encoders alike."""

    def __init__(self, tok) -> None:
        tok.no_truncation()
        tok.no_padding()
        self._tok = tok

    @classmethod
    def from_file(cls, path: str | Path) -> "HFTokenizer":
        from tokenizers import Tokenizer as _Tokenizer

        if not Path(path).is_file():
            raise ModelFormatError(f"{path} is missing: the model folder needs its tokenizer.json")
        try:
            return cls(_Tokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise ModelFormatError(f"{path} is not a readable tokenizer.json: {e}") from e

    def encode(self, text: str, specials: bool = True) -> list[int]:
        return self._encoding(text, specials).ids

    def _encoding(self, text: str, specials: bool):
        if specials:
            return self._tok.encode(text, add_special_tokens=False)
        # special tokens in the text are matched as plain text (added tokens that are not
        # special, such as Qwen's <think>, are still matched, as llama.cpp matches them)
        self._tok.encode_special_tokens = True
        try:
            return self._tok.encode(text, add_special_tokens=False)
        finally:
            self._tok.encode_special_tokens = False

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``, special tokens kept (explanations cut at their stop strings)."""
        return self._tok.decode(ids, skip_special_tokens=False)

    def encode_with_specials(self, first: str, second: str | None = None, budget: int | None = None):
        """``[CLS] first [SEP] (second [SEP])`` as the tokenizer's post-processor builds it;
        a ``[SEP]`` written in the texts is plain text.

        ``budget`` cuts the last text (``second``, or ``first`` alone) to that many tokens.
        Returns (ids, type_ids, cut)."""
        a = self._encoding(first, specials=False)
        b = None if second is None else self._encoding(second, specials=False)
        last = a if b is None else b
        cut = budget is not None and len(last.ids) > budget
        if cut:
            last.truncate(budget)
        enc = self._tok.post_process(a, b, add_special_tokens=True)
        return enc.ids, enc.type_ids, cut

    def n_special(self, pair: bool) -> int:
        return self._tok.num_special_tokens_to_add(pair)


class LlamaCppTokenizer:
    """llama.cpp's own tokenizer of a loaded GGUF model (no torch, no tokenizer.json)."""

    def __init__(self, vocab) -> None:
        self._vocab = vocab
        self._n_special = len(self.encode("", add_special=True))  # [CLS] [SEP] for BERT, 0 for most LLMs

    def encode(self, text: str, specials: bool = True, add_special: bool = False) -> list[int]:
        """Token ids of ``text``; ``specials`` parses control tokens written in it,
        ``add_special`` adds the model's own (BOS, or BERT's [CLS]/[SEP])."""
        import llama_cpp

        raw = text.encode("utf-8")
        n_max = len(raw) + 8
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self._vocab, raw, len(raw), buf, n_max, add_special, specials)
        if n < 0:  # buffer too small: -n is the size needed
            n_max = -n
            buf = (llama_cpp.llama_token * n_max)()
            n = llama_cpp.llama_tokenize(self._vocab, raw, len(raw), buf, n_max, add_special, specials)
        return list(ctypes.cast(buf, ctypes.POINTER(ctypes.c_int32))[:n])

    def encode_with_specials(self, first: str, second: str | None = None, budget: int | None = None):
        """``[CLS] first [SEP]`` for an embedding GGUF (single texts only), body cut to ``budget``."""
        if second is not None:
            raise ValueError("llama.cpp's tokenizer encodes pairs without token types; use a tokenizer.json")
        ids = self.encode(first, specials=False, add_special=True)
        body = len(ids) - self.n_special(pair=False)
        cut = budget is not None and body > budget
        if cut:
            ids = ids[: 1 + budget] + ids[-1:]  # keep [CLS] and the closing [SEP]
        return ids, [0] * len(ids), cut

    def n_special(self, pair: bool) -> int:
        if pair:
            raise ValueError("llama.cpp's tokenizer encodes single texts only")
        return self._n_special


def label_token_ids(tokenizer: Tokenizer, labels: Sequence[str]) -> list[int]:
    """The single token id of each answer label; a label spanning tokens is an error."""
    ids = []
    for label in labels:
        toks = tokenizer.encode(label)
        if len(toks) != 1:
            raise UnsupportedModelError(
                f"answer label {label!r} is {len(toks)} tokens in this model's vocabulary; "
                "the score formula needs it to be exactly one"
            )
        ids.append(toks[0])
    return ids


@dataclass
class EncodedBatch:
    """Token ids of every candidate of one query, ready for a backend."""

    sequences: list[list[int]]
    type_ids: list[list[int]] | None = None  # cross-encoders and bi-encoders
    query: list[int] | None = None  # bi-encoders: the query's own sequence
    query_type_ids: list[int] | None = None
    prefix_len: int = 0  # decoders: leading tokens every sequence shares (template + query)
    truncated: list[int] = field(default_factory=list)  # indices of cut documents

    @property
    def n_tokens(self) -> int:
        return sum(map(len, self.sequences)) + len(self.query or ())


def distinct(batch: EncodedBatch) -> tuple[EncodedBatch, list[int]]:
    """The batch with each distinct candidate once, and for every candidate the index of
    its copy in it.

    Identical documents (after truncation) are one model input, so they are scored once
    and share one score exactly. Scoring each copy would not guarantee that: on an Intel
    Sapphire Rapids VM, copies of one document in one batch came out of both torch and
    ONNX Runtime with scores differing in the 8th digit, and so tied in no particular
    order (an AMD EPYC VM gave them equal scores).
    """
    first: dict[tuple, int] = {}
    copy_of: list[int] = []
    keep: list[int] = []
    for i, seq in enumerate(batch.sequences):
        key = (tuple(seq), tuple(batch.type_ids[i]) if batch.type_ids is not None else ())
        j = first.setdefault(key, len(keep))
        if j == len(keep):
            keep.append(i)
        copy_of.append(j)
    if len(keep) == len(batch.sequences):
        return batch, copy_of
    kept = set(keep)
    return replace(
        batch,
        sequences=[batch.sequences[i] for i in keep],
        type_ids=None if batch.type_ids is None else [batch.type_ids[i] for i in keep],
        truncated=[copy_of[i] for i in batch.truncated if i in kept],
    ), copy_of


def encode_pairs(
    spec: ModelSpec,
    tokenizer: Tokenizer,
    query: str,
    documents: Sequence[str],
    instruction: str | None = None,
    max_length: int | None = None,
) -> EncodedBatch:
    """Apply the spec's template and truncation policy to one query and its documents."""
    limit = max_length or spec.max_length
    cap = limit * CHARS_PER_TOKEN_CAP
    query = _valid_unicode(query)
    instruction = _valid_unicode(instruction) if instruction else None
    long = [len(doc) > cap for doc in documents]
    documents = [_valid_unicode(doc[:cap]) for doc in documents]
    if spec.kind == "decoder":
        return _encode_decoder(spec, tokenizer, query, documents, long, instruction, limit)
    if spec.kind == "cross-encoder":
        if not isinstance(tokenizer, HFTokenizer):
            raise TypeError("cross-encoders need a tokenizer.json tokenizer (pairs carry token types)")
        budget = limit - len(_query_ids(tokenizer, query)) - tokenizer.n_special(pair=True)
        _check_budget(budget, limit)
        out = EncodedBatch(sequences=[], type_ids=[])
        for i, doc in enumerate(documents):
            ids, types, cut = tokenizer.encode_with_specials(query, doc, budget)
            out.sequences.append(ids)
            out.type_ids.append(types)
            if cut or long[i]:
                out.truncated.append(i)
        return out
    # bi-encoder: the query and each document are separate sequences
    budget = limit - tokenizer.n_special(pair=False)
    if len(_query_ids(tokenizer, query)) > budget:
        _check_budget(-1, limit)
    q_ids, q_types, _ = tokenizer.encode_with_specials(query)
    out = EncodedBatch(sequences=[], type_ids=[], query=q_ids, query_type_ids=q_types)
    for i, doc in enumerate(documents):
        ids, types, cut = tokenizer.encode_with_specials(doc, budget=budget)
        out.sequences.append(ids)
        out.type_ids.append(types)
        if cut or long[i]:
            out.truncated.append(i)
    return out


def _encode_decoder(spec, tokenizer, query, documents, long, instruction, limit) -> EncodedBatch:
    template = spec.template
    _query_ids(tokenizer, query)
    prefix = encode_template(tokenizer, _prefix_pieces(template.prefix, query, instruction or spec.default_instruction))
    suffix = encode_template(tokenizer, [(template.suffix, True)])
    budget = limit - len(prefix) - len(suffix)
    _check_budget(budget, limit)
    out = EncodedBatch(sequences=[], prefix_len=len(prefix))
    for i, doc in enumerate(documents):
        # a document's text is untrusted: a <|im_end|> in it is plain text, not the template's
        ids = tokenizer.encode(template.separator + doc.rstrip(), specials=False)
        if len(ids) > budget or long[i]:
            out.truncated.append(i)
        out.sequences.append(prefix + ids[:budget] + suffix)
    return out


_SPECIAL_CANDIDATE = re.compile(r"<[^<>\s]{1,40}>")


def _prefix_pieces(prefix: str, query: str, instruction: str | None) -> list[tuple[str, bool]]:
    """The template prefix as (text, trusted) pieces: the template's own text, and the
    query and instruction put in its slots (what ``PromptTemplate.render_prefix`` joins)."""
    pieces = []
    for part in re.split(r"(\{instruction\}|\{query\})", prefix):
        if part == "{instruction}":
            pieces.append((instruction or "", False))
        elif part == "{query}":
            pieces.append((query, False))
        elif part:
            pieces.append((part, True))
    return pieces


def _special_id(tokenizer: Tokenizer, text: str) -> int | None:
    """The id of ``text`` if it is one special token of ``tokenizer``, else None."""
    try:
        cache = _special_ids.setdefault(tokenizer, {})
    except TypeError:  # not weakly referable: no cache
        cache = {}
    if text not in cache:
        on = tokenizer.encode(text, specials=True)
        cache[text] = on[0] if len(on) == 1 and tokenizer.encode(text, specials=False) != on else None
    return cache[text]


_special_ids: "weakref.WeakKeyDictionary[Tokenizer, dict[str, int | None]]" = weakref.WeakKeyDictionary()


def encode_template(tokenizer: Tokenizer, pieces: list[tuple[str, bool]]) -> list[int]:
    """Token ids of ``pieces`` joined: special tokens are parsed in the trusted pieces (the
    template's text) only; the untrusted ones (query, instruction) are plain text.

    A tokenizer splits its input at special tokens and tokenises the text between them on
    its own, so splitting the template's text at its special tokens and encoding each run
    between them with specials off gives the same ids as encoding the joined string with
    specials on, unless the untrusted text holds a special token: then it stays text.
    (Special tokens are recognised in the template by their ``<...>`` shape, which every
    family's template uses.)"""
    ids: list[int] = []
    run: list[str] = []
    for text, trusted in pieces:
        if not trusted:
            run.append(text)
            continue
        at = 0
        for m in _SPECIAL_CANDIDATE.finditer(text):
            sid = _special_id(tokenizer, m.group())
            if sid is None:
                continue
            run.append(text[at:m.start()])
            if "".join(run):
                ids += tokenizer.encode("".join(run), specials=False)
            run, at = [], m.end()
            ids.append(sid)
        run.append(text[at:])
    if "".join(run):
        ids += tokenizer.encode("".join(run), specials=False)
    return ids


def _query_ids(tokenizer: Tokenizer, query: str) -> list[int]:
    """The query's own tokens; a query that tokenises to nothing is refused like a blank one."""
    ids = tokenizer.encode(query, specials=False)
    if not ids:
        raise ValueError("query is empty after tokenization (this model's tokenizer drops every character "
                         "of it): there is nothing to rank against")
    return ids


def _valid_unicode(text: str) -> str:
    """``text`` with lone surrogates (what ``errors="surrogateescape"`` makes of bytes
    that are not UTF-8) replaced by U+FFFD, which tokenizers can encode."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _check_budget(budget: int, limit: int) -> None:
    if budget < 1:
        raise ValueError(
            f"the query (with the prompt template) leaves no room for a document within the "
            f"model's {limit}-token limit; shorten the query (queries are never truncated)"
        )

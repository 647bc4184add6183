"""Declarative reranker families: prompt template, score formula, length limits.

A family is data, not a class. Every backend reads the same spec, so a template or a
score formula is written exactly once, here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

Kind = Literal["decoder", "cross-encoder", "bi-encoder"]


@dataclass(frozen=True)
class PromptTemplate:
    """A decoder prompt: ``prefix + separator + document + suffix``.

    ``prefix`` may contain ``{instruction}`` and ``{query}``; it is the part every
    candidate of one query shares, which the layer-wise runtime computes once.
    The three pieces are tokenised apart, so each cut must fall on a pre-tokenizer
    boundary: the prefix ends on punctuation, the document piece starts with
    ``separator`` (a space joins the following word, as in the joint string), and the
    suffix starts with a special token or a newline (documents are right-stripped).
    The template owns every special token (BOS included): nothing is added implicitly.
    """

    prefix: str
    suffix: str
    separator: str = " "

    def render_prefix(self, query: str, instruction: str | None) -> str:
        # str.replace, not str.format: queries may contain braces.
        return self.prefix.replace("{instruction}", instruction or "").replace("{query}", query)

    def rerank_template(self, instruction: str | None) -> str:
        """The whole prompt with ``{query}`` and ``{document}`` left as placeholders: what
        llama-server's ``format_prompt_rerank`` reads from ``tokenizer.chat_template.rerank``.

        llama-server replaces ``{query}`` first, then ``{document}``, in the whole string, and
        tokenises it in one piece with special tokens parsed and no BOS added. So a
        ``{query}`` in the instruction becomes the query there as here (``render_prefix``
        replaces it too), but a ``{document}`` in the instruction would become the document
        there only: refused. The document must be sent right-stripped (edgerank strips it).
        """
        if instruction and "{document}" in instruction:
            raise ValueError("the instruction contains '{document}', which llama-server would replace by each "
                             "document; edgerank keeps it as text, so the two prompts would differ")
        head = self.prefix.replace("{instruction}", instruction or "")
        return head + self.separator + "{document}" + self.suffix


@dataclass(frozen=True)
class ScoreFormula:
    """How the head's outputs become one relevance score (higher is better).

    - ``yes_no``: ``labels = (positive, negative)`` token texts; score = sigmoid(l_pos - l_neg).
    - ``expected_label``: ``labels = ("0", "1", ...)``; score = sum_i i * softmax(l)_i.
    - ``classifier``: a sequence-classification head; one logit is the score, two logits
      give sigmoid(l_1 - l_0).
    - ``cosine``: cosine similarity of mean-pooled query and document embeddings.
    """

    kind: Literal["yes_no", "expected_label", "classifier", "cosine"]
    labels: tuple[str, ...] = ()

    def apply(self, head_logits: np.ndarray, query: np.ndarray | None = None) -> np.ndarray:
        """Scores from head outputs of shape ``[n, len(labels)]`` (or ``[n, num_labels]``).

        ``cosine`` takes the candidates' pooled embeddings ``[n, H]`` and the query's
        ``[H]`` (every backend hands over both; none normalises them itself)."""
        x = np.asarray(head_logits, dtype=np.float64)
        if self.kind == "cosine":
            if query is None:
                raise ValueError("the cosine score formula needs the query's embedding")
            q = np.asarray(query, dtype=np.float64)
            docs = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
            return docs @ (q / max(float(np.linalg.norm(q)), 1e-12))
        if self.kind == "yes_no" or self.kind == "classifier" and x.shape[1] > 1:
            return _sigmoid(self.logit(x))
        if self.kind == "expected_label":
            p = np.exp(x - x.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            return p @ np.arange(x.shape[1], dtype=np.float64)
        if self.kind == "classifier":
            return x[:, 0]  # one logit: the score itself
        raise ValueError(f"unknown score formula {self.kind!r}")

    def logit(self, head_logits):
        """The pre-sigmoid relevance logit of a binary formula, for numpy or torch arrays
        alike: what the trainer's losses see (``score = sigmoid(logit)``)."""
        x = head_logits
        if self.kind == "yes_no":
            return x[:, 0] - x[:, 1]
        if self.kind == "classifier":
            return x[:, 0] if x.shape[1] == 1 else x[:, -1] - x[:, 0]
        raise ValueError(f"the {self.kind!r} score formula has no single relevance logit to train")


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free


@dataclass(frozen=True)
class ModelSpec:
    """Everything edgerank needs to know to turn (query, document) into a score."""

    family: str
    kind: Kind
    description: str
    score: ScoreFormula
    template: PromptTemplate | None = None
    default_instruction: str | None = None
    # Longest token sequence fed to the model per pair (decoders, cross-encoders) or per
    # text (bi-encoders). Documents are truncated to fit; queries never are.
    max_length: int = 512
    # Bi-encoders: whether embeddings are L2-normalised before the dot product.
    normalize: bool = True
    # Decoders, explain=True: the text after the verdict token that asks the model for its
    # rationale (tokenised apart, so it starts with a special token or a newline), and
    # the texts that end one (a stop string seen in the generated text ends generation).
    explain_prompt: str | None = None
    explain_stop: tuple[str, ...] = ()

    @property
    def takes_instruction(self) -> bool:
        """Whether ``instruction=`` means anything: the prompt has an instruction slot."""
        return self.template is not None and "{instruction}" in self.template.prefix

    def with_max_length(self, max_length: int) -> "ModelSpec":
        return replace(self, max_length=max_length)


QWEN3_SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the "
    'Instruct provided. Note that the answer can only be "yes" or "no".'
)
# The follow-up turn after a chat model's verdict: it answers in its own next turn.
CHATML_EXPLAIN = ("<|im_end|>\n<|im_start|>user\nExplain your answer in one sentence, citing the "
                  "document.<|im_end|>\n<|im_start|>assistant\n")
WEB_SEARCH_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"

QWEN3_RERANKER = ModelSpec(
    family="qwen3-reranker",
    kind="decoder",
    description="Qwen3-Reranker: yes/no judgement after an <Instruct>/<Query>/<Document> prompt.",
    template=PromptTemplate(
        prefix=(
            f"<|im_start|>system\n{QWEN3_SYSTEM}<|im_end|>\n<|im_start|>user\n"
            "<Instruct>: {instruction}\n<Query>: {query}\n<Document>:"
        ),
        suffix="<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    ),
    default_instruction=WEB_SEARCH_INSTRUCTION,
    score=ScoreFormula("yes_no", ("yes", "no")),
    max_length=1024,
    explain_prompt=CHATML_EXPLAIN,
    explain_stop=("<|im_end|>", "<|endoftext|>"),
)

# Rank1 reasons inside <think> before answering. edgerank scores the answer directly after
# an empty reasoning block: no generation, one forward pass per pair.
RANK1 = ModelSpec(
    family="rank1",
    kind="decoder",
    description="Rank1: true/false answer to a relevance question (reasoning trace skipped).",
    template=PromptTemplate(
        prefix=(
            "Determine if the following passage is relevant to the query. "
            "Answer only with 'true' or 'false'.\nQuery: {query}\nPassage:"
        ),
        suffix="\n<think>\n\n</think>",
    ),
    score=ScoreFormula("yes_no", (" true", " false")),
    max_length=1024,
    # explain=True: after the verdict, the model opens the reasoning block it was trained
    # to write (scoring skipped it) and writes its reasons there
    explain_prompt="\n<think>\n",
    explain_stop=("</think>",),
)

INTERANK = ModelSpec(
    family="interank",
    kind="decoder",
    description="InteRank (Llama-3.2-3B): graded 0/1/2 label; score is the expected label.",
    template=PromptTemplate(
        prefix=(
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
            "Rate how relevant the passage is to the query with one label: 0 (not relevant), "
            "1 (partially relevant) or 2 (highly relevant).\n\nQuery: {query}\nPassage:"
        ),
        suffix="<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    score=ScoreFormula("expected_label", ("0", "1", "2")),
    max_length=1024,
    explain_prompt=("<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nExplain the label in one "
                    "sentence, citing the passage.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    explain_stop=("<|eot_id|>", "<|end_of_text|>"),
)

# For instruct models never fine-tuned to rerank (SmolLM2, Qwen2.5): the Qwen3-Reranker
# question in the model's own ChatML, answered zero-shot.
ZEROSHOT_CHATML = ModelSpec(
    family="zeroshot-chatml",
    kind="decoder",
    description="Zero-shot ChatML instruct LLM asked for a yes/no relevance judgement.",
    template=PromptTemplate(
        prefix=(
            f"<|im_start|>system\n{QWEN3_SYSTEM}<|im_end|>\n<|im_start|>user\n"
            "<Instruct>: {instruction}\n<Query>: {query}\n<Document>:"
        ),
        suffix="<|im_end|>\n<|im_start|>assistant\n",
    ),
    default_instruction=WEB_SEARCH_INSTRUCTION,
    score=ScoreFormula("yes_no", ("yes", "no")),
    max_length=1024,
    explain_prompt=CHATML_EXPLAIN,
    explain_stop=("<|im_end|>", "<|endoftext|>"),
)

CROSS_ENCODER = ModelSpec(
    family="cross-encoder",
    kind="cross-encoder",
    description="BERT/XLM-R cross-encoder: [CLS] q [SEP] d [SEP] through pooler and classifier.",
    score=ScoreFormula("classifier"),
    max_length=512,
)

BI_ENCODER = ModelSpec(
    family="bi-encoder",
    kind="bi-encoder",
    description="Embedding model: cosine similarity of mean-pooled query and document embeddings.",
    score=ScoreFormula("cosine"),
    max_length=256,
)

SPECS: dict[str, ModelSpec] = {
    s.family: s for s in (QWEN3_RERANKER, RANK1, INTERANK, ZEROSHOT_CHATML, CROSS_ENCODER, BI_ENCODER)
}


def get_spec(family: str) -> ModelSpec:
    """The spec of a family by name; a clear error lists the known ones."""
    try:
        return SPECS[family]
    except KeyError:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(SPECS)}") from None

"""What a user would run instead of edgerank, run the way they run it (the bench's peers).

- :class:`GraphPeer`: the whole model as one standard ONNX graph (``--to onnx-graph``,
  fp32 or ``quantize_dynamic`` int8) on ONNX Runtime with its default session options,
  candidates in length-sorted batches of 32;
- :class:`SentenceTransformersPeer`: sentence-transformers' ``CrossEncoder`` or
  ``SentenceTransformer`` on the HF folder (torch fp32).

Each takes the same token sequences edgerank would (``tokenization.encode_pairs``), so the
work is the same, and returns the candidates' indices best first with their scores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgerank.runtime import layout
from edgerank.errors import ModelFormatError
from edgerank.runtime.tokenization import HFTokenizer, encode_pairs

BATCH = 32  # candidates per graph call, as a user batches them


class GraphPeer:
    """One exported graph (``converters.graph_export``) on ONNX Runtime."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        from edgerank.runtime.cpu import default_threads
        from edgerank.runtime.specs import get_spec

        self.path = Path(path)
        manifest = json.loads((self.path / layout.MANIFEST).read_text())
        if manifest.get("format") != layout.GRAPH_FORMAT:
            raise ModelFormatError(f"{self.path} is not an exported graph (--to onnx-graph)")
        self.manifest, self.spec = manifest, get_spec(manifest["family"])
        self.tokenizer = HFTokenizer.from_file(self.path / layout.TOKENIZER)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or default_threads())
        self.session = ort.InferenceSession(str(self.path / "model.onnx"), opts, providers=["CPUExecutionProvider"])

    def score(self, query: str, documents: list[str]) -> np.ndarray:
        batch = encode_pairs(self.spec, self.tokenizer, query, documents)
        seqs, types = list(batch.sequences), batch.type_ids
        if self.spec.kind == "bi-encoder":
            seqs, types = [batch.query] + seqs, ([batch.query_type_ids] + types) if types is not None else None
        head = np.zeros((len(seqs), 0))
        order = np.argsort([len(s) for s in seqs], kind="stable")
        for start in range(0, len(seqs), BATCH):
            rows = order[start: start + BATCH]
            out = self.session.run(None, self._feeds([seqs[i] for i in rows],
                                                     [types[i] for i in rows] if types is not None else None))[0]
            if head.shape[1] == 0:
                head = np.zeros((len(seqs), out.shape[1]))
            head[rows] = out
        if self.spec.kind == "bi-encoder":
            return self.spec.score.apply(head[1:], query=head[0])
        return self.spec.score.apply(head)

    def _feeds(self, seqs: list[list[int]], types: list[list[int]] | None) -> dict[str, np.ndarray]:
        n, width = len(seqs), max(map(len, seqs))
        ids, mask, tt = (np.zeros((n, width), np.int64) for _ in range(3))
        for r, s in enumerate(seqs):
            span = slice(width - len(s), width) if self.manifest["padding"] == "left" else slice(0, len(s))
            ids[r, span], mask[r, span] = s, 1
            if types is not None:
                tt[r, span] = types[r]
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.manifest["inputs"]:
            feeds["token_type_ids"] = tt
        return feeds

    def close(self) -> None:
        self.session = None


class SentenceTransformersPeer:
    """sentence-transformers on the HF folder: ``CrossEncoder.predict`` for cross-encoders,
    ``SentenceTransformer.encode`` and cosine similarity for bi-encoders (batch 32)."""

    def __init__(self, path: str | Path, family: str | None = None) -> None:
        from edgerank.runtime import extras
        from edgerank.models.supply import resolve

        extras.require("bench", "the sentence-transformers peer")
        import sentence_transformers as st

        self.source = resolve(str(path), family=family)
        if self.source.kind != "hf" or self.source.spec.kind == "decoder":
            raise ValueError(f"sentence-transformers runs HF cross-encoders and bi-encoders, not {self.source.path}")
        if self.source.spec.kind == "cross-encoder":
            self.model = st.CrossEncoder(str(self.source.path), device="cpu")
        else:
            self.model = st.SentenceTransformer(str(self.source.path), device="cpu")

    def score(self, query: str, documents: list[str]) -> np.ndarray:
        if self.source.spec.kind == "cross-encoder":
            out = np.asarray(self.model.predict([(query, d) for d in documents], batch_size=BATCH))
            # a two-label classifier gives logits [n, 2]: score them as the runtime does
            return self.source.spec.score.apply(out) if out.ndim == 2 and out.shape[1] > 1 else out.reshape(-1)
        emb = self.model.encode([query] + documents, batch_size=BATCH, convert_to_numpy=True)
        return self.source.spec.score.apply(emb[1:], query=emb[0])

    def close(self) -> None:
        self.model = None


def load(spec: dict):
    """The peer a bench configuration names (``{"peer": "ort-graph" | "sentence-transformers", ...}``)."""
    if spec["peer"] == "ort-graph":
        return GraphPeer(spec["model"], spec.get("threads"))
    if spec["peer"] == "sentence-transformers":
        return SentenceTransformersPeer(spec["model"], spec.get("family"))
    raise ValueError(f"unknown peer {spec['peer']!r}")

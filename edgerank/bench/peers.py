"""What a user would run instead of edgerank, run the way they run it (the bench's peers).

- :class:`GraphPeer`: the whole model as one standard ONNX graph (``--to onnx-graph``,
  fp32 or ``quantize_dynamic`` int8) on ONNX Runtime with its default session options,
  candidates in length-sorted batches of 32;
- :class:`OpenVinoPeer`: the fp32 graph on OpenVINO: at its default precision (bf16 where
  the CPU has bf16 hardware), or compressed by NNCF: int8 weights and activations for
  encoders (post-training quantization on the built-in sample), int8 weights for decoders;
- :class:`CTranslate2Peer`: CTranslate2's int8 encoder, converted from the HF folder
  (BERT-style encoders);
- :class:`SentenceTransformersPeer`: sentence-transformers' ``CrossEncoder`` or
  ``SentenceTransformer`` on the HF folder (torch fp32).

Each takes the same token sequences edgerank would (``tokenization.encode_pairs``), so the
work is the same, and returns the candidates' indices best first with their scores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgerank.converters.graph_export import GRAPH_FILE
from edgerank.runtime import layout
from edgerank.errors import ModelFormatError
from edgerank.runtime.tokenization import HFTokenizer, encode_pairs

BATCH = 32  # candidates per graph call, as a user batches them


class GraphPeer:
    """One exported graph (``converters.graph_export``) on ONNX Runtime."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        from edgerank.runtime.cpu import default_threads
        from edgerank.runtime.specs import get_spec

        self.path = Path(path)
        manifest = json.loads((self.path / layout.MANIFEST).read_text())
        if manifest.get("format") != layout.GRAPH_FORMAT:
            raise ModelFormatError(f"{self.path} is not an exported graph (--to onnx-graph)")
        self.manifest, self.spec = manifest, get_spec(manifest["family"])
        self.tokenizer = HFTokenizer.from_file(self.path / layout.TOKENIZER)
        self.threads = int(threads or default_threads())
        self.session = self._load()

    def _load(self):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        return ort.InferenceSession(str(self.path / GRAPH_FILE), opts, providers=["CPUExecutionProvider"])

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, feeds)[0]

    def sequences(self, query: str, documents: list[str]) -> tuple[list, list | None]:
        """The token ids the graph runs (edgerank's, from ``encode_pairs``): a bi-encoder's
        query first, then the candidates."""
        batch = encode_pairs(self.spec, self.tokenizer, query, documents)
        seqs, types = list(batch.sequences), batch.type_ids
        if self.spec.kind == "bi-encoder":
            seqs, types = [batch.query] + seqs, ([batch.query_type_ids] + types) if types is not None else None
        return seqs, types

    def score(self, query: str, documents: list[str]) -> np.ndarray:
        seqs, types = self.sequences(query, documents)
        head = np.zeros((len(seqs), 0))
        order = np.argsort([len(s) for s in seqs], kind="stable")
        for start in range(0, len(seqs), BATCH):
            rows = order[start: start + BATCH]
            out = self._run(self._feeds([seqs[i] for i in rows], [types[i] for i in rows] if types is not None else None))
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


class OpenVinoPeer(GraphPeer):
    """The exported fp32 graph on OpenVINO's CPU plugin. ``precision`` ``default``: OpenVINO's
    own choice (bf16 where the CPU has bf16 hardware, else fp32); ``fp32``: fp32 on every CPU;
    ``int8``: NNCF-compressed,
    weights and activations for encoders (quantized on the built-in sample's pairs), weights
    only for decoders (their activations stay at the default precision)."""

    def __init__(self, path: str | Path, threads: int | None = None, precision: str = "default") -> None:
        self.precision = precision
        super().__init__(path, threads)

    def _load(self):
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(self.path / GRAPH_FILE))
        if self.precision == "int8":
            model = self._int8(model)
        config = {"INFERENCE_NUM_THREADS": self.threads, "PERFORMANCE_HINT": "LATENCY"}
        if self.precision == "fp32":
            config["INFERENCE_PRECISION_HINT"] = "f32"
        self._compiled = core.compile_model(model, "CPU", config)
        return self._compiled.create_infer_request()

    def _int8(self, model):
        import nncf

        if self.spec.kind == "decoder":
            return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
        from edgerank.converters.sample import SAMPLE

        calibration = []
        for query, docs in SAMPLE:
            seqs, types = self.sequences(query, docs)
            calibration.append(self._feeds(seqs, types))
        return nncf.quantize(model, nncf.Dataset(calibration), model_type=nncf.ModelType.TRANSFORMER,
                             subset_size=len(calibration))

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.infer(feeds, share_outputs=False)[self._compiled.outputs[0]]

    def close(self) -> None:
        self.session = self._compiled = None


class CTranslate2Peer:
    """CTranslate2's encoder (int8 weights and activations) on a BERT-style HF folder,
    converted at load into a temporary folder: mean-pooled and normalised for bi-encoders,
    the pooler and the checkpoint's classifier for cross-encoders."""

    def __init__(self, path: str | Path, threads: int | None = None, family: str | None = None) -> None:
        import tempfile

        import ctranslate2

        from edgerank.models.supply import resolve
        from edgerank.runtime.cpu import default_threads

        self.source = resolve(str(path), family=family)
        if self.source.kind != "hf" or self.source.spec.kind == "decoder":
            raise ValueError(f"the CTranslate2 peer runs BERT-style HF encoders, not {self.source.path}")
        self.spec = self.source.spec
        self.tokenizer = HFTokenizer.from_file(self.source.path / "tokenizer.json")
        self._tmp = tempfile.TemporaryDirectory(prefix="edgerank-ct2-")
        out = Path(self._tmp.name) / "ct2"
        ctranslate2.converters.TransformersConverter(str(self._checkpoint())).convert(
            str(out), quantization="int8", force=True)
        self.encoder = ctranslate2.Encoder(str(out), device="cpu", compute_type="int8",
                                           intra_threads=int(threads or default_threads()))
        self.classifier = self._classifier() if self.spec.kind == "cross-encoder" else None

    def _checkpoint(self) -> Path:
        """The HF folder as CTranslate2's converter reads it. It asks BERT configs for
        ``position_embedding_type``, which transformers 5 no longer defaults: a config without
        it is read through a linked copy that names the only kind edgerank runs (absolute)."""
        config = json.loads((self.source.path / "config.json").read_text())
        if "position_embedding_type" in config:
            return self.source.path
        linked = Path(self._tmp.name) / "hf"
        linked.mkdir()
        for f in self.source.path.iterdir():
            if f.name != "config.json":
                (linked / f.name).symlink_to(f.resolve())
        (linked / "config.json").write_text(json.dumps({**config, "position_embedding_type": "absolute"}))
        return linked

    def _classifier(self) -> tuple[np.ndarray, np.ndarray]:
        from edgerank.converters.tensors import TensorReader

        reader = TensorReader(self.source.path)
        return reader.get("classifier.weight").astype(np.float32), reader.get("classifier.bias").astype(np.float32)

    def score(self, query: str, documents: list[str]) -> np.ndarray:
        batch = encode_pairs(self.spec, self.tokenizer, query, documents)
        seqs, types = list(batch.sequences), batch.type_ids
        if self.spec.kind == "bi-encoder":
            seqs, types = [batch.query] + seqs, ([batch.query_type_ids] + types) if types is not None else None
        head = None
        order = np.argsort([len(s) for s in seqs], kind="stable")
        for start in range(0, len(seqs), BATCH):
            rows = order[start: start + BATCH]
            out = self.encoder.forward_batch([list(seqs[i]) for i in rows],
                                             token_type_ids=[list(types[i]) for i in rows] if types is not None else None)
            pooled = self._pool(out, [len(seqs[i]) for i in rows])
            head = np.zeros((len(seqs), pooled.shape[1])) if head is None else head
            head[rows] = pooled
        if self.spec.kind == "bi-encoder":
            return self.spec.score.apply(head[1:], query=head[0])
        return self.spec.score.apply(head)

    def _pool(self, out, lengths: list[int]) -> np.ndarray:
        if self.classifier is not None:
            w, b = self.classifier
            return np.asarray(out.pooler_output, dtype=np.float32) @ w.T + b
        hidden = np.asarray(out.last_hidden_state, dtype=np.float32)  # [B, T, H]
        mask = (np.arange(hidden.shape[1])[None] < np.asarray(lengths)[:, None])[..., None]
        pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1)
        if getattr(self.spec, "normalize", False):
            pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return pooled

    def close(self) -> None:
        self.encoder = None
        self._tmp.cleanup()


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
    """The peer a bench configuration names (``{"peer": "ort-graph" | "openvino" |
    "ctranslate2" | "sentence-transformers", ...}``)."""
    if spec["peer"] == "ort-graph":
        return GraphPeer(spec["model"], spec.get("threads"))
    if spec["peer"] == "openvino":
        return OpenVinoPeer(spec["model"], spec.get("threads"), spec.get("precision", "default"))
    if spec["peer"] == "ctranslate2":
        return CTranslate2Peer(spec["model"], spec.get("threads"), spec.get("family"))
    if spec["peer"] == "sentence-transformers":
        return SentenceTransformersPeer(spec["model"], spec.get("family"))
    raise ValueError(f"unknown peer {spec['peer']!r}")

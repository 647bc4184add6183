"""Full-precision reference: torch + transformers, CUDA when present, else CPU.

GGUF inputs are dequantized to fp32 by transformers' GGUF loader. Decoders run the base
model and apply only the answer-label rows of the LM head at the last position; a
query's template prefix runs once per chunk and its candidates attend to its keys and
values (the same scores as full pairs, in about two thirds of the time: RESULTS §6.6).
"""

from __future__ import annotations

import numpy as np
import torch

from edgerank.errors import ModelFormatError
from edgerank.runtime.backends.contract import Scores
from edgerank.runtime.chunking import length_chunks
from edgerank.runtime.sources import ModelSource
from edgerank.runtime.tokenization import EncodedBatch, HFTokenizer, label_token_ids


class ReferenceBackend:
    name = "reference"

    def __init__(self, source: ModelSource, device: str | None = None, batch_tokens: int = 8192) -> None:
        import transformers

        self.source = source
        self.spec = source.spec
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_tokens = int(batch_tokens)
        folder, extra = source.path, {}
        if source.kind == "gguf":
            folder, extra = source.path.parent, {"gguf_file": source.path.name}
        elif source.kind != "hf":
            raise ModelFormatError(f"the reference backend reads HF folders and GGUF files, not {source.kind}")
        try:  # transformers says a folder without tokenizer files is a ValueError or OSError
            tok = transformers.AutoTokenizer.from_pretrained(folder, **extra)
        except (OSError, ValueError, KeyError) as e:
            raise ModelFormatError(f"{source.path}: transformers cannot build its tokenizer (is tokenizer.json "
                                   f"there?): {str(e).strip().splitlines()[0][:300]}") from e
        if not getattr(tok, "is_fast", False):
            raise ModelFormatError(f"{folder}: no fast tokenizer (tokenizer.json) could be built")
        self.hf_tokenizer = tok  # kept for saving a trained model (edgerank.train.trainer)
        self.tokenizer = HFTokenizer(tok.backend_tokenizer)
        auto = {
            "decoder": transformers.AutoModelForCausalLM,
            "cross-encoder": transformers.AutoModelForSequenceClassification,
            "bi-encoder": transformers.AutoModel,
        }[self.spec.kind]
        try:
            model = auto.from_pretrained(folder, dtype=torch.float32, **extra)
        except (OSError, ValueError, KeyError) as e:  # no weights file, or one of another model
            raise ModelFormatError(f"{source.path}: transformers cannot load its weights: "
                                   f"{str(e).strip().splitlines()[0][:300]}") from e
        model = model.to(self.device).eval()
        self.full_model = model  # what save_pretrained writes; self.model is the part that scores
        self.weight_prefix = ""  # self.model's parameter names within full_model's state dict
        if self.spec.kind == "decoder":
            ids = label_token_ids(self.tokenizer, self.spec.score.labels)
            lm_head = model.get_output_embeddings()
            self.head_weight = lm_head.weight[ids].detach().clone()
            self.head_bias = None if lm_head.bias is None else lm_head.bias[ids].detach().clone()
            self.model = model.get_decoder()
            self.weight_prefix = next(n + "." for n, m in model.named_modules() if m is self.model)
        else:
            self.model = model

    @torch.inference_mode()
    def score(self, batch: EncodedBatch, top_k: int | None = None) -> Scores:
        """One score per sequence of ``batch``, via the spec's score formula (every
        candidate runs to the last layer, whatever ``top_k``)."""
        seqs = batch.sequences
        if self.spec.kind == "bi-encoder":
            seqs = [batch.query] + seqs
        out = np.zeros((len(seqs), self._head_width()), dtype=np.float64)
        shared = batch.prefix_len if self.spec.kind == "decoder" else 0  # the template prefix, run once a chunk
        for chunk in length_chunks([len(s) - shared for s in seqs], self.batch_tokens, min_fill=0.75):
            out[chunk] = self._forward([seqs[i] for i in chunk], batch, chunk, shared)
        if self.spec.kind == "bi-encoder":  # the query is row 0, as on every backend
            return Scores.final(self.spec.score.apply(out[1:], query=out[0]))
        return Scores.final(self.spec.score.apply(out))

    def _head_width(self) -> int:
        if self.spec.kind == "decoder":
            return len(self.spec.score.labels)
        if self.spec.kind == "cross-encoder":
            return self.model.config.num_labels
        return self.model.config.hidden_size

    def _forward(self, seqs: list[list[int]], batch: EncodedBatch, index: list[int], prefix_len: int) -> np.ndarray:
        types = None
        if self.spec.kind != "decoder":
            all_types = ([batch.query_type_ids] + batch.type_ids) if self.spec.kind == "bi-encoder" else batch.type_ids
            types = [all_types[i] for i in index]
        return self.head_outputs_by_layer(seqs, types, prefix_len=prefix_len)[0].double().cpu().numpy()

    def head_outputs(self, seqs: list[list[int]], type_ids: list[list[int]] | None = None) -> torch.Tensor:
        """Head outputs ``[n, width]`` of token sequences, with autograd when enabled.

        Decoders: the answer-label logits at each sequence's last token. Cross-encoders:
        the classifier logits. Bi-encoders: the pooled (normalised) embedding. ``score``
        and the trainer (``edgerank.train.trainer``) both run through here."""
        return self.head_outputs_by_layer(seqs, type_ids)[0]

    def head_outputs_by_layer(self, seqs: list[list[int]], type_ids: list[list[int]] | None = None,
                              layers: tuple[int, ...] = (), prefix_len: int = 0) -> torch.Tensor:
        """``[1 + len(layers), n, width]``: the final head outputs, then the model's own head
        applied to the hidden state *entering* each of ``layers`` (1 .. L-1), which is what
        the pruning runtime scores before that layer (final norm + label rows, or pooler +
        classifier, or mean pooling). The trainer's ``layer_weight`` trains on these.

        ``prefix_len`` (decoders): the first ``prefix_len`` tokens are the same in every
        sequence (one query's template prefix); they are computed once and their keys and
        values shared, as the layer-wise runtime does. The result is the same."""
        if prefix_len and self.spec.kind == "decoder":
            return self._shared_prefix_outputs(seqs, prefix_len, layers)
        n, width = len(seqs), max(map(len, seqs))
        ids = torch.zeros((n, width), dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        want = bool(layers)
        if self.spec.kind == "decoder":  # left padding: every last token sits at -1
            for r, s in enumerate(seqs):
                ids[r, width - len(s):] = torch.tensor(s)
                mask[r, width - len(s):] = 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                             position_ids=pos.to(self.device), output_hidden_states=want)
            last = [out.last_hidden_state[:, -1]]  # final norm already applied
            last += [self.model.norm(out.hidden_states[layer][:, -1]) for layer in layers]
            return self._label_rows(torch.stack(last))
        types = torch.zeros((n, width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
            if type_ids is not None:
                types[r, : len(s)] = torch.tensor(type_ids[r])
        kwargs = dict(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), output_hidden_states=want)
        if getattr(self.model.config, "type_vocab_size", 1) > 1:
            kwargs["token_type_ids"] = types.to(self.device)
        out = self.model(**kwargs)
        if self.spec.kind == "cross-encoder":
            return torch.stack([out.logits] + [self._classify(out.hidden_states[layer]) for layer in layers])
        m = mask.to(self.device).unsqueeze(-1).to(out.last_hidden_state.dtype)
        hidden = [out.last_hidden_state] + [out.hidden_states[layer] for layer in layers]
        pooled = torch.stack([(h * m).sum(1) / m.sum(1).clamp(min=1e-9) for h in hidden])
        if self.spec.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled

    def _shared_prefix_outputs(self, seqs: list[list[int]], prefix_len: int, layers: tuple[int, ...]) -> torch.Tensor:
        from transformers import DynamicCache

        prefix = seqs[0][:prefix_len]
        if any(len(s) <= prefix_len or s[:prefix_len] != prefix for s in seqs):
            raise ValueError(f"the sequences do not all share their first {prefix_len} tokens")
        n, dev = len(seqs), self.device
        cache = DynamicCache(config=self.model.config)
        self.model(input_ids=torch.tensor([prefix], device=dev), past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(n)  # a copy per candidate; gradients sum back into the prefix
        tails = [s[prefix_len:] for s in seqs]
        width = max(map(len, tails))
        ids = torch.zeros((n, width), dtype=torch.long)
        mask = torch.zeros((n, prefix_len + width), dtype=torch.long)
        mask[:, :prefix_len] = 1
        for r, t in enumerate(tails):  # right padding: the prefix stays contiguous
            ids[r, : len(t)] = torch.tensor(t)
            mask[r, prefix_len: prefix_len + len(t)] = 1
        pos = torch.arange(prefix_len, prefix_len + width).expand(n, width)
        out = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                         past_key_values=cache, use_cache=True, output_hidden_states=bool(layers))
        rows, end = torch.arange(n, device=dev), torch.tensor([len(t) - 1 for t in tails], device=dev)
        last = [out.last_hidden_state[rows, end]]
        last += [self.model.norm(out.hidden_states[layer][rows, end]) for layer in layers]
        return self._label_rows(torch.stack(last))

    def _label_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head's answer-label rows applied to final-normed hidden states."""
        logits = hidden @ self.head_weight.T.to(hidden.dtype)
        if self.head_bias is not None:
            logits = logits + self.head_bias.to(logits.dtype)
        return logits

    def _classify(self, hidden: torch.Tensor) -> torch.Tensor:
        """A cross-encoder's head on a ``[n, T, d]`` hidden state: BERT's pooler + dropout +
        classifier, or a RoBERTa-style classifier that reads [CLS] itself."""
        pooler = getattr(self.model.base_model, "pooler", None)
        if pooler is not None:
            return self.model.classifier(self.model.dropout(pooler(hidden)))
        return self.model.classifier(hidden)

    def close(self) -> None:
        self.model = self.full_model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

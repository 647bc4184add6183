"""LlamaIndex: :class:`EdgeRankRerank`, a node postprocessor that reranks retrieved nodes
with edgerank (the slot ``SentenceTransformerRerank`` fills).

    from edgerank.integrations.llama_index import EdgeRankRerank

    engine = index.as_query_engine(similarity_top_k=50, node_postprocessors=[EdgeRankRerank(top_n=5)])

Needs ``pip install 'edgerank[llama-index]'`` (llama-index-core only, no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

from edgerank.runtime.extras import require

require("llama-index", "edgerank.integrations.llama_index")

from llama_index.core.bridge.pydantic import Field, PrivateAttr  # noqa: E402
from llama_index.core.callbacks import CBEventType, EventPayload  # noqa: E402
from llama_index.core.instrumentation import get_dispatcher  # noqa: E402
from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent  # noqa: E402
from llama_index.core.postprocessor.types import BaseNodePostprocessor  # noqa: E402
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle  # noqa: E402

from edgerank import Reranker  # noqa: E402
from edgerank.integrations import shared_reranker  # noqa: E402

dispatcher = get_dispatcher(__name__)


class EdgeRankRerank(BaseNodePostprocessor):
    """Rerank nodes with edgerank and keep the best ``top_n`` (all with ``None``).

    ``EdgeRankRerank(top_n=2, model=None, backend=None, reranker=None, **options)``:
    ``model``, ``backend`` and any other keyword go to :class:`edgerank.Reranker`; the
    model is loaded once and shared with every integration of this process built with
    the same settings (``reranker=`` uses one you loaded instead).

    Returns new ``NodeWithScore`` objects over the same nodes, ``.score`` set to
    edgerank's score, best first; the input's scores are left as they were. Each node is
    ranked by ``get_content(metadata_mode=MetadataMode.EMBED)``, the text
    ``SentenceTransformerRerank`` ranks. Emits ``ReRankStartEvent``/``ReRankEndEvent`` on
    the instrumentation dispatcher and a ``RERANKING`` event on the callback manager.
    """

    model: Optional[str] = Field(default=None, description="edgerank model: built-in name or path")
    backend: Optional[str] = Field(default=None, description="edgerank backend (default: the model's own)")
    top_n: Optional[int] = Field(default=2, gt=0, description="nodes returned, best first (None: all)")
    options: dict[str, Any] = Field(default_factory=dict, description="other edgerank.Reranker options")
    _reranker: Reranker = PrivateAttr()

    def __init__(self, top_n: int | None = 2, model: str | Path | None = None, backend: str | None = None,
                 reranker: Reranker | None = None, **options: Any) -> None:
        callback_manager = options.pop("callback_manager", None)
        if reranker is not None and (model is not None or backend is not None or options):
            raise ValueError("give either reranker= or model/backend/options, not both")
        kwargs = {"callback_manager": callback_manager} if callback_manager is not None else {}
        super().__init__(top_n=top_n, model=None if model is None else str(model), backend=backend,
                         options=options, **kwargs)
        self._reranker = reranker or shared_reranker(model, backend, options)

    @classmethod
    def class_name(cls) -> str:
        return "EdgeRankRerank"

    @property
    def reranker(self) -> Reranker:
        """The loaded model this postprocessor ranks with."""
        return self._reranker

    def _postprocess_nodes(self, nodes: List[NodeWithScore],
                           query_bundle: Optional[QueryBundle] = None) -> List[NodeWithScore]:
        if query_bundle is None:
            raise ValueError("EdgeRankRerank needs the query: pass query_bundle (or query_str)")
        if not nodes:
            return []
        model_name = self._reranker.source.name
        dispatcher.event(ReRankStartEvent(query=query_bundle, nodes=nodes, top_n=self.top_n or len(nodes),
                                          model_name=model_name))
        texts = [n.node.get_content(metadata_mode=MetadataMode.EMBED) for n in nodes]
        with self.callback_manager.event(
            CBEventType.RERANKING,
            payload={EventPayload.NODES: nodes, EventPayload.MODEL_NAME: model_name,
                     EventPayload.QUERY_STR: query_bundle.query_str, EventPayload.TOP_K: self.top_n},
        ) as event:
            ranking = self._reranker.rank(query_bundle.query_str, texts, top_k=self.top_n)
            reranked = [NodeWithScore(node=nodes[r.index].node, score=r.score) for r in ranking]
            event.on_end(payload={EventPayload.NODES: reranked})
        dispatcher.event(ReRankEndEvent(nodes=reranked))
        return reranked

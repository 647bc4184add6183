"""LangChain: :class:`EdgeRankRerank`, a ``BaseDocumentCompressor`` that reranks retrieved
documents with edgerank, for ``ContextualCompressionRetriever`` or any chain that takes a
compressor (the slot ``FlashrankRerank`` and ``CohereRerank`` fill).

    from langchain_classic.retrievers import ContextualCompressionRetriever
    from edgerank.integrations.langchain import EdgeRankRerank

    retriever = ContextualCompressionRetriever(
        base_compressor=EdgeRankRerank(top_n=5), base_retriever=vectorstore.as_retriever(k=50))

Needs ``pip install 'edgerank[langchain]'`` (langchain-core only, no torch)."""

from __future__ import annotations

from copy import deepcopy
from pathlib import Path
from typing import Any, Optional, Sequence

from edgerank.runtime.extras import require

require("langchain", "edgerank.integrations.langchain")

from langchain_core.callbacks import Callbacks  # noqa: E402
from langchain_core.documents import BaseDocumentCompressor, Document  # noqa: E402
from langchain_core.runnables.config import run_in_executor  # noqa: E402
from pydantic import ConfigDict, Field, PrivateAttr  # noqa: E402

from edgerank import Reranker  # noqa: E402
from edgerank.integrations import shared_reranker  # noqa: E402


class EdgeRankRerank(BaseDocumentCompressor):
    """Rerank documents with edgerank and keep the best ``top_n`` (all with ``None``).

    ``EdgeRankRerank(model=None, backend=None, top_n=3, reranker=None, **options)``:
    ``model``, ``backend`` and any other keyword (``threads=2``, ``max_memory_mb=300``,
    ``instruction=...``) go to :class:`edgerank.Reranker`. The model is loaded when the
    compressor is built and shared by every compressor and postprocessor of this process
    with the same settings; ``reranker=`` uses one you loaded instead.

    Each returned ``Document`` is a copy (text, ``id`` and a deep copy of the metadata)
    with ``metadata["relevance_score"]`` set to edgerank's score, best first, as
    ``CohereRerank`` returns them; the caller's documents are never changed.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    model: Optional[str] = None
    backend: Optional[str] = None
    top_n: Optional[int] = Field(default=3, gt=0)
    options: dict[str, Any] = Field(default_factory=dict)
    _reranker: Reranker = PrivateAttr()

    def __init__(self, model: str | Path | None = None, backend: str | None = None, top_n: int | None = 3,
                 reranker: Reranker | None = None, **options: Any) -> None:
        super().__init__(model=None if model is None else str(model), backend=backend, top_n=top_n,
                         options=options)
        if reranker is not None and (model is not None or backend is not None or options):
            raise ValueError("give either reranker= or model/backend/options, not both")
        self._reranker = reranker or shared_reranker(model, backend, options)

    @property
    def reranker(self) -> Reranker:
        """The loaded model this compressor ranks with."""
        return self._reranker

    def compress_documents(self, documents: Sequence[Document], query: str,
                           callbacks: Callbacks | None = None) -> Sequence[Document]:
        """The best ``top_n`` of ``documents`` for ``query``, best first, as scored copies."""
        documents = list(documents)
        if not documents:  # nothing to rank: no model call
            return []
        ranking = self._reranker.rank(query, [d.page_content for d in documents], top_k=self.top_n)
        out = []
        for r in ranking:
            doc = documents[r.index]
            metadata = deepcopy(doc.metadata)
            metadata["relevance_score"] = r.score
            out.append(Document(page_content=doc.page_content, metadata=metadata, id=doc.id))
        return out

    async def acompress_documents(self, documents: Sequence[Document], query: str,
                                  callbacks: Callbacks | None = None) -> Sequence[Document]:
        """:meth:`compress_documents` in an executor thread: a ranking holds the CPU for
        tens of milliseconds or more, which must not block the event loop."""
        return await run_in_executor(None, self.compress_documents, documents, query, callbacks)

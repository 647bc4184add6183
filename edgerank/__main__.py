"""``python -m edgerank [QUERY DOC ...]``: rerank documents and print the ranking.

With no arguments it reranks a small built-in example with the default model.
"""

from __future__ import annotations

import argparse
import sys

from edgerank import Reranker
from edgerank.runtime.backends import BACKENDS
from edgerank.cli import exits_on, positive_int
from edgerank.cli import format_table

EXAMPLE_QUERY = "how do vaccines train the immune system"
EXAMPLE_DOCS = [
    "The stock market closed higher on Friday after strong earnings reports.",
    "Vaccines expose the immune system to a harmless piece or weakened form of a pathogen, "
    "so that it learns to produce antibodies and memory cells without causing disease.",
    "The immune system is a network of cells and proteins that defends the body against infection.",
    "To train a puppy, reward good behaviour immediately and keep sessions short.",
    "Booster shots remind the immune system of an antigen so that memory B cells stay ready.",
    "The history of the printing press begins with Gutenberg in the 15th century.",
]


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


@exits_on(FileNotFoundError, ValueError)
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgerank", description=__doc__)
    parser.add_argument("query", nargs="?", help="the query (default: a built-in example)")
    parser.add_argument("documents", nargs="*", help="documents to rank")
    parser.add_argument("--model", default=None, help="built-in name, path or hf:ORG/NAME")
    parser.add_argument("--backend", default=None, choices=BACKENDS,
                        help="default: the model's own (edgerank for built-ins and artifacts)")
    parser.add_argument("--top-k", type=positive_int, default=None, help="show the best K (default: all)")
    args = parser.parse_args(argv)
    if args.query is not None and not args.documents:
        parser.error("give the documents to rank after the query (or no arguments for the example)")
    query = EXAMPLE_QUERY if args.query is None else args.query
    docs = args.documents or EXAMPLE_DOCS
    with Reranker(model=args.model, backend=args.backend) as reranker:
        ranking = reranker.rank(query, docs, top_k=args.top_k)
    s = ranking.stats
    rows = [[str(pos), f"{r.score:.4f}", str(r.index), _clip(r.document, 70)] for pos, r in enumerate(ranking, 1)]
    print(f"query: {query!r}")
    print(format_table(["rank", "score", "index", "document"], rows, right=(0, 1, 2)))
    print(f"{s.model} on {s.backend}: {s.candidates} candidates, {s.tokens} tokens, "
          f"{s.wall_s * 1000:.0f} ms, peak RSS {s.peak_rss_mb:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

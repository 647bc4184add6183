"""Data: judged collections (BEIR folders, TREC runs, BM25 candidates) and training sets."""

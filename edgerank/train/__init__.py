"""Training: fine-tune a reranker on the reference (torch) path; recipes for edgerank's own models."""

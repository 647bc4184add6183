"""Evaluation: rerank a first-stage run on judged data and score both."""

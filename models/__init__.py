"""Reranker families (specs) and the built-in model catalogue: data, read by edgerank."""

from models.catalog import BUILTINS, BuiltinModel, get_builtin
from models.specs import SPECS, ModelSpec, PromptTemplate, ScoreFormula, get_spec

__all__ = [
    "BUILTINS", "BuiltinModel", "get_builtin",
    "SPECS", "ModelSpec", "PromptTemplate", "ScoreFormula", "get_spec",
]

"""The PEP workflow (PEP_SPEC sections 4-6): budgeted search, lottery-ticket retrain, evaluation."""

from .evaluate import evaluate, evaluate_per_batch
from .retrain import retrain
from .search import budget_counts, search

__all__ = ["budget_counts", "evaluate", "evaluate_per_batch", "retrain", "search"]

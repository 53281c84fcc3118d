"""MetabolicGPT-2 study: semantic token budgets and measured inference energy for GPT-2."""

__version__ = "0.1.0"

"""Evaluation of budgeted generation: Table I metrics (paper V.C), scoring, budget levels."""

"""Counterfactual semantic cost: the labeller (eq. 9-11), totals and statistics, the cached dataset, approximations, analysis."""

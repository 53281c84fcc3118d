"""Budget-conditioned generation: logits processors, stopping criteria and the budgeted decode."""

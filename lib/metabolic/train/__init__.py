"""Training: the loss terms (eq. 18, 22, 24), dual ascent (eq. 23), the Lagrangian loop and backbone pretraining."""

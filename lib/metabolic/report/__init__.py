"""Figures, the live budget explorer and notebook helpers (the layer notebooks call)."""

"""WikiText-2 tokenized (corpus) and the synthetic energy prior c_syn(v) (paper eq. 8)."""

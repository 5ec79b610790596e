"""Show, Attend and Tell (Xu et al. 2015): data preparation, model, training, beam search."""

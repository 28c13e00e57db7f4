"""Building blocks of functions of tensors: margin losses, cosine heads (Partial FC), lazy optimizers, fused kernels."""

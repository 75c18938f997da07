"""Mask generators: pure functions of sizes, probabilities and a torch.Generator.

Called in the data loader's collate step; every function returns a bool tensor, True = masked.
"""
from d2v.masking.span import mask_rate, span_mask

__all__ = ["span_mask", "mask_rate"]

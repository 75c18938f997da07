"""Mask generators: pure functions of sizes, probabilities and a torch.Generator.

Called in the data loader's collate step; every function returns a bool tensor, True = masked.
`mask_maker(cfg)` is the run's one maker for whichever masking.kind it configures.
"""
from d2v.masking.exact_count import block_mask_1d, inverse_block_mask_2d, random_mask
from d2v.masking.beit_blocks import block_mask_2d
from d2v.masking.span import mask_rate, span_mask
from d2v.masking.text import apply_token_mask, text_span_mask
from d2v.masking.multimask import MultiMaskFn, multi_mask_fn
from d2v.masking.makers import mask_maker

__all__ = ["MultiMaskFn", "apply_token_mask", "block_mask_1d", "block_mask_2d", "inverse_block_mask_2d", "mask_rate",
           "mask_maker", "multi_mask_fn", "random_mask", "span_mask", "text_span_mask"]

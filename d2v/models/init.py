"""Weight initialisations of the reference models (docs/method.md, section "Initialisation"), shared by
the 1.0 and 2.0 builders."""
from __future__ import annotations

from torch import nn

NO_WEIGHT_DECAY = "no_weight_decay"
"""Attribute marking a parameter the optimizer exempts from weight decay whatever its shape."""


def exempt_from_weight_decay(*params: nn.Parameter) -> None:
    for p in params:
        setattr(p, NO_WEIGHT_DECAY, True)


def bert_init(module: nn.Module, std: float) -> None:
    """Normal(0, std) linear/embedding weights, zero biases (fairseq's init_bert_params)."""
    for mod in module.modules():
        if isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, std=std)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
        elif isinstance(mod, nn.Embedding):
            nn.init.normal_(mod.weight, std=std)


def trunc_init(module: nn.Module, std: float) -> None:
    """BEiT's init: normal weights truncated at one std (`trunc_normal_(a=-std, b=std)` in
    data2vec_vision's `beit/modeling_cyclical.py`: an effective std of 0.54·std), zero biases, then each
    block's output projections rescaled by 1/sqrt(2·layer) so deep residual streams start small."""
    for mod in module.modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(mod.weight, std=std, a=-std, b=std)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
    for layer, block in enumerate(getattr(module, "blocks", []), start=1):
        block.attention.out_proj.weight.data.div_((2.0 * layer) ** 0.5)
        block.ffn.fc2.weight.data.div_((2.0 * layer) ** 0.5)

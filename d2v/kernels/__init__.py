"""Fused GPU kernels for d2v, each beside a plain PyTorch reference and behind one dispatch
function (docs/method.md §5). Imports only torch and triton. `D2V_KERNELS=off` forces the references.
"""
from d2v.kernels.attention import attention
from d2v.kernels.attention import buckets_for as attention_buckets
from d2v.kernels.attention import describe_plan as describe_attention_plan
from d2v.kernels.attention import plan as plan_attention
from d2v.kernels.attention_reference import Alibi, alibi_slopes
from d2v.kernels.targets import accumulate, finalize, fused_targets

__all__ = ["attention", "attention_buckets", "plan_attention", "describe_attention_plan", "Alibi", "alibi_slopes", "accumulate", "finalize", "fused_targets"]

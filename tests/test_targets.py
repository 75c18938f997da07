"""Targets against an independent float64 reference written here (docs/method.md §3.1 step 2): the
streaming form training runs (kernels.accumulate/finalize), the fused kernel and the list-form reference."""
import pytest
import torch

from d2v import kernels
from d2v.kernels import accumulate, finalize
from d2v.kernels.targets_reference import fused_targets as build_targets


def ref_norm(x, kind, valid):
    """x: B×T×D float64; valid: B×T bool. Loops over samples and channels, no vectorised tricks."""
    out = torch.zeros_like(x)
    B, T, D = x.shape
    for b in range(B):
        v = valid[b]
        if kind == "instance":
            for d in range(D):
                col = x[b, v, d]
                mean = col.mean()
                var = ((col - mean) ** 2).mean()
                out[b, v, d] = (col - mean) / torch.sqrt(var + 1e-5)
        elif kind == "layer":
            rows = x[b, v]
            mean = rows.mean(dim=1, keepdim=True)
            var = ((rows - mean) ** 2).mean(dim=1, keepdim=True)
            out[b, v] = (rows - mean) / torch.sqrt(var + 1e-5)
        else:
            out[b, v] = x[b, v]
    return out


def reference(layers, top_k, layer_norm, final_norm, valid):
    acc = sum(ref_norm(a.double(), layer_norm, valid) for a in layers[-top_k:]) / top_k
    return ref_norm(acc, final_norm, valid)


CASES = [("instance", None), ("layer", None), ("layer", "layer"), (None, "instance"), ("instance", "layer")]


@pytest.mark.parametrize("layer_norm,final_norm", CASES)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_list_and_streaming_forms_match_float64(layer_norm, final_norm, padded, dtype):
    B, T, D, L, K = 3, 37, 24, 5, 3
    layers = [(torch.randn(B, T, D) * 3 + torch.randn(D)).to(dtype) for _ in range(L)]
    lengths = torch.tensor([37, 20, 31]) if padded else torch.full((B,), T)
    pad = torch.arange(T)[None, :] >= lengths[:, None]
    valid = ~pad
    want = reference(layers, K, layer_norm, final_norm, valid)
    got = build_targets(layers, top_k=K, layer_norm=layer_norm, final_norm=final_norm,
                        padding_mask=pad if padded else None)
    acc = None
    for a in layers[-K:]:
        acc = accumulate(acc, a, layer_norm=layer_norm, padding_mask=pad if padded else None)
    streamed = finalize(acc, top_k=K, final_norm=final_norm, padding_mask=pad if padded else None)
    fused = kernels.fused_targets(layers, top_k=K, layer_norm=layer_norm, final_norm=final_norm,
                                  padding_mask=pad if padded else None)
    for out in (got, streamed, fused):
        assert out.dtype == torch.float32 and out.shape == (B, T, D)
        assert torch.allclose(out.double(), want, atol=2e-5, rtol=1e-5), (out.double() - want).abs().max()
        assert (out[pad] == 0).all()


def test_instance_norm_is_over_time_not_channels():
    x = torch.randn(2, 50, 8) * torch.arange(1, 9) + torch.arange(8) * 10  # per-channel scale and offset
    y = build_targets([x], top_k=1, layer_norm="instance", final_norm=None)
    assert torch.allclose(y.mean(dim=1), torch.zeros(2, 8), atol=1e-5)  # each channel centred over time
    assert torch.allclose(y.var(dim=1, unbiased=False), torch.ones(2, 8), atol=1e-3)
    assert not torch.allclose(y.mean(dim=2), torch.zeros(2, 50), atol=1e-2)


def test_padding_is_excluded_from_statistics():
    x = torch.randn(1, 10, 4)
    pad = torch.zeros(1, 10, dtype=torch.bool)
    pad[0, 6:] = True
    garbage = x.clone()
    garbage[0, 6:] = 1e4
    a = build_targets([x], top_k=1, layer_norm="instance", final_norm=None, padding_mask=pad)
    b = build_targets([garbage], top_k=1, layer_norm="instance", final_norm=None, padding_mask=pad)
    assert torch.allclose(a, b)


def test_top_k_bounds():
    with pytest.raises(ValueError):
        build_targets([torch.randn(1, 2, 3)], top_k=2, layer_norm=None, final_norm=None)

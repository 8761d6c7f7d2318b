"""ViT attention backends agree, and the xformers path follows xformers' (B, M, H, K) contract."""

import sys
import types

import pytest
import torch

from san_fast.model import attention as attn_mod
from san_fast.model.attention import attention, resolve_backend
from san_fast.model.vit import ViT


def _qkv(b=2, m=37, h=3, k=16, dtype=torch.float32):
    return [torch.randn(b, m, h, k, dtype=dtype) for _ in range(3)]


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_sdpa_matches_math():
    q, k, v = _qkv()
    out_sdpa = attention(q, k, v, "sdpa")
    out_math = attention(q, k, v, "math")
    assert out_sdpa.shape == q.shape
    assert torch.isfinite(out_sdpa).all()
    assert _rel(out_sdpa, out_math) < 1e-5


def test_math_matches_explicit_per_head_softmax():
    q, k, v = _qkv(b=1, m=5, h=2, k=4)
    out = attention(q, k, v, "math")
    for head in range(2):
        s = q[0, :, head] @ k[0, :, head].T / 2.0
        ref = s.softmax(-1) @ v[0, :, head]
        assert torch.allclose(out[0, :, head], ref, atol=1e-6)


@pytest.fixture
def stand_in_xformers(monkeypatch):
    """A module with xformers' API whose op checks the layout it is given and records calls."""
    calls = []

    def memory_efficient_attention(q, k, v, attn_bias=None, p=0.0, scale=None):
        assert q.dim() == 4 and q.shape == k.shape == v.shape, "xformers takes (B, M, H, K)"
        calls.append(tuple(q.shape))
        # Computed independently of the project's code: the per-head softmax of xformers' docs.
        b, m, h, kk = q.shape
        qh, kh, vh = (t.permute(0, 2, 1, 3) for t in (q, k, v))
        w = (qh @ kh.transpose(-1, -2) * (scale or kk**-0.5)).softmax(-1)
        return (w @ vh).permute(0, 2, 1, 3)

    package = types.ModuleType("xformers")
    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = memory_efficient_attention
    package.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    return calls


def test_vit_xformers_layout_and_agreement(stand_in_xformers):
    torch.manual_seed(0)
    vit = ViT(image_size=32, patch_size=8, dim=64, depth=2, heads=4).eval()
    x = torch.randn(3, 3, 32, 32)
    vit.set_attention_backend(resolve_backend("xformers", torch.device("cpu")))
    out_x = vit(x)
    vit.set_attention_backend("sdpa")
    out_s = vit(x)
    # ViT with 64-wide tokens, 4 heads of 16, 16 patches: the op must see (B=3, M=16, H=4, K=16).
    assert stand_in_xformers == [(3, 16, 4, 16)] * 2
    assert _rel(out_x, out_s) < 1e-5


def test_auto_falls_back_to_sdpa_without_cuda(stand_in_xformers):
    attn_mod.xformers_works.cache_clear()
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"


def test_env_override(monkeypatch):
    monkeypatch.setenv("SAN_ATTN", "math")
    assert resolve_backend("auto", torch.device("cpu")) == "math"
    monkeypatch.setenv("SAN_ATTN", "flash9")
    with pytest.raises(ValueError, match="SAN_ATTN"):
        resolve_backend("auto", torch.device("cpu"))


def test_bad_backend_and_shapes():
    with pytest.raises(ValueError, match="expected one of"):
        resolve_backend("flash", torch.device("cpu"))
    q, k, _ = _qkv()
    with pytest.raises(ValueError, match=r"\(B, M, H, K\)"):
        attention(q, k, k[:, :3], "sdpa")


def test_explicit_xformers_without_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    with pytest.raises(RuntimeError, match="not importable"):
        resolve_backend("xformers", torch.device("cpu"))

"""ViT attention backends agree, the xformers path follows xformers' (B, M, H, K) contract, loads
the CUDA 12 runtime it needs, and `auto` keeps the faster backend by a measurement."""

import ctypes
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


@pytest.fixture
def fresh_caches():
    cached = (attn_mod.xformers_works, attn_mod.pick_auto, attn_mod.load_cudart12)
    for fn in cached:
        fn.cache_clear()
    yield
    for fn in cached:
        fn.cache_clear()


def test_auto_falls_back_to_sdpa_without_cuda(stand_in_xformers, fresh_caches):
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"


def test_choose_by_timing_keeps_the_fastest_and_drops_failures():
    times = {"xformers": 0.8, "sdpa": 0.5, "math": 2.0}
    assert attn_mod.choose_by_timing(("xformers", "sdpa", "math"), times.__getitem__) == ("sdpa", times)

    def timer(name):
        if name == "sdpa":
            raise RuntimeError("no kernel for this shape")
        return times[name]

    best, measured = attn_mod.choose_by_timing(("xformers", "sdpa"), timer)
    assert best == "xformers" and measured == {"xformers": 0.8}
    with pytest.raises(RuntimeError, match="none of"):
        attn_mod.choose_by_timing(("sdpa",), timer)


@pytest.mark.parametrize("xformers_ms,expected", [(0.3, "xformers"), (0.9, "sdpa")])
def test_auto_measures_once_and_announces(monkeypatch, capsys, fresh_caches, xformers_ms, expected):
    """On CUDA with a working xformers, `auto` times both backends at the ViT's shape (stand-in
    timings here) and keeps the faster; the choice is cached per process."""
    calls = []

    def stand_in_timer(backend, shape, dtype, device):
        calls.append((backend, shape, dtype, device.type))
        return {"xformers": xformers_ms, "sdpa": 0.5}[backend]

    monkeypatch.setattr(attn_mod, "xformers_works", lambda device_type: device_type == "cuda")
    monkeypatch.setattr(attn_mod, "time_fwd_bwd", stand_in_timer)
    shape = (4, 64, 2, 32)
    for _ in range(2):
        assert resolve_backend("auto", torch.device("cuda"), shape=shape, dtype=torch.float16) == expected
    assert sorted(calls) == [("sdpa", shape, torch.float16, "cuda"), ("xformers", shape, torch.float16, "cuda")]
    err = capsys.readouterr().err
    assert err.count("attention auto:") == 1 and f"using {expected}" in err


def test_cuda12_runtime_is_loaded_globally_before_xformers(tmp_path, monkeypatch, capsys, fresh_caches,
                                                           stand_in_xformers):
    lib = tmp_path / attn_mod.CUDART12
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"stand-in")
    loaded = []
    monkeypatch.setattr(sys, "path", [str(tmp_path / "elsewhere"), str(tmp_path)])
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(ctypes, "CDLL", lambda path, mode=0: loaded.append((path, mode)))
    assert attn_mod._import_xformers_ops() is sys.modules["xformers.ops"]
    assert loaded == [(str(lib.resolve()), ctypes.RTLD_GLOBAL)]
    assert "nvidia-cuda-runtime-cu12" in capsys.readouterr().err
    attn_mod._import_xformers_ops()
    assert len(loaded) == 1  # once per process


def test_cuda12_runtime_not_loaded_when_absent_or_torch_has_it(tmp_path, monkeypatch, fresh_caches):
    loaded = []
    monkeypatch.setattr(ctypes, "CDLL", lambda path, mode=0: loaded.append(path))
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert attn_mod.load_cudart12() is None
    (tmp_path / attn_mod.CUDART12).parent.mkdir(parents=True)
    (tmp_path / attn_mod.CUDART12).write_bytes(b"stand-in")
    attn_mod.load_cudart12.cache_clear()
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert attn_mod.load_cudart12() is None
    assert loaded == []


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


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_real_xformers_matches_sdpa_on_cuda(dtype, fresh_caches):
    if not attn_mod.xformers_works("cuda"):
        pytest.skip("xformers is not installed or its CUDA operators do not load here")
    q, k, v = (t.cuda().requires_grad_() for t in _qkv(b=2, m=77, h=4, k=64, dtype=dtype))
    grad = torch.randn_like(q)
    outs = {}
    for backend in ("xformers", "sdpa"):
        out = attention(q, k, v, backend)
        outs[backend] = (out, *torch.autograd.grad(out, (q, k, v), grad))
    for got, ref in zip(outs["xformers"], outs["sdpa"]):
        assert torch.isfinite(got).all()
        assert _rel(got.float(), ref.float()) < 1e-2


@pytest.mark.gpu
@needs_cuda
def test_auto_on_cuda_picks_a_working_backend_once(fresh_caches, capsys):
    shape = (2, 64, 4, 32)
    picked = resolve_backend("auto", torch.device("cuda"), shape=shape, dtype=torch.float16)
    assert picked in ("xformers", "sdpa")
    assert resolve_backend("auto", torch.device("cuda"), shape=shape, dtype=torch.float16) == picked
    if attn_mod.xformers_works("cuda"):
        assert capsys.readouterr().err.count("attention auto:") == 1

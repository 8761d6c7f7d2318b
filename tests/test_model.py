"""SAN end to end on tiny shapes: every encoder and generator backbone, both ViT norms, RGB + IR
input through the SEAT kernel's C=4 path, every ablation switch, eval determinism."""

import pytest
import torch

from san_fast.config import Config, resolve
from san_fast.model import SAN
from san_fast.model.encoders import build_encoder
from san_fast.model.san import alignment_loss, uniformity_loss


def tiny(**overrides) -> Config:
    base = dict(crop_size=32, embed_dim=32, vit_dim=32, vit_heads=2, vit_depth=1, synthetic_classes=5,
                seat_impl="torch")
    base.update(overrides)
    return Config(**base).validate()


@pytest.mark.parametrize("channels", [3, 4])
@pytest.mark.parametrize("name", ["conv3x3", "resnet18", "unet"])
def test_encoders_keep_full_resolution(name, channels):
    enc = build_encoder(name, 24, channels)
    out = enc(torch.randn(2, channels, 32, 48))
    assert out.shape == (2, 24, 32, 48)
    assert torch.isfinite(out).all()


def test_encoder_name_error():
    with pytest.raises(ValueError, match="conv3x3, resnet18 or unet"):
        build_encoder("vgg", 8)


def test_forward_shapes_and_paper_defaults():
    cfg = resolve({"preset": "paper"}, cuda_available=False)
    assert (cfg.embed_dim, cfg.vit_depth, cfg.patch_size, cfg.crop_size, cfg.lr) == (1024, 6, 8, 128, 1e-4)
    assert cfg.semantics() == cfg.num_classes()
    cfg = tiny()
    model = SAN(cfg)
    x = torch.randn(3, 3, 32, 32)
    q, gamma, zeta = model(x)
    assert q.shape == (3, 32, 32, 32)
    assert gamma.shape == (3, 5, 32)
    assert zeta.shape == (5, 32)  # batch-wise: one set of semantics for the batch


def test_losses_backpropagate_to_every_part():
    model = SAN(tiny())
    terms, _, _ = model.losses(torch.randn(4, 3, 32, 32))
    assert set(terms) == {"rec", "con", "uni", "loss"}
    expected = terms["rec"] + terms["con"] + terms["uni"]
    assert torch.allclose(terms["loss"], expected)
    terms["loss"].backward()
    for part in (model.encoder, model.backbone, model.generator, model.matcher, model.recon):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)


def test_ablation_switches():
    x = torch.randn(2, 3, 32, 32)
    no_rec = SAN(tiny(reconstruction=False))
    terms, _, _ = no_rec.losses(x)
    assert set(terms) == {"align", "uni", "loss"}

    no_batch = SAN(tiny(batch_wise=False))
    _, gamma, zeta = no_batch(x)
    assert zeta.shape == (2, 5, 32)  # each image its own semantics

    no_matcher = SAN(tiny(token_matcher=False))
    assert no_matcher.matcher is None
    _, gamma, zeta = no_matcher(x)
    assert torch.equal(gamma, zeta.expand_as(gamma))  # p = 1

    heavier = SAN(tiny(uniformity_weight=3.0))
    terms, _, _ = heavier.losses(x)
    assert torch.allclose(terms["loss"], terms["rec"] + terms["con"] + 3.0 * terms["uni"])


def test_vit_depth_switch():
    assert len(SAN(tiny(vit_depth=3)).backbone.blocks) == 3


def test_eval_prediction_does_not_depend_on_batch_mates():
    torch.manual_seed(0)
    model = SAN(tiny())
    model.train()
    for _ in range(3):
        model.losses(torch.randn(4, 3, 32, 32))
    model.eval()
    a = torch.randn(1, 3, 32, 32)
    alone = model.predict(a)
    with_others = model.predict(torch.cat([a, torch.randn(5, 3, 32, 32)]))[:1]
    assert alone.shape == (1, 32, 32)
    assert torch.equal(alone, with_others)
    assert alone.min() >= 0 and alone.max() < 5


def test_eval_at_larger_resolution_interpolates_positions():
    model = SAN(tiny()).eval()
    assert model.predict(torch.randn(1, 3, 48, 64)).shape == (1, 48, 64)


def test_uniformity_loss_is_zero_for_orthogonal_and_positive_otherwise():
    eye = torch.eye(4, 8)
    assert uniformity_loss(eye).item() == pytest.approx(0.0, abs=1e-7)
    same = torch.ones(4, 8)
    # all cosines 1: the 12 off-diagonal entries of a 4x4 matrix are off by one
    assert uniformity_loss(same).item() == pytest.approx(12 / 16)


def test_alignment_loss_matches_explicit_formula():
    q = torch.randn(2, 8, 3, 5)
    gamma = torch.randn(2, 4, 8)
    rows = q.permute(0, 2, 3, 1).reshape(2, 15, 8)
    theta = torch.softmax(rows @ gamma.transpose(1, 2) / 8**0.5, -1) @ gamma
    assert alignment_loss(q, gamma).item() == pytest.approx(((theta - rows) ** 2).mean().item(), rel=1e-5)


def test_compiled_model_calls_the_triton_op_without_graph_breaks():
    """fullgraph=True fails on any graph break, so the SEAT custom ops must trace as single
    nodes inside the whole SAN loss (aot_eager on CPU keeps this fast; the interpreter runs
    the kernels)."""
    torch.manual_seed(0)
    eager = SAN(tiny(seat_impl="triton"))
    compiled_model = SAN(tiny(seat_impl="triton"))
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model.losses, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 32, 32)
    want, _, _ = eager.losses(x)
    got, _, _ = compiled(x)
    for key in ("rec", "con", "uni", "loss"):
        assert torch.allclose(got[key], want[key], rtol=1e-4, atol=1e-6), key
    got["loss"].backward()
    want["loss"].backward()
    for (name, p_got), p_want in zip(compiled_model.named_parameters(), eager.parameters()):
        assert torch.allclose(p_got.grad, p_want.grad, rtol=1e-3, atol=1e-6), name


# --- Table 4's generator backbones, the ViT's norm placement, RGB + IR -----------------------------


@pytest.mark.parametrize("generator", ["vit", "resnet18", "unet"])
def test_generator_backbones_give_tokens_on_the_patch_grid(generator):
    from san_fast.model.variants import build_generator_backbone

    cfg = tiny(generator=generator)
    backbone = build_generator_backbone(cfg, 4)
    tokens = backbone(torch.randn(2, 4, 32, 48))
    assert tokens.shape == (2, (32 // 8) * (48 // 8), 32) and torch.isfinite(tokens).all()
    with pytest.raises(ValueError, match="multiple of the patch size"):
        backbone(torch.randn(1, 4, 30, 32))


@pytest.mark.parametrize("generator", ["resnet18", "unet"])
def test_san_trains_with_a_cnn_generator(generator):
    model = SAN(tiny(generator=generator))
    assert type(model.backbone).__name__ == "ConvTokens"
    terms, _, _ = model.losses(torch.randn(2, 3, 32, 32))
    terms["loss"].backward()
    grads = [p.grad for p in model.backbone.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.set_attention_backend("math", torch.device("cpu")) == "none"  # a CNN has no attention
    assert model.eval().predict(torch.randn(1, 3, 48, 64)).shape == (1, 48, 64)


def _identity_sublayers(block):
    """Zero the attention and MLP outputs so only the norm placement remains."""
    for layer in (block.attn.proj, block.mlp[2]):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    return block


def test_pre_and_post_norm_blocks():
    from san_fast.model.vit import Block

    x = torch.randn(2, 5, 16) * 3 + 1
    pre = _identity_sublayers(Block(16, 2, norm="pre"))
    assert torch.equal(pre(x), x)  # x + f(LN(x)) with f = 0
    post = _identity_sublayers(Block(16, 2, norm="post"))
    ln = torch.nn.functional.layer_norm
    assert torch.allclose(post(x), ln(ln(x, (16,)), (16,)), atol=1e-6)  # LN(x + f(x)) twice
    with pytest.raises(ValueError, match="vit_norm='mid'"):
        Block(16, 2, norm="mid")


def test_post_norm_vit_has_no_final_norm_and_trains():
    model = SAN(tiny(vit_norm="post", vit_depth=2))
    assert isinstance(model.backbone.norm, torch.nn.Identity)
    assert all(not b.pre_norm for b in model.backbone.blocks)
    assert isinstance(SAN(tiny(vit_norm="pre")).backbone.norm, torch.nn.LayerNorm)
    terms, _, _ = model.losses(torch.randn(2, 3, 32, 32))
    terms["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.backbone.parameters())


def test_rgbir_model_takes_and_reconstructs_four_bands_through_the_c4_kernel_path():
    """Potsdam's RGB + IR: the encoders, the ViT's patch embedding and F_G have 4 channels, and
    the Triton SEAT op (interpreter on the CPU) agrees with the PyTorch reference at C=4."""
    torch.manual_seed(0)
    cfg = dict(dataset="potsdam", data_root="unused", num_semantics=5)
    reference = SAN(tiny(**cfg))
    kernel = SAN(tiny(seat_impl="triton", **cfg))
    kernel.load_state_dict(reference.state_dict())
    assert reference.recon.out_channels == 4 and reference.backbone.patch_embed.in_channels == 4
    assert reference.encoder.net[0].in_channels == 4
    x = torch.randn(2, 4, 32, 32)
    want, _, _ = reference.losses(x)
    got, _, _ = kernel.losses(x)
    for key in ("rec", "con", "loss"):
        assert torch.allclose(got[key], want[key], rtol=1e-4, atol=1e-6), key
    want["loss"].backward()
    got["loss"].backward()
    for (name, p_got), p_want in zip(kernel.named_parameters(), reference.parameters()):
        assert torch.allclose(p_got.grad, p_want.grad, rtol=1e-3, atol=1e-6), name
    assert SAN(tiny(dataset="potsdam", data_root="x", potsdam_bands="rgb")).recon.out_channels == 3


def test_the_attention_backend_is_chosen_for_the_models_own_shape_and_dtype(monkeypatch):
    from san_fast.model import san as san_module

    asked = []
    monkeypatch.setattr(san_module, "resolve_backend",
                        lambda name, device, shape=None, dtype=None: asked.append((name, shape, dtype)) or "math")
    model = SAN(tiny(vit_dim=48, vit_heads=3, batch_size=12))
    assert model.set_attention_backend("auto", torch.device("cpu")) == "math"
    assert model.backbone.blocks[0].attn.backend == "math"
    # (batch, tokens of a 32x32 crop in 8x8 patches, heads, head dim); no AMP: fp32
    assert asked[-1] == ("auto", (12, 16, 3, 16), torch.float32)
    model.set_attention_backend("auto", torch.device("cpu"), batch=4, dtype=torch.bfloat16, image_size=64)
    assert asked[-1] == ("auto", (4, 64, 3, 16), torch.bfloat16)

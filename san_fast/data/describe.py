"""What a run's scores depend on besides the weights, in one dict for metrics.json: the data and
its input bands, the training crop, the evaluation protocol, which images train, fit the
matching and are scored, the over-clustering rule, and the model variant (in words here, so
recording it does not import the model and its kernels)."""

from __future__ import annotations

from typing import Any

from san_fast.config import GENERATORS
from san_fast.data import dataset_module, input_channels
from san_fast.data.labels import IGNORE
from san_fast.data.splits import evaluation_plan
from san_fast.data.transforms import protocol_for, train_crop_step
from san_fast.metrics import describe_overcluster

_GENERATOR_WORDS = {
    "vit": "ViT-{depth} (width {width}, {heads} heads, patch {patch}, learned positions, no "
           "class token)",
    "resnet18": "ResNet-18 trunk (output stride 8, random init) pooled to the {patch}x{patch} "
                "patch grid, linear to width {width}, LayerNorm",
    "unet": "four-level UNet trunk (base width 32, random init) pooled to the {patch}x{patch} "
            "patch grid, linear to width {width}, LayerNorm",
}
_NORM_WORDS = {
    "pre": "pre-norm blocks, x + f(LN(x)), final LayerNorm (the ViT/timm placement)",
    "post": "post-norm blocks, LN(x + f(x)), no final LayerNorm (Vaswani et al. 2017, the "
            "transformer the paper names)",
}
_ENCODER_WORDS = {
    "conv3x3": "per-pixel perceptron: Conv3x3+BN+GELU, Conv1x1+BN (the paper's)",
    "resnet18": "ResNet-18 trunk at output stride 8, upsampled (Table 4)",
    "unet": "four-level UNet at full resolution (Table 4)",
}


def describe_architecture(cfg: Any) -> dict:
    """The model variant: Table 4's encoder and generator (san_fast.model.variants), ViT norm."""
    if cfg.generator not in GENERATORS:
        raise ValueError(f"generator={cfg.generator!r}: expected one of {', '.join(GENERATORS)}")
    words = _GENERATOR_WORDS[cfg.generator].format(
        depth=cfg.vit_depth, width=cfg.vit_width(), heads=cfg.vit_num_heads(), patch=cfg.patch_size)
    out = {"encoder": cfg.encoder, "encoder_words": _ENCODER_WORDS[cfg.encoder],
           "generator": cfg.generator, "generator_words": words, "embed_dim": cfg.embed_dim,
           "num_semantics": cfg.semantics()}
    if cfg.generator == "vit":
        out.update(vit_norm=cfg.vit_norm, vit_norm_words=_NORM_WORDS[cfg.vit_norm])
    return out


def _augment_words(cfg: Any) -> str:
    if not (cfg.color_jitter or cfg.color_drop):
        return "no colour augmentation"
    return (f"colour jitter {cfg.color_jitter:g} (brightness/contrast/saturation factors in "
            f"[1-s, 1+s], hue up to s of a turn, torchvision's semantics) and colour dropping "
            f"p={cfg.color_drop:g}, on whole batches on the device; an IR band is left untouched")


def evaluation_words(cfg: Any) -> dict:
    """The evaluation plan in words: which images train, fit the matching, are scored."""
    plan = evaluation_plan(cfg)
    module = dataset_module(cfg.dataset)

    def parts(names, training):
        return " + ".join(module.part_words(cfg, p, training) for p in names)

    return {"eval_split": plan.name, "follows": plan.follows,
            "trained_on": parts(plan.train, True),
            "matching_fitted_on": parts(plan.fit, False),
            "scored_on": parts(plan.score, False),
            "held_out_matching": plan.held_out}


def run_description(cfg: Any) -> dict:
    crop = train_crop_step(cfg)
    out = {"dataset": cfg.dataset, "input": dataset_module(cfg.dataset).input_words(cfg), "channels": input_channels(cfg),
           "train_crop": cfg.train_crop, "evaluation": evaluation_words(cfg),
           "overcluster": {"mode": cfg.overcluster, "rule": describe_overcluster(cfg.overcluster)},
           "model": describe_architecture(cfg), "ignore_label": IGNORE}
    if cfg.dataset == "synthetic":
        size = dataset_module("synthetic").image_size(cfg)
        out.update(protocol=None, note="generated images (san_fast.data.synthetic); evaluation "
                   f"on whole {size}x{size} scenes, no resizing",
                   train_transform=f"{crop.words()}; {_augment_words(cfg)}")
        return out
    proto = protocol_for(cfg.dataset, cfg.eval_protocol)
    size = proto.crop.size
    out.update(
        protocol=proto.name, follows=proto.follows,
        splits=dataset_module(cfg.dataset).describe_splits(cfg),
        eval_resize=proto.base_words(),
        eval_crop=(f"centre crop {size}x{size} ({proto.crop.rounding} offsets; padding 0 for "
                   "images, 255 for labels where an image is smaller)"),
        train_transform=f"{proto.base_words()}; {crop.words()}; {_augment_words(cfg)}",
        matching=("one cluster-to-class matching on the confusion matrix accumulated over all "
                  "of evaluation.matching_fitted_on, applied to evaluation.scored_on; pixel "
                  "accuracy and mIoU after matching"),
    )
    return out

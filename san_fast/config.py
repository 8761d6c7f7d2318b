"""The one configuration object of a run, its presets, and the command line that fills it."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Optional

DATASETS = ("synthetic", "coco27", "coco3", "coco15", "cityscapes", "potsdam", "potsdam3")
NUM_CLASSES = {
    "coco27": 27,
    "coco3": 3,
    "coco15": 15,
    "cityscapes": 27,
    "potsdam": 6,
    "potsdam3": 3,
}
ENCODERS = ("conv3x3", "resnet18", "unet")
ATTN_BACKENDS = ("auto", "xformers", "sdpa", "math")
SEAT_IMPLS = ("auto", "triton", "torch")
FOLD_BN = ("auto", "on", "off")
AMP_MODES = ("auto", "bf16", "fp16", "off")
EVAL_PROTOCOLS = ("picie", "iic")
TRAIN_CROPS = ("paper", "resized")
POTSDAM_BANDS = ("rgbir", "rgb")
EVAL_SPLITS = ("auto", "val", "train+val", "iid", "iid+")
OVERCLUSTER = ("hungarian-majority", "majority", "strict")
GENERATORS = ("vit", "resnet18", "unet")
VIT_NORMS = ("pre", "post")
LOGGERS = ("auto", "tensorboard", "none")
# torch.compile modes (--compile-mode); reduce-overhead replays the compiled step as CUDA graphs;
# auto is reduce-overhead on one CUDA device, default elsewhere (runtime.resolve_compile_mode).
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Sections config.json holds besides the Config fields: how the run was launched.
RUN_RECORD_KEYS = ("distributed",)


class ConfigError(ValueError):
    """A flag or config value out of its range: the message names the flag and what it expects."""


@dataclass
class Config:
    # data
    dataset: str = "synthetic"
    data_root: Optional[str] = None
    crop_size: int = 128
    eval_protocol: str = "picie"  # picie: short side 320 + centre crop 320; iic: see san_fast.data
    data_cache: Optional[str] = None  # `prepare --out` folder; default <data_root>/san_fast_cache
    train_crop_scale: tuple[float, float] = (0.5, 1.0)  # area range of the random resized crop
    # paper: random crop_size crops at the evaluation scale; resized: random resized crop
    train_crop: str = "paper"
    potsdam_bands: str = "rgbir"  # Potsdam input: RGB + IR (the paper, IIC) or RGB only
    # which images are scored and where the matching is fitted; auto = the dataset's default
    eval_split: str = "auto"
    overcluster: str = "hungarian-majority"  # how clusters beyond the class count are scored
    num_workers: int = 2
    color_jitter: float = 0.0  # per-image brightness/contrast/saturation/hue strength (training)
    color_drop: float = 0.0  # probability of turning a training image gray
    synthetic_classes: int = 6
    synthetic_train_size: int = 2000
    synthetic_val_size: int = 200
    synthetic_seed: int = 0
    synthetic_image_size: Optional[int] = None  # side of the generated scenes; None = crop_size

    # model (paper defaults)
    embed_dim: int = 1024  # P: length of pixel-wise and semantic embeddings
    num_semantics: Optional[int] = None  # N; None = the dataset's class count
    encoder: str = "conv3x3"
    generator: str = "vit"  # backbone of the semantic-wise generator (Table 4, "Dec.")
    # post: the paper's "simplest transformer mentioned in (Vaswani et al. 2017)", LN(x + f(x));
    # pre: the ViT/timm placement. Post is the default because it is the paper's architecture,
    # although on the synthetic set pre-norm scores higher (README, section The model).
    vit_norm: str = "post"
    vit_depth: int = 6
    vit_dim: Optional[int] = None  # None = P: the paper's blocks output (K, P) tokens
    vit_heads: Optional[int] = None  # None = vit_dim // 64
    patch_size: int = 8
    attn: str = "auto"
    seat_impl: str = "auto"
    # The encoder's last BatchNorm applied inside the SEAT kernels (Q never written): auto = when
    # the Triton implementation runs and the encoder ends in BatchNorm (kernels/seat_bn_fold.py).
    fold_bn: str = "auto"

    # ablations of the paper's Table 5 (all True = the full model)
    reconstruction: bool = True
    batch_wise: bool = True
    token_matcher: bool = True
    # consistency target of F_G(Theta): the image x (Eq. 9) or F_G(Q) (detached switch off)
    consistency_target: str = "image"
    uniformity_weight: float = 1.0

    # optimisation
    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.0
    seed: int = 0
    max_steps: Optional[int] = None  # cap on optimiser steps, for smoke runs
    eval_every: int = 1  # epochs between validations

    # runtime
    device: str = "auto"
    amp: str = "auto"
    compile: bool = False
    compile_mode: str = "auto"  # torch.compile mode, with compile
    channels_last: Optional[bool] = None  # None = on for CUDA
    out: str = "runs/latest"
    overwrite: bool = False  # reuse an --out folder that already holds a run
    save_every: Optional[int] = None  # also checkpoint every this many steps (mid-epoch)
    log_every: int = 50  # steps between reads of the loss terms to the host
    profile_steps: Optional[int] = None  # torch.profiler over this many steps after warm-up
    logger: str = "auto"  # auto: tensorboard when installed, else none
    resume: Optional[str] = None  # checkpoint.pt of an earlier run: continue after its last epoch
    num_vis: int = 6
    baseline: bool = True  # also fit and report the k-means-on-pixels baseline
    preset: Optional[str] = None

    def num_classes(self) -> int:
        if self.dataset == "synthetic":
            return self.synthetic_classes
        return NUM_CLASSES[self.dataset]

    def semantics(self) -> int:
        return self.num_classes() if self.num_semantics is None else self.num_semantics

    def vit_width(self) -> int:
        return self.embed_dim if self.vit_dim is None else self.vit_dim

    def vit_num_heads(self) -> int:
        return max(1, self.vit_width() // 64) if self.vit_heads is None else self.vit_heads

    def validate(self) -> "Config":
        """Every value checked before any work, each failure one line naming the flag."""
        from san_fast.config_checks import validate

        validate(self)
        return self

    def check_paths(self) -> "Config":
        """The run folder and checkpoint flags, against the file system (read-only)."""
        from san_fast.config_checks import check_paths

        check_paths(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# Presets are partial configs applied before the user's own flags. `cpu` is what
# `python train.py` uses with no arguments: small enough to train on 2 CPU cores in minutes.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(
        dataset="synthetic", crop_size=64, embed_dim=128, vit_dim=96, vit_heads=4, vit_depth=2,
        patch_size=8, epochs=6, batch_size=16, lr=1e-3, synthetic_train_size=1024,
        synthetic_val_size=128, num_workers=0,
    ),
    # The paper's setting (crops 128, P=1024, ViT-6, patch 8, Adam 1e-4, 30 epochs), per dataset.
    "paper": dict(crop_size=128, embed_dim=1024, vit_depth=6, patch_size=8, lr=1e-4, epochs=30,
                  batch_size=16),
}
DATASET_PRESETS: dict[str, dict[str, Any]] = {
    "coco27": dict(eval_protocol="picie"),
    "cityscapes": dict(eval_protocol="picie"),
    "coco3": dict(eval_protocol="iic"),
    "coco15": dict(eval_protocol="iic"),
    # The paper augments Potsdam "following IIC": IIC's jitter strengths (0.1) for brightness,
    # contrast, saturation and hue; the colour-dropping probability is ours (SimCLR's 0.2).
    "potsdam": dict(eval_protocol="iic", color_jitter=0.1, color_drop=0.2),
    "potsdam3": dict(eval_protocol="iic", color_jitter=0.1, color_drop=0.2),
}


def _bool_flag(parser: argparse.ArgumentParser, name: str, dest: str, help_on: str) -> None:
    parser.add_argument(f"--{name}", dest=dest, action="store_true", default=None, help=help_on)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (exit code 2) instead of the whole usage
    block, which for this many flags buries the message."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="train.py",
        description="Train and evaluate SAN (unsupervised semantic segmentation).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _data_flags(p)
    _model_flags(p)
    _run_flags(p)
    return p


def _data_flags(p: argparse.ArgumentParser) -> None:
    d = Config()
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="base settings: 'cpu' (default for synthetic data without a GPU), "
                        "'paper' (the paper's hyper-parameters; default for real datasets)")
    p.add_argument("--dataset", choices=DATASETS, default=None, help=f"(default {d.dataset})")
    p.add_argument("--data-root", default=None, help="folder holding the dataset (see README)")
    p.add_argument("--data-cache", default=None,
                   help="cache written by `python -m san_fast.data.prepare --out` "
                        "(default DATA_ROOT/san_fast_cache when present)")
    p.add_argument("--eval-protocol", choices=EVAL_PROTOCOLS, default=None,
                   help="picie: short side 320 + centre crop 320 (PiCIE/STEGO); iic: IIC's crops")
    p.add_argument("--crop-size", type=int, default=None)
    p.add_argument("--train-crop", choices=TRAIN_CROPS, default=None,
                   help="paper: random crops at the evaluation scale (the paper's 128x128 crops); "
                        "resized: random resized crop (area --train-crop-scale) plus flip")
    p.add_argument("--potsdam-bands", choices=POTSDAM_BANDS, default=None,
                   help="Potsdam input: rgbir (4 channels, the paper and IIC) or rgb")
    p.add_argument("--eval-split", choices=EVAL_SPLITS, default=None,
                   help="images scored and where the Hungarian matching is fitted (see README, Evaluation)")
    p.add_argument("--overcluster", choices=OVERCLUSTER, default=None,
                   help="scoring of clusters beyond the class count (see README, Evaluation)")
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--color-jitter", type=float, default=None,
                   help="training colour jitter strength, applied to whole batches on the device")
    p.add_argument("--color-drop", type=float, default=None, help="probability of a gray training image")
    p.add_argument("--synthetic-classes", type=int, default=None)
    p.add_argument("--synthetic-train-size", type=int, default=None)
    p.add_argument("--synthetic-val-size", type=int, default=None)
    p.add_argument("--synthetic-image-size", type=int, default=None,
                   help="side of the generated scenes (default: --crop-size); training crops them")


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embed-dim", type=int, default=None, help="P, embedding length (paper 1024)")
    p.add_argument("--num-semantics", type=int, default=None,
                   help="N semantic embeddings (default: the dataset's class count)")
    p.add_argument("--encoder", choices=ENCODERS, default=None, help="pixel-wise encoder (Table 4)")
    p.add_argument("--generator", choices=GENERATORS, default=None,
                   help="backbone of the semantic-wise generator (Table 4, 'Dec.')")
    p.add_argument("--vit-norm", choices=VIT_NORMS, default=None, help="pre- or post-norm ViT blocks")
    p.add_argument("--vit-depth", type=int, default=None, help="ViT blocks (Table 4: 4 or 6)")
    p.add_argument("--vit-dim", type=int, default=None)
    p.add_argument("--vit-heads", type=int, default=None)
    p.add_argument("--patch-size", type=int, default=None)
    p.add_argument("--attn", choices=ATTN_BACKENDS, default=None,
                   help="ViT attention backend (env SAN_ATTN overrides auto)")
    p.add_argument("--seat-impl", choices=SEAT_IMPLS, default=None,
                   help="SEAT + reconstruction op: Triton kernel or plain PyTorch")
    p.add_argument("--fold-bn", choices=FOLD_BN, default=None,
                   help="apply the encoder's last BatchNorm inside the SEAT kernels (auto: with the Triton op)")

    _bool_flag(p, "no-reconstruction", "no_reconstruction", "ablation: drop the image reconstruction task")
    _bool_flag(p, "no-batch-wise", "no_batch_wise", "ablation: per-image descriptors, no batch mean")
    _bool_flag(p, "no-token-matcher", "no_token_matcher", "ablation: p = 1, no token matcher")
    p.add_argument("--consistency-target", choices=("image", "rec_q"), default=None)
    p.add_argument("--uniformity-weight", type=float, default=None)


def _run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--weight-decay", type=float, default=None, help="Adam's L2 penalty")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--eval-every", type=int, default=None, help="epochs between validations")
    p.add_argument("--num-vis", type=int, default=None, help="validation images in predictions.png")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", choices=AMP_MODES, default=None,
                   help="auto: bf16 where supported, fp16+GradScaler on V100, off on CPU")
    _bool_flag(p, "compile", "compile", "torch.compile the training step")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default=None,
                   help="torch.compile mode with --compile; reduce-overhead replays the step as CUDA graphs, "
                        "cutting the host's launch work; auto: reduce-overhead on one CUDA device, default "
                        "elsewhere (default: auto)")
    p.add_argument("--channels-last", dest="channels_last", action=argparse.BooleanOptionalAction,
                   default=None, help="channels-last memory format (default: on for CUDA)")
    _bool_flag(p, "no-baseline", "no_baseline", "skip the k-means-on-pixels baseline")
    p.add_argument("--out", default=None, help="run folder for config, metrics, checkpoint, pictures")
    p.add_argument("--resume", default=None, help="continue training from a checkpoint.pt")
    _bool_flag(p, "overwrite", "overwrite", "start afresh in an --out folder that already holds a run")
    p.add_argument("--save-every", type=int, default=None, help="also checkpoint every this many steps")
    p.add_argument("--log-every", type=int, default=None, help="steps between loss reads to the host")
    p.add_argument("--profile-steps", type=int, default=None,
                   help="profile this many training steps right after warm-up (torch.profiler): per-step "
                        "host phases and GPU kernel time in metrics.json, a chrome trace in the run folder")
    p.add_argument("--logger", choices=LOGGERS, default=None,
                   help="auto: TensorBoard when the package is installed, else none")


def config_from_args(argv: Optional[list[str]] = None) -> Config:
    args = build_parser().parse_args(argv)
    return resolve(vars(args))


def resolve(flags: dict[str, Any], cuda_available: Optional[bool] = None) -> Config:
    """Default < preset < dataset preset < flags the user gave."""
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    flags = {k: v for k, v in flags.items() if v is not None}
    dataset = flags.get("dataset", Config.dataset)
    preset = flags.get("preset")
    if preset is None:
        preset = "cpu" if dataset == "synthetic" and not cuda_available else "paper"
    values: dict[str, Any] = {}
    values.update(PRESETS[preset])
    values.update(DATASET_PRESETS.get(dataset, {}))
    renames = {"no_reconstruction": "reconstruction", "no_batch_wise": "batch_wise",
               "no_token_matcher": "token_matcher", "no_baseline": "baseline"}
    for key, value in flags.items():
        if key in renames:
            values[renames[key]] = not value
        else:
            values[key] = value
    values["preset"] = preset
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown config keys: {sorted(unknown)}")
    cfg = Config(**values).validate()
    _check_dataset_flags(dataset, flags)
    return cfg.check_paths()


def _check_dataset_flags(dataset: str, flags: dict[str, Any]) -> None:
    """Flags that only mean something for another kind of data are refused, not ignored: a
    --data-root without --dataset would otherwise train on the synthetic set."""
    real_only = [k for k in ("data_root", "data_cache") if k in flags]
    if dataset == "synthetic" and real_only:
        names = ", ".join("--" + k.replace("_", "-") for k in real_only)
        raise ConfigError(f"{names} given for the synthetic dataset, which needs no files: add --dataset "
                          f"{'|'.join(d for d in DATASETS if d != 'synthetic')}, or drop {names}")
    synthetic_only = sorted(k for k in flags if k.startswith("synthetic_"))
    if dataset != "synthetic" and synthetic_only:
        names = ", ".join("--" + k.replace("_", "-") for k in synthetic_only)
        raise ConfigError(f"{names} only apply to --dataset synthetic, not {dataset}")
    if "potsdam_bands" in flags and not dataset.startswith("potsdam"):
        raise ConfigError(f"--potsdam-bands only applies to --dataset potsdam or potsdam3, not {dataset}")


def config_from_dict(values: dict[str, Any]) -> Config:
    """A Config from Config.to_dict() output (config.json, a checkpoint), validated."""
    values = {k: v for k, v in values.items() if k not in RUN_RECORD_KEYS}
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config fields {unknown} (written by another version of san_fast?)")
    values["train_crop_scale"] = tuple(values.get("train_crop_scale", Config.train_crop_scale))
    return Config(**values).validate()


def load_config(path: str) -> Config:
    with open(path) as f:
        return config_from_dict(json.load(f))

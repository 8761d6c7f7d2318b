"""A whole run: checks, data, model, training (san_fast/trainer.py), evaluation, the run folder.

Everything that can be refused is refused before any work and before anything is written:
flags (Config.validate), the batch split over ranks, the --resume checkpoint, the --out folder,
the dataset layout and every data file. Then rank 0 locks the run folder, and the run trains,
evaluates and writes its files (rank 0 only).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.utils.data import Dataset

from san_fast import ops
from san_fast.baseline import kmeans_pixel_baseline
from san_fast.checkpoint import check_compatible, load_checkpoint, load_model_state
from san_fast.config import Config, ConfigError
from san_fast.data import build_dataset
from san_fast.data._io import cache_root_of
from san_fast.data.labels import class_names
from san_fast.data.synthetic import class_names as synthetic_class_names
from san_fast.data.transforms import protocol_description
from san_fast.data.verify import verify_dataset
from san_fast.distributed import DistEnv, all_gather_objects, on_main, setup, teardown
from san_fast.evaluation import evaluate
from san_fast.io_utils import atomic_write_json, atomic_write_text
from san_fast.loader import train_loader, val_loader
from san_fast.metrics import UnsupervisedMetrics
from san_fast.model import SAN
from san_fast.model.sync_batchnorm import convert_batchnorm
from san_fast.run_folder import CONFIG, METRICS, RunFolder
from san_fast.runtime import Runtime, build_runtime, derive_seed, seed_everything
from san_fast.train_step import LossSums, TrainStep, build_optimizer, wrap_objective
from san_fast.trainer import Trainer, config_json
from san_fast.viz import save_loss_curve, save_prediction_grid

DEVICE_AUGMENT_STREAM = 2  # derive_seed purpose tag: each rank's on-device colour augmentation


def run(cfg: Config) -> dict:
    """Train SAN as configured, evaluate it and the k-means baseline, write the run folder.
    Under torchrun every process calls this; rank 0 writes the files."""
    cfg.validate().check_paths()
    env = setup(cfg)
    try:
        return _run(cfg, env)
    finally:
        teardown(env)


def _run(cfg: Config, env: DistEnv) -> dict:
    runtime = build_runtime(cfg, env.device)
    ops.check_impl(cfg.seat_impl, runtime.device)  # fail before any work is done
    resume = _resume_state(cfg) if cfg.resume else None
    folder = RunFolder(cfg.out, cfg.resume, cfg.overwrite)
    folder.check()
    train_set, val_set = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    _check_split_size(cfg, env, train_set)
    for split, dataset in (("train", train_set), ("val", val_set)):
        verify_dataset(dataset, split, cache_root_of(cfg) if cfg.data_root else None, cfg.num_workers,
                       env.is_main, env.rank, env.world_size, lambda obj: all_gather_objects(obj, env))
    on_main(folder.acquire, env)
    try:
        return _train(cfg, env, runtime, folder, train_set, val_set, resume)
    finally:
        folder.release()


def _resume_state(cfg: Config) -> dict:
    state = load_checkpoint(cfg.resume, map_location="cpu")
    check_compatible(cfg, state, cfg.resume)
    return state


def _check_split_size(cfg: Config, env: DistEnv, train_set: Dataset) -> None:
    per_rank = cfg.batch_size // env.world_size
    if len(train_set) // env.world_size < per_rank:
        raise ConfigError(f"the training split has {len(train_set)} images, fewer than one global batch "
                          f"(--batch-size {cfg.batch_size}): lower --batch-size")


def build_model(cfg: Config, runtime: Runtime, env: DistEnv) -> tuple[SAN, str]:
    """SAN on the device (same initial weights on every rank), and its attention backend."""
    seed_everything(cfg.seed)
    model = SAN(cfg).to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    backend = model.set_attention_backend(cfg.attn, runtime.device)
    if env.enabled:
        convert_batchnorm(model, runtime.device)
    return model, backend


def _train(cfg: Config, env: DistEnv, runtime: Runtime, folder: RunFolder, train_set: Dataset,
           val_set: Dataset, resume: Optional[dict]) -> dict:
    model, backend = build_model(cfg, runtime, env)
    if resume is not None:
        load_model_state(model, resume, cfg.resume)
    optimizer = build_optimizer(model, cfg, announce=env.is_main)
    # Each rank's own reproducible stream for the on-device colour augmentation.
    torch.manual_seed(derive_seed(cfg.seed, DEVICE_AUGMENT_STREAM, env.rank))
    step = TrainStep(wrap_objective(model, cfg, env), model, optimizer, runtime, cfg, env,
                     LossSums(runtime.device))
    vals = val_loader(cfg, val_set, env, runtime)
    num_classes = cfg.num_classes()

    def score(num_vis: int, desc: str) -> tuple[dict, dict]:
        metrics = UnsupervisedMetrics(cfg.semantics(), num_classes)
        return evaluate(model, vals, runtime, metrics, env, num_vis=num_vis, desc=desc)

    record = env.record(cfg.batch_size)
    trainer = Trainer(cfg, env, step, train_loader(cfg, train_set, env, runtime), folder, score, record)
    if resume is not None:
        trainer.restore(resume, cfg.resume)
    on_main(lambda: atomic_write_text(folder.file(CONFIG), config_json(cfg, record)), env)
    if env.is_main:
        print(_banner(cfg, env, runtime, model, backend, optimizer, len(train_set), len(val_set)))
    scores, shown, history = trainer.fit()
    train = {"steps": trainer.progress.step, **trainer.clock.summary(trainer.images),
             "device": str(runtime.device), "amp": str(runtime.amp_dtype or "off"), "attention": backend,
             "compile": cfg.compile, "optimizer": "adam-fused" if step.fused else "adam-foreach",
             "distributed": record}
    result = {"dataset": cfg.dataset, "num_classes": num_classes, "num_semantics": cfg.semantics(),
              "protocol": protocol_description(cfg), "san": scores, "train": train,
              "class_names": _class_names(cfg), "history": history}
    if env.is_main:
        _report(cfg, folder, result, shown, train_set, val_set)
    return result


def _banner(cfg: Config, env: DistEnv, runtime: Runtime, model: SAN, backend: str, optimizer, n_train: int,
            n_val: int) -> str:
    params = sum(p.numel() for p in model.parameters())
    fused = "fused" if optimizer.defaults.get("fused") else "foreach"
    procs = (f"{env.world_size} processes ({env.backend}), {cfg.batch_size // env.world_size} images each"
             if env.enabled else "1 process")
    return (f"san_fast: {cfg.dataset} ({n_train} train / {n_val} val images, {cfg.num_classes()} classes) | "
            f"SAN {params / 1e6:.2f}M params, P={cfg.embed_dim}, N={cfg.semantics()}, encoder {cfg.encoder}, "
            f"ViT-{cfg.vit_depth} | device {runtime.device}, amp {runtime.amp_dtype or 'off'}, attention "
            f"{backend}, SEAT {ops.resolve_impl(cfg.seat_impl, runtime.device)}, compile {cfg.compile}, "
            f"Adam {fused} | {procs} | run folder {cfg.out}")


def _class_names(cfg: Config) -> list[str]:
    names = class_names(cfg.dataset)
    return list(names) if names is not None else synthetic_class_names(cfg.num_classes())


def _report(cfg: Config, folder: RunFolder, result: dict, shown: dict, train_set: Dataset,
            val_set: Dataset) -> None:
    """Rank 0: the baseline, metrics.json, the pictures, the table."""
    if cfg.baseline:
        result["baseline"] = kmeans_pixel_baseline(train_set, val_set, cfg.semantics(),
                                                   num_classes=result["num_classes"], seed=cfg.seed)
    atomic_write_json(folder.file(METRICS), result)
    if shown:
        save_prediction_grid(folder.file("predictions.png"), shown["images"], shown["targets"], shown["preds"],
                             class_names=result["class_names"], assignment=result["san"]["assignment"])
    history = result["history"]
    save_loss_curve(folder.file("curves.png"), {k: v for k, v in history.items() if k != "clusters_used"},
                    xlabel="epoch")
    print(summary_table(result))
    print("wrote " + ", ".join(str(folder.file(n)) for n in
                               (CONFIG, METRICS, "checkpoint.pt", "predictions.png", "curves.png")))


def summary_table(result: dict[str, Any]) -> str:
    rows = [("SAN", result["san"])]
    if "baseline" in result:
        rows.append(("k-means on pixels", result["baseline"]))
    lines = [f"{'method':<20} {'pixel acc':>9} {'mIoU':>7} {'clusters used':>14}"]
    for name, s in rows:
        lines.append(f"{name:<20} {s['acc']:>9.4f} {s['miou']:>7.4f} {s['clusters_used']:>14}")
    return "\n".join(lines)

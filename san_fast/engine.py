"""A whole run: checks, data, model, training (san_fast/trainer.py), evaluation, the run folder.

Everything that can be refused is refused before any work and before anything is written:
flags (Config.validate), the logger, the batch split over ranks, the --resume checkpoint, the
--out folder, the dataset layout, the evaluation plan and every data file. Then rank 0 locks the
run folder, and the run trains, evaluates and writes its files (rank 0 only).

Evaluation: every --eval-every epochs the model is validated on the val split (matching fitted
there), which is what the progress line, the history and TensorBoard show. The run's final
scores follow the evaluation plan of --eval-split (san_fast.data.splits): where the plan is the
val split, the last validation is the final evaluation; otherwise (IIC's IID and IID+, PiCIE's
Cityscapes train+val) the model is scored once more at the end on the plan's images, and the
k-means baseline is scored the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.data import Dataset

from san_fast import ops
from san_fast.baseline import kmeans_pixel_baseline
from san_fast.checkpoint import check_compatible, load_checkpoint, load_model_state
from san_fast.config import Config, ConfigError
from san_fast.data import build_dataset, build_eval_datasets
from san_fast.data._io import cache_root_of
from san_fast.data.splits import EvalPlan
from san_fast.data.transforms import protocol_description
from san_fast.data.verify import verify_dataset
from san_fast.distributed import DistEnv, all_gather_objects, on_main, setup, teardown
from san_fast.evaluation import evaluate, evaluate_plan
from san_fast.io_utils import atomic_write_json, atomic_write_text
from san_fast.loader import train_loader, val_loader
from san_fast.logger import check_logger, resolve_logger
from san_fast.metrics import UnsupervisedMetrics
from san_fast.model import SAN
from san_fast.model.sync_batchnorm import convert_batchnorm
from san_fast.report import class_names_of, prediction_panels, summary_table, write_figures
from san_fast.run_folder import CHECKPOINT, CONFIG, METRICS, TENSORBOARD, RunFolder
from san_fast.runtime import Runtime, build_runtime, derive_seed, seed_everything
from san_fast.train_step import LossSums, TrainStep, build_optimizer, cudagraph_skips, wrap_objective
from san_fast.trainer import Trainer, config_json
from san_fast.viz import save_loss_curve

DEVICE_AUGMENT_STREAM = 2  # derive_seed purpose tag: each rank's on-device colour augmentation


@dataclass
class RunData:
    train: Dataset  # training crops
    val: Dataset  # the val split, validated every --eval-every epochs
    plan: EvalPlan  # the final evaluation: the matching fitted on `fit`, applied to `score`
    fit: Dataset
    score: Dataset

    @property
    def plan_is_val(self) -> bool:
        """The plan fits and scores the val split: the last validation is the final evaluation."""
        return self.plan.fit == self.plan.score == ("val",)


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
    runtime = build_runtime(cfg, env.device, distributed=env.enabled)
    ops.check_impl(cfg.seat_impl, runtime.device, cfg.semantics())  # fail before any work is done
    check_logger(cfg.logger)
    resume = _resume_state(cfg) if cfg.resume else None
    folder = RunFolder(cfg.out, cfg.resume, cfg.overwrite, resume["config"] if resume is not None else None)
    folder.check()
    on_main(folder.check_not_in_use, env)
    plan, fit_set, score_set = build_eval_datasets(cfg)
    data = RunData(build_dataset(cfg, "train"), build_dataset(cfg, "val"), plan, fit_set, score_set)
    _check_split_size(cfg, env, data.train)
    # The plan's fit and score images are files of these two (the labelled ones of each part).
    for split, dataset in (("train", data.train), ("val", data.val)):
        verify_dataset(dataset, split, cache_root_of(cfg) if cfg.data_root else None, cfg.num_workers,
                       env.is_main, env.rank, env.world_size, lambda obj: all_gather_objects(obj, env))
    on_main(folder.acquire, env)
    try:
        return _train(cfg, env, runtime, folder, data, resume)
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
    backend = model.set_attention_backend(cfg.attn, runtime.device, batch=cfg.batch_size // env.world_size,
                                          dtype=runtime.amp_dtype)
    if env.enabled:
        convert_batchnorm(model, runtime.device)
    return model, backend


def _train(cfg: Config, env: DistEnv, runtime: Runtime, folder: RunFolder, data: RunData,
           resume: Optional[dict]) -> dict:
    model, backend = build_model(cfg, runtime, env)
    if resume is not None:
        load_model_state(model, resume, cfg.resume)
    optimizer = build_optimizer(model, cfg, announce=env.is_main)
    # Each rank's own reproducible stream for the on-device colour augmentation.
    torch.manual_seed(derive_seed(cfg.seed, DEVICE_AUGMENT_STREAM, env.rank))
    step = TrainStep(wrap_objective(model, cfg, env, runtime), model, optimizer, runtime, cfg, env,
                     LossSums(runtime.device))
    vals = val_loader(cfg, data.val, env, runtime)
    num_classes, names = cfg.num_classes(), class_names_of(cfg)

    def new_metrics() -> UnsupervisedMetrics:
        return UnsupervisedMetrics(cfg.semantics(), num_classes, overcluster=cfg.overcluster)

    def score(num_vis: int, desc: str) -> tuple[dict, dict]:
        return evaluate(model, vals, runtime, new_metrics(), env, num_vis=num_vis, desc=desc)

    record = env.record(cfg.batch_size)
    # A resumed run logs again from the step after its checkpoint: later events are hidden.
    purge = int(resume["progress"]["step"]) + 1 if resume is not None else None
    logger = resolve_logger(cfg.logger if env.is_main else "none", cfg.out, purge_step=purge)
    trainer = Trainer(cfg, env, step, train_loader(cfg, data.train, env, runtime), folder, score, record,
                      logger=logger, panels=prediction_panels(names))
    if resume is not None:
        trainer.restore(resume, cfg.resume)
    on_main(lambda: _write_config(folder, cfg, record), env)
    if env.is_main:
        print(_banner(cfg, env, runtime, model, backend, optimizer, data))
    with logger:
        scores, shown, history = trainer.fit()
        if not data.plan_is_val:
            scores, shown = evaluate_plan(model, data.plan, val_loader(cfg, data.fit, env, runtime),
                                          val_loader(cfg, data.score, env, runtime), runtime, new_metrics, env,
                                          num_vis=cfg.num_vis)
    skips = cudagraph_skips(runtime)
    if skips and env.is_main:
        print(f"san_fast: compile mode reduce-overhead ran {skips} compiled graph(s) without CUDA graphs "
              "(their launches were issued one by one); TORCH_LOGS=cudagraphs prints why")
    train = {"steps": trainer.progress.step, **trainer.clock.summary(trainer.images),
             "device": str(runtime.device), "amp": str(runtime.amp_dtype or "off"), "attention": backend,
             "compile": cfg.compile, "compile_mode": runtime.compile_mode,
             "cudagraph_skips": skips,
             "optimizer": "adam-fused" if step.fused else "adam-foreach",
             "distributed": record, "profile": trainer.profiler.result}
    profiled = trainer.profiler.line()
    if profiled and env.is_main:
        print(f"san_fast: {profiled}")
    result = {"dataset": cfg.dataset, "num_classes": num_classes, "num_semantics": cfg.semantics(),
              "protocol": protocol_description(cfg), "san": scores, "train": train,
              "class_names": names, "history": history}
    if env.is_main:
        _report(cfg, folder, result, shown, data, logger.enabled)
    return result


def _write_config(folder: RunFolder, cfg: Config, record: dict) -> None:
    """config.json at the start of a run. A folder holding a checkpoint (a resumed run) keeps the
    config.json written with it until the next checkpoint rewrites both: a changed run-control
    flag (--epochs, ...) would otherwise make the two differ."""
    if not folder.file(CHECKPOINT).exists():
        atomic_write_text(folder.file(CONFIG), config_json(cfg, record))


def _banner(cfg: Config, env: DistEnv, runtime: Runtime, model: SAN, backend: str, optimizer,
            data: RunData) -> str:
    params = sum(p.numel() for p in model.parameters())
    fused = "fused" if optimizer.defaults.get("fused") else "foreach"
    procs = (f"{env.world_size} processes ({env.backend}), {cfg.batch_size // env.world_size} images each"
             if env.enabled else "1 process")
    scoring = ("" if data.plan_is_val else
               f", final scores: {data.plan.name} ({len(data.fit)} images fit the matching"
               + (f", {len(data.score)} scored)" if data.plan.held_out else ", the same scored)"))
    return (f"san_fast: {cfg.dataset} ({len(data.train)} train / {len(data.val)} val images{scoring}, "
            f"{cfg.num_classes()} classes) | "
            f"SAN {params / 1e6:.2f}M params, P={cfg.embed_dim}, N={cfg.semantics()}, encoder {cfg.encoder}, "
            f"generator {cfg.generator}{f'-{cfg.vit_depth}' if cfg.generator == 'vit' else ''} | device "
            f"{runtime.device}, amp {runtime.amp_dtype or 'off'}, attention "
            f"{backend}, SEAT {ops.resolve_impl(cfg.seat_impl, runtime.device, cfg.semantics())}, "
            f"compile {runtime.compile_mode or 'off'}, "
            f"Adam {fused} | {procs} | run folder {cfg.out}")


def _report(cfg: Config, folder: RunFolder, result: dict, shown: dict, data: RunData, logged: bool) -> None:
    """Rank 0: the baseline (scored like the model), metrics.json, the pictures, the table."""
    if cfg.baseline:
        result["baseline"] = kmeans_pixel_baseline(
            data.train, data.fit, cfg.semantics(), num_classes=result["num_classes"], seed=cfg.seed,
            overcluster=cfg.overcluster, score_dataset=data.score if data.plan.held_out else None,
            num_workers=cfg.num_workers, progress=True)
    atomic_write_json(folder.file(METRICS), result)
    written = [folder.file(n) for n in (CONFIG, METRICS, CHECKPOINT)]
    written += write_figures(folder.path, result["san"], shown, result["class_names"])
    history = result["history"]
    curves = {k: v for k, v in history.items() if k not in ("clusters_used", "val_epoch")}
    epochs = history.get("val_epoch", [])
    x = {k: epochs for k in ("val_acc", "val_miou") if len(history.get(k, [])) == len(epochs)}
    save_loss_curve(folder.file("curves.png"), curves, xlabel="epoch", x=x)
    written.append(folder.file("curves.png"))
    if logged:
        written.append(folder.file(TENSORBOARD))
    print(summary_table(result))
    print("wrote " + ", ".join(str(p) for p in written))

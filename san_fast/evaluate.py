"""Score a trained SAN on a dataset, under any evaluation protocol, split and over-clustering rule.

    python -m san_fast.evaluate --checkpoint runs/latest/checkpoint.pt --out runs/latest/eval
    torchrun --nproc_per_node K -m san_fast.evaluate --checkpoint PATH --dataset coco3 \
        --data-root DIR --eval-split iid+ --out DIR

The model is rebuilt from the config inside the checkpoint (loaded with weights_only=True);
only what may differ from training is taken from the flags: where the data is, which dataset
(one with as many classes as the model has clusters or fewer, and the input bands it was trained
on), the protocol, evaluation split and over-clustering rule, and how to run (device, batch,
workers). The matching is fitted and applied as the split's plan says (san_fast.data.splits),
with the code training uses, so on the run's own settings it reproduces the run's final scores.

Writes metrics.json (the layout of a training run's: ``san`` with the ``assignment``, and
``class_names``, so ``python -m san_fast.predict --assignment`` reads it), predictions.png and
confusion.png into --out, and prints the per-class IoU table. Exit code 2 with one line for any
bad input.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Optional

from san_fast.api import model_from_checkpoint
from san_fast.checkpoint import config_from_checkpoint, load_checkpoint
from san_fast.config import (DATASET_PRESETS, DATASETS, EVAL_PROTOCOLS, EVAL_SPLITS, OVERCLUSTER, Config,
                             ConfigError, OneLineErrorParser)
from san_fast.data import build_eval_datasets, input_channels
from san_fast.data.transforms import protocol_description
from san_fast.distributed import DistEnv, on_main, setup, teardown
from san_fast.evaluation import evaluate_plan
from san_fast.io_utils import atomic_write_json
from san_fast.loader import val_loader
from san_fast.metrics import UnsupervisedMetrics
from san_fast.report import EXPECTED, class_names_of, iou_table, print_error, write_figures
from san_fast.run_folder import CHECKPOINT, METRICS
from san_fast.runtime import build_runtime

PROG = "python -m san_fast.evaluate"


def build_parser() -> OneLineErrorParser:
    p = OneLineErrorParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt of a training run")
    p.add_argument("--out", required=True, help="folder for metrics.json, predictions.png, confusion.png")
    p.add_argument("--dataset", choices=DATASETS, default=None, help="default: the training run's")
    p.add_argument("--data-root", default=None, help="default: the training run's")
    p.add_argument("--data-cache", default=None, help="default: the training run's (or DATA_ROOT's cache)")
    p.add_argument("--eval-protocol", choices=EVAL_PROTOCOLS, default=None,
                   help="default: the training run's (the dataset's own for another --dataset)")
    p.add_argument("--eval-split", choices=EVAL_SPLITS, default=None,
                   help="default: the training run's (auto for another --dataset)")
    p.add_argument("--overcluster", choices=OVERCLUSTER, default=None, help="default: the training run's")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per forward pass over all processes (default: the training run's)")
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader worker processes")
    p.add_argument("--num-vis", type=int, default=6, help="images in predictions.png")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in --out")
    return p


def eval_config(saved: Config, args) -> Config:
    """The training run's config with what may differ for this evaluation; refuses a dataset the
    model cannot be scored on (more classes than clusters, other input bands)."""
    changes = {"out": args.out, "resume": None, "overwrite": False, "device": args.device,
               "num_vis": args.num_vis}
    if args.dataset is not None and args.dataset != saved.dataset:
        # Another dataset brings its own protocol and default split, unless the flags say.
        changes.update(dataset=args.dataset, eval_split="auto",
                       eval_protocol=DATASET_PRESETS.get(args.dataset, {}).get("eval_protocol", Config.eval_protocol))
        if args.data_root is None:
            changes["data_cache"] = None
    for name in ("data_root", "data_cache", "eval_protocol", "eval_split", "overcluster", "batch_size",
                 "num_workers"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    cfg = dataclasses.replace(saved, **changes).validate()
    clusters, classes = saved.semantics(), cfg.num_classes()
    if classes > clusters:
        raise ConfigError(f"--dataset {cfg.dataset} has {classes} classes but the model has {clusters} clusters "
                          f"(trained on {saved.dataset}): the matching needs at least one cluster per class")
    if input_channels(cfg) != input_channels(saved):
        raise ConfigError(f"--dataset {cfg.dataset} gives {input_channels(cfg)}-channel images but the model "
                          f"takes {input_channels(saved)} (trained on {saved.dataset})")
    return cfg


def check_out(out: str, overwrite: bool) -> None:
    """--out must not be a file, a training run's folder, or an earlier evaluation (unless
    --overwrite): its metrics.json would be replaced."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {out} is an existing file: expected a folder")
    if (path / CHECKPOINT).exists():
        raise ConfigError(f"--out {out} holds a training run ({CHECKPOINT}), whose {METRICS} this would "
                          "replace: choose another folder, e.g. --out " + str(path / "eval"))
    if (path / METRICS).exists() and not overwrite:
        raise ConfigError(f"--out {out} already holds {METRICS}: pass --overwrite to replace it, or another --out")


def evaluate_checkpoint(checkpoint: str, cfg: Config, state: dict, env: DistEnv) -> tuple[dict, dict]:
    """(metrics.json's content, the images shown) of the checkpoint's model under `cfg`'s plan."""
    runtime = build_runtime(cfg, env.device)
    plan, fit, score = build_eval_datasets(cfg)
    model = model_from_checkpoint(state, checkpoint, runtime.device, batch=cfg.batch_size // env.world_size)
    num_classes = cfg.num_classes()

    def new_metrics() -> UnsupervisedMetrics:
        return UnsupervisedMetrics(model.num_semantics, num_classes, overcluster=cfg.overcluster)

    tic = time.perf_counter()
    scores, shown = evaluate_plan(model, plan, val_loader(cfg, fit, env, runtime), val_loader(cfg, score, env, runtime),
                                  runtime, new_metrics, env, num_vis=cfg.num_vis)
    progress = state.get("progress", {})
    result = {"checkpoint": str(checkpoint), "dataset": cfg.dataset, "num_classes": num_classes,
              "num_semantics": model.num_semantics, "protocol": protocol_description(cfg), "san": scores,
              "class_names": class_names_of(cfg),
              "trained": {"dataset": config_from_checkpoint(state).dataset, "steps": progress.get("step")},
              "evaluation": {"seconds": round(time.perf_counter() - tic, 2), "device": str(runtime.device),
                             "amp": str(runtime.amp_dtype or "off"), "images_fitted": len(fit),
                             "images_scored": len(score), "distributed": env.record(cfg.batch_size)}}
    return result, shown


def run(args) -> dict:
    state = load_checkpoint(args.checkpoint, map_location="cpu")
    cfg = eval_config(config_from_checkpoint(state), args)
    check_out(args.out, args.overwrite)
    env = setup(cfg)
    try:
        result, shown = evaluate_checkpoint(args.checkpoint, cfg, state, env)
        on_main(lambda: _write(Path(args.out), result, shown), env)
    finally:
        teardown(env)
    return result


def _write(out: Path, result: dict, shown: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / METRICS, result)
    written = [out / METRICS] + write_figures(out, result["san"], shown, result["class_names"])
    evaluation = result["protocol"]["evaluation"]
    print(f"{result['dataset']}, {evaluation['eval_split']}: matching fitted on "
          f"{evaluation['matching_fitted_on']}; scored on {evaluation['scored_on']}; "
          f"over-clustering {result['protocol']['overcluster']['mode']}")
    print(iou_table(result["san"], result["class_names"]))
    print("wrote " + ", ".join(str(p) for p in written))


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except EXPECTED as exc:
        return print_error(PROG, exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())

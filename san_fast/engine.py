"""The whole training run: data, model, optimisation, evaluation, and the files a run leaves."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from san_fast import ops
from san_fast.baseline import kmeans_pixel_baseline
from san_fast.config import Config
from san_fast.data import build_dataset
from san_fast.data.labels import class_names
from san_fast.data.synthetic import class_names as synthetic_class_names
from san_fast.data.transforms import protocol_description
from san_fast.io_utils import atomic_torch_save, atomic_write_json, atomic_write_text
from san_fast.metrics import UnsupervisedMetrics
from san_fast.model import SAN
from san_fast.runtime import Runtime, build_runtime, seed_everything
from san_fast.viz import save_loss_curve, save_prediction_grid


def make_loader(cfg: Config, dataset: Dataset, train: bool, runtime: Runtime) -> DataLoader:
    generator = torch.Generator().manual_seed(cfg.seed)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=train,
        # A ragged last batch would skew the batch-wise descriptor and BatchNorm statistics.
        drop_last=train and len(dataset) >= cfg.batch_size,
        num_workers=cfg.num_workers,
        pin_memory=runtime.device.type == "cuda",
        persistent_workers=cfg.num_workers > 0,
        generator=generator,
    )


@torch.no_grad()
def evaluate(model: SAN, loader: DataLoader, runtime: Runtime, num_classes: int,
             num_vis: int = 0, desc: str = "eval") -> tuple[dict, dict]:
    """Hungarian-matched scores over the whole loader, and a few (image, label, pred) to show."""
    was_training = model.training
    model.eval()
    metrics = UnsupervisedMetrics(model.num_semantics, num_classes)
    shown: dict[str, list[torch.Tensor]] = {"images": [], "targets": [], "preds": []}
    count = 0
    for images, targets in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        with runtime.autocast():
            pred = model.predict(runtime.prepare(images))
        metrics.update(pred, targets.to(runtime.device, non_blocking=True))
        if count < num_vis:
            take = min(num_vis - count, images.shape[0])
            shown["images"].append(images[:take].cpu())
            shown["targets"].append(targets[:take].cpu())
            shown["preds"].append(pred[:take].cpu())
            count += take
    model.train(was_training)
    return metrics.compute(), {k: torch.cat(v) for k, v in shown.items() if v}


def _log_line(epoch: int, means: dict[str, float], scores: Optional[dict]) -> str:
    parts = [f"epoch {epoch}"] + [f"{k} {v:.4f}" for k, v in means.items()]
    if scores is not None:
        parts += [f"val acc {scores['acc']:.4f}", f"mIoU {scores['miou']:.4f}",
                  f"clusters used {scores['clusters_used']}"]
    return " | ".join(parts)


def run(cfg: Config) -> dict:
    """Train SAN as configured, evaluate it and the k-means baseline, write the run folder."""
    seed_everything(cfg.seed)
    runtime = build_runtime(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", cfg.to_json())

    train_set, val_set = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    train_loader = make_loader(cfg, train_set, True, runtime)
    val_loader = make_loader(cfg, val_set, False, runtime)
    num_classes = cfg.num_classes()

    seat_impl = ops.check_impl(cfg.seat_impl, runtime.device)  # fail before any work is done
    model = SAN(cfg).to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    backend = model.set_attention_backend(cfg.attn, runtime.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = torch.compile(model.losses) if cfg.compile else model.losses
    params = sum(p.numel() for p in model.parameters())
    print(f"san_fast: {cfg.dataset} ({len(train_set)} train / {len(val_set)} val images, "
          f"{num_classes} classes) | SAN {params / 1e6:.2f}M params, P={cfg.embed_dim}, "
          f"N={cfg.semantics()}, encoder {cfg.encoder}, ViT-{cfg.vit_depth} | device {runtime.device}, "
          f"amp {runtime.amp_dtype or 'off'}, attention {backend}, SEAT {seat_impl}, "
          f"compile {cfg.compile} | run folder {out}")

    steps_per_epoch = len(train_loader)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    epochs = math.ceil(total_steps / max(steps_per_epoch, 1))
    history: dict[str, list[float]] = {}
    step, images_seen, train_time, scores, first_epoch = 0, 0, 0.0, None, 1
    if cfg.resume:
        state = torch.load(cfg.resume, map_location=runtime.device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, history, first_epoch = state["step"], state["history"], state["epoch"] + 1
        print(f"resumed from {cfg.resume}: epoch {state['epoch']}, step {step}")
    model.train()
    for epoch in range(first_epoch, epochs + 1):
        sums: dict[str, float] = {}
        seen = 0
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{epochs}", dynamic_ncols=True,
                   total=min(steps_per_epoch, total_steps - step))
        tic = time.perf_counter()
        for images, _ in bar:
            x = runtime.prepare(images, cfg.color_jitter, cfg.color_drop)
            with runtime.autocast():
                terms, q, gamma = loss_fn(x)
            optimizer.zero_grad(set_to_none=True)
            if runtime.scaler is not None:
                runtime.scaler.scale(terms["loss"]).backward()
                runtime.scaler.step(optimizer)
                runtime.scaler.update()
            else:
                terms["loss"].backward()
                optimizer.step()
            step += 1
            seen += 1
            images_seen += images.shape[0]
            values = {k: float(v.detach()) for k, v in terms.items()}
            if not all(math.isfinite(v) for v in values.values()):
                raise FloatingPointError(f"non-finite loss at step {step}: {values}")
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            if step % 10 == 1 or seen == 1:
                # Collapse indicator: how many of the N semantics win at least one pixel.
                labels = ops.seat_labels(q.detach(), gamma.detach(), impl=cfg.seat_impl)
                used = int(torch.unique(labels).numel())
                history.setdefault("clusters_used", []).append(used)
            # Q is as large as the op's input: drop it now, not when the next step rebinds it.
            del q, gamma
            bar.set_postfix(loss=f"{values['loss']:.4f}", used=f"{used}/{cfg.semantics()}")
            if step >= total_steps:
                break
        if runtime.device.type == "cuda":
            torch.cuda.synchronize(runtime.device)
        train_time += time.perf_counter() - tic
        means = {k: v / max(seen, 1) for k, v in sums.items()}
        for k, v in means.items():
            history.setdefault(k, []).append(v)
        last = epoch == epochs
        scores = None
        if last or epoch % cfg.eval_every == 0:
            scores, _ = evaluate(model, val_loader, runtime, num_classes, desc=f"eval epoch {epoch}")
            history.setdefault("val_acc", []).append(scores["acc"])
            history.setdefault("val_miou", []).append(scores["miou"])
        tqdm.write(_log_line(epoch, means, scores))
        atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "epoch": epoch, "step": step, "config": cfg.to_dict(), "history": history},
                          out / "checkpoint.pt")

    scores, shown = evaluate(model, val_loader, runtime, num_classes, num_vis=cfg.num_vis, desc="final eval")
    names = class_names(cfg.dataset)
    names = list(names) if names is not None else synthetic_class_names(num_classes)
    result = {
        "dataset": cfg.dataset,
        "num_classes": num_classes,
        "num_semantics": cfg.semantics(),
        "protocol": protocol_description(cfg),
        "san": scores,
        "train": {"steps": step, "seconds": round(train_time, 2),
                  "images_per_second": round(images_seen / max(train_time, 1e-9), 2),
                  "device": str(runtime.device), "amp": str(runtime.amp_dtype or "off"),
                  "attention": backend, "compile": cfg.compile},
        "class_names": names,
        "history": history,
    }
    if cfg.baseline:
        result["baseline"] = kmeans_pixel_baseline(train_set, val_set, cfg.semantics(),
                                                   num_classes=num_classes, seed=cfg.seed)
    atomic_write_json(out / "metrics.json", result)
    if shown:
        save_prediction_grid(out / "predictions.png", shown["images"], shown["targets"], shown["preds"],
                             class_names=names, assignment=scores["assignment"])
    save_loss_curve(out / "curves.png", {k: v for k, v in history.items() if k != "clusters_used"},
                    xlabel="epoch")
    print(summary_table(result))
    print(f"wrote {out / 'config.json'}, {out / 'metrics.json'}, {out / 'checkpoint.pt'}, "
          f"{out / 'predictions.png'}, {out / 'curves.png'}")
    return result


def summary_table(result: dict) -> str:
    rows = [("SAN", result["san"])]
    if "baseline" in result:
        rows.append(("k-means on pixels", result["baseline"]))
    lines = [f"{'method':<20} {'pixel acc':>9} {'mIoU':>7} {'clusters used':>14}"]
    for name, s in rows:
        lines.append(f"{name:<20} {s['acc']:>9.4f} {s['miou']:>7.4f} {s['clusters_used']:>14}")
    return "\n".join(lines)

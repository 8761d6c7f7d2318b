"""The Python API: ``san_fast.load(path)`` gives a trained SAN ready for ``model.segment(images)``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Union

import torch

from san_fast import ops
from san_fast.checkpoint import config_from_checkpoint, load_checkpoint, load_model_state
from san_fast.metrics import UNASSIGNED
from san_fast.model import SAN
from san_fast.runtime import resolve_amp, resolve_device


def load(path: Union[str, Path], device: Union[str, torch.device] = "auto",
         seat_impl: str = "auto", attn: str = "auto") -> SAN:
    """The SAN saved in checkpoint ``path``, rebuilt from the config it holds, on ``device``
    ("auto": CUDA when present), in eval mode.

    The training run's SEAT implementation and attention backend are chosen again for the
    device it now runs on (``seat_impl``, ``attn``: "auto" picks the fastest that works there),
    so a model trained with the Triton kernel on a GPU also loads on a CPU.
    """
    return model_from_checkpoint(load_checkpoint(str(path), map_location="cpu"), str(path), device,
                                 seat_impl, attn)


def model_from_checkpoint(state: dict, path: str, device: Union[str, torch.device] = "auto",
                          seat_impl: str = "auto", attn: str = "auto", batch: int = 8) -> SAN:
    """``load`` for a checkpoint already read with ``load_checkpoint`` (``path`` names it in
    errors); ``batch``: the images per forward pass the attention backend is chosen for."""
    device = resolve_device(str(device))
    cfg = dataclasses.replace(config_from_checkpoint(state), device=str(device),
                              seat_impl=seat_impl, attn=attn)
    model = SAN(cfg)
    load_model_state(model, state, path)
    model.to(device)
    if device.type == "cuda":  # the layout the SEAT kernel reads without a copy
        model.to(memory_format=torch.channels_last)
    model.seat_impl = ops.check_impl(seat_impl, device, cfg.semantics())
    model.set_attention_backend(attn, device, batch=batch, dtype=resolve_amp("auto", device))  # as segment() runs
    return model.eval()


def read_assignment(path: Union[str, Path], num_clusters: int) -> tuple[list[int], list[str]]:
    """(cluster -> class assignment, class names) from an evaluation's JSON: a run's or
    ``san_fast.evaluate``'s metrics.json (``san.assignment`` and ``class_names``) or a file with
    top-level ``assignment`` and ``class_names``. Checked against the model's ``num_clusters``.
    A cluster the ``strict`` over-clustering rule matched to no class holds UNASSIGNED (-1)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"--assignment {path}: cannot read it as JSON ({err})") from None
    section = data.get("san", data) if isinstance(data, dict) else {}
    assignment: Optional[list] = section.get("assignment") if isinstance(section, dict) else None
    names = data.get("class_names") if isinstance(data, dict) else None
    if not isinstance(assignment, list) or not isinstance(names, list):
        raise ValueError(f"--assignment {path}: expected a metrics.json with san.assignment and "
                         "class_names (or top-level assignment and class_names)")
    if len(assignment) != num_clusters:
        raise ValueError(f"--assignment {path}: {len(assignment)} clusters, but the model has "
                         f"{num_clusters}: it comes from another model")
    if not all(isinstance(a, int) and UNASSIGNED <= a < len(names) for a in assignment):
        raise ValueError(f"--assignment {path}: class ids must lie in [0, {len(names)}), or be "
                         f"{UNASSIGNED} for a cluster matched to no class")
    return assignment, [str(name) for name in names]

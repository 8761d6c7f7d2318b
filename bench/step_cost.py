"""From a traced step (bench/step_trace.py) to kernels: each with its FLOPs and the HBM bytes it
must move under the fusion assumptions bench/step_model.py states, and their times on a GPU."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import torch

from bench.step_trace import Access, Op, Settings, Trace
from san_fast.gpu_specs import GPUSpec

BN_FORWARD = ("native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_functional",
              "_batch_norm_with_update", "_batch_norm_with_update_functional", "cudnn_batch_norm")
BN_BACKWARD = ("native_batch_norm_backward", "batch_norm_backward", "cudnn_batch_norm_backward")
LN_BACKWARD = ("native_layer_norm_backward",)


@dataclass
class Node:
    op: Op
    reads: list
    writes: list
    reduction: bool  # its outputs are a full reduction's result: consumers start a new pass
    name: str


def _small(key: int) -> Access:
    """A per-channel statistics tensor a split norm passes between its passes (bytes: none)."""
    return Access(key, (key,), 0, 1)


def expand(trace: Trace, settings: Settings) -> list[Node]:
    """Ops -> kernels: composite norms split into their passes, views dropped, BatchNorm folded."""
    nodes: list[Node] = []
    fresh = iter(range(-1, -10**9, -1))  # keys of the small statistics tensors the split creates
    rename: dict[int, int] = {}
    recomputed: dict[int, Access] = {}  # a BatchNorm output's storage -> that BatchNorm's input
    folded_fwd = folded_bwd = False
    for op in trace.ops:
        if op.kind == "view":
            continue
        reads = [dataclasses.replace(a, storage=rename.get(a.storage, a.storage)) for a in op.reads]
        if op.phase == "bwd" and op.kind == "fusible":
            reads = [recomputed.get(a.storage, a) for a in reads]
        name = op.name
        if name in BN_FORWARD and reads:
            x, stats = reads[0], _small(next(fresh))
            is_q = settings.bn_folded and any(w.storage == trace.seat.q_key for w in op.writes)
            nodes.append(Node(op, [x], [stats], True, f"{name}:stats"))
            if is_q:  # applied per P-chunk inside the SEAT kernels: Q is never written
                rename.update({w.storage: x.storage for w in op.writes if w.storage == trace.seat.q_key})
                folded_fwd = True
                continue
            if settings.compile:
                # AOTAutograd's min-cut partitioner saves BN's input and statistics, not its
                # output, for the backward's element-wise consumers: they recompute it from the
                # input, which BN's backward reads anyway. A library kernel's backward (a matmul
                # reading Q) still gets the saved output (tests/test_step_model.py checks both).
                recomputed.update({w.storage: x for w in op.writes if w.numel == x.numel})
            nodes.append(Node(op, reads + [stats], op.writes, False, f"{name}:apply"))
        elif name in BN_BACKWARD + LN_BACKWARD and len(reads) >= 2:
            sums = _small(next(fresh))
            is_q = settings.bn_folded and op.node == trace.seat.q_node and name in BN_BACKWARD
            if not is_q:  # folded: the two sums come from the SEAT backward's epilogue
                nodes.append(Node(op, reads[:2], [sums] + (op.writes[1:] if name in LN_BACKWARD else []),
                                  True, f"{name}:sums"))
            folded_bwd |= is_q
            if is_q and settings.bn_split:
                continue  # the SEAT dq pass writes dy itself (kernels/seat_bn_split.py)
            nodes.append(Node(op, reads + [sums], op.writes[:1] if name in LN_BACKWARD else op.writes, False,
                              f"{name}:apply"))
        else:
            largest_in = max((a.numel for a in reads), default=0)
            largest_out = max((a.numel for a in op.writes), default=0)
            reduction = op.kind == "fusible" and largest_out * 8 < largest_in
            nodes.append(Node(op, reads, op.writes, reduction, name))
    if settings.bn_folded and not (folded_fwd and folded_bwd):
        raise ValueError("--bn-folded: no BatchNorm produces the Q that the SEAT op reads (encoder without a final BN?)")
    return nodes


def fuse(nodes: list[Node], compiled: bool) -> tuple[list[int], dict]:
    """Group index per node, and each node's consumers per storage it writes.

    Compiled phases: a fusible node joins its fusible producer's group when both sit at the same
    depth, where the depth grows by one across every library kernel and every full reduction on
    the way. Same depth means no library kernel and no finished reduction between them, so the
    groups are passes Inductor can emit, and no group needs its own output."""
    group = list(range(len(nodes)))
    depth = [0] * len(nodes)
    consumers: dict[tuple[int, int], set[int]] = defaultdict(set)
    last_writer: dict[int, int] = {}

    def find(i: int) -> int:
        while group[i] != i:
            group[i] = group[group[i]]
            i = group[i]
        return i

    for i, node in enumerate(nodes):
        producers = {last_writer[a.storage] for a in node.reads if a.storage in last_writer}
        for p in producers:
            consumers[(p, i)].add(i)
            pn = nodes[p]
            if pn.op.phase != node.op.phase:
                continue  # an input of this phase's graph (a saved activation, a gradient)
            boundary = pn.op.kind != "fusible" or pn.reduction
            depth[i] = max(depth[i], depth[p] + (1 if boundary else 0))
        fusible = compiled and node.op.kind == "fusible" and node.op.phase in ("fwd", "bwd")
        if fusible:
            for p in producers:
                pn = nodes[p]
                if (pn.op.kind == "fusible" and not pn.reduction and pn.op.phase == node.op.phase
                        and depth[p] == depth[i]):
                    group[find(p)] = find(i)
        for a in node.writes:
            last_writer[a.storage] = i
    readers: dict[int, set[int]] = defaultdict(set)
    for (p, i) in consumers:
        readers[p].add(i)
    return [find(i) for i in range(len(nodes))], readers


@dataclass
class Kernel:
    part: str
    category: str
    phase: str
    flops: int
    bytes: int
    dtype: Optional[torch.dtype]  # operand dtype of its FLOPs (sets the matmul rate)
    names: list


def _category(members: list[Node]) -> str:
    op = members[0].op
    if op.cost is not None:
        return {"seat_fused_loss": "fused SEAT loss kernel", "grad_scaler_unscale": "GradScaler unscale"}.get(
            op.name, op.name)
    if op.part == "monitor":
        return "allocate and zero"
    if op.kind == "extern":
        if "attention" in op.name:
            return "attention"
        if "conv" in op.name:
            return "convolution"
        if "adam" in op.name:
            return "fused Adam"
        return "matmul"
    # A pass of casts (and the layout copies that ride along) only; a cast fused into other
    # work costs that work's pass, nothing more.
    for tag, category in (("weight-cast", "weights to AMP dtype"), ("grad-cast", "gradients to fp32")):
        if all(tag in m.op.tags or m.op.name in ("copy_", "clone") for m in members) and \
                any(tag in m.op.tags for m in members):
            return category
    if op.phase == "opt":
        return "multi-tensor Adam ops"  # foreach Adam's passes; with fused Adam, the step counters
    return "element-wise / norm"


def kernels(trace: Trace, settings: Settings) -> list[Kernel]:
    nodes = expand(trace, settings)
    groups, readers = fuse(nodes, settings.compile)
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    out = []
    for g, idx in members.items():
        ms = [nodes[i] for i in idx]
        if all(m.op.kind == "alloc" for m in ms):
            continue
        inside = set(idx)
        if ms[0].op.cost is not None:
            nbytes, flops = ms[0].op.cost["bytes"], ms[0].op.cost["flops"]
        else:
            read_views, write_views = {}, {}
            for i in idx:
                for a in nodes[i].reads:
                    producer_inside = any(a.storage in {w.storage for w in nodes[j].writes} for j in inside if j < i)
                    if not producer_inside:
                        read_views[a.view] = a.nbytes
                for a in nodes[i].writes:
                    outside = [j for j in readers.get(i, ()) if j not in inside
                               and any(r.storage == a.storage for r in nodes[j].reads)]
                    used_inside = any(j in inside for j in readers.get(i, ())
                                      if any(r.storage == a.storage for r in nodes[j].reads))
                    if outside or not used_inside:
                        write_views[a.view] = a.nbytes
            nbytes = sum(read_views.values()) + sum(write_views.values())
            flops = sum(m.op.flops for m in ms)
        # A fused pass belongs to the part of its last op: the consumer the producers fold into.
        category = _category(ms)
        part = "amp casts" if category in ("weights to AMP dtype", "gradients to fp32") else ms[-1].op.part
        out.append(Kernel(part, category, ms[0].op.phase, flops, nbytes,
                          (ms[0].op.cost or {}).get("dtype", ms[0].op.dtype), [m.name for m in ms]))
    return out


def kernel_ms(k: Kernel, spec: GPUSpec, settings: Settings) -> tuple[float, float]:
    """(FLOP-bound ms, byte-bound ms) of one kernel."""
    flop_ms = 0.0
    if k.flops:
        tf32 = settings.conv_tf32 if k.category == "convolution" else settings.mm_tf32
        flop_ms = k.flops / spec.matmul_rate(k.dtype or torch.float32, tf32) * 1e3
    return flop_ms, k.bytes / spec.hbm_bytes_per_s * 1e3


def activation_bytes(trace: Trace, settings: Settings) -> int:
    """Bytes the forward writes that the backward reads (kept alive between them)."""
    written: dict[int, int] = {}
    saved: dict[int, int] = {}
    for node in expand(trace, settings):
        if node.op.phase == "fwd":
            for a in node.writes:
                written[a.storage] = max(written.get(a.storage, 0), a.nbytes)
        elif node.op.phase == "bwd" and node.op.kind != "alloc":
            for a in node.reads:
                if a.storage in written:
                    saved[a.storage] = written[a.storage]
    return sum(saved.values())

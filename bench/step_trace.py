"""One training step traced on fake tensors (nothing allocated, seconds on the CPU): every aten op
with its FLOPs, the tensors it reads and writes, its phase (forward, backward, optimizer) and the
part of the model it belongs to. bench/step_model.py turns the trace into HBM bytes and floors.

How the pieces are found:
- FLOPs: torch.utils.flop_counter's formula table (the one FlopCounterMode uses; FlopCounterMode
  runs around the step too and its total is kept as a check). The CPU flash-attention op that
  SDPA dispatches to on fake CPU tensors gets SDPA's formula registered here.
- Forward ops belong to the innermost module running; backward ops to the module whose forward
  created the autograd node executing them (torch._C._current_autograd_node).
- The SEAT op: with the fused kernel, a stand-in with the op's signature replaces
  ops.seat_reconstruct_loss while tracing, and its cost comes from the traffic model
  (san_fast.kernels.traffic: the kernels' own bytes and FLOPs); with the PyTorch reference, the
  reference's own ops are traced.
- AMP: CUDA autocast cannot run on fake tensors of a CPU build, so CPU autocast with the same
  dtype stands in; its op lists agree with CUDA's for conv, linear, matmul, SDPA, batch norm and
  GELU (CUDA also runs layer_norm and softmax in fp32: small ViT tensors here).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.utils.flop_counter as flop_counter
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from san_fast import ops as seat_ops

aten = torch.ops.aten


def _register_cpu_flash_flops() -> None:
    """SDPA on fake CPU tensors runs the CPU flash kernel, which the formula table lacks; its
    FLOPs are SDPA's (the GPU kernels' entries use the same counts)."""
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None and fwd not in flop_counter.flop_registry:
        @flop_counter.register_flop_formula(fwd)
        def _fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)
    if bwd is not None and bwd not in flop_counter.flop_registry:
        @flop_counter.register_flop_formula(bwd)
        def _bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_register_cpu_flash_flops()


@dataclass(frozen=True)
class Access:
    storage: int  # one key per allocation
    view: tuple  # (storage, offset, shape, stride): a view read twice by one kernel counts once
    nbytes: int
    numel: int


@dataclass
class Op:
    name: str
    phase: str  # "fwd", "bwd" or "opt"
    part: str
    flops: int
    dtype: Optional[torch.dtype]  # of the first floating-point input: sets the matmul rate
    reads: list[Access]
    writes: list[Access]
    kind: str  # "extern" (library kernel), "fusible", "view" (no data moved) or "alloc"
    node: Optional[int] = None  # id of the autograd node running it (backward)
    cost: Optional[dict] = None  # synthetic ops: {"bytes": ..., "flops": ...} from a model
    tags: set = field(default_factory=set)


# Library kernels: Inductor calls them as they are (no fusion into or across them).
EXTERN = ("mm", "bmm", "addmm", "baddbmm", "convolution", "convolution_backward", "_convolution",
          "cudnn_convolution", "_scaled_dot_product", "_efficient_attention", "_flash_attention",
          "_fused_adam", "_fused_adamw")
ALLOC = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided")
WRITE_ONLY = ("copy_", "fill_", "zero_", "normal_", "uniform_", "random_")
# Factories shaped like an input: they read its metadata, not its data.
LIKE = ("zeros_like", "ones_like", "full_like", "rand_like", "randn_like", "new_zeros", "new_ones", "new_full")


def _access(t: torch.Tensor) -> Access:
    key = StorageWeakRef(t.untyped_storage()).cdata
    nbytes = t.numel() * t.element_size()
    return Access(key, (key, t.storage_offset(), tuple(t.shape), tuple(t.stride())), nbytes, t.numel())


def _kind(func) -> str:
    name = func._overloadpacket.__name__
    schema = func._schema
    mutates = any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
    returns_tensors = any(r.type.kind() in ("TensorType", "ListType", "OptionalType") for r in schema.returns)
    if schema.name.split("::")[0] == "prim" or not (mutates or returns_tensors):
        return "view"  # metadata (prim::device, sizes) or a scalar read: no tensor written
    if name in ALLOC:
        return "alloc"
    if name.startswith(EXTERN) or "attention" in name:
        return "extern"
    returns = schema.returns
    if returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns):
        return "view"
    return "fusible"


def _feeds_parameter(node) -> bool:
    return node.name().startswith("ToCopyBackward") and any(
        n is not None and n.name() == "torch::autograd::AccumulateGrad" for n, _ in node.next_functions)


class StepTracer(TorchDispatchMode):
    """Records every aten op between enter and exit (see the module docstring)."""

    def __init__(self, module_names: dict, param_keys: set):
        super().__init__()
        self.module_names = module_names  # id(module) -> qualified name
        self.param_keys = param_keys  # storages of the parameters (AMP weight casts read them)
        self.ops: list[Op] = []
        self.phase = "fwd"
        self.stack = [""]
        self.node_module: dict[int, str] = {}
        self.keep: list = []  # every tensor and node seen stays alive: ids are never reused
        self._hooks = []

    # ---- module attribution
    def __enter__(self):
        self._hooks = [register_module_forward_pre_hook(self._pre), register_module_forward_hook(self._post)]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        return super().__exit__(*exc)

    def _pre(self, module, inputs):
        self.stack.append(self.module_names.get(id(module), self.stack[-1]))

    def _post(self, module, inputs, outputs):
        self.claim_nodes(outputs, self.stack[-1])
        self.stack.pop()

    def push(self, name: str) -> None:
        self.stack.append(name)

    def pop(self, outputs) -> None:
        self.claim_nodes(outputs, self.stack.pop())

    def claim_nodes(self, outputs, module: str) -> None:
        """Give the autograd nodes behind `outputs` that no inner module claimed to `module`."""
        todo = [t.grad_fn for t in tree_flatten(outputs)[0] if isinstance(t, torch.Tensor) and t.grad_fn]
        while todo:
            node = todo.pop()
            if node is None or id(node) in self.node_module:
                continue
            self.node_module[id(node)] = module
            self.keep.append(node)
            todo.extend(n for n, _ in node.next_functions)

    def module_now(self):
        """(module name, autograd node or None) of the op being dispatched."""
        if self.phase != "bwd":
            return self.stack[-1], None
        node = torch._C._current_autograd_node()
        if node is None:
            return "", None
        self.keep.append(node)
        return self.node_module.get(id(node), ""), node

    # ---- recording
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self.keep.extend(ins + outs)
        formula = flop_counter.flop_registry.get(func._overloadpacket)
        flops = int(formula(*args, **kwargs, out_val=out)) if formula is not None else 0
        module, node = self.module_now()
        kind = _kind(func)
        writes = [_access(t) for t in outs]
        write_only: set[int] = set()
        # In-place and out= ops write into an input's storage; fills, copies and out= arguments
        # do not read what they overwrite.
        for i, arg in enumerate(func._schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                value = args[i] if i < len(args) else kwargs.get(arg.name)
                if arg.name == "grads" and func._overloadpacket.__name__.startswith("_fused_adam") \
                        and kwargs.get("grad_scale") is None:
                    continue  # fused Adam writes the gradients back only to unscale them
                for t in tree_flatten(value)[0]:
                    if isinstance(t, torch.Tensor):
                        writes.append(_access(t))
                        if arg.name == "out" or func._overloadpacket.__name__ in WRITE_ONLY:
                            write_only.add(id(t))
        # An alloc reads metadata only.
        metadata_only = kind == "alloc" or func._overloadpacket.__name__ in LIKE
        reads = [] if metadata_only else [_access(t) for t in ins if id(t) not in write_only]
        floating = next((t.dtype for t in ins if t.is_floating_point()), None)
        op = Op(func._overloadpacket.__name__, self.phase, module, flops, floating, reads, writes, kind,
                None if node is None else id(node))
        if op.name == "_to_copy" and self.phase == "fwd" and reads and reads[0].storage in self.param_keys:
            op.tags.add("weight-cast")  # AMP casting an fp32 master weight for a matmul or conv
        if op.name == "_to_copy" and node is not None and _feeds_parameter(node):
            op.tags.add("grad-cast")  # the gradient of such a cast, back to the weight's fp32
        self.ops.append(op)
        return out

    def synthetic(self, name: str, part: str, cost: dict, reads=(), writes=()) -> None:
        """An op whose bytes and FLOPs come from a model (the SEAT kernels' traffic model)."""
        self.ops.append(Op(name, self.phase, part, int(cost.get("flops", 0)), cost.get("dtype"),
                           [_access(t) for t in reads], [_access(t) for t in writes], "extern", None, cost))


class FusedSeatStandIn(torch.autograd.Function):
    """The fused SEAT loss's signature without its arithmetic, recorded by `record(reads,
    writes, backward)` (its forward carries the traffic model's whole cost, the backward's
    record none). One-pass design: like the kernel, the forward writes every gradient and keeps
    them for the backward, which hands them out. Two-pass: the forward keeps Q (the kernels'
    input) and the backward reads it to write the gradients."""

    @staticmethod
    def forward(ctx, q, gamma, weight, bias, x, record, two_pass):
        ctx.record, ctx.two_pass, ctx.has_bias = record, two_pass, bias is not None
        if two_pass:
            record(reads=(q, gamma, weight, x), writes=(), backward=False)
            ctx.save_for_backward(q, gamma, weight, bias)
        else:
            grads = _like(q, gamma, weight, bias)
            record(reads=(q, gamma, weight, x), writes=grads, backward=False)
            ctx.save_for_backward(*grads)
        return q.new_empty((), dtype=torch.float32), q.new_empty((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_rec, grad_con):
        grads = list(ctx.saved_tensors)
        if ctx.two_pass:
            q = grads[0]
            grads = _like(*grads)
            ctx.record(reads=(q,), writes=grads, backward=True)
        if not ctx.has_bias:
            grads.append(None)
        return (*grads, None, None, None, None)


def _like(*tensors) -> list:
    return [torch.empty_like(t) for t in tensors if t is not None]


@dataclass
class SeatCall:
    """What the SEAT call saw during tracing, for the costing (BatchNorm folding, the shape)."""
    shape: tuple = ()  # (B, M, P, N, C)
    dtype: Optional[torch.dtype] = None
    q_key: Optional[int] = None
    q_node: Optional[int] = None  # id of Q's grad_fn: its backward is BN2's
    calls: int = 0


@contextlib.contextmanager
def seat_region(tracer: StepTracer, fused: bool, traffic_cost, call: SeatCall, two_pass: bool = False):
    """Route ops.seat_reconstruct_loss through the tracer: the fused kernels as synthetic ops
    costed by `traffic_cost(B, M, P, N, C, dtype)` (`two_pass`: the design that reads Q again in
    the backward), or the PyTorch reference traced op by op."""
    original = seat_ops.seat_reconstruct_loss

    def traced(q, gamma, weight, bias, x, consistency_target="image", impl="auto", **kwargs):
        rows = seat_ops._as_rows(q)
        call.shape = (rows.shape[0], rows.shape[1], rows.shape[2], gamma.shape[-2], weight.shape[0])
        call.dtype, call.calls = q.dtype, call.calls + 1
        call.q_key = _access(q).storage
        call.q_node = id(q.grad_fn) if q.grad_fn is not None else None
        tracer.keep.append(q.grad_fn)
        tracer.push("seat")
        out = None
        try:
            if fused:
                cost = traffic_cost(*call.shape, q.dtype)

                def record(reads, writes, backward):
                    share = {"bytes": 0, "flops": 0, "dtype": cost.get("dtype")} if backward else cost
                    tracer.synthetic("seat_fused_loss", "seat", share, reads, writes)

                out = FusedSeatStandIn.apply(q, gamma, weight, bias, x, record, two_pass)
            else:
                out = seat_ops.seat_reconstruct_loss_reference(q, gamma, weight, bias, x, consistency_target)
        finally:
            tracer.pop(out)
        return out

    seat_ops.seat_reconstruct_loss = traced
    try:
        yield
    finally:
        seat_ops.seat_reconstruct_loss = original


def fake_mode() -> FakeTensorMode:
    return FakeTensorMode(allow_non_fake_inputs=False)


@dataclass
class Settings:
    """How the step runs on one GPU: the config resolved for it, and the fusion assumptions."""
    gpu: str
    amp: Optional[torch.dtype]
    grad_scaler: bool
    seat_fused: bool
    compile: bool
    channels_last: bool
    adam: str  # "fused" or "foreach"
    bn_folded: bool
    bn_split: bool  # folded, with the statistics' backward inside the SEAT dq pass (kernels/seat_bn_split.py)
    seat_two_pass: bool  # the SEAT loss's design: forward, then a backward reading Q again
    monitor_grad: str  # "auto": a zero gradient for a returned Q when compiled and Q is attached
    conv_tf32: bool
    mm_tf32: bool

    def describe(self) -> dict:
        out = dataclasses.asdict(self)
        out["amp"] = str(self.amp).replace("torch.", "") if self.amp else "off"
        return out


@dataclass
class Trace:
    ops: list[Op]
    seat: SeatCall
    flop_counter_total: int
    params: int
    batch: int

"""The training step: no host reads between log points, no gradient for monitoring-only outputs,
fused Adam, and divergence that never becomes a result."""

import json
from types import SimpleNamespace

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

import train
from san_fast.checkpoint import load_checkpoint
from san_fast.config import resolve
from san_fast.distributed import DistEnv
from san_fast.engine import run
from san_fast.loader import SeededItems
from san_fast.model import SAN
from san_fast.runtime import build_runtime, resolve_compile_mode
from san_fast.train_step import LossSums, Objective, TrainStep, build_optimizer

TINY = dict(crop_size=32, embed_dim=32, vit_dim=32, vit_heads=2, vit_depth=1, batch_size=8,
            synthetic_train_size=32, synthetic_val_size=8, epochs=1, num_workers=0, synthetic_classes=4,
            num_vis=0, baseline=False, seat_impl="torch")
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")
# Tensors built from host values: on a CUDA device a copy from pageable memory, which synchronises
# the stream as a read does.
HOST_BUILDS = ("tensor", "as_tensor")


class HostReads:
    """Counts tensor-to-host reads (the Python methods that need the value) and tensors built
    from host values while `active`."""

    def __init__(self, monkeypatch):
        self.active, self.count, self.where = False, 0, []
        for name in HOST_READS:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, __original=original, __name=name, **kwargs):
                if self.active:
                    self.count += 1
                    self.where.append(__name)
                return __original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)
        for name in HOST_BUILDS:
            original = getattr(torch, name)

            def built(*args, __original=original, __name=name, **kwargs):
                if self.active:
                    self.count += 1
                    self.where.append(f"torch.{__name}")
                return __original(*args, **kwargs)

            monkeypatch.setattr(torch, name, built)


def tiny(**extra):
    return resolve(dict(TINY, **extra), cuda_available=False)


def test_a_step_reads_nothing_to_the_host(monkeypatch):
    cfg = tiny(color_jitter=0.1, color_drop=0.5)
    model = SAN(cfg)
    runtime = build_runtime(cfg)
    optimizer = build_optimizer(model, cfg)
    step = TrainStep(Objective(model), model, optimizer, runtime, cfg, DistEnv(), LossSums(runtime.device))
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    step(images, 1, monitor=True)  # first step: optimizer state is created
    reads = HostReads(monkeypatch)
    reads.active = True
    for k in range(2, 6):
        wins = step(images, k, monitor=k % 2 == 0)
    reads.active = False
    assert reads.count == 0, reads.where
    assert wins is None and step.sums.steps == 5
    assert step.sums.bad.item() == 0 and step.sums.sums.shape == (4,)  # rec, con, uni, loss


def test_a_run_reads_the_host_only_at_log_points(monkeypatch, tmp_path):
    """Over a whole run, reads happen only inside the trainer's log reads, checkpoints and
    evaluation, never in the steps between them."""
    from san_fast import trainer as trainer_module

    reads = HostReads(monkeypatch)
    read_steps = []

    def permitted(method):
        def wrapper(self, *args, **kwargs):
            was_active, reads.active = reads.active, False
            try:
                if method.__name__ == "_read":
                    read_steps.append(self.progress.step)
                return method(self, *args, **kwargs)
            finally:
                reads.active = was_active
        return wrapper

    for name in ("_read", "save", "_end_epoch"):
        monkeypatch.setattr(trainer_module.Trainer, name, permitted(getattr(trainer_module.Trainer, name)))
    # Loading an item draws its random crop from CPU tensors (in worker processes when there are
    # workers): host values by nature, never the device's.
    monkeypatch.setattr(SeededItems, "__getitem__", permitted(SeededItems.__getitem__))
    run_steps = trainer_module.Trainer._run_steps

    def watched(self, *args):
        reads.active = True
        try:
            return run_steps(self, *args)
        finally:
            reads.active = False

    monkeypatch.setattr(trainer_module.Trainer, "_run_steps", watched)
    run(tiny(out=str(tmp_path), epochs=2, log_every=3, save_every=2))
    assert reads.count == 0, reads.where
    # log points 3 and 6, the epoch ends 4 and 8, the mid-epoch checkpoints 2 and 6
    assert read_steps == [2, 3, 4, 6, 8]


def test_compiled_backward_allocates_no_gradient_for_q():
    """SAN.losses returns Q for the collapse indicator only: compiled, its backward must not take
    a Q-sized incoming gradient (a zeros tensor the size of Q, read by both BatchNorm backwards)."""
    graphs = {}

    def keep(name):
        def compiler(gm, example_inputs):
            graphs[name] = gm
            return make_boxed_func(gm.forward)
        return compiler

    backend = aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"))
    model = SAN(tiny())
    x = torch.randn(2, 3, 32, 32)
    terms, q, gamma = torch.compile(model.losses, backend=backend)(x)
    terms["loss"].backward()
    assert not q.requires_grad and not gamma.requires_grad
    q_numel = q.numel()
    sizes = [node.meta["val"].numel() for node in graphs["backward"].graph.nodes
             if node.op == "placeholder" and node.name.startswith("tangents") and "val" in node.meta]
    assert sizes and q_numel not in sizes
    zeros = [node for node in graphs["backward"].graph.nodes
             if node.op == "call_function" and any(k in str(node.target) for k in ("zeros", "full", "new_zeros"))
             and "val" in node.meta and node.meta["val"].numel() == q_numel]
    assert not zeros


def test_fused_adam_matches_foreach():
    cfg = tiny()
    torch.manual_seed(0)
    fused_model = SAN(cfg)
    foreach_model = SAN(cfg)
    foreach_model.load_state_dict(fused_model.state_dict())
    fused = build_optimizer(fused_model, cfg)
    foreach = torch.optim.Adam(foreach_model.parameters(), lr=cfg.lr, foreach=True)
    assert fused.defaults["fused"]
    for _ in range(5):
        for a, b in zip(fused_model.parameters(), foreach_model.parameters()):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        fused.step()
        foreach.step()
    for a, b in zip(fused_model.parameters(), foreach_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_adam_falls_back_to_foreach_with_one_line(monkeypatch, capsys):
    real = torch.optim.Adam

    def no_fused(params, **kwargs):
        if kwargs.get("fused"):
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of "
                               "supported devices: ['cuda']\nsecond line")
        return real(params, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", no_fused)
    optimizer = build_optimizer(SAN(tiny()), tiny())
    assert optimizer.defaults["foreach"] and not optimizer.defaults["fused"]
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "fused Adam unavailable" in out[0] and "using foreach Adam" in out[0]


def test_a_non_finite_loss_skips_the_step_on_the_device():
    cfg = tiny()
    model = SAN(cfg)
    runtime = build_runtime(cfg)
    step = TrainStep(Objective(model), model, build_optimizer(model, cfg), runtime, cfg, DistEnv(),
                     LossSums(runtime.device))
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    step(images, 1, monitor=False)
    with torch.no_grad():
        model.recon.bias.fill_(float("nan"))  # the loss of the next step is NaN
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    step(images, 2, monitor=False)
    for name, value in model.named_parameters():  # every weight as it was (BatchNorm buffers move)
        torch.testing.assert_close(value.detach(), before[name], rtol=0, atol=0, equal_nan=True)
    assert step.sums.bad.item() == 1 and step.sums.first_bad.item() == 2
    assert step.optimizer.state[model.recon.weight]["step"].item() == 1  # not counted either


def test_divergence_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, capsys):
    args = ["--crop-size", "32", "--embed-dim", "32", "--vit-dim", "32", "--vit-heads", "2", "--vit-depth", "1",
            "--batch-size", "8", "--synthetic-train-size", "32", "--synthetic-val-size", "8", "--epochs", "1",
            "--no-baseline", "--seat-impl", "torch", "--lr", "1e37", "--save-every", "1", "--log-every", "1",
            "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        train.main(args)
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train.py")]
    assert err == [f"train.py: error: training diverged: the loss became non-finite at step 2 (lr 1e+37); "
                   f"the last checkpoint, {tmp_path / 'checkpoint.pt'} (step 1), is unchanged"]
    assert load_checkpoint(str(tmp_path / "checkpoint.pt"))["progress"]["step"] == 1
    assert not (tmp_path / "metrics.json").exists()


def test_divergence_in_the_last_step_writes_no_result(tmp_path):
    from san_fast.evaluation import DivergedError

    with pytest.raises(DivergedError, match="outputs are not finite"):
        run(tiny(out=str(tmp_path), lr=1e37, max_steps=1))
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "checkpoint.pt").exists()
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 1e37


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_device_synchronisation_inside_steps_on_cuda(tmp_path):
    cfg = resolve(dict(TINY, seat_impl="auto", device="cuda", color_jitter=0.1, color_drop=0.5), cuda_available=True)
    model = SAN(cfg).cuda().to(memory_format=torch.channels_last)
    runtime = build_runtime(cfg)
    step = TrainStep(Objective(model), model, build_optimizer(model, cfg), runtime, cfg, DistEnv(),
                     LossSums(runtime.device))
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8).pin_memory()
    step(images, 1, monitor=True)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for k in range(2, 6):
            step(images, k, monitor=k == 4)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_compile_mode_reaches_torch_compile_and_marks_cuda_graph_steps(monkeypatch):
    """--compile-mode goes to torch.compile as its mode; under reduce-overhead each step first
    tells the CUDA-graph trees that a new step begins (their outputs get reused)."""
    from san_fast import train_step as module

    seen, marks = [], []
    monkeypatch.setattr(module.torch, "compile", lambda fn, **kwargs: seen.append(kwargs) or fn)
    monkeypatch.setattr(module.torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    for mode, expected in (("default", None), ("reduce-overhead", "reduce-overhead")):
        cfg = tiny(compile=True, compile_mode=mode)
        model = SAN(cfg)
        runtime = build_runtime(cfg)
        objective = module.wrap_objective(model, cfg, DistEnv(), runtime)
        assert seen[-1] == {"mode": expected}
        step = TrainStep(objective, model, build_optimizer(model, cfg), runtime, cfg, DistEnv(),
                         LossSums(runtime.device))
        step(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), 1, monitor=False)
        assert len(marks) == (1 if mode == "reduce-overhead" else 0)


def test_cuda_graph_skips_are_counted_only_where_cuda_graphs_could_run(monkeypatch):
    """Under reduce-overhead on CUDA, the run reports how many compiled graphs inductor left
    without CUDA graphs (its own counter, which it bumps quietly); elsewhere None: on the CPU
    every graph is skipped by nature, and without the mode no graph was asked for."""
    from torch._dynamo.utils import counters

    from san_fast.train_step import cudagraph_skips

    monkeypatch.setitem(counters["inductor"], "cudagraph_skips", 2)
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")

    def runtime(device, **flags):  # what cudagraph_skips reads of a Runtime (one on CUDA needs a GPU)
        return SimpleNamespace(device=device, compile_mode=resolve_compile_mode(tiny(**flags), device, False))

    assert cudagraph_skips(runtime(cuda, compile=True, compile_mode="reduce-overhead")) == 2
    assert cudagraph_skips(runtime(cuda, compile=True)) == 2  # auto: CUDA graphs on one GPU
    assert cudagraph_skips(runtime(cpu, compile=True, compile_mode="reduce-overhead")) is None
    assert cudagraph_skips(runtime(cuda, compile=True, compile_mode="default")) is None
    assert cudagraph_skips(runtime(cuda, compile=False)) is None


def test_auto_compile_mode_is_cuda_graphs_on_one_gpu_only():
    """--compile-mode auto (the default): reduce-overhead on one CUDA device; default on the
    CPU and under DDP; a mode given by name is kept; nothing without --compile."""
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    auto = tiny(compile=True)
    assert auto.compile_mode == "auto"
    assert resolve_compile_mode(auto, cuda, distributed=False) == "reduce-overhead"
    assert resolve_compile_mode(auto, cuda, distributed=True) == "default"
    assert resolve_compile_mode(auto, cpu, distributed=False) == "default"
    assert resolve_compile_mode(tiny(compile=True, compile_mode="max-autotune"), cuda, distributed=True) == "max-autotune"
    assert resolve_compile_mode(tiny(compile=False), cuda, distributed=False) is None
    assert build_runtime(auto).compile_mode == "default"  # this machine's CPU

"""The training-step rows of the GPU check (bench/train_rows.py): their flags, the figures read
from metrics.json, and the target line."""

import json

import pytest

from bench import train_rows


def test_rows_differ_only_in_their_switches():
    a, d = train_rows.row_flags("a", False), train_rows.row_flags("d", False)
    for flags in (a, d):
        assert flags[: len(train_rows.PAPER)] == train_rows.PAPER
        assert flags[flags.index("--num-semantics") + 1] == "27" and flags[flags.index("--batch-size") + 1] == "16"
    assert a[-6:] == ["--amp", "off", "--no-channels-last", "--seat-impl", "torch"][-6:] or "--no-channels-last" in a
    assert "--compile" in d and d[d.index("--amp") + 1] == "bf16" and d[d.index("--seat-impl") + 1] == "triton"
    dry = train_rows.row_flags("d", True)
    assert "--compile" not in dry and dry[dry.index("--amp") + 1] == "off" and "cpu" in dry


def test_metrics_keys_are_read_when_present(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"train": {"images_per_second": 10.0, "steps": 4}}))
    older = train_rows.read_metrics(path)
    assert older["images_per_second"] == 10.0 and older["peak_gpu_memory_bytes"] is None
    path.write_text(json.dumps({"train": {"images_per_second_after_warmup": 900.0, "peak_gpu_memory_bytes": 2**33,
                                          "data_wait_fraction": 0.01, "measured_window_unix_s": [1.0, 2.0]}}))
    newer = train_rows.read_metrics(path)
    assert newer["images_per_second_after_warmup"] == 900.0 and newer["window_unix_s"] == [1.0, 2.0]
    assert older["median_step_ms"] is None
    assert train_rows.read_metrics(tmp_path / "missing.json") == {}


def test_target_line():
    line = train_rows.target_line({"a": {"step_ms": 100.0}, "d": {"step_ms": 16.0, "gpu_busy_percent": 93.0}})
    assert line["speedup_d_over_a"] == pytest.approx(6.25) and line["speedup_met"] and line["busy_met"]
    line = train_rows.target_line({"a": {"step_ms": 100.0}, "d": {"step_ms": 40.0, "gpu_busy_percent": None}})
    assert line["speedup_met"] is False and line["busy_met"] is None
    assert train_rows.target_line({})["speedup_d_over_a"] is None


def test_cuda_graph_row_is_the_compiled_row_plus_its_mode():
    d, e = train_rows.row_flags("d", False), train_rows.row_flags("e", False)
    assert d[-2:] == ["--compile-mode", "default"]  # --compile alone would pick CUDA graphs on a GPU
    assert e == d[:-1] + ["reduce-overhead"]
    dry = train_rows.row_flags("e", True)  # the CPU dry run compiles nothing
    assert "--compile" not in dry and "--compile-mode" not in dry
    line = train_rows.target_line({"a": {"step_ms": 100.0}, "e": {"step_ms": 20.0, "gpu_busy_percent": 80.0}})
    assert line["speedup_e_over_a"] == pytest.approx(5.0) and line["busy_e_percent"] == 80.0


def test_cudagraph_skip_reasons_from_a_row_log():
    log = ("step 1\n"
           "V1126 12:00:00.000 torch/_inductor/cudagraph_utils.py:380] [0/0] skipping cudagraphs due to "
           "mutated inputs (1 instances)\n"
           "[cudagraphs] skipping cudagraphs due to cpu device (arg3)\n"
           "skipping cudagraphs due to mutated inputs (1 instances)\n")
    assert train_rows.cudagraph_skip_reasons(log) == ["mutated inputs (1 instances)", "cpu device (arg3)"]
    assert train_rows.cudagraph_skip_reasons("no graphs skipped here\n") == []


def test_only_the_cuda_graphs_row_logs_why_graphs_were_skipped(monkeypatch, tmp_path):
    """Row (e) runs with TORCH_LOGS=cudagraphs (kept alongside the caller's); the others do not."""
    seen = {}

    class Proc:
        pid = 0

        def __init__(self, argv, env, **kw):
            seen[argv[argv.index("--out") + 1]] = env.get("TORCH_LOGS")

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(train_rows.subprocess, "Popen", Proc)
    for row in ("d", "e"):
        train_rows.run_row(row, train_rows.row_flags(row, False), tmp_path / f"row_{row}", 5.0,
                           {"TORCH_LOGS": "recompiles"})
    assert seen[str(tmp_path / "row_d")] == "recompiles"
    assert seen[str(tmp_path / "row_e")] == "recompiles,cudagraphs"


def test_the_loader_alone_is_timed_and_tabulated():
    from bench.results_table import training

    rate = train_rows.measure_loader(dry_run=True, workers=0)
    assert rate["images_per_second"] > 0 and rate["batch_size"] == 4 and rate["num_workers"] == 0
    assert rate["fastest_step_ms"] == pytest.approx(1e3 * 4 / rate["images_per_second"], rel=1e-2)
    report = {"rows": [{"row": "a", "name": "eager fp32", "status": "ok"}], "loader": rate}
    text = "\n".join(training({"stages": {"train": {"report": report}}}))
    assert f"Loader alone: {rate['images_per_second']:.0f} images/s with 0 workers" in text
    failed = "\n".join(training({"stages": {"train": {"report": dict(report, loader={"error": "OSError: x"})}}}))
    assert "Loader alone: not measured (OSError: x)" in failed


def test_a_short_split_is_timed_over_more_epochs_and_an_empty_one_refused():
    from bench.loader_rate import loader_rate

    rate = loader_rate(train_rows.TINY + ["--synthetic-train-size", "8"], batches=5)  # 2 batches an epoch
    assert rate["batches"] == 5 and rate["images_per_second"] > 0
    with pytest.raises(ValueError, match="fewer than one batch of 4"):
        loader_rate(train_rows.TINY + ["--synthetic-train-size", "3"])

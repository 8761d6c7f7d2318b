"""results.md of the GPU check: the environment, each stage's status, and one table per stage,
from results.json (so a committed results.json can be re-tabulated: `python -m
bench.results_table bench/results/<gpu>-<date>/results.json`)."""

from __future__ import annotations

import json
import sys
from typing import Optional


def _f(value, spec: str = ".2f") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return format(value, spec)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _report(results: dict, stage: str) -> dict:
    return results.get("stages", {}).get(stage, {}).get("report", {}) or {}


def environment(results: dict) -> list[str]:
    v, g, info = results.get("versions", {}), results.get("git", {}), results.get("gpu_info", {})
    dirty = " (working tree differs)" if g.get("dirty") else ""
    clocks = (f"SM {info.get('sm_clock_mhz')}/{info.get('max_sm_clock_mhz')} MHz, memory "
              f"{info.get('memory_clock_mhz')} MHz, {info.get('temperature_c')} C, {_f(info.get('power_w'), '.0f')} W"
              if "name" in info else info.get("error", "-"))
    return [f"# GPU check, {results.get('gpu') or 'no GPU (dry run)'}, {results.get('date', '')[:10]}", "",
            f"- GPU: {results.get('gpu')} (driver {results.get('driver')}); at start: {clocks}",
            f"- torch {v.get('torch')} (CUDA {v.get('torch_cuda')}), triton {v.get('triton')}, python {v.get('python')}, "
            f"xformers {v.get('xformers')}",
            f"- commit {g.get('commit')}{dirty}; {results.get('date')}; budget {_f(results.get('budget_s'), '.0f')} s, "
            f"wall {_f(results.get('wall_s'), '.0f')} s, exit {results.get('exit_code')}", ""]


def stage_summary(results: dict) -> list[str]:
    rows = []
    for name, o in results.get("stages", {}).items():
        notes = "; ".join(o.get("notes", []) + o.get("report", {}).get("notes", []))
        rows.append([name, o.get("status"), _f(o.get("allotted_s"), ".0f"), _f(o.get("wall_s"), ".0f"), notes])
    return ["## Stages", ""] + _table(["stage", "status", "allotted s", "wall s", "notes"], rows)


def tests(results: dict) -> list[str]:
    r = _report(results, "tests")
    if not r:
        return []
    counts = ", ".join(f"{k.lower()} {v}" for k, v in sorted(r.get("counts", {}).items())) or "none ran"
    lines = ["## GPU tests", "", f"`{r.get('command', '')}`: {counts}", ""]
    lines += [f"- FAILED {f['test']}: {f['reason']}" for f in r.get("failures", [])]
    return lines + [""]


def seat(results: dict) -> list[str]:
    r = _report(results, "seat")
    if not r.get("rows"):
        return []
    rows = []
    for x in r["rows"]:
        if x.get("status") != "ok":
            rows.append([x.get("shape_name"), x.get("variant"), x.get("mode")] + ["-"] * 11 + [x.get("status")])
            continue
        target = "-" if "target_ms" not in x else f"{x['target_ms']} ({_f(x['target_met'])}" + (
            f"; graph {_f(x['target_met_graph'])})" if x.get("target_met_graph") is not None else ")")
        extra_t = "-" if "extra_met" not in x else f"<= 0.05 ({_f(x['extra_met'])})"
        kernel = _f(x.get("kernel_ms"), ".3f") + (" (host-bound)" if x.get("host_bound") else "")
        graph = _f(x.get("graph_ms"), ".3f") if not x.get("graph_error") else "not captured"
        rows.append([x["shape_name"], x["variant"], x["mode"], _f(x["ms"], ".3f"), kernel, graph, target,
                     _f((x.get("floor_bytes") or 0) / 1e6 or None, ".1f"),
                     _f((x.get("modeled_bytes") or 0) / 1e6 or None, ".1f"),
                     _f(x.get("gbps_floor"), ".0f"), _f(x.get("gbps_modeled"), ".0f"),
                     _f(x.get("of_copy_bw_floor")), _f(x.get("extra_beyond_outputs_of_q"), ".3f"), extra_t, "ok"])
    head = ["shape", "variant", "mode", "ms", "GPU ms", "graph ms", "target ms", "floor MB", "model MB", "GB/s floor",
            "GB/s model",
            "of copy bw", "extra/Q", "extra target", "status"]
    return ["## SEAT op", "", f"Copy bandwidth {_f(r.get('copy_gbps'), '.0f')} GB/s (read + write). Times: median of "
            "CUDA-event timings, L2 flushed before each run; GPU ms: the device's own work per run (torch.profiler), "
            "host-bound where it is under 0.8 of ms (the GPU waited for the host to issue launches); graph ms: the "
            "case captured once as a CUDA graph and replayed (events, L2 flushed), as --compile's CUDA graphs run it, "
            "and the target by that time after 'graph'. extra/Q: peak "
            "memory beyond the inputs and the dQ the op returns, over Q's bytes. Targets are the H100's.", ""] + \
        _table(head, rows)


def training(results: dict) -> list[str]:
    r, m = _report(results, "train"), _report(results, "step_model")
    if not r.get("rows") and not m.get("rows"):
        return []
    floors = {x["row"]: x for x in m.get("rows", [])}
    rows = []
    for x in r.get("rows", []) or [{"row": k, "name": v.get("name")} for k, v in floors.items()]:
        floor = floors.get(x["row"], {}).get("floor_ms")
        step = x.get("step_ms")
        peak = x.get("peak_gpu_memory_bytes")
        after = x.get("data_wait_fraction_after_warmup")  # absent from results older than it
        wait = after if after is not None else x.get("data_wait_fraction")
        rows.append([f"({x['row']}) {x.get('name')}", _f(x.get("images_per_second_after_warmup")
                                                         or x.get("images_per_second"), ".0f"),
                     _f(step), _f(x.get("median_step_ms")), _f(floor),
                     _f(step / floor if step and floor else None),
                     _f(peak / 1e9 if peak else None), _f(x.get("gpu_busy_percent"), ".0f"),
                     _f(100 * wait if wait is not None else None, ".1f"), x.get("status", "-")])
    head = ["row", "img/s", "step ms", "median step ms", "model floor ms", "step/floor", "peak GB", "GPU busy %",
            "data wait %", "status"]
    t = r.get("target", {})
    target = (f"Target: (d) >= {t.get('target_speedup')}x (a): {_f(t.get('speedup_d_over_a'), '.1f')}x "
              f"({_f(t.get('speedup_met'))}); GPU busy >= {t.get('target_busy_percent')}% in (d): "
              f"{_f(t.get('busy_d_percent'), '.0f')}% ({_f(t.get('busy_met'))})"
              + (f"; (e) {_f(t.get('speedup_e_over_a'), '.1f')}x (a), busy {_f(t.get('busy_e_percent'), '.0f')}%"
                 if t.get("speedup_e_over_a") is not None else "")) if t else ""
    copy = next((x.get("copy_gbps") for x in m.get("rows", []) if x.get("copy_gbps")), None)
    basis = f"the step model on the H100 table's rates with the measured copy bandwidth {copy:.0f} GB/s" if copy \
        else "the step model on the H100 table's rates"
    graphs = [f"({x['row']}) ran {x['cudagraph_skips']} compiled graph(s) without CUDA graphs: "
              + ("; ".join(x.get("cudagraph_skip_reasons") or []) or "no reason logged")
              for x in r.get("rows", []) if x.get("cudagraph_skips")]
    waits = ("Data wait: the share of the steps after warm-up spent waiting for batches"
             + ("" if all(x.get("data_wait_fraction_after_warmup") is not None for x in r.get("rows", []))
                else " (of the whole loop, warm-up included, for rows without that figure)") + ".")
    return ["## Training step (paper preset, synthetic data)", "", f"Model floor: {basis}. {waits}", ""] + \
        _table(head, rows) + ([target, ""] if target else []) + ([*graphs, ""] if graphs else []) + \
        _loader_line(r.get("loader"))


def _loader_line(loader: Optional[dict]) -> list[str]:
    """The rows' training loader timed alone (bench/loader_rate.py)."""
    if not loader:
        return []
    if loader.get("error"):
        return [f"Loader alone: not measured ({loader['error']}).", ""]
    return [f"Loader alone: {_f(loader.get('images_per_second'), '.0f')} images/s with {loader.get('num_workers')} "
            f"workers, so no step faster than {_f(loader.get('fastest_step_ms'))} ms.", ""]


def xformers(results: dict) -> list[str]:
    r = _report(results, "xformers")
    if not r:
        return []
    lines = ["## xformers vs SDPA in the ViT", "",
             f"torch CUDA {r.get('torch_cuda')}, xformers {r.get('xformers_version')}, libcudart.so.12 loaded from "
             f"{r.get('cudart12')}; xformers works: {_f(r.get('xformers_works'))}; compared: {r.get('compared')}; "
             f"(B,M,H,K) {r.get('shape_bmhk')}; `--attn auto` picks {r.get('auto_picks', '-')}", ""]
    rows = []
    for x in r.get("rows", []):
        if x.get("kind") == "agreement":
            rows.append([x["backend"], x["dtype"], "agreement", f"out {_f(x['output_rel_err'], '.1e')}, grads "
                         f"{_f(x['grad_rel_err'], '.1e')} (tol {x['tolerance']}): {_f(x['ok'])}"])
        else:
            rows.append([x["backend"], x.get("dtype", "-"), "fwd+bwd ms", _f(x.get("ms"), ".3f") if "ms" in x
                         else x.get("status")])
    return lines + _table(["backend", "dtype", "what", "result"], rows)


def profile(results: dict) -> list[str]:
    r = _report(results, "profile")
    if not r.get("rows"):
        return []
    rows = [[_f(x["ms_per_step"], ".3f"), _f(x["share"] * 100 if x.get("share") is not None else None, ".1f"),
             _f(x["calls_per_step"], ".1f"), x["kernel"][:90].replace("|", "/")] for x in r["rows"]]
    lines = ["## Profile of compiled training steps (top kernels)", "",
             f"{_f(r.get('unprofiled_ms_per_step'))} ms per step unprofiled ({_f(r.get('wall_ms_per_step'))} under the "
             f"profiler), {_f(r.get('kernel_ms_per_step'))} ms in kernels; per step "
             f"{_f(r.get('launches_per_step'), '.0f')} "
             f"kernel launches, {_f(r.get('syncs_per_step'), '.1f')} host waits for the GPU.", ""]
    lines += _table(["ms/step", "% of kernel time", "calls/step", "kernel"], rows)
    host = [[_f(x["self_cpu_ms_per_step"], ".3f"), _f(x["calls_per_step"], ".1f"), x["op"][:90].replace("|", "/")]
            for x in r.get("host_top", [])]
    if host:
        lines += ["Host: top operators by their own CPU time.", ""]
        lines += _table(["CPU ms/step", "calls/step", "operator"], host)
    return lines


def markdown(results: dict) -> str:
    parts = [environment, stage_summary, tests, seat, training, xformers, profile]
    return "\n".join(line for part in parts for line in part(results))


if __name__ == "__main__":
    print(markdown(json.loads(open(sys.argv[1]).read())))

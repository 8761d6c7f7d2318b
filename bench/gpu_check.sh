#!/usr/bin/env bash
# GPU check of the SEAT kernels, run from the repository root on a machine with a CUDA GPU
# (torch and triton installed, no network needed):
#   1. the SEAT correctness tests, bf16 and inductor cases included (they skip on CPU);
#   2. the SEAT benchmarks, JSON to $OUT/bench_seat.json;
#   3. a compact table of ms, GB/s, fraction of copy bandwidth and extra memory.
# Exits non-zero if the tests failed (the benchmarks still run, to see how far off things are).
set -uo pipefail

OUT="${OUT:-bench_results}"
mkdir -p "$OUT"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

"$PY" - <<'PYEOF' || exit 2
import sys, torch, triton
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh: no CUDA device visible to torch")
p = torch.cuda.get_device_properties(0)
print(f"device {p.name} (sm{p.major}{p.minor}, {p.multi_processor_count} SMs), torch {torch.__version__}, triton {triton.__version__}")
PYEOF

"$PY" -m pytest tests/ -k seat -q -rs 2>&1 | tee "$OUT/seat_tests.txt"
tests_rc=${PIPESTATUS[0]}

"$PY" -m pytest bench/bench_seat.py --benchmark-only -q \
    --benchmark-json="$OUT/bench_seat.json" > "$OUT/bench_seat.txt" 2>&1
bench_rc=$?
tail -n 3 "$OUT/bench_seat.txt"

"$PY" - "$OUT/bench_seat.json" <<'PYEOF'
import json, sys

# Targets on the H100 at the paper shape (the lead's brief; floors in DESIGN.md section 2).
TARGET_MS = {"fwd": 0.18, "fwdbwd": 0.67, "loss": 0.45}

def fmt(value, spec):
    return "-".rjust(int(spec.split(".")[0])) if value is None else format(value, spec)

rows = [r for r in json.load(open(sys.argv[1]))["benchmarks"] if "mode" in r["extra_info"]]
rows.sort(key=lambda r: (r["extra_info"]["shape"]["M"], r["extra_info"]["shape"]["N"],
                         r["extra_info"]["mode"], r["extra_info"]["ms"]))
print(f"{'case':34s} {'ms':>9s} {'GB/s':>8s} {'of copy':>8s} {'extra MB':>9s} {'extra/Q':>8s} {'target':>7s}")
for r in rows:
    e = r["extra_info"]
    name = r["name"].split("[", 1)[-1].rstrip("]")
    target = TARGET_MS[e["mode"]] if name.startswith("paper-triton") else None
    print(f"{name:34s} {e['ms']:9.3f} {e['gb_per_s']:8.0f} {e['fraction_of_copy_bw']:8.2f} "
          f"{fmt(e['extra_peak_mb'], '9.1f')} {fmt(e['extra_peak_beyond_dq_vs_q'], '8.3f')} {fmt(target, '7.2f')}")
print(f"copy bandwidth {rows[0]['extra_info']['copy_gb_per_s']:.0f} GB/s (read + write); "
      "extra/Q = peak memory beyond inputs, minus dQ for backward variants, over Q's bytes")
print("autotuned configs at the paper shape (registers/spills: python -m san_fast.kernels.compile_report):")
for r in rows:
    if r["name"].split("[", 1)[-1].startswith("paper-triton"):
        for key, cfg in (r["extra_info"].get("autotuned") or {}).items():
            print(f"  {r['extra_info']['mode']:7s} {key}: {cfg}")
PYEOF

echo "tests exit code ${tests_rc}, benchmarks exit code ${bench_rc}; results in ${OUT}/"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]

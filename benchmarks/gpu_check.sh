#!/usr/bin/env bash
# The GPU path on a real GPU. On a machine with CUDA, from the repository root:
#
#   bash benchmarks/gpu_check.sh
#
# 1. the GPU-marked tests (`pytest -m gpu`);
# 2. a short production-config training with every diagnostic on one GPU
#    (`torchrun --nproc_per_node=1`), in bf16 autocast and in fp32;
# 3. for each: samples/s and step time (metrics.jsonl), peak allocated/reserved CUDA memory,
#    NVML memory, per-component CUDA-event forward/backward times and MFU against the GPU's
#    bf16 dense peak (components/profile_step_*.json; an unknown GPU reports MFU as unknown).
#
# Without CUDA it says so and exits 77 (the "skipped" status of automake and friends).
# Environment: GPU_CHECK_CONFIG (default: production), GPU_CHECK_STEPS (600),
# GPU_CHECK_PROFILE_INTERVAL (100: several profiled steps; the first is left out as warm-up),
# GPU_CHECK_OUT (run folders; default: a new folder under /tmp, kept), GPU_CHECK_SET (extra
# `key=value` overrides, space-separated), PYTHON (default: .venv/bin/python if present).
# GPU_CHECK_ALLOW_CPU=1 runs steps 2-3 on the CPU instead (a dry run of this script, used by
# its tests; the numbers are then CPU numbers and say so) and skips step 1.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
CONFIG=${GPU_CHECK_CONFIG:-configs/celestial_enhanced_pgat_production.yaml}
STEPS=${GPU_CHECK_STEPS:-600}
PROFILE_INTERVAL=${GPU_CHECK_PROFILE_INTERVAL:-100}
read -r -a EXTRA_SET <<< "${GPU_CHECK_SET:-}"
STAMP=$(date +%Y%m%d_%H%M%S)
failures=0

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    if [ "${GPU_CHECK_ALLOW_CPU:-0}" != "1" ]; then
        echo "gpu_check: no CUDA GPU is visible to torch ($("$PYTHON" -c 'import torch; print(torch.__version__)')):" \
             "nothing was checked. Run this on a machine with an NVIDIA GPU and a CUDA build of torch." >&2
        exit 77
    fi
    echo "gpu_check: GPU_CHECK_ALLOW_CPU=1 and no CUDA: dry run on the CPU (these are NOT GPU numbers)"
    DEVICE=cpu
else
    DEVICE=cuda
fi
OUT=${GPU_CHECK_OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$OUT"

echo "== machine"
"$PYTHON" - <<'EOF'
import platform, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, python {platform.python_version()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv

if [ "$DEVICE" = cuda ]; then
    echo "== GPU-marked tests"
    "$PYTHON" -m pytest -m gpu -v tests/ || failures=$((failures + 1))
fi

for precision in bf16 fp32; do
    name="gpu_check_${precision}_${STAMP}"
    echo "== training: $(basename "$CONFIG"), $STEPS steps, $precision, all diagnostics, $DEVICE"
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=1 launch/train.py \
        --config "$CONFIG" --experiment_name "$name" --precision "$precision" \
        --enable_gradient_diagnostics --enable_attention_logging --enable_component_profiling \
        --log_interval 10 --gradient_log_interval 50 --attention_log_interval 100 \
        --checkpoint_interval 500 --max_steps "$STEPS" \
        --set "train.device=$DEVICE" "train.log_root=$OUT/logs" "checkpoint.root=$OUT/checkpoints" \
              train.progress_bar=false train.validate_at_start=false \
              "diagnostics.profile_interval=$PROFILE_INTERVAL" "${EXTRA_SET[@]}" \
        > "$OUT/$name.out" 2>&1
    status=$?
    if [ $status -ne 0 ]; then
        echo "training failed (exit $status); the last lines of $OUT/$name.out:"
        tail -n 30 "$OUT/$name.out"
        failures=$((failures + 1))
        continue
    fi
    "$PYTHON" - "$OUT/logs/$name" "$precision" <<'EOF' || failures=$((failures + 1))
"""Summarise one run folder: metrics.jsonl train lines and components/profile_step_*.json."""
import json, statistics, sys
from pathlib import Path

import jsonschema

from diagnostics.schemas import PROFILE_RECORD

folder, precision = Path(sys.argv[1]), sys.argv[2]
lines = [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines()]
train = [l for l in lines if l["kind"] == "train"][1:]            # the first interval: warm-up
profiles = [json.loads(p.read_text()) for p in sorted((folder / "components").glob("profile_step_*.json"))]
if not train or not profiles:
    sys.exit(f"{folder}: {len(train)} timed train lines and {len(profiles)} profile records")
for record in profiles:
    jsonschema.validate(record, PROFILE_RECORD)
timed = profiles[1:] or profiles                                  # the first: warm-up
last, mem = timed[-1], timed[-1]["memory"]["per_rank"][0]
rate = statistics.median(l["samples_per_s"] for l in train)
step_ms = 1e3 * statistics.median(l["step_time_s"] for l in train)
mb = lambda key: f"{mem[key]:,.0f} MB" if mem.get(key) is not None else "n/a"
print(f"-- {precision} on {last['device_name']} ({last['device']}), timing by {last['timing']['method']}")
print(f"samples/s {rate:.1f} (median of {len(train)} log intervals, "
      f"{min(l['samples_per_s'] for l in train):.1f}-{max(l['samples_per_s'] for l in train):.1f}); "
      f"step time {step_ms:.2f} ms")
print(f"memory: CUDA peak allocated {mb('cuda_allocated_peak_mb')}, peak reserved "
      f"{mb('cuda_reserved_peak_mb')}; NVML used {mb('nvml_used_mb')} of {mb('nvml_total_mb')}; "
      f"RSS {mb('rss_mb')}")
print(f"profiled steps {[p['step'] for p in timed]}: per component, median ms (forward / backward)")
names = list(last["timing"]["components"])
for name in names:
    fwd = statistics.median(p["timing"]["components"][name]["forward_ms"] for p in timed)
    bwd = statistics.median(p["timing"]["components"][name]["backward_ms"] for p in timed)
    print(f"  {name:<32} {fwd:9.3f} / {bwd:9.3f}")
profiled_ms = statistics.median(p["timing"]["step_time_ms"] for p in timed)
parts_ms = statistics.median(sum(c["forward_ms"] + c["backward_ms"] for c in p["timing"]["components"].values())
                             for p in timed)
print(f"  components together {parts_ms:.3f} ms of a profiled step of {profiled_ms:.3f} ms "
      f"(hooks and a synchronize make profiled steps slower than the rest)")
flops, peak = last["flops_per_sample"], last["peak_tflops"]
print(f"FLOPs per sample {flops / 1e9:.3f} GFLOP; bf16 dense peak of this device: "
      f"{f'{peak} TFLOP/s' if peak else 'unknown (not in diagnostics.profiling.BF16_PEAK_TFLOPS)'}")
if peak:
    mfus = [p["mfu"] for p in timed if p["mfu"] is not None]
    note = " (fp32 cannot reach the bf16 peak: for comparison only)" if precision == "fp32" else ""
    print(f"MFU: {100 * flops * rate / (peak * 1e12):.2f}% at the unprofiled rate, "
          f"{100 * statistics.median(mfus):.2f}% in the profiled steps{note}")
else:
    print("MFU: unknown (no peak known for this device)")
EOF
done

echo "== run folders: $OUT"
if [ $failures -ne 0 ]; then
    echo "gpu_check: $failures part(s) failed"
    exit 1
fi
echo "gpu_check: done"

#!/usr/bin/env bash
# GPU measurements for one lent-device call, each step in its own process under its own time limit, every log
# kept in $OUT (the device's output folder; ./gpu-logs elsewhere). Steps run in the order given:
#   parity    the Triton GDN kernel and the CUDA engine path against the CPU reference (tests/gpu)
#   variants  eager bf16 and FP8 at 1/4/8 sessions, each compared with the first's frames and latents
#   compile   the same compiled (the engine warms up every chunk kind first: minutes)
#   factored  the factored (batched-GEMM) GDN: its parity and timing against the reference and the kernel, then
#             the engine with it, eager and compiled (profiled at 8 sessions)
#   profile   one step of 4 sessions by model part and kernel family
#   refiner   the release-size refiner on a 60 s recording (time, peak memory), eager; refiner-compile: compiled
#   live      LIVE_SESSIONS (1) live sessions for LIVE_SECONDS (45), then as many more while the refiner works
#             on the first ones' recordings (benchmarks/live_with_refiner.sh)
#
#   benchmarks/gpu_session.sh parity variants profile          # about 8 minutes on a fresh H100
# Needs diffusers (and nvidia-modelopt for FP8) importable, e.g. from wheels installed to /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
V="python3 benchmarks/gpu_variants.py --sessions 1,4,8 --chunks 3 --reference $OUT/reference.npz --variants"
run() {  # run NAME SECONDS COMMAND...: the command's output to the terminal and to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  echo "== $name (limit $limit s): $*"
  timeout "$limit" "$@" 2>&1 | grep -v -i -e "warn" -e "recompil" | tee "$OUT/$name.log"
}
for step in "$@"; do
  case $step in
    parity) run parity-triton 150 python3 -m pytest -q -x -s tests/gpu/test_gated_delta_triton_cuda.py
            run parity-engine 300 python3 -m pytest -q tests/gpu/test_cuda_parity.py ;;
    variants) run bf16 120 $V tf32
              run fp8 200 $V fp8 ;;
    compile) run compile 420 $V compile
             run fp8-compile 420 $V fp8_compile ;;
    factored) run parity-factored 180 python3 -m pytest -q -s tests/gpu/test_gated_delta_factored_cuda.py tests/gpu/test_gated_delta_triton_cuda.py -k "factored or timing or largest"
              run eager-factored 150 $V factored --profile
              run compile-factored 420 $V compile_factored --profile ;;
    profile) run profile 120 python3 benchmarks/profile_engine.py --sessions 4 ;;
    refiner) run refiner 150 python3 benchmarks/refiner_gpu.py --seconds 60 --decode ;;
    refiner-compile) run refiner-compile 420 python3 benchmarks/refiner_gpu.py --seconds 60 --compile ;;
    live) run live 300 env PYTHON=python3 benchmarks/live_with_refiner.sh sana-wm-streaming cuda "${LIVE_SESSIONS:-1}" "${LIVE_SECONDS:-45}"
          cp /tmp/live-refiner-*/serve.log "$OUT/live-serve.log" 2>/dev/null ;;
    *) echo "unknown step $step (parity variants compile factored profile refiner refiner-compile live)" >&2; exit 2 ;;
  esac
done

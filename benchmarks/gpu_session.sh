#!/usr/bin/env bash
# Everything measured on a CUDA machine, in one go (see benchmarks/results/):
#   1. the gpu-marked tests (Triton and torch conversion kernels bit-identical to the CPU path);
#   2. benchmarks/bench_gpu_convert.py: kernel GB/s vs a device copy, end to end vs the disk;
#   3. flagrelease probe-gems on the DeepSeek-R1-Distill-Qwen-32B architecture (2 layers).
# Usage: bash benchmarks/gpu_session.sh OUTDIR [tests|convert|probe ...]   (default: all three)
set -uo pipefail
out=${1:?usage: gpu_session.sh OUTDIR [tests|convert|probe ...]}; shift
steps=${*:-tests convert probe}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
$py - <<'PY' | tee "$out/device.txt"
import torch, triton
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| triton", triton.__version__)
try:
    import flag_gems
    print("flag_gems", getattr(flag_gems, "__version__", "?"))
except Exception as err:  # noqa: BLE001 - report what is there
    print("flag_gems not importable:", err)
PY
for step in $steps; do
  case $step in
    tests) $py -m pytest --noconftest -q -m gpu -p no:cacheprovider tests/gems/test_gpu_kernels.py tests/convert/test_convert.py 2>&1 | tee "$out/gpu_tests.txt" ;;
    convert) $py benchmarks/bench_gpu_convert.py --out "$out" --e2e-gb "${E2E_GB:-6}" 2>&1 | tail -40 ;;
    probe) $py -m flagrelease.cli probe-gems release_configs/deepseek-r1-distill-qwen-32b-nvidia.yaml \
             --model-config benchmarks/configs/deepseek-r1-distill-qwen-32b.config.json \
             --layers 2 --jobs 4 --timeout 180 --out "$out/probe" 2>&1 | tail -60 ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done

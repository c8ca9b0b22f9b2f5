#!/usr/bin/env bash
# Serve release deepseek-r1-distill-qwen-32b-nvidia (DeepSeek-R1-Distill-Qwen-32B on NVIDIA H100) with vLLM directly: the
# equivalent of `flagscale serve deepseek_r1_distill_qwen_32b` with the same engine args and environment.
# Rendered by flagrelease 0.1.0; every value below is shell-quoted.
set -eo pipefail

export CUDA_DEVICE_MAX_CONNECTIONS=1
export USE_FLAGGEMS=true

exec vllm serve /nfs/DeepSeek-R1-Distill-Qwen-32B \
    --served-model-name deepseek-r1-distill-qwen-32b-flagos \
    --tensor-parallel-size 8 \
    --pipeline-parallel-size 1 \
    --max-model-len 32768 \
    --max-num-seqs 256 \
    --gpu-memory-utilization 0.9 \
    --port 9010 \
    --host 127.0.0.1 \
    --trust-remote-code \
    --enforce-eager \
    --enable-chunked-prefill

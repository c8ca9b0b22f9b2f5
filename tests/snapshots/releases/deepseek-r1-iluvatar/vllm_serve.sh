#!/usr/bin/env bash
# Serve release deepseek-r1-iluvatar (DeepSeek-R1 on Iluvatar BI-V150) with vLLM directly: the
# equivalent of `flagscale serve deepseek_r1` with the same engine args and environment.
# Rendered by flagrelease 0.1.0; every value below is shell-quoted.
set -eo pipefail

export CUDA_DEVICE_MAX_CONNECTIONS=1
export VLLM_FORCE_NCCL_COMM=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export USE_FLAGGEMS=true

# serve.before_start from the release config: shell commands by contract, as FlagScale runs them.
export TRITON_CACHE_DIR="/cache"
export NCCL_SOCKET_IFNAME=ens1f0
export VLLM_FORCE_NCCL_COMM=1
export GLOO_SOCKET_IFNAME=ens1f0
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

exec vllm serve /data1/models/DeepSeek-R1-INT8 \
    --served-model-name deepseek-r1-flagos-iluvatar-int8 \
    --tensor-parallel-size 8 \
    --pipeline-parallel-size 4 \
    --max-model-len 5120 \
    --max-num-seqs 256 \
    --gpu-memory-utilization 0.8 \
    --port 9010 \
    --host 127.0.0.1 \
    --trust-remote-code

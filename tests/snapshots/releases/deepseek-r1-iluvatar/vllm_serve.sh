#!/usr/bin/env bash
# Serve release deepseek-r1-iluvatar (DeepSeek-R1 on Iluvatar BI-V150) with vLLM directly: the
# equivalent of `flagscale serve deepseek_r1` with the same engine args and environment.
# Across the nodes of hostfile.txt with a Ray cluster, as FlagScale forms it: Ray's head on the
# first node, a Ray worker on every other node (over ssh), then vLLM on the head. Run it on the
# first node of hostfile.txt (HOSTFILE=... names another hostfile).
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

HOSTFILE="${HOSTFILE:-$(dirname "$0")/hostfile.txt}"
RAY_PORT=6379
mapfile -t NODES < <(awk 'NF && $1 !~ /^#/ {print $1}' "$HOSTFILE")
mapfile -t SLOTS < <(awk 'NF && $1 !~ /^#/ {n = 0; for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) n = substr($i, 7); print n}' "$HOSTFILE")
HEAD="${NODES[0]}"
BEFORE_START='export TRITON_CACHE_DIR="/cache" && export NCCL_SOCKET_IFNAME=ens1f0 && export VLLM_FORCE_NCCL_COMM=1 && export GLOO_SOCKET_IFNAME=ens1f0 && export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True'

# The shell line that runs "$@" on node $1 with this release's environment, in its container.
node_line() {
    local node="$1"
    shift
    printf '%q ' docker exec -e "CUDA_DEVICE_MAX_CONNECTIONS=$CUDA_DEVICE_MAX_CONNECTIONS" -e "VLLM_FORCE_NCCL_COMM=$VLLM_FORCE_NCCL_COMM" -e "PYTORCH_CUDA_ALLOC_CONF=$PYTORCH_CUDA_ALLOC_CONF" -e "USE_FLAGGEMS=$USE_FLAGGEMS" -e "VLLM_HOST_IP=$node" flagrelease_bi bash -c "$BEFORE_START"' && exec "$@"' bash "$@"
}

# Run "$@" on node $1: here on the head, over ssh on the others.
on_node() {
    local node="$1" line
    shift
    line="$(node_line "$node" "$@")"
    if [ "$node" = "$HEAD" ]; then bash -c "$line"; else ssh -p 22 "$node" "$line"; fi
}

for node in "${NODES[@]}"; do on_node "$node" ray stop --force || true; done
on_node "$HEAD" ray start --head --node-ip-address="$HEAD" --port="$RAY_PORT" --num-gpus="${SLOTS[0]}"
for i in "${!NODES[@]}"; do
    if [ "$i" -gt 0 ]; then
        on_node "${NODES[$i]}" ray start --address="$HEAD:$RAY_PORT" --node-ip-address="${NODES[$i]}" --num-gpus="${SLOTS[$i]}"
    fi
done

# vLLM on the head, across the cluster.
exec bash -c "$(node_line "$HEAD" \
    vllm serve /data1/models/DeepSeek-R1-INT8 \
    --served-model-name deepseek-r1-flagos-iluvatar-int8 \
    --tensor-parallel-size 8 \
    --pipeline-parallel-size 4 \
    --max-model-len 5120 \
    --max-num-seqs 256 \
    --gpu-memory-utilization 0.8 \
    --port 9010 \
    --host 0.0.0.0 \
    --trust-remote-code \
    --distributed-executor-backend ray)"

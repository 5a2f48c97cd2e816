# One image for every Cascade service; docker-compose.yml picks the role with `command:`
# (cascade serve retrieval|prerank|rank|gateway, cascade load-store).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_NUM_THREADS=1 \
    OMP_WAIT_POLICY=PASSIVE

# libgomp1: faiss-cpu and torch's OpenMP runtime.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# torch first, from the PyTorch CPU index: a bare `torch` requirement would pull the multi-GB
# CUDA build from PyPI. GPU hosts override TORCH_INDEX (e.g. .../whl/cu124) at build time.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

# Dependencies before code, so editing code does not reinstall them.
COPY pyproject.toml README.md ./
COPY models ./models
COPY services ./services
COPY cli ./cli
COPY loadtest ./loadtest
COPY proto ./proto
COPY scripts ./scripts
RUN pip install .

# Unprivileged runtime user; bundles and data arrive read-only on mounted volumes.
RUN useradd --create-home --uid 10001 cascade
USER cascade

EXPOSE 8000 8001 8002 8003
CMD ["cascade", "serve", "all", "--host", "0.0.0.0", "--port", "8000"]

# Stable-SAM ML backend for Label Studio: one image for the HTTP backend and the GPU training worker.
#
#   docker build -t stable-sam-backend .                                  # embedded default only
#   docker build --build-arg SAM_CHECKPOINTS="vit_b vit_l" -t stable-sam-backend .
#
# SAM_CHECKPOINTS (space-separated: vit_b vit_l vit_h vit_t hq_vit_b hq_vit_l hq_vit_h
# sam2.1_hiera_tiny sam2.1_hiera_small sam2.1_hiera_base_plus sam2.1_hiera_large) downloads the
# official SAM / MobileSAM / HQ-SAM / SAM 2.1 checkpoints into /models at build time, each verified
# against its SHA-256 pinned in deploy/checkpoints.py (a mismatch fails the build). hq_vit_b and
# hq_vit_l have no published hash to pin: they are refused unless
# --build-arg SAM_CHECKPOINT_SHA256="hq_vit_b=<sha256>" gives one (or mount the file instead).
# Select one at run time with SAM_MODEL_TYPE=vit_l SAM_CHECKPOINT=/models/sam_vit_l_0b3195.pth
# (MobileSAM: SAM_MODEL_TYPE=vit_t SAM_CHECKPOINT=/models/mobile_sam.pt; SAM 2.1:
# SAM_MODEL_TYPE=sam2.1_hiera_tiny SAM_CHECKPOINT=/models/sam2.1_hiera_tiny.pt). The PyPI torch
# wheels bring their own CUDA libraries; the CUDA base image provides the NVIDIA container runtime
# setup.
ARG CUDA_BASE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
FROM ${CUDA_BASE}

ARG SAM_CHECKPOINTS=""
ARG SAM_CHECKPOINT_SHA256=""
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    VERSIONS_DIR=/data/versions

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates curl \
        libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /app
COPY requirements.txt .
COPY scripts/install_requirements.sh scripts/
RUN bash scripts/install_requirements.sh pip

# Official checkpoints, fetched at build time and verified against their pins (none by default:
# the embedded default ships in stable_sam/weights/).
COPY deploy/checkpoints.py deploy/checkpoints.py
RUN mkdir -p /models && python deploy/checkpoints.py --dest /models ${SAM_CHECKPOINTS}

# Only the code (never .venv or data): backend, model, training, scripts.
COPY pyproject.toml ./
COPY stable_sam ./stable_sam
COPY labelstudio ./labelstudio
COPY runtime ./runtime
COPY backend ./backend
COPY training ./training
COPY scripts ./scripts

RUN useradd --create-home --uid 1000 app && mkdir -p /data/versions && chown -R app /data
USER app
VOLUME ["/data"]
EXPOSE 9090

HEALTHCHECK --interval=30s --timeout=3s --start-period=60s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/health', timeout=2)"

# The backend; the worker service runs `python -m training.worker` instead (docker-compose.yml).
CMD ["uvicorn", "backend.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "9090"]

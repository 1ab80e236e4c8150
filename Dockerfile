# Stable-SAM ML backend for Label Studio: one image for the HTTP backend and the GPU training worker.
#
#   docker build -t stable-sam-backend .                                  # embedded default only
#   docker build --build-arg SAM_CHECKPOINTS="vit_b vit_l" -t stable-sam-backend .
#
# SAM_CHECKPOINTS (space-separated: vit_b vit_l vit_h hq_vit_b hq_vit_l hq_vit_h) downloads the
# official SAM / HQ-SAM checkpoints into /models at build time; select one at run time with
# SAM_MODEL_TYPE=vit_l SAM_CHECKPOINT=/models/sam_vit_l_0b3195.pth. The PyPI torch wheels bring
# their own CUDA libraries; the CUDA base image provides the NVIDIA container runtime setup.
ARG CUDA_BASE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
FROM ${CUDA_BASE}

ARG SAM_CHECKPOINTS=""
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

# Official checkpoints, fetched at build time (none by default: the embedded default ships in
# stable_sam/weights/).
RUN set -eu; mkdir -p /models; \
    for name in ${SAM_CHECKPOINTS}; do \
      case "$name" in \
        vit_b) url=https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth ;; \
        vit_l) url=https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth ;; \
        vit_h) url=https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth ;; \
        hq_vit_b) url=https://huggingface.co/lkeab/hq-sam/resolve/main/sam_hq_vit_b.pth ;; \
        hq_vit_l) url=https://huggingface.co/lkeab/hq-sam/resolve/main/sam_hq_vit_l.pth ;; \
        hq_vit_h) url=https://huggingface.co/lkeab/hq-sam/resolve/main/sam_hq_vit_h.pth ;; \
        *) echo "unknown checkpoint '$name'" >&2; exit 1 ;; \
      esac; \
      echo "fetching $name"; curl -fL --retry 3 -o "/models/$(basename "$url")" "$url"; \
    done

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

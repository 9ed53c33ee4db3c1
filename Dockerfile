# disagg-serve on the official Ray GPU image (Ray 2.60.0, Python 3.11, CUDA; user `ray`).
# Used by deploy/ray-cluster.yaml (docker.image) and deploy/kuberay/*.yaml (image).
#   IMAGE=ghcr.io/YOUR_ORG/disagg-serve:0.1.0
#   docker build -t $IMAGE . && docker push $IMAGE
# The install line uses the versions CI passes with (constraints/ci.txt) and the torch of the
# README; tests/deploy/test_image.py checks this file against pyproject.toml and those pins.
FROM rayproject/ray:2.60.0-py311-gpu

# The checkout is bind-mounted for the install (BuildKit, Docker >= 23): no source layer in the image,
# and nothing of it left on sys.path.
# torch 2.13.0 from PyPI is the CUDA 13.0 build (NVIDIA driver >= 580 on the host) with triton 3.7.1.
RUN --mount=type=bind,source=.,target=/tmp/disagg-serve,rw \
    cd /tmp/disagg-serve && pip install --no-cache-dir -c constraints/ci.txt torch==2.13.0 '.[bench,report]' \
    && cd / && disagg --version

WORKDIR /home/ray
# Model weights live on a volume mounted at /models (deploy/kuberay: a PVC; the launcher: the
# host's /models); the HF cache goes there too so nothing is downloaded into the container layer.
ENV HF_HOME=/models/.hf-cache \
    RAY_USAGE_STATS_ENABLED=0
# gRPC, OpenAI-compatible HTTP, Prometheus metrics, Ray dashboard, Ray GCS.
EXPOSE 50051 8000 9400 8265 6379

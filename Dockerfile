# The ptft-dist image for GPU clusters (the one cluster/kuberay/*.yaml name): Ray 2.60's GPU
# image, the CUDA build of ptft's torch pin, DeepSpeed (CUDA ops JIT-build on first use into
# TORCH_EXTENSIONS_DIR), and this checkout installed.
#
#   docker build -t ghcr.io/your-org/ptft-dist:0.1.0-gpu .        # EDIT: your registry
#   docker run --rm ghcr.io/your-org/ptft-dist:0.1.0-gpu ptft doctor            # on CPU: says so
#   docker run --rm --gpus all ghcr.io/your-org/ptft-dist:0.1.0-gpu ptft doctor # GPUs, NCCL, bf16
#   docker push ghcr.io/your-org/ptft-dist:0.1.0-gpu
#
# Build args: CUDA (PyTorch's wheel index, cu128 by default), RAY_IMAGE (the base).
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}
ARG CUDA=cu128

WORKDIR /home/ray/ptft
# Dependencies first (a layer that changes only with pyproject.toml), then the code.
COPY --chown=ray:users pyproject.toml README.md ./
RUN pip install --no-cache-dir "torch==2.13.0" \
        --index-url "https://download.pytorch.org/whl/${CUDA}" --extra-index-url https://pypi.org/simple \
    && DS_BUILD_OPS=0 pip install --no-cache-dir --no-build-isolation "deepspeed==0.19.8"
COPY --chown=ray:users ptft_dist ./ptft_dist
RUN pip install --no-cache-dir -e . \
    && python -c "import ray; assert ray.__version__ == '2.60.0', ray.__version__"

# DeepSpeed's JIT-built ops land here (node-local in the container); W&B logs offline unless
# WANDB_API_KEY / WANDB_MODE say otherwise.
ENV TORCH_EXTENSIONS_DIR=/home/ray/.cache/torch_extensions \
    PYTHONWARNINGS=ignore::FutureWarning,ignore::DeprecationWarning \
    TOKENIZERS_PARALLELISM=false

# The check runs at build time too (no GPU there): it fails the build if a package is broken.
RUN ptft doctor

# syntax=docker/dockerfile:1
# megatron-oreal GPU image for H100 (sm_90) clusters: CUDA PyTorch, Transformer Engine, NVIDIA apex,
# Megatron-Core 0.16.1, SGLang (co-located rollout) and this package, patches applied (no flash-attn 2:
# see Versions).
#
# Build (from the repository root, with a Docker engine; the CPU dev machines have no engine, so
# this file is linted by tests/unit/test_dockerfile.py but has not been built there):
#   docker build -t megatron-oreal:gpu --build-arg MAX_JOBS=32 .
#   (Transformer Engine and apex compile from source: most of an hour with MAX_JOBS=32; each nvcc
#    job needs ~4-8 GB of RAM, so lower MAX_JOBS on a small builder)
#
# Run on one 8-GPU node:
#   docker run --rm --gpus all --init --ipc=host --network=host \
#     --ulimit memlock=-1 --ulimit stack=67108864 \
#     -v "$PWD/runs:/workspace/megatron-oreal/runs" -v /data:/data megatron-oreal:gpu \
#     torchrun --nproc_per_node 8 -m megatron_oreal train CONFIG.yaml
#   (--ipc=host: NCCL and SGLang need more shared memory than Docker's 64 MB; --init reaps zombies)
#
# On Slurm with pyxis/enroot:
#   enroot import -o /shared/megatron-oreal.sqsh dockerd://megatron-oreal:gpu
#   sbatch --export=ALL,OREAL_CONTAINER=/shared/megatron-oreal.sqsh \
#     examples/slurm/train_1node.sbatch CONFIG.yaml
#
# Versions (checked against PyPI with `pip download --no-deps` / `pip index versions`, 2026-11):
#   * SGLang 0.5.21 is the newest release that pins torch==2.13.0, the torch of the CPU path
#     (requirements.txt); it also pins transformers==5.12.1 and tokenizers==0.22.2, which therefore
#     win inside this image (the CPU path pins transformers 5.23.0; the CPU suite's fast tests, the
#     TP2xPP2 weight sync, the TP1 e2e run and the demo test also pass under 5.12.1 + tokenizers
#     0.22.2, checked 2026-11-22). sglang 0.5.5 pinned torch 2.8.0.
#   * PyPI torch 2.13.0 is built for CUDA 13.0 (cuda-toolkit 13.0.3, NCCL 2.29.7, cuDNN 9.20).
#   * Transformer Engine: megatron-core 0.16.1's own extra asks for transformer-engine>=2.9.0a0,<2.12.0;
#     2.11.0 is the newest in that range (transformer_engine_torch is an sdist built here against torch).
#   * No flash-attn 2. The only version TE 2.11 accepts (<= 2.8.3, FlashAttentionUtils.max_version) has
#     open upstream build failures from source under CUDA 13 (the image's toolkit), and the trainer does
#     not need it: our packed micro-batches are THD, for which TE's backend selection
#     (transformer_engine/pytorch/attention/dot_product_attention/utils.py, get_attention_backend,
#     "Filter: QKV layout") drops the unfused backend and uses cuDNN's FusedAttention (arbitrary
#     sequence lengths, sm80+, served by the cuDNN 9 that torch 2.13 ships); with padding between
#     sequences it would skip flash-attn 2 anyway.
#     NGC's own flash-attn (built for NGC's torch) is uninstalled with it. (SGLang's flash-attn-4
#     installs only flash_attn/cute, which TE does not use.) docs/gpu.md §6 says what to check first.
#   * apex: not on PyPI (PyPI's "apex" is another project); built from NVIDIA/apex at a pinned commit
#     (2026-07-08, head of master when checked) for fused_weight_gradient_mlp_cuda and fused layer norm.
#   * Base: NGC 26.07 ships torch 2.13.0a0+nv26.07, CUDA 13.3, Python 3.12. SGLang's wheels
#     (sglang-kernel, flashinfer) are built against the PyPI torch 2.13.0 release and its exact pin
#     rejects the NGC pre-release build, so the image replaces NGC's torch with the PyPI one and
#     builds TE and apex against it: one torch ABI for every extension. NGC still provides
#     nvcc, cuDNN/NCCL headers, HPC-X/UCX and the InfiniBand user space that H100 clusters need.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:26.07-py3
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCHVISION_VERSION=0.28.0
ARG TORCHAUDIO_VERSION=2.11.0
ARG SGLANG_VERSION=0.5.21
ARG TE_VERSION=2.11.0
ARG MCORE_VERSION=0.16.1
ARG APEX_COMMIT=6424da3b4faa6c8f062da4a48c424fff3f02d42d
ARG NINJA_VERSION=1.13.0
ARG PYBIND11_VERSION=3.0.1
ARG MAX_JOBS=16

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# NGC's PIP_CONSTRAINT pins its own torch build; ours (written below) pins the PyPI one instead.
# Kernels only for H100 (sm_90): a fraction of the build time and size of all architectures.
# FP32 (not power-of-2) block scales for TE's blockwise FP8 training GEMMs (read at import), as slime's
# Hopper recipes; unrelated to the rollout quantiser's scales (fp8_param=False, docs/gpu.md §5).
ENV PIP_CONSTRAINT="" \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TORCH_CUDA_ARCH_LIST="9.0" \
    NVTE_CUDA_ARCHS="90" \
    NVTE_FRAMEWORK=pytorch \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    NVTE_FP8_BLOCK_SCALING_FP32_SCALES=1 \
    TOKENIZERS_PARALLELISM=false \
    PYTHONUNBUFFERED=1

# patch: applies patches/*.patch; git: fetches apex at its pinned commit.
RUN apt-get update \
 && apt-get install -y --no-install-recommends patch git \
 && rm -rf /var/lib/apt/lists/*

# 1. One torch for everything, then a constraints file so no later install can swap it.
RUN pip uninstall -y torch torchvision torchaudio triton transformer-engine transformer-engine-torch \
        transformer-engine-cu12 transformer-engine-cu13 flash-attn apex torch-tensorrt \
 && pip install torch==${TORCH_VERSION} torchvision==${TORCHVISION_VERSION} torchaudio==${TORCHAUDIO_VERSION} \
        ninja==${NINJA_VERSION} pybind11==${PYBIND11_VERSION} \
 && python -c "import torch; v = torch.__version__; assert v.split('+')[0] == '${TORCH_VERSION}', v; print('torch', v, 'CUDA', torch.version.cuda)" \
 && pip freeze | grep -iE '^(torch|torchvision|torchaudio|triton)==' > /opt/oreal-constraints.txt
ENV PIP_CONSTRAINT=/opt/oreal-constraints.txt

# 2. SGLang with its own pins (transformers, flashinfer, sglang-kernel); torch is already satisfied.
RUN pip install sglang==${SGLANG_VERSION} \
 && pip freeze | grep -iE '^(transformers|tokenizers|numpy)==' >> /opt/oreal-constraints.txt

# 3. Transformer Engine, compiled against the torch above (hence --no-build-isolation).
RUN MAX_JOBS=${MAX_JOBS} pip install --no-build-isolation "transformer_engine[pytorch,core_cu13]==${TE_VERSION}"

# 4. NVIDIA apex at a pinned commit, with the C++/CUDA extensions Megatron-Core can use.
RUN git clone --filter=blob:none https://github.com/NVIDIA/apex /tmp/apex \
 && git -C /tmp/apex checkout ${APEX_COMMIT} \
 && cd /tmp/apex \
 && APEX_CPP_EXT=1 APEX_CUDA_EXT=1 APEX_PARALLEL_BUILD=${MAX_JOBS} NVCC_APPEND_FLAGS="--threads 4" \
    pip install --no-build-isolation --no-deps . \
 && cd / && rm -rf /tmp/apex

# 5. Megatron-Core and the CPU-path requirements, minus what the GPU stack pins above.
COPY requirements.txt /tmp/requirements.txt
RUN grep -vE '^(torch|transformers|tokenizers|numpy|megatron-core)==' /tmp/requirements.txt > /tmp/requirements-image.txt \
 && pip install -r /tmp/requirements-image.txt megatron-core==${MCORE_VERSION} \
 && rm /tmp/requirements.txt /tmp/requirements-image.txt

# 6. This package (editable, so a bind-mounted checkout over it is picked up), then our patches
#    to the installed upstream packages (an empty patches/ folder is a no-op).
WORKDIR /workspace/megatron-oreal
COPY . .
RUN pip install --no-deps --no-build-isolation -e . \
 && python patches/apply.py

# Fail the build on a broken stack: the pins we asked for are the ones installed, and none of our
# packages has an unmet requirement (NGC's own extras may complain about the replaced torch; they
# are not used, so only our packages' lines count).
RUN python -c "import importlib.metadata as m; \
want = {'torch': '${TORCH_VERSION}', 'sglang': '${SGLANG_VERSION}', 'transformer_engine': '${TE_VERSION}', \
'megatron_core': '${MCORE_VERSION}'}; \
got = {k: m.version(k).split('+')[0] for k in want}; assert got == want, (got, want); print(got)" \
 && { pip check > /tmp/pip-check.txt || true; } \
 && cat /tmp/pip-check.txt \
 && ! grep -iE '^(sglang|megatron|transformer.engine|flash.attn|apex|torch) ' /tmp/pip-check.txt

CMD ["python", "-m", "megatron_oreal", "--help"]

# NCCL / CUDA settings for H100 nodes with InfiniBand (sourced by the GPU sbatch scripts).
# Every value can be overridden from the environment of `sbatch`.

# Megatron-Core's tensor-parallel communication overlap needs kernels issued in order on one
# hardware queue: megatron/core/tensor_parallel/layers.py (the async all-gather/reduce-scatter
# overlap in LinearWithGradAccumulationAndAsyncCommunication) relies on CUDA_DEVICE_MAX_CONNECTIONS=1.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
# A rank that fails a collective raises instead of hanging the job until the time limit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
# Dump the in-flight collectives of a hung rank (read with torch's fr_trace tool).
export TORCH_NCCL_TRACE_BUFFER_SIZE="${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# GPUDirect RDMA when the NIC and the GPU share a PCIe switch (the usual H100 HGX layout).
export NCCL_NET_GDR_LEVEL="${NCCL_NET_GDR_LEVEL:-PHB}"
# Bootstrap/out-of-band traffic on the node's Ethernet, not on loopback or docker bridges;
# set NCCL_SOCKET_IFNAME (e.g. ens, bond0) and NCCL_IB_HCA (e.g. mlx5) for your cluster.
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker}"
# SGLang's co-located engines share the GPUs with training: leave NCCL's NVLS buffers off
# unless the cluster is known to have memory to spare (NVLS reserves memory per communicator).
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
# Blockwise FP8 (policy.fp8=blockwise) on Hopper: FP32 (not power-of-2) block scales for the training
# GEMMs, as slime's Hopper recipes; the rollout quantiser's scales do not depend on it (docs/gpu.md §5).
export NVTE_FP8_BLOCK_SCALING_FP32_SCALES="${NVTE_FP8_BLOCK_SCALING_FP32_SCALES:-1}"

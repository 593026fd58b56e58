#!/bin/bash
# GPU smoke check, first thing on a CUDA machine (run from the repo root; needs the CPU requirements
# installed, Transformer Engine optional):
#   bash tools/gpu_smoke.sh [OUT_DIR]
# 1. the tiny OREAL run on cuda:0 (Megatron's local layer spec if TE does not import), 12 steps;
# 2. `profile` of 6 steps the same way;
# 3. the CPU suite (CUDA hidden by tests/conftest.py) and the `gpu` tier.
# Each part is time-boxed and logged to OUT_DIR; the first GPU run (docs/gpu.md §6) used this order.
set -u
out=${1:-gpu_smoke_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" \
  | tee "$out/env.txt" || exit 1
run() { timeout "$1" "${@:2}"; echo "rc=$?"; }
run 300 python3 -m megatron_oreal train examples/tiny/oreal.yaml run_dir="$out/train" steps=12 eval.every=6 \
  policy.allow_local_spec=true >"$out/train.log" 2>&1; tail -4 "$out/train.log"
run 180 python3 -m megatron_oreal profile examples/tiny/oreal.yaml --steps 6 run_dir="$out/profile" \
  policy.allow_local_spec=true eval.every=0 checkpoint.every=0 >"$out/profile.log" 2>&1; tail -12 "$out/profile.log"
run 1800 python3 -m pytest tests -q -rfEs -m "not slurm and not real_model" >"$out/pytest.log" 2>&1; tail -3 "$out/pytest.log"
run 600 python3 -m pytest tests -q -rs -m gpu >"$out/pytest_gpu.log" 2>&1; tail -3 "$out/pytest_gpu.log"

# Shared by the sbatch scripts in this folder (sourced, not run). Bash only.
#
#   oreal_setup_env       venv, rendezvous (MASTER_ADDR/MASTER_PORT), threading, a banner in the log
#   oreal_srun ARGS...    run `srun ARGS...` in the background, forward USR1/TERM/INT to it,
#                         and return its exit status
#
# Signals: bash runs a trap only after the foreground command ends, so a step started in the
# foreground would not see `--signal=B:USR1@...` until the run is over. oreal_srun starts srun in
# the background and waits; the trap forwards the signal to srun, which passes it to every task
# (tested on Slurm 22.05: USR1 sent to srun reaches each task and its children). The trainer
# (megatron_oreal.launch.signals) finishes its stage, checkpoints, requeues the job itself with
# `scontrol requeue`, and exits with EXIT_PREEMPTED=75. Nothing here kills anything by name: only
# the srun this script started is signalled, by its pid.

OREAL_EXIT_PREEMPTED=75 # keep equal to megatron_oreal.launch.signals.EXIT_PREEMPTED

oreal_log() { echo "[oreal-slurm $(date +%T)] $*"; }

oreal_setup_env() {
  # The job runs from the submit directory (the repository root, as the README's commands do).
  if [ -n "${OREAL_VENV:-}" ]; then
    # shellcheck disable=SC1091
    source "$OREAL_VENV/bin/activate"
  elif [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
    # shellcheck disable=SC1091
    source .venv/bin/activate
  fi
  # Rank 0 runs on the first node of the allocation; `scontrol show hostnames` is Slurm's own
  # expansion of the nodelist (launch/env.py falls back to parsing it when MASTER_ADDR is unset).
  MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
  # Same rule as launch.env.slurm_port: a requeued job keeps its id and so its port.
  MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
  export MASTER_ADDR MASTER_PORT
  # One process per GPU: keep each rank's CPU threads to its share of the node.
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
  export TOKENIZERS_PARALLELISM=false
  export PYTHONUNBUFFERED=1 # logs appear as they are written, not at exit
  oreal_log "job ${SLURM_JOB_ID} (${SLURM_JOB_NAME:-}) restart ${SLURM_RESTART_COUNT:-0}:" \
    "${SLURM_NNODES:-1} node(s) ${SLURM_JOB_NODELIST}, ${SLURM_NTASKS:-1} task(s)," \
    "rendezvous ${MASTER_ADDR}:${MASTER_PORT}, python $(command -v python)"
}

oreal_srun() {
  srun "$@" &
  local pid=$!
  # Forward to our srun only (by pid); a second signal is forwarded too and is harmless.
  trap 'oreal_log "batch shell got USR1: forwarding to srun $pid"; kill -USR1 $pid 2>/dev/null' USR1
  trap 'oreal_log "batch shell got TERM: forwarding to srun $pid"; kill -TERM $pid 2>/dev/null' TERM
  trap 'kill -INT $pid 2>/dev/null' INT
  # `wait` returns early (128+N) when a trapped signal arrives: keep waiting until srun is gone.
  while kill -0 "$pid" 2>/dev/null; do
    wait "$pid"
  done
  wait "$pid" # bash keeps the status of a reaped background job: this is srun's exit status
  local rc=$?
  trap - USR1 TERM INT
  if [ "$rc" = "$OREAL_EXIT_PREEMPTED" ]; then
    oreal_log "step stopped on a preemption signal and saved its state (exit $rc); the job requeued itself"
  else
    oreal_log "step exited with status $rc"
  fi
  return "$rc"
}

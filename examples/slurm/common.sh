# Shared by the sbatch scripts in this folder (sourced, not run). Bash only.
#
#   oreal_setup_env       venv, rendezvous (MASTER_ADDR/MASTER_PORT), threading, a banner in the log
#   oreal_srun ARGS...    run `srun ARGS...` in the background, turn the batch shell's USR1 into
#                         the stop-request file $OREAL_PREEMPT_FILE, return srun's exit status
#
# Signals: bash runs a trap only after the foreground command ends, so a step started in the
# foreground would not see `--signal=B:USR1@...` until the run is over. oreal_srun starts srun in
# the background and waits. The USR1 trap does not forward the signal (Slurm would deliver it to
# every process of every task, and spawned children such as the verifier pool or checkpoint
# writers die of it); it writes $OREAL_PREEMPT_FILE, which the ranks' PreemptionHandler
# (megatron_oreal.launch.signals) checks between stages. Rank 0 runs on this (the first) node,
# and the ranks OR their flags, so a node-local file is enough. The trainer then finishes its
# stage, checkpoints, requeues the job with `scontrol requeue`, and exits with EXIT_PREEMPTED=75.
# SIGTERM (scancel, time limit, preemption) reaches every task from Slurm itself. Nothing here
# kills anything by name.

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
  # One flag file per run (a requeued run must not see the previous run's request).
  export OREAL_PREEMPT_FILE="${OREAL_PREEMPT_FILE:-${TMPDIR:-/tmp}/oreal-preempt-${SLURM_JOB_ID}.${SLURM_RESTART_COUNT:-0}}"
  rm -f "$OREAL_PREEMPT_FILE"
  oreal_log "job ${SLURM_JOB_ID} (${SLURM_JOB_NAME:-}) restart ${SLURM_RESTART_COUNT:-0}:" \
    "${SLURM_NNODES:-1} node(s) ${SLURM_JOB_NODELIST}, ${SLURM_NTASKS:-1} task(s)," \
    "rendezvous ${MASTER_ADDR}:${MASTER_PORT}, python $(command -v python)"
}

oreal_srun() {
  srun "$@" &
  local pid=$!
  # The file appears whole (write + rename), so a rank never reads it half-written.
  trap 'oreal_log "batch shell got USR1: asking the ranks to stop via $OREAL_PREEMPT_FILE";
        echo SIGUSR1 > "$OREAL_PREEMPT_FILE.tmp" && mv -f "$OREAL_PREEMPT_FILE.tmp" "$OREAL_PREEMPT_FILE"' USR1
  # Slurm sends TERM to the tasks itself; the trap keeps this shell alive to report srun's status.
  trap 'oreal_log "batch shell got TERM (the tasks get it from Slurm too)"' TERM
  trap 'kill -INT $pid 2>/dev/null' INT
  # `wait` returns early (128+N) when a trapped signal arrives: keep waiting until srun is gone.
  while kill -0 "$pid" 2>/dev/null; do
    wait "$pid"
  done
  wait "$pid" # bash keeps the status of a reaped background job: this is srun's exit status
  local rc=$?
  trap - USR1 TERM INT
  rm -f "$OREAL_PREEMPT_FILE"
  if [ "$rc" = "$OREAL_EXIT_PREEMPTED" ]; then
    oreal_log "step stopped on a preemption signal and saved its state (exit $rc); the job requeued itself"
  else
    oreal_log "step exited with status $rc"
  fi
  return "$rc"
}

#!/usr/bin/env bash
# setup_slurm.sh -- a real one-node Slurm (slurmctld + slurmd + munged) on localhost, for the tests
# in tests/slurm/. Debian/Ubuntu packages, no systemd, no cgroups: works in containers and microVMs.
#
#   sudo tests/slurm/setup_slurm.sh start    install (apt) if missing, write slurm.conf, start daemons (idempotent)
#   sudo tests/slurm/setup_slurm.sh stop     cancel jobs, stop the daemons this script started (by pid only)
#        tests/slurm/setup_slurm.sh status   exit 0 when the controller answers and the node is usable
#
# Measured on Debian 12 (slurm 22.05.8, munge 0.5.15), 2 CPUs, as root without systemd: `start` from
# nothing installed ~9 s (apt update + 8 packages, 3.2 MB), with packages present ~1-4 s.
#
# Why these settings (a test budget, not a production cluster):
#   cred_expire=10         a requeued job may start again only after the credential expires (default 120 s)
#   sched_interval=5       the scheduler looks at pending (e.g. requeued) jobs every 5 s, not 60 s
#   proctrack/linuxproc, task/none, no accounting: nothing needs cgroups or a database
#   CR_CPU                 each task gets one CPU, so a 2-task job fits a 2-CPU runner
#   the node line          copied from `slurmd -C`, so the node is never drained for a topology mismatch
# Knobs: OREAL_SLURM_ROOT (/tmp/oreal-slurm: state, spool, logs, pids), OREAL_SLURM_KILLWAIT (10).
set -euo pipefail

ROOT="${OREAL_SLURM_ROOT:-/tmp/oreal-slurm}"
KILLWAIT="${OREAL_SLURM_KILLWAIT:-10}"
CONF=/etc/slurm/slurm.conf
HOST="$(hostname -s)"

say() { echo "[setup_slurm $(date +%T)] $*" >&2; }
die() { say "ERROR: $*"; exit 1; }
pid_in() { [ -s "$1" ] && cat "$1" || true; }
running() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
retry() {  # retry <seconds> <command...>: poll every 0.2 s
  local n=$(($1 * 5)); shift
  for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  return 1
}
node_usable() { sinfo -h -n "$HOST" -o %T | grep -qE '^(idle|mixed|allocated|completing)'; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null; then
    return
  fi
  command -v apt-get >/dev/null || die "Slurm is not installed and apt-get is not available"
  say "installing slurmctld slurmd slurm-client munge (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
  say "installed $(slurmd -V)"
}

start_munge() {
  # Reuse a munged that already works (e.g. started by systemd at install time).
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    mungekey --create --keyfile=/etc/munge/munge.key --force
  fi
  chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge 2>/dev/null || true
  chmod 0700 /etc/munge
  chmod 0400 /etc/munge/munge.key
  # munged refuses to run as root and needs its socket directory owned by munge.
  mkdir -p /run/munge
  chown munge:munge /run/munge
  rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  runuser -u munge -- /usr/sbin/munged --force
  retry 10 bash -c 'munge -n | unmunge' || die "munged does not answer (see /var/log/munge/munged.log)"
  cp /run/munge/munged.pid "$ROOT/run/munged.pid"  # remember that we started it: `stop` ends only ours
  say "munged started (pid $(cat "$ROOT/run/munged.pid"))"
}

write_conf() {  # sets CONF_CHANGED=1 when the file on disk changed
  local hw mem tmp
  hw="$(slurmd -C | head -n1 | sed -e 's/^NodeName=[^ ]* //' -e 's/ *RealMemory=[0-9]*//' -e 's/ *UpTime=.*//')"
  mem=$(awk '/^MemTotal:/ {print int($2 / 1024) - 1024}' /proc/meminfo)
  tmp="$(mktemp)"
  cat >"$tmp" <<EOF
# written by megatron-oreal tests/slurm/setup_slurm.sh: a one-node test cluster, not for production
ClusterName=orealci
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=5,sched_interval=5
ReturnToService=2
InactiveLimit=0
KillWait=$KILLWAIT
MinJobAge=300
NodeName=$HOST NodeAddr=127.0.0.1 $hw RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
  CONF_CHANGED=0
  if ! cmp -s "$tmp" "$CONF"; then
    mkdir -p "$(dirname "$CONF")"
    install -m 0644 "$tmp" "$CONF"
    CONF_CHANGED=1
  fi
  rm -f "$tmp"
}

stop_pid() {  # stop_pid <name> <pidfile>: TERM, wait up to 10 s, then KILL; only the pid we recorded
  local pid
  pid="$(pid_in "$2")"
  if running "$pid"; then
    kill -TERM "$pid"
    retry 10 bash -c "! kill -0 $pid" || kill -KILL "$pid" 2>/dev/null || true
    say "stopped $1 ($pid)"
  fi
  rm -f "$2"
}

start() {
  [ "$(id -u)" = 0 ] || die "start needs root (sudo $0 start)"
  local t0=$SECONDS
  install_packages
  # MASTER_ADDR comes from `scontrol show hostnames`, i.e. the short hostname: it must resolve.
  getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST" >>/etc/hosts
  mkdir -p "$ROOT"/{state,spool,log,run,jobs}
  chmod 1777 "$ROOT/jobs"  # job logs of non-root test users
  write_conf
  start_munge
  if [ "$CONF_CHANGED" = 1 ]; then
    stop_pid slurmd "$ROOT/run/slurmd.pid"
    stop_pid slurmctld "$ROOT/run/slurmctld.pid"
  fi
  if ! running "$(pid_in "$ROOT/run/slurmctld.pid")"; then
    /usr/sbin/slurmctld || die "slurmctld did not start: $(tail -n5 "$ROOT/log/slurmctld.log")"
    retry 30 scontrol ping || die "slurmctld does not answer: $(tail -n5 "$ROOT/log/slurmctld.log")"
  fi
  if ! running "$(pid_in "$ROOT/run/slurmd.pid")"; then
    /usr/sbin/slurmd || die "slurmd did not start: $(tail -n5 "$ROOT/log/slurmd.log")"
  fi
  if ! retry 20 node_usable; then  # DOWN/DRAIN left over from an unclean stop
    scontrol update nodename="$HOST" state=resume 2>/dev/null || true
    retry 30 node_usable || die "node $HOST not usable: $(sinfo -N -h; tail -n5 "$ROOT/log/slurmd.log")"
  fi
  say "ready in $((SECONDS - t0)) s: $(sinfo -h -o '%P %D %T %C')"
}

stop() {
  [ "$(id -u)" = 0 ] || die "stop needs root"
  if scontrol ping >/dev/null 2>&1; then
    local jobs
    jobs="$(squeue -h -o %i 2>/dev/null || true)"
    if [ -n "$jobs" ]; then
      # shellcheck disable=SC2086
      scancel $jobs || true
      retry $((KILLWAIT + 15)) bash -c '[ -z "$(squeue -h -o %i)" ]' || say "jobs still listed: $jobs"
    fi
  fi
  stop_pid slurmd "$ROOT/run/slurmd.pid"
  stop_pid slurmctld "$ROOT/run/slurmctld.pid"
  stop_pid munged "$ROOT/run/munged.pid"  # a no-op unless `start` launched it
}

status() {
  command -v sinfo >/dev/null || { echo "Slurm client not installed"; return 1; }
  scontrol ping | grep -q UP || { echo "slurmctld not answering"; return 1; }
  node_usable || { echo "node $HOST not usable: $(sinfo -N -h)"; return 1; }
  sinfo -h -o '%P %D %T %C'
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac

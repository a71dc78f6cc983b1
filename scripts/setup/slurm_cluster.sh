#!/usr/bin/env bash
# Single-node SLURM "cluster" on this machine, for testing the workflow through
# profiles/slurm (snakemake-executor-plugin-slurm). Needs root.
#
#   scripts/setup/slurm_cluster.sh up      install Debian's slurmctld/slurmd/slurm-client if missing,
#                                    write /etc/slurm/{slurm,gres}.conf (node "localhost",
#                                    partition "debug", one fake GPU gpu:fake:1), start both
#                                    daemons and wait until the node is idle. Safe to re-run.
#   scripts/setup/slurm_cluster.sh down    cancel every job, stop the daemons, remove their state.
#   scripts/setup/slurm_cluster.sh status  daemons, sinfo, squeue.
#
# Environment: SLURM_NODE_CPUS (default: nproc, at least 2), SLURM_NODE_MEM_MB (default 16000),
# SLURM_UP_TIMEOUT seconds to wait for the node (default 30).
# Why each setting is there: shared/notes/slurm-single-node.md.
set -euo pipefail

CONF_DIR=/etc/slurm                 # must be here: the executor's job step clears SLURM_CONF
STATE_DIR=/var/spool/slurmctld
SPOOL_DIR=/var/spool/slurmd
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm
CTLD_PID=$RUN_DIR/slurmctld.pid
SLURMD_PID=$RUN_DIR/slurmd.pid
NODE=localhost

log() { echo "slurm_cluster: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

have_systemd() { [ -d /run/systemd/system ] && command -v systemctl >/dev/null; }

stop_units() {  # stop package-managed services (started on install on systemd machines)
  local u
  for u in slurmctld slurmd munge; do
    if have_systemd; then
      systemctl is-active --quiet "$u" 2>/dev/null && systemctl stop "$u" || true
    elif command -v service >/dev/null; then
      service "$u" stop >/dev/null 2>&1 || true
    fi
  done
}

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sinfo >/dev/null; then
    return
  fi
  [ "$(id -u)" = 0 ] || die "installing SLURM needs root"
  log "installing slurmctld slurmd slurm-client (apt-get)"
  local policy_created=
  if [ ! -e /usr/sbin/policy-rc.d ]; then  # keep the install from starting the daemons
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    policy_created=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client >/dev/null
  if [ -n "$policy_created" ]; then rm -f /usr/sbin/policy-rc.d; fi
  stop_units
}

plugin_exists() {  # plugin_exists auth_none
  local d
  for d in /usr/lib/*/slurm-wlm /usr/lib/slurm-wlm /usr/lib64/slurm /usr/lib/slurm /usr/local/lib/slurm; do
    [ -e "$d/$1.so" ] && return 0
  done
  return 1
}

write_config() {
  local cpus=${SLURM_NODE_CPUS:-$(nproc)} mem=${SLURM_NODE_MEM_MB:-16000} auth
  [ "$cpus" -ge 2 ] || cpus=2
  if plugin_exists auth_none; then
    auth=$'AuthType=auth/none\nCredType=cred/none'
  else  # newer SLURM dropped auth/none: fall back to munge (installed as a dependency)
    log "auth/none plugin not found; using munge"
    auth=$'AuthType=auth/munge\nCredType=cred/munge'
  fi
  mkdir -p "$CONF_DIR"
  cat >"$CONF_DIR/slurm.conf.new" <<EOF
# Written by scripts/setup/slurm_cluster.sh: single-node test cluster. Do not edit; re-run "up".
ClusterName=tlselect
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
$auth
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MpiDefault=none
ReturnToService=2
# no cgroups on this machine
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without it a job with no --mem takes the whole node
DefMemPerCPU=1000
# over-requests fail at submission instead of pending forever (hangs Snakemake)
EnforcePartLimits=ALL
# keep finished jobs visible to squeue (the status command when accounting is off)
MinJobAge=3600
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
InactiveLimit=0
KillWait=5
Waittime=0
GresTypes=gpu
# node may claim more than the hardware reports
SlurmdParameters=config_overrides
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem Gres=gpu:fake:1 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  cat >"$CONF_DIR/gres.conf.new" <<EOF
# Written by scripts/setup/slurm_cluster.sh. File= is required, else the node drains.
AutoDetect=off
NodeName=$NODE Name=gpu Type=fake File=/dev/null
EOF
  local f
  CONFIG_CHANGED=1
  if cmp -s "$CONF_DIR/slurm.conf.new" "$CONF_DIR/slurm.conf" 2>/dev/null &&
     cmp -s "$CONF_DIR/gres.conf.new" "$CONF_DIR/gres.conf" 2>/dev/null; then
    CONFIG_CHANGED=0
  fi
  for f in slurm.conf gres.conf; do mv -f "$CONF_DIR/$f.new" "$CONF_DIR/$f"; done
  chmod 644 "$CONF_DIR/slurm.conf" "$CONF_DIR/gres.conf"
}

start_munge() {
  grep -q '^AuthType=auth/munge' "$CONF_DIR/slurm.conf" || return 0
  pgrep -x munged >/dev/null && return 0
  mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
  [ -s /etc/munge/munge.key ] || { command -v mungekey >/dev/null && mungekey -c -f 2>/dev/null || true; }
  chown munge:munge /etc/munge/munge.key 2>/dev/null || true
  runuser -u munge -- /usr/sbin/munged || die "could not start munged"
}

stop_daemons() {
  local p i
  if pid_alive "$CTLD_PID"; then
    for p in $(squeue -h -o %A 2>/dev/null); do scancel "$p" 2>/dev/null || true; done
    # give cancelled jobs a moment to be signalled and cleaned up by slurmd
    for i in $(seq 1 20); do [ -z "$(squeue -h -t R,CG -o %A 2>/dev/null)" ] && break; sleep 0.5; done
  fi
  for p in "$SLURMD_PID" "$CTLD_PID"; do
    if pid_alive "$p"; then
      kill -TERM "$(cat "$p")" 2>/dev/null || true
      for i in $(seq 1 40); do pid_alive "$p" || break; sleep 0.25; done
      pid_alive "$p" && kill -KILL "$(cat "$p")" 2>/dev/null || true
    fi
    rm -f "$p"
  done
}

node_state() { sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1; }

cmd_up() {
  [ "$(id -u)" = 0 ] || die "run as root"
  install_packages
  write_config
  mkdir -p "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR" "$RUN_DIR"
  if pid_alive "$CTLD_PID" && pid_alive "$SLURMD_PID" && [ "$CONFIG_CHANGED" = 0 ]; then
    log "daemons already running with this configuration"
  else
    stop_units
    stop_daemons
    start_munge
    rm -rf "${STATE_DIR:?}"/* "${SPOOL_DIR:?}"/*   # fresh state: no stale jobs or drained node
    slurmctld || die "slurmctld did not start; see $LOG_DIR/slurmctld.log"
    slurmd -N "$NODE" || die "slurmd did not start; see $LOG_DIR/slurmd.log"
  fi
  local timeout=${SLURM_UP_TIMEOUT:-30} start=$SECONDS state resumed=0
  while :; do
    state=$(node_state)
    case "$state" in
      idle|mixed|allocated) break ;;
      drain*|down*)
        if [ "$resumed" = 0 ]; then
          scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true
          resumed=1
        fi ;;
    esac
    if ((SECONDS - start >= timeout)); then
      log "node '$NODE' not idle after ${timeout}s (state: '${state:-no answer from slurmctld}')"
      sinfo -R 2>&1 | sed 's/^/  /' >&2 || true
      for f in slurmctld slurmd; do
        log "last lines of $LOG_DIR/$f.log:"; tail -n 15 "$LOG_DIR/$f.log" 2>/dev/null | sed 's/^/  /' >&2
      done
      die "SLURM cluster did not come up"
    fi
    sleep 0.5
  done
  log "up: node $NODE is $state ($((SECONDS - start))s)"
  sinfo -o '%P %a %l %D %T %N %c %m %G'
}

cmd_down() {
  [ "$(id -u)" = 0 ] || die "run as root"
  stop_daemons
  stop_units
  rm -rf "$STATE_DIR" "$SPOOL_DIR" "$RUN_DIR"
  log "down: daemons stopped, state removed (config in $CONF_DIR and logs in $LOG_DIR kept)"
}

cmd_status() {
  local p
  for p in "$CTLD_PID" "$SLURMD_PID"; do
    if pid_alive "$p"; then echo "$(basename "$p" .pid): running (pid $(cat "$p"))"
    else echo "$(basename "$p" .pid): not running"; fi
  done
  if pid_alive "$CTLD_PID"; then sinfo; squeue; fi
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac

# Helpers shared by scripts/testbed and scripts/cluster (sourced; set LOG_PREFIX first).

log() { echo "${LOG_PREFIX:-runner-warden}: $*" >&2; }

# alive <pidfile>: the process it names is running.
# A pid file's process runs (a zombie — killed, not yet reaped by a PID 1 that may never reap — does not).
alive() {
  [ -f "$1" ] || return 1
  local stat; stat=$(cat "/proc/$(cat "$1")/stat" 2>/dev/null) || return 1
  [ "$(echo "${stat##*) }" | cut -d' ' -f1)" != Z ]
}

# wait_for <seconds> <description> <command...>: every wait has a bound (an unbounded one once hung a run).
wait_for() {
  local limit=$1 what=$2; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then log "timed out after ${limit}s waiting for $what"; return 1; fi
    sleep "${WAIT_POLL:-0.1}"
  done
}

# stop_pid <pidfile> <name>: TERM, up to 5 s, then KILL; removes the pid file.
stop_pid() {
  local f=$1 name=$2 pid i
  alive "$f" || { rm -f "$f"; return 0; }
  pid=$(cat "$f")
  kill "$pid" 2>/dev/null || true
  for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$f"
  log "stopped $name"
}

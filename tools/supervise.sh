#!/usr/bin/env bash
# Start or stop the pipeline under supervisord.
#   tools/supervise.sh start CONFIG   start supervisord in the background; return when every program is RUNNING
#   tools/supervise.sh stop           stop every program and supervisord
#   tools/supervise.sh ctl ARGS...    supervisorctl with this project's config, e.g. `ctl status`, `ctl restart validator:*`
# Environment: MDP_RUN_DIR (default var/run), MDP_SIM_ARGS (simulator options), MDP_START_TIMEOUT (s, default 90).
set -euo pipefail
cd "$(dirname "$0")/.."
export MDP_RUN_DIR="${MDP_RUN_DIR:-$PWD/var/run}"
mkdir -p "$MDP_RUN_DIR/logs"
ctl() { .venv/bin/supervisorctl -c supervisord.conf "$@"; }

case "${1:-}" in
  start)
    config="${2:?usage: supervise.sh start CONFIG}"
    case "$config" in /*) ;; *) config="$PWD/$config" ;; esac
    export MDP_CONFIG="$config"
    # The simulator runs when the config points an exchange at it (override with MDP_SIMULATOR=true|false).
    if [ -z "${MDP_SIMULATOR:-}" ]; then
      if grep -q '127.0.0.1:8765' "$config"; then export MDP_SIMULATOR=true; else export MDP_SIMULATOR=false; fi
    fi
    export MDP_SIM_ARGS="${MDP_SIM_ARGS:---port 8765 --speed 1 --loop --shift-to-now --wait-for btcusdt@trade --wait-for btcusdt@kline_1m --venue binanceusdm --venue coinbase --venue hyperliquid}"
    if [ -S "$MDP_RUN_DIR/supervisor.sock" ] && ctl pid >/dev/null 2>&1; then
      echo "supervisord already runs (pid $(ctl pid)); restarting its programs with $config"
      ctl shutdown >/dev/null; for _ in $(seq 1 100); do ctl pid >/dev/null 2>&1 || break; sleep 0.2; done
    fi
    .venv/bin/supervisord -c supervisord.conf
    deadline=$((SECONDS + ${MDP_START_TIMEOUT:-90}))
    while :; do
      out=$(ctl status 2>/dev/null || true)
      expected=$(echo "$out" | grep -vc 'simulator.*STOPPED' || true)
      running=$(echo "$out" | grep -c ' RUNNING ' || true)
      if [ -n "$out" ] && [ "$running" -eq "$expected" ]; then break; fi
      if echo "$out" | grep -qE 'FATAL|BACKOFF|EXITED'; then
        echo "$out"; echo "error: a program failed to start; read $MDP_RUN_DIR/logs/" >&2; exit 1
      fi
      if [ $SECONDS -ge $deadline ]; then
        echo "$out"; echo "error: not every program RUNNING after ${MDP_START_TIMEOUT:-90} s; read $MDP_RUN_DIR/logs/" >&2; exit 1
      fi
      sleep 0.5
    done
    if [ "$MDP_SIMULATOR" = true ]; then  # RUNNING means "up for 2 s"; the simulator may still be loading
      port=$(echo "$MDP_SIM_ARGS" | sed -n 's/.*--port \([0-9]*\).*/\1/p'); port=${port:-8765}
      until .venv/bin/python -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/_sim/status', timeout=2)" 2>/dev/null; do
        if [ $SECONDS -ge $deadline ]; then
          echo "error: the simulator does not answer on port $port after ${MDP_START_TIMEOUT:-90} s; read $MDP_RUN_DIR/logs/simulator.log" >&2; exit 1
        fi
        sleep 0.5
      done
    fi
    echo "$out"
    echo "pipeline running (config $config, logs in $MDP_RUN_DIR/logs). Try: .venv/bin/mdp status"
    ;;
  stop)
    if [ -S "$MDP_RUN_DIR/supervisor.sock" ] && ctl pid >/dev/null 2>&1; then
      ctl shutdown
      for _ in $(seq 1 150); do ctl pid >/dev/null 2>&1 || break; sleep 0.2; done
      echo "pipeline stopped"
    else
      echo "pipeline is not running"
    fi
    ;;
  ctl)
    shift
    ctl "$@"
    ;;
  *) echo "usage: $0 start CONFIG | stop | ctl ARGS..." >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Start or stop the pipeline under supervisord.
#   tools/supervise.sh start CONFIG   start supervisord in the background; return when every program is RUNNING
#   tools/supervise.sh stop           stop every program and supervisord
#   tools/supervise.sh ctl ARGS...    supervisorctl with this project's config, e.g. `ctl status`, `ctl restart validator:*`
#                                     (with the default run dir, plain `supervisorctl -c supervisord.conf ARGS` is the same)
# Environment: MDP_RUN_DIR (default var/run), MDP_SIMULATOR (true|false, default: true when CONFIG points at
# 127.0.0.1:8765), MDP_SIM_ARGS (simulator options), MDP_START_TIMEOUT (s, default 90), MDP_NUMPROCS (programs'
# numprocs, e.g. "validator=2,normalizer=2,aggregator=2", for a run with [bus] partitions > 1).
# supervisord.conf resolves its paths from its own folder and runs the simulator with its default options. When
# the run dir, MDP_SIMULATOR, MDP_SIM_ARGS or MDP_NUMPROCS differ from that, supervisord runs from a copy rendered into
# $MDP_RUN_DIR/supervisord.conf (re-rendered by `ctl reread` / `ctl update`, so edits to supervisord.conf apply).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
DEFAULT_RUN_DIR="$ROOT/var/run"
export MDP_RUN_DIR="${MDP_RUN_DIR:-$DEFAULT_RUN_DIR}"
case "$MDP_RUN_DIR" in /*) ;; *) MDP_RUN_DIR="$ROOT/$MDP_RUN_DIR" ;; esac
mkdir -p "$MDP_RUN_DIR/logs"
RENDERED="$MDP_RUN_DIR/supervisord.conf"
conf() { if [ -f "$RENDERED" ]; then echo "$RENDERED"; else echo "$ROOT/supervisord.conf"; fi; }
ctl() { .venv/bin/supervisorctl -c "$(conf)" "$@"; }

# Write $RENDERED from supervisord.conf with the run dir, simulator switch and options of render.env.
render() {
  # shellcheck disable=SC1091
  . "$MDP_RUN_DIR/render.env"
  .venv/bin/python - "$ROOT" "$MDP_RUN_DIR" "$RENDER_SIMULATOR" "$RENDER_SIM_ARGS" "$RENDERED" "${RENDER_NUMPROCS:-}" <<'PY'
import re, sys
root, run_dir, simulator, sim_args, out, numprocs = sys.argv[1:]
text = open(f"{root}/supervisord.conf").read()
for item in filter(None, numprocs.split(",")):
    program, _, n = item.partition("=")
    text, found = re.subn(rf"(\[program:{re.escape(program.strip())}\][^\[]*?\nnumprocs=)\d+", rf"\g<1>{int(n)}", text)
    if not found:
        sys.exit(f"error: MDP_NUMPROCS names {program!r}, which has no numprocs line in supervisord.conf")
default_args = re.search(r"^command=%\(here\)s/\.venv/bin/python -m simulator (.*)$", text, re.M)
if default_args is None:
    sys.exit("error: supervisord.conf has no [program:simulator] command line to render; restore it")
text = text.replace(default_args.group(0), default_args.group(0).replace(default_args.group(1), sim_args), 1)
text = text.replace("autostart=true", f"autostart={simulator}", 1)  # the simulator's, the only one set
text = text.replace("%(here)s/var/run", run_dir).replace("%(here)s", root)
open(out, "w").write(text)
PY
}

case "${1:-}" in
  start)
    config="${2:?usage: supervise.sh start CONFIG}"
    case "$config" in /*) ;; *) config="$PWD/$config" ;; esac
    export MDP_CONFIG="$config"
    # The simulator runs when the config points an exchange at it (override with MDP_SIMULATOR=true|false).
    if [ -z "${MDP_SIMULATOR:-}" ]; then
      if grep -q '127.0.0.1:8765' "$config"; then export MDP_SIMULATOR=true; else export MDP_SIMULATOR=false; fi
    fi
    if [ -S "$MDP_RUN_DIR/supervisor.sock" ] && ctl pid >/dev/null 2>&1; then
      echo "supervisord already runs (pid $(ctl pid)); restarting its programs with $config"
      ctl shutdown >/dev/null; for _ in $(seq 1 100); do ctl pid >/dev/null 2>&1 || break; sleep 0.2; done
    fi
    rm -f "$RENDERED" "$MDP_RUN_DIR/render.env"
    if [ "$MDP_RUN_DIR" != "$DEFAULT_RUN_DIR" ] || [ "$MDP_SIMULATOR" != true ] || [ -n "${MDP_SIM_ARGS:-}" ] \
        || [ -n "${MDP_NUMPROCS:-}" ]; then
      sim_args="${MDP_SIM_ARGS:-$(sed -n 's|^command=%(here)s/.venv/bin/python -m simulator ||p' supervisord.conf)}"
      printf 'RENDER_SIMULATOR=%q\nRENDER_SIM_ARGS=%q\nRENDER_NUMPROCS=%q\n' "$MDP_SIMULATOR" "$sim_args" \
        "${MDP_NUMPROCS:-}" > "$MDP_RUN_DIR/render.env"
      render
    fi
    .venv/bin/supervisord -c "$(conf)"
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
      port=$(grep -m1 -- '-m simulator' "$(conf)" | sed -n 's/.*--port \([0-9]*\).*/\1/p'); port=${port:-8765}
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
    if [ -S "$MDP_RUN_DIR/supervisor.sock" ] && pid=$(ctl pid 2>/dev/null); then
      ctl shutdown
      # supervisord stops the programs by priority, each group given stopwaitsecs (10 s): up to ~40 s in all.
      # Wait for its process to exit: `ctl pid` already fails while it is shutting down (SHUTDOWN_STATE), with
      # programs still running.
      stopped=false
      for _ in $(seq 1 450); do kill -0 "$pid" 2>/dev/null || { stopped=true; break; }; sleep 0.2; done
      if $stopped; then
        echo "pipeline stopped"
      else
        echo "error: supervisord ($MDP_RUN_DIR/supervisor.sock) still runs 90 s after shutdown; see its log in $MDP_RUN_DIR" >&2
        exit 1
      fi
    else
      echo "pipeline is not running"
    fi
    ;;
  ctl)
    shift
    case "${1:-}" in reread|update) [ -f "$MDP_RUN_DIR/render.env" ] && render ;; esac
    ctl "$@"
    ;;
  *) echo "usage: $0 start CONFIG | stop | ctl ARGS..." >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Start the stores the pipeline needs if they are not running. Idempotent; every wait is bounded.
#   Redis (the bus): the project's own redis-server with AOF (appendonly yes, appendfsync everysec) on the port
#     of MDP_REDIS_URL (default 127.0.0.1:6380), data under var/redis; not the machine's 6379, which runs
#     without persistence. docs/operations.md says what a crash may cost.
#   PostgreSQL 127.0.0.1:5432: the machine's service (started if down).
#   InfluxDB: a private influxd on 127.0.0.1:8086 with its data under var/influxdb (skipped by --no-influx).
#   The PostgreSQL database named in MDP_POSTGRES_DSN's path (default market_data) is created if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
want_influx=1
[ "${1:-}" = "--no-influx" ] && want_influx=0

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

redis_url="${MDP_REDIS_URL:-redis://127.0.0.1:6380/0}"
redis_hostport="${redis_url#*://}"; redis_hostport="${redis_hostport#*@}"; redis_hostport="${redis_hostport%%/*}"
redis_host="${redis_hostport%%:*}"; redis_port="${redis_hostport##*:}"
[ "$redis_port" = "$redis_hostport" ] && redis_port=6379
if [ "$redis_host" = 127.0.0.1 ] || [ "$redis_host" = localhost ]; then
  if ! port_open "$redis_port"; then
    echo "starting the bus: redis-server on 127.0.0.1:$redis_port with AOF (appendfsync everysec), data in var/redis"
    mkdir -p var/redis
    redis-server --daemonize yes --bind 127.0.0.1 --port "$redis_port" --save "" \
      --appendonly yes --appendfsync everysec --appenddirname "appendonly-$redis_port" \
      --dir "$PWD/var/redis" --pidfile "$PWD/var/redis/redis-$redis_port.pid" \
      --logfile "$PWD/var/redis/redis-$redis_port.log"
  fi
  for _ in $(seq 1 100); do port_open "$redis_port" && break; sleep 0.1; done
  port_open "$redis_port" || {
    echo "error: Redis does not listen on 127.0.0.1:$redis_port; read var/redis/redis-$redis_port.log" >&2; exit 1; }
fi

if ! port_open 5432; then
  echo "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start
fi
for _ in $(seq 1 100); do port_open 5432 && break; sleep 0.1; done
port_open 5432 || { echo "error: PostgreSQL does not listen on 127.0.0.1:5432; read /var/log/postgresql/" >&2; exit 1; }

dsn="${MDP_POSTGRES_DSN:-postgresql://postgres@127.0.0.1:5432/market_data}"
db="${dsn##*/}"; db="${db%%\?*}"
if ! psql "${dsn%/*}/postgres" -tAc "SELECT 1 FROM pg_database WHERE datname='$db'" | grep -q 1; then
  echo "creating PostgreSQL database $db"
  psql "${dsn%/*}/postgres" -qc "CREATE DATABASE \"$db\""
fi

if [ "$want_influx" = 1 ]; then
  url="${MDP_INFLUX_URL:-http://127.0.0.1:8086}"
  port="${url##*:}"; port="${port%%/*}"
  .venv/bin/python -m tools.localstores influxd --dir var/influxdb --port "$port"
fi

#!/usr/bin/env bash
# Start the stores the pipeline needs if they are not running. Idempotent; every wait is bounded.
#   Redis 127.0.0.1:6379 and PostgreSQL 127.0.0.1:5432: the machine's services (started if down).
#   InfluxDB: a private influxd on 127.0.0.1:8086 with its data under var/influxdb (skipped by --no-influx).
#   The PostgreSQL database named in MDP_POSTGRES_DSN's path (default market_data) is created if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
want_influx=1
[ "${1:-}" = "--no-influx" ] && want_influx=0

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if ! port_open 6379; then
  echo "starting redis-server on 127.0.0.1:6379"
  mkdir -p var/redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir "$PWD/var/redis" --logfile "$PWD/var/redis/redis.log"
fi

if ! port_open 5432; then
  echo "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start
fi
for _ in $(seq 1 100); do port_open 5432 && port_open 6379 && break; sleep 0.1; done
port_open 6379 || { echo "error: Redis does not listen on 127.0.0.1:6379; read var/redis/redis.log" >&2; exit 1; }
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

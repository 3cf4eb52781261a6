#!/usr/bin/env bash
# Make sure PostgreSQL (127.0.0.1:5432, trust auth, databases test/root/postgres), Redis (127.0.0.1:6379) and
# RabbitMQ (127.0.0.1:5672, guest/guest) are running: start them when stopped, install them with apt-get when
# missing. Idempotent; prints what it does on stderr.
set -euo pipefail

log() { echo "services: $*" >&2; }
port_open() { (echo >"/dev/tcp/127.0.0.1/$1") >/dev/null 2>&1; }
wait_port() { # port seconds name
  local i
  for ((i = 0; i < $2 * 4; i++)); do port_open "$1" && return 0; sleep 0.25; done
  log "$3 did not open port $1 within $2 s"; return 1
}
apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

# PostgreSQL
if ! port_open 5432; then
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    log "installing PostgreSQL"; apt_install postgresql postgresql-client
  fi
  ver=$(find /etc/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n 1)
  hba=/etc/postgresql/$ver/main/pg_hba.conf
  if ! grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
    log "enabling trust auth on 127.0.0.1"
    sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\nlocal all all trust' "$hba"
  fi
  log "starting PostgreSQL $ver"
  pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
  wait_port 5432 60 PostgreSQL
fi
if command -v psql >/dev/null; then
  if ! psql -h 127.0.0.1 -U root -d postgres -tAc 'select 1' >/dev/null 2>&1; then
    log "creating role root"
    su postgres -c "psql -tAc \"CREATE ROLE root SUPERUSER LOGIN\"" >&2 || true
  fi
  for db in test root; do
    if ! psql -h 127.0.0.1 -U root -d postgres -tAc "select 1 from pg_database where datname='$db'" | grep -q 1; then
      log "creating database $db"; psql -h 127.0.0.1 -U root -d postgres -c "CREATE DATABASE $db" >&2
    fi
  done
fi

# Redis
if ! port_open 6379; then
  command -v redis-server >/dev/null || { log "installing Redis"; apt_install redis-server; }
  log "starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >&2
  wait_port 6379 30 Redis
fi

# RabbitMQ
if ! port_open 5672; then
  command -v rabbitmq-server >/dev/null || { log "installing RabbitMQ"; apt_install rabbitmq-server; }
  log "starting RabbitMQ"
  rabbitmq-server -detached >&2 || true
  wait_port 5672 180 RabbitMQ
fi
# The broker accepts TCP a little before it accepts AMQP logins; wait until it answers.
if command -v rabbitmqctl >/dev/null; then
  for _ in $(seq 1 60); do rabbitmqctl -q await_startup >/dev/null 2>&1 && break; sleep 1; done
fi
log "PostgreSQL, Redis and RabbitMQ are up"

#!/usr/bin/env bash
# A throwaway PostgreSQL cluster on 127.0.0.1 for a Prefect server (tests, trials, one-machine setups).
#
#   infra/postgres/pgcluster.sh start DIR [PORT]   initdb into DIR (must not exist or be empty), start the server on
#                                                   127.0.0.1:PORT (a free port when omitted), create role and
#                                                   database "prefect"; prints the PREFECT_API_DATABASE_CONNECTION_URL
#   infra/postgres/pgcluster.sh url DIR            print that URL again
#   infra/postgres/pgcluster.sh status DIR         exit 0 when the server in DIR accepts connections
#   infra/postgres/pgcluster.sh stop DIR [--keep]  stop the server (fast shutdown) and delete DIR (unless --keep)
#
# Binaries: $PG_BIN, else `pg_config --bindir`, else the newest /usr/lib/postgresql/*/bin. Missing binaries exit with
# code 3 and one line saying so (`apt-get install postgresql` installs them). initdb refuses to run as root, so as
# root the cluster is created and run as the `postgres` system user (DIR is chowned to it).
# PGCLUSTER_FAST=1 turns off fsync/synchronous_commit/full_page_writes: only for clusters you can lose (tests).
# The password of role "prefect" is random, kept in DIR/password (mode 600) and in the URL; the server listens on
# 127.0.0.1 only and its Unix socket lives in DIR.
set -euo pipefail

die() { echo "pgcluster: $1" >&2; exit "${2:-1}"; }

find_bin() {
  if [[ -n "${PG_BIN:-}" ]]; then
    [[ -x "$PG_BIN/initdb" ]] || die "PG_BIN=$PG_BIN has no initdb" 3
    echo "$PG_BIN"; return
  fi
  if command -v pg_config >/dev/null 2>&1; then
    local b; b="$(pg_config --bindir)"
    if [[ -x "$b/initdb" ]]; then echo "$b"; return; fi
  fi
  local best=""
  for b in /usr/lib/postgresql/*/bin; do [[ -x "$b/initdb" ]] && best="$b"; done
  [[ -n "$best" ]] || die "PostgreSQL server binaries not found (set PG_BIN, or apt-get install postgresql)" 3
  echo "$best"
}

# run a command as the cluster's owner: the postgres system user when we are root, else ourselves
as_owner() {
  if [[ "$(id -u)" == 0 ]]; then
    local cmd; cmd="$(printf '%q ' "$@")"
    su postgres -s /bin/bash -c "$cmd"
  else
    "$@"
  fi
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

url_of() {
  local dir="$1"
  [[ -f "$dir/port" && -f "$dir/password" ]] || die "$dir: not a cluster made by pgcluster.sh start"
  echo "postgresql+asyncpg://prefect:$(cat "$dir/password")@127.0.0.1:$(cat "$dir/port")/prefect"
}

cmd_start() {
  local dir="${1:?usage: pgcluster.sh start DIR [PORT]}" port="${2:-}"
  local bin; bin="$(find_bin)"
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  [[ -z "$(ls -A "$dir")" ]] || die "$dir: not empty (a cluster is already there? use stop first)"
  [[ -n "$port" ]] || port="$(free_port)"
  if [[ "$(id -u)" == 0 ]]; then
    id postgres >/dev/null 2>&1 || die "running as root needs a 'postgres' system user to own the cluster" 3
    chown postgres: "$dir"
    chmod 700 "$dir"
  fi
  local pw; pw="$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
  (umask 077; echo "$pw" > "$dir/password"; echo "$port" > "$dir/port")
  [[ "$(id -u)" == 0 ]] && chown postgres: "$dir/password" "$dir/port"
  as_owner "$bin/initdb" -D "$dir/data" -U prefect --pwfile="$dir/password" --auth-host=scram-sha-256 \
    --auth-local=scram-sha-256 -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; die "initdb failed (log above)"; }
  local opts="-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$dir -c max_connections=100"
  if [[ "${PGCLUSTER_FAST:-0}" == 1 ]]; then
    opts="$opts -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
  fi
  as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -o "$opts" -w -t 60 start >/dev/null \
    || { tail -n 20 "$dir/server.log" >&2 || true; die "pg_ctl start failed (server.log above)"; }
  PGPASSWORD="$pw" "$bin/psql" -q -h 127.0.0.1 -p "$port" -U prefect -d postgres -v ON_ERROR_STOP=1 \
    -c "CREATE DATABASE prefect" >/dev/null || die "could not create database prefect"
  url_of "$dir"
}

cmd_status() {
  local dir="${1:?usage: pgcluster.sh status DIR}"
  local bin; bin="$(find_bin)"
  "$bin/pg_isready" -q -h 127.0.0.1 -p "$(cat "$dir/port")"
}

cmd_stop() {
  local dir="${1:?usage: pgcluster.sh stop DIR [--keep]}" keep="${2:-}"
  [[ -d "$dir" ]] || return 0
  local bin; bin="$(find_bin)"
  if [[ -f "$dir/data/postmaster.pid" ]]; then
    as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >/dev/null 2>&1 \
      || as_owner "$bin/pg_ctl" -D "$dir/data" -m immediate -w -t 30 stop >/dev/null 2>&1 || true
  fi
  [[ "$keep" == "--keep" ]] || rm -rf "$dir"
}

case "${1:-}" in
  start) shift; cmd_start "$@" ;;
  url) shift; url_of "${1:?usage: pgcluster.sh url DIR}" ;;
  status) shift; cmd_status "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  *) echo "usage: $0 start DIR [PORT] | url DIR | status DIR | stop DIR [--keep]" >&2; exit 2 ;;
esac

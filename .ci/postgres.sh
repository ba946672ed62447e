# Sourced by .ci/run: install Debian's PostgreSQL when missing, start a throwaway server on loopback,
# and export RADLENS_TEST_DB_URL so the indexer/engine/web tests also run against it.
PG_PORT=${PG_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
PGDATA=$(mktemp -d /tmp/radlens-pg.XXXXXX)
as_pg() { if [ "$(id -u)" = 0 ]; then chown -R postgres "$PGDATA" && runuser -u postgres -- "$@"; else "$@"; fi; }
as_pg "$PGBIN/initdb" -D "$PGDATA/db" -A trust -U postgres >/dev/null
as_pg "$PGBIN/pg_ctl" -D "$PGDATA/db" -l "$PGDATA/log" -w \
  -o "-k $PGDATA -p $PG_PORT -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" start >/dev/null \
  || { cat "$PGDATA/log"; exit 1; }
trap 'as_pg "$PGBIN/pg_ctl" -D "$PGDATA/db" -m fast stop >/dev/null' EXIT
export RADLENS_TEST_DB_URL="postgresql+psycopg://postgres@127.0.0.1:$PG_PORT/postgres"

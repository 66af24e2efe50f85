#!/bin/sh
# Container entrypoint: decide the bind address, then exec `python -m server` (PID 1, so SIGTERM reaches it).
#
# Rules (PROMPTSERVE_HOST, when set, is left alone; the server enforces its own rule on it):
#   PROMPTSERVE_AUTH_FILE set and a readable file  -> bind 0.0.0.0, every non-probe request needs a key
#   PROMPTSERVE_AUTH_FILE set but no such file      -> refuse to start (a missing secret must not open the server)
#   no auth file, PROMPTSERVE_ALLOW_INSECURE_BIND=1 -> bind 0.0.0.0 as one open tenant, with a loud warning
#   no auth file, opt-in off                        -> refuse to start: 127.0.0.1 inside a container reaches nobody
# Arguments that start with "-" go to the server; any other command runs instead (e.g. `python -m training ...`).
set -eu

die() {
  echo "promptserve-entrypoint: error: $*" >&2
  exit 64
}

# An empty PROMPTSERVE_* variable (compose's `${VAR:-}`) means unset, not "the empty path".
for name in $(env | sed -n 's/^\(PROMPTSERVE_[A-Za-z0-9_]*\)=$/\1/p'); do
  unset "$name"
done

case "${1:-}" in
  ""|-*) ;;
  *) exec "$@" ;;
esac

insecure=${PROMPTSERVE_ALLOW_INSECURE_BIND:-0}
case "$insecure" in
  1|[Tt][Rr][Uu][Ee]|[Yy][Ee][Ss]|[Oo][Nn]) insecure=1 ;;
  ""|0|[Ff][Aa][Ll][Ss][Ee]|[Nn][Oo]|[Oo][Ff][Ff]) insecure=0 ;;
  *) die "PROMPTSERVE_ALLOW_INSECURE_BIND=$insecure is not a boolean (use 1 or 0)" ;;
esac

auth=${PROMPTSERVE_AUTH_FILE:-}
if [ -n "$auth" ]; then
  [ -f "$auth" ] && [ -r "$auth" ] || die "PROMPTSERVE_AUTH_FILE=$auth is not a readable file; mount the auth file (JSON: {\"keys\": {...}}) there"
  : "${PROMPTSERVE_HOST:=0.0.0.0}"
elif [ "$insecure" = 1 ]; then
  : "${PROMPTSERVE_HOST:=0.0.0.0}"
  cat >&2 <<WARN
promptserve-entrypoint: WARNING **********************************************************************
promptserve-entrypoint: WARNING  No auth file: serving on ${PROMPTSERVE_HOST} WITHOUT AUTHENTICATION as one open tenant.
promptserve-entrypoint: WARNING  Anyone who reaches port ${PROMPTSERVE_PORT:-8000} can upload, delete and run tasks.
promptserve-entrypoint: WARNING  For real use mount an auth file and set PROMPTSERVE_AUTH_FILE, or set
promptserve-entrypoint: WARNING  PROMPTSERVE_ALLOW_INSECURE_BIND=0 to refuse to start without one.
promptserve-entrypoint: WARNING **********************************************************************
WARN
elif [ -z "${PROMPTSERVE_HOST:-}" ]; then
  die "no auth file and PROMPTSERVE_ALLOW_INSECURE_BIND=0: set PROMPTSERVE_AUTH_FILE to a mounted auth file, or PROMPTSERVE_ALLOW_INSECURE_BIND=1 to serve without authentication"
fi

export PROMPTSERVE_HOST
exec python -m server "$@"

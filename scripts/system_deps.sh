#!/usr/bin/env bash
# Debian packages the test suite uses when it can: PostgreSQL 15 (store tests against a real server) and
# docker-compose v1 (`docker-compose config -q` validates docker-compose.yml without an engine).
# Tests that need them skip with a reason when they are missing, so this step is best-effort.
set -uo pipefail
need=()
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "system deps: installing ${need[*]}"
  apt-get update -qq >/dev/null 2>&1 || true
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1 \
    || echo "system deps: could not install ${need[*]}; the tests that need them will skip"
else
  echo "system deps: missing ${need[*]} (not root or no apt-get); the tests that need them will skip"
fi

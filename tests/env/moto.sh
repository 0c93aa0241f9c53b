#!/usr/bin/env bash
# moto: the first S3 implementation (versioning, If-Match and If-None-Match, suffix ranges).
source "$(dirname "$0")/lib.sh"

VENV_BIN=$(bash "$ENV_DIR/python.sh" bin_dir)

install() { bash "$ENV_DIR/python.sh" install; }

start() {
  local state=$1 port
  port=$(free_port)
  spawn "$state" moto "$VENV_BIN/moto_server" -H 127.0.0.1 -p "$port"
  wait_for 30 "moto" curl -sf "http://127.0.0.1:$port/moto-api/"
  export_env "$state" MOTO_ENDPOINT "http://127.0.0.1:$port"
  # moto accepts any credentials; fixed ones keep the tests' requests signable.
  export_env "$state" MOTO_ACCESS_KEY_ID testing
  export_env "$state" MOTO_SECRET_ACCESS_KEY testing
  log "moto at http://127.0.0.1:$port"
}

"$@"

#!/usr/bin/env bash
# Garage: the second S3 implementation (no bucket versioning; its 412 has no error code).
# Built from crates.io once and cached by version.
source "$(dirname "$0")/lib.sh"

GARAGE_VERSION=2.5.0
GARAGE_ROOT="$SNAPCACHE_CACHE/garage-$GARAGE_VERSION"
GARAGE="$GARAGE_ROOT/bin/garage"
GARAGE_KEY_ID=GK0123456789abcdef01234567
GARAGE_KEY_SECRET=0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef

install() {
  [[ -x $GARAGE ]] && return 0
  log "building garage $GARAGE_VERSION from crates.io (about 10 minutes, once)"
  # sqlite is the only engine the tests use; leaving out lmdb, k2v and metrics shortens the build.
  cargo install garage --version "$GARAGE_VERSION" --locked --root "$GARAGE_ROOT.partial" \
    --no-default-features --features bundled-libs,sqlite
  rm -rf "$GARAGE_ROOT" && mv "$GARAGE_ROOT.partial" "$GARAGE_ROOT"
}

start() {
  local state=$1 dir="$1/garage"
  mkdir -p "$dir"
  local rpc_port s3_port admin_port
  rpc_port=$(free_port); s3_port=$(free_port); admin_port=$(free_port)
  cat >"$dir/garage.toml" <<EOF
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpc_port"
rpc_public_addr = "127.0.0.1:$rpc_port"
rpc_secret = "$(openssl rand -hex 32)"

[s3_api]
s3_region = "us-east-1"
api_bind_addr = "127.0.0.1:$s3_port"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$admin_port"
EOF
  local g=("$GARAGE" -c "$dir/garage.toml")
  spawn "$state" garage "${g[@]}" server
  wait_for 30 "garage rpc" "${g[@]}" status
  local node
  node=$("${g[@]}" node id -q | cut -d@ -f1)
  "${g[@]}" layout assign -z dc1 -c 1G "$node" >/dev/null
  "${g[@]}" layout apply --version 1 >/dev/null
  "${g[@]}" key import --yes -n snapcache-tests "$GARAGE_KEY_ID" "$GARAGE_KEY_SECRET" >/dev/null
  "${g[@]}" key allow --create-bucket "$GARAGE_KEY_ID" >/dev/null
  wait_for 30 "garage s3" curl -s -o /dev/null "http://127.0.0.1:$s3_port/"
  export_env "$state" GARAGE_ENDPOINT "http://127.0.0.1:$s3_port"
  export_env "$state" GARAGE_ACCESS_KEY_ID "$GARAGE_KEY_ID"
  export_env "$state" GARAGE_SECRET_ACCESS_KEY "$GARAGE_KEY_SECRET"
  log "garage at http://127.0.0.1:$s3_port"
}

"$@"

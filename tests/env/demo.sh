#!/usr/bin/env bash
# demo.sh: what `make demo` runs. The main job end to end on local components:
# publish a snapshot of this project's own git repository to S3 (moto), serve it with
# `snapcache-sidecar serve`, download and unpack it with `fetch --extract` (parallel
# pinned ranges), check the checkout, and show the sidecar's metrics.
source "$(dirname "$0")/lib.sh"

NAME=github.com/snapcache/snapcache
BUCKET=snapcache-demo

step() { printf '\n==> %s\n' "$*"; }
fail() { printf '\ndemo FAILED: %s\n' "$*" >&2; exit 1; }

if [[ ${1:-} != inside ]]; then
  SNAPCACHE_DEMO_STARTED=$(date +%s)
  export SNAPCACHE_DEMO_STARTED
  step "1/7 Installing the local S3 server (moto, in a Python virtualenv)"
  apt_install curl git
  bash "$ENV_DIR/python.sh" install
  ROOT=$(git -C "$ENV_DIR" rev-parse --show-toplevel)
  step "2/7 Building the sidecar binary: cargo build --release -p snapcache-sidecar (minutes the first time)"
  (cd "$ROOT" && cargo build --release --locked -p snapcache-sidecar)
  step "3/7 Starting moto"
  exec bash "$ENV_DIR/run.sh" moto -- bash "$0" inside
fi

ROOT=$(git -C "$ENV_DIR" rev-parse --show-toplevel)
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/snapcache-sidecar
[[ -x $BIN ]] || fail "$BIN is missing: the build step did not produce it"
set -a
# shellcheck source=/dev/null
source "$SNAPCACHE_TEST_ENV"
set +a
export AWS_ACCESS_KEY_ID=$MOTO_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY=$MOTO_SECRET_ACCESS_KEY
export AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
echo "moto (S3) at $MOTO_ENDPOINT"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/snapcache-demo.XXXXXX")
SIDECAR_PID=
stop_sidecar() {
  if [[ -n $SIDECAR_PID ]] && kill -0 "$SIDECAR_PID" 2>/dev/null; then
    echo "stopping the sidecar (pid $SIDECAR_PID)"
    kill -TERM "$SIDECAR_PID" 2>/dev/null || true
    wait "$SIDECAR_PID" 2>/dev/null || true
  fi
  SIDECAR_PID=
}
# The sidecar is ours to stop whatever happens; run.sh stops moto after this script.
cleanup() {
  local status=$?
  stop_sidecar
  if ((status != 0)) && [[ -s $WORK/sidecar.log ]]; then
    echo "last lines of the sidecar log:" >&2
    tail -n 20 "$WORK/sidecar.log" | sed 's/^/  /' >&2
  fi
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT

# The field $2 of the one JSON object in $1.
json_field() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }

step "4/7 Publishing this repository ($ROOT) as $NAME to s3://$BUCKET"
"$PYTHON_BIN/aws" --endpoint-url "$MOTO_ENDPOINT" s3 mb "s3://$BUCKET" >/dev/null
# The checked-out branch (its committed head), or the commit itself on a detached HEAD.
REF=$(git -C "$ROOT" symbolic-ref --quiet --short HEAD || git -C "$ROOT" rev-parse HEAD)
EXPECTED=$(git -C "$ROOT" rev-parse HEAD)
published=$(RUST_LOG=warn "$BIN" publish --repo "$ROOT" --ref "$REF" --name "$NAME" \
  --s3-bucket "$BUCKET" --s3-endpoint "$MOTO_ENDPOINT" --work-dir "$WORK/publish" --json) ||
  fail "publish failed"
echo "publish: $published"
COMMIT=$(json_field "$published" commit)
[[ $COMMIT == "$EXPECTED" ]] || fail "publish took commit $COMMIT, but $REF is at $EXPECTED"

step "5/7 Starting snapcache-sidecar serve"
LISTEN=127.0.0.1:$(free_port)
ADMIN=127.0.0.1:$(free_port)
"$BIN" serve --listen "$LISTEN" --admin-listen "$ADMIN" \
  --s3-endpoint "$MOTO_ENDPOINT" --s3-bucket "$BUCKET" --disk-dir "$WORK/disk" \
  >"$WORK/sidecar.log" 2>&1 </dev/null &
SIDECAR_PID=$!
deadline=$((SECONDS + 30))
until curl -sf "http://$ADMIN/healthz" >/dev/null 2>&1; do
  kill -0 "$SIDECAR_PID" 2>/dev/null || fail "the sidecar exited during start-up"
  ((SECONDS < deadline)) || fail "the sidecar did not answer /healthz within 30s"
  sleep 0.2
done
echo "snapshot API on http://$LISTEN, admin (/metrics, /healthz) on http://$ADMIN"

step "6/7 Fetching the snapshot with pinned parallel ranges and unpacking it"
URL=http://$LISTEN/git/$NAME/snapshot.tar.zst
echo "snapcache-sidecar fetch $URL --extract CHECKOUT"
fetched=$("$BIN" fetch "$URL" -o "$WORK/snapshot.tar.zst" --extract "$WORK/checkout" --json) ||
  fail "fetch failed"
echo "fetch: $fetched"
[[ $(json_field "$fetched" mode) == pinned ]] || fail "fetch did not use pinned ranges"
head=$(git -C "$WORK/checkout" log -1 --format=%H) || fail "the checkout is not a git repository"
[[ $head == "$COMMIT" ]] || fail "the checkout is at $head, the published commit is $COMMIT"
status=$(git -C "$WORK/checkout" status --porcelain) || fail "git status failed in the checkout"
[[ -z $status ]] || fail "the checkout is not clean:"$'\n'"$status"
echo "checkout at $head ($(git -C "$WORK/checkout" log -1 --format=%s)), git status clean"
# Pinned ranges bypass the disk tier; a plain GET takes the tiered path: the first one
# fills the disk tier with a bounded parallel GET from S3, the second reads the disk.
for source in "S3, filling the disk tier" "the disk tier"; do
  size=$(curl -sf -o /dev/null -w '%{size_download}' "$URL") || fail "plain GET of $URL failed"
  echo "plain GET: $size bytes from $source"
done

step "7/7 Sidecar metrics"
curl -sf "http://$ADMIN/metrics" |
  grep -E '^snapcache_(response_bytes_total|s3_read_bytes_total|parallel_get_buffered_bytes_high_water|heap_resident_bytes)' |
  sed 's/^/  /' || fail "the metrics are missing"

stop_sidecar
echo
echo "demo passed in $(($(date +%s) - SNAPCACHE_DEMO_STARTED))s"

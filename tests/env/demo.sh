#!/usr/bin/env bash
# demo.sh: what `make demo` runs. The main job end to end on local components:
# publish a snapshot of this project's own git repository to S3 (moto), serve it with
# `snapcache-sidecar serve`, download and unpack it with `fetch --extract` (parallel
# pinned ranges), check the checkout, and show the sidecar's metrics.
# shellcheck source-path=SCRIPTDIR source=demo-lib.sh
source "$(dirname "$0")/demo-lib.sh"

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
demo_cleanup() {
  stop_sidecar
  if (($1 != 0)) && [[ -n $WORK && -s $WORK/sidecar.log ]]; then
    echo "last lines of the sidecar log:" >&2
    tail -n 20 "$WORK/sidecar.log" | sed 's/^/  /' >&2
  fi
}

if [[ ${1:-} != inside ]]; then
  step "1/7 Installing the local S3 server (moto, in a Python virtualenv)"
  install_demo_tools
  step "2/7 Building the sidecar binary: cargo build --release -p snapcache-sidecar (minutes the first time)"
  (cd "$ROOT" && cargo build --release --locked -p snapcache-sidecar)
  run_inside moto "3/7 Starting moto"
fi

enter_run release
echo "moto (S3) at $MOTO_ENDPOINT"

step "4/7 Publishing this repository ($ROOT) as $NAME to s3://$BUCKET"
publish_repository

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
# metric NAME_AND_LABELS: its value on the admin port, 0 while it has no sample.
metric() { curl -sf "http://$ADMIN/metrics" | awk -v name="$1" '$1 == name { print $2; found=1 } END { if (!found) print 0 }'; }
size=$(curl -sf -o /dev/null -w '%{size_download}' "$URL") || fail "plain GET of $URL failed"
echo "plain GET: $size bytes from S3, filling the disk tier"
# The fill commits just after its last byte reaches the client: wait for it (10 s at most).
for _ in $(seq 100); do
  [[ $(metric snapcache_disk_fill_duration_seconds_count) == 1 ]] && break
  sleep 0.1
done
[[ $(metric snapcache_disk_fill_duration_seconds_count) == 1 ]] || fail "the disk tier was not filled"
before=$(metric 'snapcache_response_bytes_total{source="disk"}')
size=$(curl -sf -o /dev/null -w '%{size_download}' "$URL") || fail "plain GET of $URL failed"
from_disk=$(( $(metric 'snapcache_response_bytes_total{source="disk"}') - before ))
(( from_disk == size )) || fail "the second GET sent $from_disk of its $size bytes from the disk tier"
echo "plain GET: $size bytes from the disk tier"

step "7/7 Sidecar metrics"
curl -sf "http://$ADMIN/metrics" |
  grep -E '^snapcache_(response_bytes_total|s3_read_bytes_total|parallel_get_buffered_bytes_high_water|heap_resident_bytes)' |
  sed 's/^/  /' || fail "the metrics are missing"

stop_sidecar
printf '\ndemo passed\n'

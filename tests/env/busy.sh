#!/usr/bin/env bash
# busy.sh: `make test` RUNS times in a row (default 5), each beside a from-scratch release
# build of the workspace in a target directory of its own, so the suite is shown to pass
# on a machine whose cores are taken. Stops at the first failing run.
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"
cd "$ENV_DIR/../.."

runs=${RUNS:-5}
scratch=$(mktemp -d /tmp/snapcache-busy.XXXXXX)
build=""
stop_build() {
  if [[ -n $build ]]; then kill -- "-$build" 2>/dev/null || true; wait "$build" 2>/dev/null || true; fi
  build=""
}
trap 'stop_build; rm -rf "$scratch"' EXIT

results=()
for ((run = 1; run <= runs; run++)); do
  rm -rf "$scratch/target"
  setsid env CARGO_TARGET_DIR="$scratch/target" cargo build --release --workspace --locked \
    >"$scratch/build.log" 2>&1 </dev/null &
  build=$!
  log "run $run of $runs: make test beside a release build (log: $scratch/test-$run.log)"
  start=$SECONDS
  status=0
  make test >"$scratch/test-$run.log" 2>&1 || status=$?
  if kill -0 "$build" 2>/dev/null; then beside="still building"; else beside="had finished"; fi
  stop_build
  summary=$(grep -E '^ *Summary' "$scratch/test-$run.log" | tail -n 1 | sed 's/^ *//')
  results+=("run $run: exit $status in $((SECONDS - start))s, the release build $beside; $summary")
  log "${results[-1]}"
  if ((status != 0)); then
    cp "$scratch/test-$run.log" "/tmp/snapcache-busy-failed-run-$run.log"
    die "run $run failed; its log is /tmp/snapcache-busy-failed-run-$run.log"
  fi
done
log "== all $runs runs passed"
for line in "${results[@]}"; do log "$line"; done

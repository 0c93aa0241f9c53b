#!/usr/bin/env bash
# test.sh: what `make test` runs. Checks, installs, starts the components, runs every
# test, stops the components, and prints how long each phase took.
source "$(dirname "$0")/lib.sh"
cd "$ENV_DIR/../.."

timings=()
phase() {
  local label=$1; shift
  local start=$SECONDS
  log "== $label"
  "$@"
  timings+=("$(printf '%-28s %4ss' "$label" $((SECONDS - start)))")
}
# run.sh adds how long each component took to start and stop (inside "tests").
SNAPCACHE_TIMINGS=$(mktemp)
export SNAPCACHE_TIMINGS
report() {
  local status=$?
  log "== timings"
  for line in "${timings[@]}"; do log "$line"; done
  while IFS= read -r line; do log "$line"; done <"$SNAPCACHE_TIMINGS"
  rm -f "$SNAPCACHE_TIMINGS"
  log "total $((SECONDS - run_start))s (exit $status)"
}
# crds/ and the chart's crds/ must be exactly what `snapcache-operator crd` prints; `make crds` regenerates it.
# It runs the operator the test build made: `cargo run -p` would build it again with other features.
crd_drift() {
  local generated copy
  generated=$(target/debug/snapcache-operator crd)
  for copy in crds/snapcache.io_snapshotcaches.yaml charts/snapcache/crds/snapcache.io_snapshotcaches.yaml; do
    diff -u "$copy" - <<<"$generated" ||
      die "$copy is out of date with the SnapshotCache types: run 'make crds' and commit the result"
  done
}
run_start=$SECONDS
trap report EXIT

phase "cargo fmt --check" cargo fmt --all --check
# No module of either crate depends on itself through others (cargo-modules' --acyclic, from the source).
phase "module cycles" python3 "$ENV_DIR/module_cycles.py" sidecar/src operator/src
phase "install components" bash "$ENV_DIR/install.sh"
# Clippy and the test build in one: `cargo clippy` would compile every dependency a second
# time, in check mode (282 of a warm CI run's 904 s). Every target is a test or a binary the
# tests run, so this lints what `cargo clippy --all-targets` does; `make lint` runs that.
export RUSTC_WORKSPACE_WRAPPER="$ENV_DIR/clippy-rustc.sh"
phase "clippy and build tests" cargo nextest run --workspace --locked --no-run
phase "CRD drift" crd_drift
# The container images, from the dev build the tests use (make images ships release);
# the cluster imports them into its node before the tests start.
images_test() {
  SNAPCACHE_IMAGE_PROFILE=dev bash "$ENV_DIR/images.sh" build &&
    SNAPCACHE_IMAGE_PROFILE=dev bash "$ENV_DIR/images.sh" test
}
phase "images" images_test
phase "tests" bash "$ENV_DIR/run.sh" all -- cargo nextest run --workspace --locked --no-fail-fast

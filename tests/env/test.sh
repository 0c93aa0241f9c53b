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
report() {
  local status=$?
  log "== timings"
  for line in "${timings[@]}"; do log "$line"; done
  log "total $((SECONDS - run_start))s (exit $status)"
}
run_start=$SECONDS
trap report EXIT

phase "cargo fmt --check" cargo fmt --all --check
phase "install components" bash "$ENV_DIR/install.sh"
phase "cargo clippy" cargo clippy --workspace --all-targets --locked -- -D warnings
phase "build tests" cargo nextest run --workspace --locked --no-run
phase "tests" bash "$ENV_DIR/run.sh" all -- cargo nextest run --workspace --locked --no-fail-fast

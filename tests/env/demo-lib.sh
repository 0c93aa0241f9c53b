# shellcheck shell=bash
# What demo.sh and cluster-demo.sh share. Source it; do not run it.
#
# A demo runs twice. First on the machine, where it installs and builds; run_inside then
# starts its components with run.sh and runs the demo again with the argument "inside",
# where enter_run reads their endpoints. Each run prints its step times when it ends and
# removes $WORK, whether it passed, failed or was interrupted.
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

NAME=github.com/snapcache/snapcache
BUCKET=snapcache-demo
ROOT=$(git -C "$ENV_DIR" rev-parse --show-toplevel)
DEMO=$(basename "$0" .sh)
# Set by the first run, so that the second counts from the same start.
SNAPCACHE_DEMO_STARTED=${SNAPCACHE_DEMO_STARTED:-$(date +%s)}
export SNAPCACHE_DEMO_STARTED
WORK=""

step_times=()
step_label=""
step_started=$SECONDS
# step TEXT: prints the heading of the next step; its time goes to the table printed at the end.
step() {
  end_step
  step_label=$*
  step_started=$SECONDS
  printf '\n==> %s\n' "$*"
}
end_step() {
  if [[ -n $step_label ]]; then step_times+=("$(printf '%4ss  %s' $((SECONDS - step_started)) "$step_label")"); fi
  step_label=""
}
report_steps() {
  end_step
  printf '\n==> step times (%ss since the demo started)\n' $(($(date +%s) - SNAPCACHE_DEMO_STARTED))
  if ((${#step_times[@]} > 0)); then printf '%s\n' "${step_times[@]}"; fi
}

fail() { printf '\n%s FAILED: %s\n' "$DEMO" "$*" >&2; exit 1; }

# demo_cleanup STATUS: what the demo itself undoes on exit, before $WORK is removed. A demo
# that starts processes of its own defines it again after sourcing this file.
demo_cleanup() { :; }

finish_run() {
  local status=$?
  demo_cleanup "$status"
  report_steps
  if [[ -n $WORK ]]; then rm -rf "$WORK"; fi
  exit "$status"
}
trap finish_run EXIT

# install_demo_tools: curl, git and moto's Python virtualenv, which both demos use.
install_demo_tools() {
  apt_install curl git
  bash "$ENV_DIR/python.sh" install
}

# run_inside COMPONENTS HEADING: ends this run with its step times and runs the demo again
# under run.sh with COMPONENTS started; run.sh prints how long each one took to start.
run_inside() {
  trap - EXIT
  report_steps
  printf '\n==> %s\n' "$2"
  exec bash "$ENV_DIR/run.sh" "$1" -- bash "$0" inside
}

# enter_run PROFILE: in the run under run.sh: the components' endpoints from its env file,
# BIN (the sidecar that cargo built in PROFILE, debug or release), moto's credentials for aws
# and the sidecar, and a new $WORK.
enter_run() {
  set -a
  # shellcheck source=/dev/null
  source "$SNAPCACHE_TEST_ENV"
  set +a
  BIN=${CARGO_TARGET_DIR:-$ROOT/target}/$1/snapcache-sidecar
  [[ -x $BIN ]] || fail "$BIN is missing: the build step did not produce it"
  export AWS_ACCESS_KEY_ID=$MOTO_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY=$MOTO_SECRET_ACCESS_KEY
  export AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/snapcache-$DEMO.XXXXXX")
}

# json_field JSON FIELD: the field FIELD of the one JSON object JSON.
json_field() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }

# publish_repository: creates s3://$BUCKET in moto and publishes this repository as $NAME:
# its checked-out branch (the committed head), or the commit itself on a detached HEAD. Sets
# COMMIT, the commit publish took, which must be HEAD's.
publish_repository() {
  "$PYTHON_BIN/aws" --endpoint-url "$MOTO_ENDPOINT" s3 mb "s3://$BUCKET" >/dev/null ||
    fail "creating s3://$BUCKET in moto failed"
  local ref expected published
  ref=$(git -C "$ROOT" symbolic-ref --quiet --short HEAD || git -C "$ROOT" rev-parse HEAD)
  expected=$(git -C "$ROOT" rev-parse HEAD)
  published=$(RUST_LOG=warn "$BIN" publish --repo "$ROOT" --ref "$ref" --name "$NAME" \
    --s3-bucket "$BUCKET" --s3-endpoint "$MOTO_ENDPOINT" --work-dir "$WORK/publish" --json) ||
    fail "publish failed"
  echo "publish: $published"
  COMMIT=$(json_field "$published" commit)
  [[ $COMMIT == "$expected" ]] || fail "publish took commit $COMMIT, but $ref is at $expected"
}

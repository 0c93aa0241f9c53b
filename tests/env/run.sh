#!/usr/bin/env bash
# run.sh COMPONENTS -- CMD...
# Starts the named components (comma-separated: moto,garage,kube,cluster, or "all"; cluster
# after the S3 servers, whose endpoints it forwards to the pods), runs CMD
# with SNAPCACHE_TEST_ENV naming their env file, and stops every one of them on exit,
# whether CMD passed, failed or was interrupted.
source "$(dirname "$0")/lib.sh"

[[ $# -ge 3 && $2 == -- ]] || die "usage: run.sh moto,garage,kube,cluster|all -- CMD..."
components=$1; shift 2
[[ $components == all ]] && components=moto,garage,kube,cluster

STATE=$(mktemp -d "${TMPDIR:-/tmp}/snapcache-env.XXXXXX")
: >"$STATE/env"; : >"$STATE/pids"
# kubectl's discovery and HTTP caches, one per API server address, would otherwise pile up in
# ~/.kube/cache, a new address each run (kubectl 1.25 and later read KUBECACHEDIR).
export KUBECACHEDIR="$STATE/kubectl-cache"
stop_all() {
  local status=$?
  recorded "stopping the components" bash "$ENV_DIR/down.sh" "$STATE"
  if ((status == 0)); then rm -rf "$STATE"; else log "kept logs of the components in $STATE"; fi
  exit "$status"
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for component in ${components//,/ }; do
  recorded "starting $component" bash "$ENV_DIR/$component.sh" start "$STATE"
done
export_env "$STATE" HELM "$(bash "$ENV_DIR/helm.sh" bin_path)"
export_env "$STATE" PROMTOOL "$(command -v promtool || echo promtool-not-installed)"
export_env "$STATE" PROMETHEUS "$(bash "$ENV_DIR/prometheus.sh" server || echo prometheus-not-built)"
export_env "$STATE" PYTHON_BIN "$(bash "$ENV_DIR/python.sh" bin_dir)"

export SNAPCACHE_TEST_ENV="$STATE/env"
"$@"

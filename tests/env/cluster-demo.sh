#!/usr/bin/env bash
# cluster-demo.sh: what `make cluster-demo` runs. Starts a real kube-apiserver (with
# etcd), installs the chart (CRDs included), runs the operator as a local process acting
# as the chart's ServiceAccount (there is no kubelet here to run its pod), creates a
# Deployment and a SnapshotCache, and prints the injected pod template and the status.
source "$(dirname "$0")/lib.sh"

RELEASE=snapcache
RELEASE_NAMESPACE=snapcache-system
DEMO_NAMESPACE=snapcache-demo

step() { printf '\n==> %s\n' "$*"; }
fail() { printf '\ncluster-demo FAILED: %s\n' "$*" >&2; exit 1; }

if [[ ${1:-} != inside ]]; then
  step "1/6 Installing kube-apiserver and etcd, helm, and Python (cached after the first run)"
  apt_install curl
  bash "$ENV_DIR/python.sh" install
  bash "$ENV_DIR/helm.sh" install
  bash "$ENV_DIR/kube.sh" install
  ROOT=$(git -C "$ENV_DIR" rev-parse --show-toplevel)
  step "2/6 Building the operator: cargo build -p snapcache-operator"
  (cd "$ROOT" && cargo build --locked -p snapcache-operator)
  step "3/6 Starting kube-apiserver and etcd on loopback"
  exec bash "$ENV_DIR/run.sh" kube -- bash "$0" inside
fi

ROOT=$(git -C "$ENV_DIR" rev-parse --show-toplevel)
OPERATOR=${CARGO_TARGET_DIR:-$ROOT/target}/debug/snapcache-operator
[[ -x $OPERATOR ]] || fail "$OPERATOR is missing: the build step did not produce it"
set -a
# shellcheck source=/dev/null
source "$SNAPCACHE_TEST_ENV"
set +a
HELM=$(bash "$ENV_DIR/helm.sh" bin_path)
PYTHON=$PYTHON_BIN/python
WORK=$(mktemp -d "${TMPDIR:-/tmp}/snapcache-cluster-demo.XXXXXX")
OPERATOR_PID=
cleanup() {
  [[ -n $OPERATOR_PID ]] && kill "$OPERATOR_PID" 2>/dev/null && wait "$OPERATOR_PID" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

# The API through curl and the admin token: no kubectl needed.
api() {
  local method=$1 path=$2
  shift 2
  curl -sS --fail-with-body --cacert "$KUBE_CA_FILE" -H "Authorization: Bearer $KUBE_TOKEN" \
    -X "$method" "$KUBE_APISERVER$path" "$@"
}
create() { api POST "$1" -H 'Content-Type: application/yaml' --data-binary @- >/dev/null; }
# poll SECONDS CMD...: true once CMD succeeds, false after SECONDS.
poll() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}
as_yaml() { "$PYTHON" -c 'import json, sys, yaml; print(yaml.safe_dump(eval("json.load(sys.stdin)" + sys.argv[1]), sort_keys=False), end="")' "$1"; }

step "4/6 helm install $RELEASE charts/snapcache -n $RELEASE_NAMESPACE --create-namespace"
"$HELM" install "$RELEASE" "$ROOT/charts/snapcache" -n "$RELEASE_NAMESPACE" --create-namespace \
  || fail "helm install"
"$HELM" list -n "$RELEASE_NAMESPACE"

step "5/6 Running the operator locally as the chart's ServiceAccount (impersonated)"
deployment=$(api GET "/apis/apps/v1/namespaces/$RELEASE_NAMESPACE/deployments/$RELEASE")
service_account=$("$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["spec"]["template"]["spec"]["serviceAccountName"])' <<<"$deployment")
echo "the chart's operator Deployment runs as ServiceAccount $service_account with args:"
as_yaml '["spec"]["template"]["spec"]["containers"][0]["args"]' <<<"$deployment"
"$PYTHON" - "$KUBECONFIG" "$WORK/kubeconfig" "$RELEASE_NAMESPACE" "$service_account" <<'EOF'
import sys, yaml
source, target, namespace, account = sys.argv[1:]
config = yaml.safe_load(open(source))
for user in config["users"]:
    user["user"]["as"] = f"system:serviceaccount:{namespace}:{account}"
    user["user"]["as-groups"] = ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"]
yaml.safe_dump(config, open(target, "w"))
EOF
admin_port=$(free_port)
KUBECONFIG=$WORK/kubeconfig POD_NAME=$RELEASE-local POD_NAMESPACE=$RELEASE_NAMESPACE RUST_LOG=info \
  "$OPERATOR" run --leader-election --lease-name "$RELEASE" \
  --admin-listen "127.0.0.1:$admin_port" >"$WORK/operator.log" 2>&1 &
OPERATOR_PID=$!
poll 30 curl -sf "http://127.0.0.1:$admin_port/readyz" \
  || fail "the operator did not become ready: $(tail -n 20 "$WORK/operator.log")"
echo "operator ready: http://127.0.0.1:$admin_port/readyz"

step "6/6 A Deployment and a SnapshotCache selecting it, in namespace $DEMO_NAMESPACE"
create /api/v1/namespaces <<EOF
metadata: {name: $DEMO_NAMESPACE}
EOF
create "/apis/apps/v1/namespaces/$DEMO_NAMESPACE/deployments" <<'EOF'
apiVersion: apps/v1
kind: Deployment
metadata: {name: builder, labels: {app: builder}}
spec:
  selector: {matchLabels: {app: builder}}
  template:
    metadata: {labels: {app: builder}}
    spec:
      containers: [{name: build, image: "builder:1", command: [make, build]}]
EOF
create "/apis/snapcache.io/v1alpha1/namespaces/$DEMO_NAMESPACE/snapshotcaches" <<'EOF'
apiVersion: snapcache.io/v1alpha1
kind: SnapshotCache
metadata: {name: monorepo}
spec:
  selector: {matchLabels: {app: builder}}
  s3: {bucket: snapshots, region: us-east-1}
  sidecar: {diskSize: 20Gi, parallelGetWorkers: 8}
EOF
injected() {
  api GET "/apis/apps/v1/namespaces/$DEMO_NAMESPACE/deployments/builder" |
    grep -q '"name": *"snapcache-sidecar"'
}
poll 30 injected || fail "no sidecar injected: $(tail -n 20 "$WORK/operator.log")"
echo
echo "--- the Deployment's pod template, with the sidecar the operator injected:"
api GET "/apis/apps/v1/namespaces/$DEMO_NAMESPACE/deployments/builder" | as_yaml '["spec"]["template"]'
ready() {
  api GET "/apis/snapcache.io/v1alpha1/namespaces/$DEMO_NAMESPACE/snapshotcaches/monorepo" |
    grep -q '"status": *"True"'
}
poll 30 ready || fail "the SnapshotCache did not become Ready"
echo
echo "--- the SnapshotCache's status:"
api GET "/apis/snapcache.io/v1alpha1/namespaces/$DEMO_NAMESPACE/snapshotcaches/monorepo" | as_yaml '["status"]'
echo
echo "--- events:"
api GET "/apis/events.k8s.io/v1/namespaces/$DEMO_NAMESPACE/events" |
  "$PYTHON" -c 'import json, sys; [print(e["type"], e["reason"], e.get("note", "")) for e in json.load(sys.stdin)["items"]]'
printf '\ncluster demo OK: the chart is installed, the operator injected the sidecar, the SnapshotCache is Ready\n'

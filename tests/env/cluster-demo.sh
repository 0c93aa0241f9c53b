#!/usr/bin/env bash
# cluster-demo.sh: what `make cluster-demo` runs. On a real one-node cluster (cluster.sh):
# `helm install` of the chart runs the operator as a pod from its image; a snapshot of this
# repository is published to S3 (moto); a SnapshotCache and a Deployment follow, the
# operator's webhook injects the sidecar, and the app container reads the snapshot from
# 127.0.0.1:8765; then a Job starts with the repository checked out and completes. Prints
# the logs, a few sidecar metrics and each step's time, then stops everything and leaves
# the host as it was.
# shellcheck source-path=SCRIPTDIR source=demo-lib.sh
source "$(dirname "$0")/demo-lib.sh"

RELEASE=snapcache
RELEASE_NAMESPACE=snapcache-system
DEMO_NAMESPACE=snapcache-demo

if [[ ${1:-} != inside ]]; then
  step "1/10 Installing moto, helm, containerd, the CNI plugins and Kubernetes 1.20.2 (built once from Debian's source, about 15 minutes; cached after)"
  install_demo_tools
  bash "$ENV_DIR/helm.sh" install
  bash "$ENV_DIR/cluster.sh" install
  bash "$ENV_DIR/images.sh" install
  step "2/10 Building the binaries and the images of the sidecar and the operator (dev profile)"
  (cd "$ROOT" && cargo build --locked -p snapcache-sidecar -p snapcache-operator)
  SNAPCACHE_IMAGE_PROFILE=dev bash "$ENV_DIR/images.sh" build
  run_inside moto,cluster "3/10 Starting moto and the cluster (etcd, API server, scheduler, controller-manager, containerd, kubelet)"
fi

enter_run debug
HELM=$(bash "$ENV_DIR/helm.sh" bin_path)
kubectl() { command kubectl --kubeconfig "$CLUSTER_KUBECONFIG" "$@"; }
kubectl get nodes -o wide

step "4/10 helm install $RELEASE charts/snapcache -n $RELEASE_NAMESPACE (the operator runs as a pod)"
# No kube-proxy here: the operator reaches the API server at the node address.
"$HELM" --kubeconfig "$CLUSTER_KUBECONFIG" install "$RELEASE" "$ROOT/charts/snapcache" \
  -n "$RELEASE_NAMESPACE" --create-namespace --set image.pullPolicy=Never \
  --set "extraEnv[0].name=KUBERNETES_SERVICE_HOST" --set "extraEnv[0].value=$CLUSTER_NODE_IP" \
  --set "extraEnv[1].name=KUBERNETES_SERVICE_PORT" --set-string "extraEnv[1].value=${CLUSTER_APISERVER##*:}" \
  || fail "helm install"
kubectl -n "$RELEASE_NAMESPACE" rollout status deployment/"$RELEASE" --timeout=120s ||
  fail "the operator pod did not become ready: $(kubectl -n "$RELEASE_NAMESPACE" logs deployment/"$RELEASE" --tail=20)"
kubectl -n "$RELEASE_NAMESPACE" get pods -o wide

step "5/10 Publishing a snapshot of this repository to S3 (moto): snapcache-sidecar publish"
publish_repository

step "6/10 A Secret, a SnapshotCache and a Deployment whose app reads the snapshot from 127.0.0.1:8765"
kubectl create namespace "$DEMO_NAMESPACE"
kubectl -n "$DEMO_NAMESPACE" create secret generic s3-credentials \
  --from-literal=AWS_ACCESS_KEY_ID="$MOTO_ACCESS_KEY_ID" \
  --from-literal=AWS_SECRET_ACCESS_KEY="$MOTO_SECRET_ACCESS_KEY"
kubectl -n "$DEMO_NAMESPACE" apply -f - <<EOF
apiVersion: snapcache.io/v1alpha1
kind: SnapshotCache
metadata: {name: monorepo}
spec:
  selector: {matchLabels: {app: builder}}
  s3: {bucket: $BUCKET, endpoint: "$CLUSTER_S3_MOTO_ENDPOINT", credentialsSecret: s3-credentials}
  sidecar: {diskSize: 1Gi}
EOF
# The operator narrows its webhook to the pods each SnapshotCache selects: let the entry
# exist before the Deployment's first pod is created.
deadline=$((SECONDS + 30))
until kubectl get mutatingwebhookconfiguration "$RELEASE" -o jsonpath='{.webhooks[*].name}' |
  grep -qw "monorepo.$DEMO_NAMESPACE.pods.snapcache.io"; do
  ((SECONDS < deadline)) || fail "the operator did not add the SnapshotCache's webhook entry"
  sleep 0.2
done
kubectl -n "$DEMO_NAMESPACE" apply -f - <<EOF
apiVersion: apps/v1
kind: Deployment
metadata: {name: builder, labels: {app: builder}}
spec:
  selector: {matchLabels: {app: builder}}
  template:
    metadata: {labels: {app: builder}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
        - name: app
          image: $CLUSTER_BUSYBOX_IMAGE
          imagePullPolicy: Never
          command:
            - sh
            - -c
            - |
              mkdir -p /tmp
              start=\$(date +%s)
              until wget -q -O /tmp/snapshot.tar.zst http://127.0.0.1:8765/git/$NAME/snapshot.tar.zst; do sleep 0.2; done
              echo "read the snapshot from the sidecar in \$((\$(date +%s) - start))s: \$(wc -c < /tmp/snapshot.tar.zst) bytes"
              sha256sum /tmp/snapshot.tar.zst
              exec sleep 1000000
EOF

step "7/10 Waiting for the pod: the webhook injects the sidecar, the app reads the snapshot"
app_has_read() {
  kubectl -n "$DEMO_NAMESPACE" logs deployment/builder -c app 2>/dev/null | grep -q 'snapshot.tar.zst$'
}
deadline=$((SECONDS + 180))
until app_has_read; do
  ((SECONDS < deadline)) || fail "the app did not read the snapshot: $(kubectl -n "$DEMO_NAMESPACE" describe pods | tail -n 30)"
  sleep 0.5
done
kubectl -n "$DEMO_NAMESPACE" get pods -o wide
echo
echo "--- the app container's log:"
kubectl -n "$DEMO_NAMESPACE" logs deployment/builder -c app
echo "--- the SnapshotCache:"
kubectl -n "$DEMO_NAMESPACE" get snapshotcache monorepo

step "8/10 A few lines of the sidecar's metrics (its admin port, on the pod's address)"
pod_ip=$(kubectl -n "$DEMO_NAMESPACE" get pods -l app=builder \
  -o 'jsonpath={.items[?(@.status.phase=="Running")].status.podIP}' | awk '{print $1}')
curl -sf "http://$pod_ip:9765/metrics" |
  grep -E '^snapcache_(response_bytes_total|s3_read_bytes_total|disk_tier_entries|s3_up|ready|heap_resident_bytes)' ||
  fail "no metrics from the sidecar at $pod_ip:9765"
# apply_checkout_job NAME: a Job whose pod starts with this repository checked out (the
# webhook's init container) and shows it.
apply_checkout_job() {
  kubectl -n "$DEMO_NAMESPACE" apply -f - <<EOF
apiVersion: batch/v1
kind: Job
metadata: {name: $1}
spec:
  backoffLimit: 0
  template:
    metadata:
      labels: {app: builder}
      annotations:
        snapcache.io/checkout: $NAME=/workspace/snapcache
    spec:
      restartPolicy: Never
      containers:
        - name: app
          image: $CLUSTER_GIT_IMAGE
          imagePullPolicy: Never
          securityContext: {runAsUser: 1000, runAsGroup: 1000}
          command:
            - sh
            - -c
            - |
              cd /workspace/snapcache
              echo "first command, as uid \$(id -u): the checkout is at \$(git rev-parse HEAD)"
              git log --oneline -3
              echo "uncommitted changes: \$(git status --porcelain | wc -l)"
EOF
}
step "9/10 A Job that starts with this repository checked out (the webhook's init container) and completes"
apply_checkout_job ci
kubectl -n "$DEMO_NAMESPACE" wait --for=condition=complete job/ci --timeout=180s ||
  fail "the Job did not complete: $(kubectl -n "$DEMO_NAMESPACE" describe pods -l job-name=ci | tail -n 30)"
kubectl -n "$DEMO_NAMESPACE" get job ci
echo "--- the Job's log:"
kubectl -n "$DEMO_NAMESPACE" logs job/ci -c app

step "10/10 A node tier: a node cache on the node; the first Job reads the snapshot through it from S3, the second starts warm"
kubectl -n "$DEMO_NAMESPACE" patch snapshotcache monorepo --type merge \
  -p "{\"spec\": {\"nodeTier\": {\"enabled\": true, \"hostPath\": \"$WORK/node-cache\", \"size\": \"1Gi\"}}}"
deadline=$((SECONDS + 60))
until kubectl -n "$DEMO_NAMESPACE" get daemonset snapcache-node-monorepo >/dev/null 2>&1; do
  ((SECONDS < deadline)) || fail "the operator made no node cache DaemonSet"
  sleep 0.5
done
kubectl -n "$DEMO_NAMESPACE" rollout status daemonset/snapcache-node-monorepo --timeout=120s ||
  fail "the node cache is not ready: $(kubectl -n "$DEMO_NAMESPACE" describe pods -l app.kubernetes.io/component=node-cache | tail -n 30)"
# node_cache_s3_bytes: what the node cache has read from S3 so far (its admin port, 9766).
node_cache_s3_bytes() {
  curl -sf "http://$CLUSTER_NODE_IP:9766/metrics" | awk '$1 == "snapcache_s3_read_bytes_total" { print $2 }'
}
cold_bytes=""
for job in ci-cold ci-warm; do
  apply_checkout_job "$job" >/dev/null
  kubectl -n "$DEMO_NAMESPACE" wait --for=condition=complete "job/$job" --timeout=180s ||
    fail "the Job $job did not complete: $(kubectl -n "$DEMO_NAMESPACE" describe pods -l job-name="$job" | tail -n 30)"
  seconds=$(kubectl -n "$DEMO_NAMESPACE" get job "$job" -o json |
    python3 -c 'import json,sys,datetime; s=json.load(sys.stdin)["status"]; t=lambda k: datetime.datetime.fromisoformat(s[k].replace("Z","+00:00")); print(int((t("completionTime")-t("startTime")).total_seconds()))')
  read_bytes=$(node_cache_s3_bytes) || fail "no metrics from the node cache at $CLUSTER_NODE_IP:9766"
  echo "$job: completed in ${seconds}s; the node cache has read $read_bytes bytes from S3 in all"
  if [[ -z $cold_bytes ]]; then
    cold_bytes=$read_bytes
    [[ $cold_bytes != 0 ]] || fail "the first Job did not read through the node cache"
  else
    [[ $read_bytes == "$cold_bytes" ]] || fail "the second Job made the node cache read S3 again"
  fi
done
echo "--- the second Job's log:"
kubectl -n "$DEMO_NAMESPACE" logs job/ci-warm -c app
printf '\ncluster demo OK: the operator pod injected the sidecar, the app read the published snapshot from it, a Job started with the repository checked out, and with a node tier a second Job started warm\n'

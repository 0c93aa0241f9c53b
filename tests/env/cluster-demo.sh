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
  step "1/9 Installing moto, helm, containerd, the CNI plugins and Kubernetes 1.20.2 (built once from Debian's source, about 15 minutes; cached after)"
  install_demo_tools
  bash "$ENV_DIR/helm.sh" install
  bash "$ENV_DIR/cluster.sh" install
  bash "$ENV_DIR/images.sh" install
  step "2/9 Building the binaries and the images of the sidecar and the operator (dev profile)"
  (cd "$ROOT" && cargo build --locked -p snapcache-sidecar -p snapcache-operator)
  SNAPCACHE_IMAGE_PROFILE=dev bash "$ENV_DIR/images.sh" build
  run_inside moto,cluster "3/9 Starting moto and the cluster (etcd, API server, scheduler, controller-manager, containerd, kubelet)"
fi

enter_run debug
HELM=$(bash "$ENV_DIR/helm.sh" bin_path)
kubectl() { command kubectl --kubeconfig "$CLUSTER_KUBECONFIG" "$@"; }
kubectl get nodes -o wide

step "4/9 helm install $RELEASE charts/snapcache -n $RELEASE_NAMESPACE (the operator runs as a pod)"
# No kube-proxy here: the operator reaches the API server at the node address.
"$HELM" --kubeconfig "$CLUSTER_KUBECONFIG" install "$RELEASE" "$ROOT/charts/snapcache" \
  -n "$RELEASE_NAMESPACE" --create-namespace --set image.pullPolicy=Never \
  --set "extraEnv[0].name=KUBERNETES_SERVICE_HOST" --set "extraEnv[0].value=$CLUSTER_NODE_IP" \
  --set "extraEnv[1].name=KUBERNETES_SERVICE_PORT" --set-string "extraEnv[1].value=${CLUSTER_APISERVER##*:}" \
  || fail "helm install"
kubectl -n "$RELEASE_NAMESPACE" rollout status deployment/"$RELEASE" --timeout=120s ||
  fail "the operator pod did not become ready: $(kubectl -n "$RELEASE_NAMESPACE" logs deployment/"$RELEASE" --tail=20)"
kubectl -n "$RELEASE_NAMESPACE" get pods -o wide

step "5/9 Publishing a snapshot of this repository to S3 (moto): snapcache-sidecar publish"
publish_repository

step "6/9 A Secret, a SnapshotCache and a Deployment whose app reads the snapshot from 127.0.0.1:8765"
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

step "7/9 Waiting for the pod: the webhook injects the sidecar, the app reads the snapshot"
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

step "8/9 A few lines of the sidecar's metrics (its admin port, on the pod's address)"
pod_ip=$(kubectl -n "$DEMO_NAMESPACE" get pods -l app=builder \
  -o 'jsonpath={.items[?(@.status.phase=="Running")].status.podIP}' | awk '{print $1}')
curl -sf "http://$pod_ip:9765/metrics" |
  grep -E '^snapcache_(response_bytes_total|s3_read_bytes_total|disk_tier_entries|s3_up|ready|heap_resident_bytes)' ||
  fail "no metrics from the sidecar at $pod_ip:9765"
step "9/9 A Job that starts with this repository checked out (the webhook's init container) and completes"
kubectl -n "$DEMO_NAMESPACE" apply -f - <<EOF
apiVersion: batch/v1
kind: Job
metadata: {name: ci}
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
kubectl -n "$DEMO_NAMESPACE" wait --for=condition=complete job/ci --timeout=180s ||
  fail "the Job did not complete: $(kubectl -n "$DEMO_NAMESPACE" describe pods -l job-name=ci | tail -n 30)"
kubectl -n "$DEMO_NAMESPACE" get job ci
echo "--- the Job's log:"
kubectl -n "$DEMO_NAMESPACE" logs job/ci -c app
printf '\ncluster demo OK: the operator pod injected the sidecar, the app read the published snapshot from it, and a Job started with the repository checked out\n'

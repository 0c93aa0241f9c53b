#!/usr/bin/env bash
# Kubernetes: a real kube-apiserver over etcd, for the tests that talk to the Kubernetes API,
# and (for cluster.sh) the kubelet, kube-scheduler and kube-controller-manager of a node.
# No registry ships them, so they are built once from Debian's `kubernetes` source package
# (1.20.2, vendor/ included) and cached by version; etcd is Debian's etcd-server.
#
#   kube.sh start STATE         an API server on 127.0.0.1 (KUBECONFIG, KUBE_* in the env)
#   KUBE_ADDRESS=IP KUBE_NODE_NAME=NODE kube.sh start STATE
#                               cluster.sh's: on IP, with a node credential, service account
#                               tokens and webhook routing to pod IPs (CLUSTER_* in the env)
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

KUBE_VERSION=1.20.2
# The kubelet carries 1.26's unix-socket gRPC authority fix, without which it cannot talk to
# the node cache's CSI plugin (tonic); the suffix keys the cache to the patch.
KUBELET_PATCH="$ENV_DIR/patches/kubelet-1.20-unix-socket-grpc-authority.patch"
KUBE_ROOT="$SNAPCACHE_CACHE/kubernetes-$KUBE_VERSION-grpc-authority-1"
KUBE_APISERVER_BIN="$KUBE_ROOT/kube-apiserver"
KUBE_COMMANDS=(kube-apiserver kubelet kube-scheduler kube-controller-manager)
ETCD=/usr/bin/etcd
# Vendored packages swapped for Debian's newer copies: the 1.20.2 ones (reflect2 1.0.1,
# json-iterator 1.1.10) crash the server under Go 1.19 on the first custom-resource POST.
KUBE_VENDOR_REPLACE=(github.com/modern-go/reflect2 github.com/json-iterator/go)

install() {
  # Only an etcd-server installed here: a machine's own etcd is left as it is.
  if ! deb_installed etcd-server; then
    apt_install etcd-server
    disable_etcd_at_boot
  fi
  apt_install curl openssl
  command -v kubectl >/dev/null || apt_install kubernetes-client
  local command
  for command in "${KUBE_COMMANDS[@]}"; do
    [[ -x $KUBE_ROOT/$command ]] || { build_kubernetes; return 0; }
  done
}

bin_dir() { echo "$KUBE_ROOT"; }

# The source of the pause container, kept from the build for cluster.sh.
pause_source() {
  [[ -f $KUBE_ROOT/pause.c ]] || die "$KUBE_ROOT/pause.c missing; run $0 install"
  echo "$KUBE_ROOT/pause.c"
}

# etcd-server's maintainer scripts enable a machine-wide etcd on 127.0.0.1:2379 for every boot
# (apt_install kept it from starting now). The tests run their own on free ports.
disable_etcd_at_boot() {
  if command -v systemctl >/dev/null; then systemctl disable etcd.service >/dev/null 2>&1 || true; fi
  if [[ -x /etc/init.d/etcd ]]; then update-rc.d etcd disable >/dev/null 2>&1 || true; fi
}

build_kubernetes() {
  log "building ${KUBE_COMMANDS[*]} $KUBE_VERSION from Debian's kubernetes source (about 12 minutes, once)"
  apt_install golang-go dpkg-dev rsync make patch \
    golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev
  local partial="$KUBE_ROOT.partial"
  local work="$partial/work"
  rm -rf "$partial"
  mkdir -p "$work"
  apt_source kubernetes "$work"
  local origs=("$work"/kubernetes_*"$KUBE_VERSION".orig.tar.*)
  [[ -f ${origs[0]} ]] || die "Debian's kubernetes source is not $KUBE_VERSION: $(ls "$work")"
  tar -xf "${origs[0]}" -C "$work"
  local src="$work/kubernetes-$KUBE_VERSION"
  [[ -d $src/vendor ]] || die "$src has no vendor/ tree"
  local pkg
  for pkg in "${KUBE_VENDOR_REPLACE[@]}"; do
    [[ -d /usr/share/gocode/src/$pkg ]] || die "/usr/share/gocode/src/$pkg missing"
    rm -rf "${src:?}/vendor/$pkg"
    cp -rL "/usr/share/gocode/src/$pkg" "$src/vendor/$pkg"
  done
  patch -s -d "$src" -p1 <"$KUBELET_PATCH"
  # As debian/rules does: a GOPATH inside the tree with k8s.io/kubernetes pointing at it.
  mkdir -p "$src/.go/src/k8s.io"
  ln -s ../../.. "$src/.go/src/k8s.io/kubernetes"
  local what=("${KUBE_COMMANDS[@]/#/cmd/}") command
  (cd "$src" && env GOPATH="$src/.go" GOCACHE="$src/.gocache" GOFLAGS= CGO_ENABLED=0 \
    make WHAT="${what[*]}")
  for command in "${KUBE_COMMANDS[@]}"; do
    cp -L "$src/_output/bin/$command" "$partial/$command"
    "$partial/$command" --version | grep -qx "Kubernetes v$KUBE_VERSION" \
      || die "built $command reports $("$partial/$command" --version)"
  done
  cp "$src/build/pause/linux/pause.c" "$partial/pause.c"
  chmod -R u+w "$work" && rm -rf "$work"
  rm -rf "$KUBE_ROOT" && mv "$partial" "$KUBE_ROOT"
}

# true once URL answers 200, or once PID is gone (the caller then reports the exit).
ready_or_dead() {
  local pid=$1; shift
  ! kill -0 "$pid" 2>/dev/null || curl -fsS -o /dev/null "$@"
}

start() {
  local state=$1
  [[ -x $KUBE_APISERVER_BIN ]] || die "kube-apiserver $KUBE_VERSION not built; run $0 install"
  [[ -x $ETCD ]] || die "$ETCD missing; run $0 install"
  # The plain API server, or cluster.sh's (with a node) beside it in the same run.
  local address=${KUBE_ADDRESS:-127.0.0.1} node=${KUBE_NODE_NAME:-}
  local dir="$state/kube" prefix=KUBE_ config_key=KUBECONFIG tag=""
  if [[ -n $node ]]; then dir="$state/cluster-kube" prefix=CLUSTER_ config_key=CLUSTER_KUBECONFIG tag=cluster-; fi
  mkdir -p "$dir"
  local etcd_port peer_port api_port pid
  etcd_port=$(free_port); peer_port=$(free_port); api_port=$(free_port)

  local etcd_url="http://127.0.0.1:$etcd_port" peer_url="http://127.0.0.1:$peer_port"
  # etcd 3.4 refuses to run on arm64 and the like unless told; on amd64 the variable draws a warning.
  local arch etcd_env=()
  arch=$(dpkg --print-architecture)
  [[ $arch == amd64 ]] || etcd_env=(ETCD_UNSUPPORTED_ARCH="$arch")
  spawn "$state" "${tag}etcd" env "${etcd_env[@]}" "$ETCD" \
    --name snapcache --data-dir "$dir/etcd" --unsafe-no-fsync --logger=zap \
    --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
    --listen-peer-urls "$peer_url" --initial-advertise-peer-urls "$peer_url" \
    --initial-cluster "snapcache=$peer_url" --initial-cluster-state new
  pid=$!
  wait_for 30 etcd ready_or_dead "$pid" "$etcd_url/health"
  kill -0 "$pid" 2>/dev/null || die "etcd exited: $(tail -n 20 "$state/${tag}etcd.log")"

  local pki="$dir/pki"
  mkdir -p "$pki"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj /CN=snapcache-kube-ca \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
    -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj /CN=kube-apiserver \
    -keyout "$pki/apiserver.key" -out "$pki/apiserver.csr" 2>/dev/null
  # 10.0.0.1 and kubernetes.default.svc: the names pods know the API server by.
  printf '%s\n' "subjectAltName=IP:127.0.0.1,DNS:localhost,IP:$address,IP:10.0.0.1,DNS:kubernetes.default.svc" \
    'extendedKeyUsage=serverAuth' 'keyUsage=critical,digitalSignature,keyEncipherment' >"$pki/apiserver.ext"
  openssl x509 -req -days 3650 -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
    -CAcreateserial -extfile "$pki/apiserver.ext" -out "$pki/apiserver.crt" 2>/dev/null
  openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
  local token node_token=""
  token=$(openssl rand -hex 32)
  # Tests act as other users (a chart's ServiceAccount) by impersonation from this one.
  printf '%s,snapcache-admin,snapcache-admin,"system:masters"\n' "$token" >"$dir/tokens.csv"
  if [[ -n $node ]]; then
    node_token=$(openssl rand -hex 32)
    printf '%s,system:node:%s,%s,"system:nodes"\n' "$node_token" "$node" "$node" >>"$dir/tokens.csv"
  fi
  chmod 600 "$dir/tokens.csv" "$pki"/*.key

  local api_url="https://$address:$api_port"
  local args=(
    "$KUBE_APISERVER_BIN"
    --bind-address="$address" --advertise-address="$address"
    --secure-port="$api_port" --insecure-port=0
    --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key"
    --client-ca-file="$pki/ca.crt" --token-auth-file="$dir/tokens.csv"
    --authorization-mode="Node,RBAC"
    --etcd-servers="$etcd_url"
    --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key"
    --service-account-issuer=https://kubernetes.default.svc.cluster.local
    --service-cluster-ip-range=10.0.0.0/24 --cert-dir="$dir/cert-dir" --profiling=false
    # The default reconciler logs an error every 10 s: a loopback advertise address is not a
    # valid endpoint for the `kubernetes` service. Nothing here needs that service.
    --endpoint-reconciler-type=none
  )
  if [[ -n $node ]]; then
    # Webhooks are dialled at their endpoints' pod IPs (there is no kube-proxy); the
    # kubelet (logs, exec) at the node address, as its name resolves nowhere.
    args+=(--enable-aggregator-routing=true --kubelet-preferred-address-types=InternalIP)
    # As every real cluster's: shared trees' node caches run privileged (they mount).
    args+=(--allow-privileged=true)
  else
    # No controller-manager mints service account tokens for the plain API server.
    args+=(--disable-admission-plugins=ServiceAccount)
  fi
  {
    echo '#!/usr/bin/env bash'
    echo "# The kube-apiserver that kube.sh started for $state; run it again to restart it."
    printf 'exec'
    printf ' \\\n  %q' "${args[@]}"
    echo
  } >"$dir/run-apiserver.sh"
  chmod +x "$dir/run-apiserver.sh"

  spawn "$state" "${tag}kube-apiserver" "$dir/run-apiserver.sh"
  pid=$!
  wait_for 60 kube-apiserver ready_or_dead "$pid" \
    --cacert "$pki/ca.crt" -H "Authorization: Bearer $token" "$api_url/readyz"
  kill -0 "$pid" 2>/dev/null || die "kube-apiserver exited: $(tail -n 20 "$state/${tag}kube-apiserver.log")"

  write_kubeconfig "$dir/kubeconfig" "$api_url" "$pki/ca.crt" snapcache-admin "$token"
  export_env "$state" "$config_key" "$dir/kubeconfig"
  export_env "$state" "${prefix}APISERVER" "$api_url"
  export_env "$state" "${prefix}TOKEN" "$token"
  export_env "$state" "${prefix}CA_FILE" "$pki/ca.crt"
  export_env "$state" "${prefix}APISERVER_RUN" "$dir/run-apiserver.sh"
  if [[ -n $node ]]; then
    write_kubeconfig "$dir/node.kubeconfig" "$api_url" "$pki/ca.crt" "system:node:$node" "$node_token"
    export_env "$state" CLUSTER_NODE_KUBECONFIG "$dir/node.kubeconfig"
    export_env "$state" CLUSTER_PKI "$pki"
  fi
  log "kube-apiserver at $api_url (etcd at $etcd_url)"
}

# write_kubeconfig FILE SERVER CA_FILE USER TOKEN
write_kubeconfig() {
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: snapcache
  cluster:
    server: $2
    certificate-authority-data: $(base64 -w0 "$3")
users:
- name: $4
  user:
    token: $5
contexts:
- name: snapcache
  context:
    cluster: snapcache
    user: $4
    namespace: default
current-context: snapcache
EOF
  chmod 600 "$1"
}

"$@"

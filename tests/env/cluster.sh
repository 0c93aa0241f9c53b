#!/usr/bin/env bash
# cluster: a real one-node Kubernetes 1.20 cluster for the tests that need running pods.
#
#   cluster.sh install      containerd, runc, the CNI plugins, socat (Debian); kubelet,
#                           kube-scheduler and kube-controller-manager (kube.sh builds them
#                           with kube-apiserver); the pause and busybox images (cached)
#   cluster.sh start STATE  etcd and kube-apiserver (kube.sh, on the node address), the
#                           scheduler, the controller-manager, containerd and a kubelet;
#                           imports the pause, busybox and project images; waits for the node
#   cluster.sh stop STATE   (down.sh runs it) stops the pods, the kubelet and containerd (with
#                           its shims), and removes every mount, netns, cgroup, iptables rule,
#                           sysctl change, kernel module, file outside STATE and the bridge the
#                           cluster made
#
# Network: a bridge (snapc-br0) for the pods whose address, 172.30.213.1, is also the node
# address (the kubelet refuses loopback, and this kernel has no dummy interfaces). Servers
# the pods must reach (the API server, the S3 servers through socat) listen on it; nothing
# listens on the machine's own interfaces. Pods reach the API server at that address
# (KUBERNETES_SERVICE_HOST), so no kube-proxy and no Service routing is needed.
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

BRIDGE=snapc-br0
NODE_IP=172.30.213.1
POD_SUBNET=172.30.213.0/24
NODE_NAME=snapcache-node
# The sysctls the kubelet (its kernel tunables) and the bridge plugin set; stop puts back
# what it found.
SYSCTLS=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes net.ipv4.ip_forward)
# Where the node writes outside STATE whatever its configuration says: the kubelet's pod logs
# and their links and its device-plugin socket, CNI's result cache, the shims' sockets and the
# pods' network namespaces. stop removes what is new there.
NODE_HOST_PATHS=(/var/log/pods /var/log/containers /var/lib/kubelet /var/lib/cni /run/containerd /run/netns)
IMAGES_VERSION=2
IMAGES_CACHE="$SNAPCACHE_CACHE/cluster-images-$IMAGES_VERSION"
PAUSE_IMAGE=localhost/snapcache/pause:3.4
BUSYBOX_IMAGE=localhost/snapcache/busybox:1
GIT_IMAGE=localhost/snapcache/git:1
CGROUP_PARENT=kubepods

install() {
  apt_install containerd runc containernetworking-plugins socat iptables busybox-static \
    buildah gcc libc6-dev git
  bash "$ENV_DIR/kube.sh" install
  [[ -f $IMAGES_CACHE/pause.oci.tar && -f $IMAGES_CACHE/busybox.oci.tar &&
    -f $IMAGES_CACHE/git.oci.tar ]] || build_images
}

# The pause image from the Kubernetes source's pause.c (kube.sh keeps a copy), a
# busybox-static image for the workloads, and the same with Debian's git and the libraries
# it links (for checkout tests), all FROM scratch.
build_images() {
  log "building the pause, busybox and git images (once)"
  local pause_c
  pause_c=$(bash "$ENV_DIR/kube.sh" pause_source)
  local partial="$IMAGES_CACHE.partial"
  rm -rf "$partial" && mkdir -p "$partial/pause" "$partial/busybox/bin"
  gcc -Os -static -o "$partial/pause/pause" "$pause_c"
  cp /bin/busybox "$partial/busybox/bin/busybox"
  local applet
  for applet in sh wget sha256sum sleep cat echo date ls id mkdir tar; do
    ln -s busybox "$partial/busybox/bin/$applet"
  done
  mkdir -p "$partial/git/usr/bin"
  cp /usr/bin/git "$partial/git/usr/bin/git"
  local library
  for library in $(ldd /usr/bin/git | grep -o '/[^ ]*'); do
    mkdir -p "$partial/git/$(dirname "$library")"
    cp -L "$library" "$partial/git/$library"
  done
  with_buildah commit_images "$partial"
  rm -rf "$partial/pause" "$partial/busybox" "$partial/git"
  rm -rf "$IMAGES_CACHE" && mv "$partial" "$IMAGES_CACHE"
}

# commit_images DIR: the three images from the files build_images staged in DIR, as OCI
# archives beside them (run by with_buildah).
commit_images() {
  local partial=$1 container
  container=$(buildah_isolated from scratch)
  buildah_isolated copy "$container" "$partial/pause/pause" /pause >/dev/null
  buildah_isolated config --entrypoint '["/pause"]' --user 65535:65535 "$container"
  buildah_isolated commit --quiet "$container" "oci-archive:$partial/pause.oci.tar:$PAUSE_IMAGE" >/dev/null
  container=$(buildah_isolated from scratch)
  buildah_isolated copy "$container" "$partial/busybox/bin" /bin >/dev/null
  buildah_isolated config --cmd '["sh"]' --env PATH=/bin "$container"
  buildah_isolated commit --quiet "$container" "oci-archive:$partial/busybox.oci.tar:$BUSYBOX_IMAGE" >/dev/null
  container=$(buildah_isolated from scratch)
  buildah_isolated copy "$container" "$partial/busybox/bin" /bin >/dev/null
  buildah_isolated copy "$container" "$partial/git" / >/dev/null
  buildah_isolated config --cmd '["sh"]' --env PATH=/usr/bin:/bin --env HOME=/tmp "$container"
  buildah_isolated commit --quiet "$container" "oci-archive:$partial/git.oci.tar:$GIT_IMAGE" >/dev/null
}

# sysctl_value NAME: the current value, as `sysctl -n` prints it.
sysctl_value() { sysctl -n "$1"; }

# env_value STATE KEY: a value an earlier component wrote to the env file.
env_value() {
  local value
  value=$(awk -F= -v key="$2" '$1 == key {sub(/^[^=]*=/, ""); print}' "$1/env" | tail -n 1)
  [[ -n $value ]] || die "$2 missing from $1/env"
  echo "$value"
}

start() {
  local state=$1 dir="$1/cluster"
  [[ -x /usr/bin/containerd ]] || die "containerd missing; run $0 install"
  mkdir -p "$dir"/{cni,cni-ipam,kubelet,containerd,runc}
  record_host "$dir"
  echo "bash $ENV_DIR/cluster.sh stop $state" >>"$state/stops"

  ip link add "$BRIDGE" type bridge
  ip addr add "$NODE_IP/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up

  KUBE_ADDRESS=$NODE_IP KUBE_NODE_NAME=$NODE_NAME bash "$ENV_DIR/kube.sh" start "$state"
  KUBECONFIG=$(env_value "$state" CLUSTER_KUBECONFIG)
  NODE_KUBECONFIG=$(env_value "$state" CLUSTER_NODE_KUBECONFIG)
  PKI=$(env_value "$state" CLUSTER_PKI)
  KUBE_BIN_DIR=$(bash "$ENV_DIR/kube.sh" bin_dir)
  start_control_plane "$state" "$dir"
  start_containerd "$state" "$dir"
  import_images "$dir"
  start_kubelet "$state" "$dir"
  wait_for 120 "node $NODE_NAME Ready" node_ready
  forward_s3_servers "$state"
  export_env "$state" CLUSTER_NODE_IP "$NODE_IP"
  export_env "$state" CLUSTER_BUSYBOX_IMAGE "$BUSYBOX_IMAGE"
  export_env "$state" CLUSTER_GIT_IMAGE "$GIT_IMAGE"
  # Where the kubelet keeps pod volumes: tests look into a failed pod's emptyDir, which
  # --keep-terminated-pod-volumes leaves there until the pod is deleted.
  export_env "$state" CLUSTER_KUBELET_DIR "$dir/kubelet"
  log "cluster: node $NODE_NAME Ready at $NODE_IP"
}

node_ready() {
  [[ $(kubectl --kubeconfig "$KUBECONFIG" get node "$NODE_NAME" \
    -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null) == True ]]
}

# What the host looks like before the cluster: stop puts it back.
record_host() {
  local dir=$1 name
  [[ -e /sys/fs/cgroup/memory/$CGROUP_PARENT ]] &&
    die "/sys/fs/cgroup/*/$CGROUP_PARENT exists: is another kubelet running? Stop it first."
  ip link show "$BRIDGE" >/dev/null 2>&1 &&
    die "the bridge $BRIDGE exists: another test cluster runs, or one was not stopped (then: ip link del $BRIDGE)"
  local value
  for name in "${SYSCTLS[@]}"; do
    # One this kernel lacks, the kubelet cannot set either.
    if value=$(sysctl_value "$name" 2>/dev/null); then printf '%s=%s\n' "$name" "$value" >>"$dir/sysctls.saved"; fi
  done
  iptables-save >"$dir/iptables.saved"
  netns_names | sort >"$dir/netns.before"
  node_host_paths | sort >"$dir/host-paths.before"
  loaded_modules | sort >"$dir/modules.before"
}

netns_names() { ip netns list 2>/dev/null | awk '{print $1}' || true; }
node_host_paths() { find "${NODE_HOST_PATHS[@]}" 2>/dev/null || true; }
# The bridge, the veths, the overlay mounts and iptables load theirs on demand; a kernel
# without loadable modules has no /proc/modules.
loaded_modules() { if [[ -r /proc/modules ]]; then awk '{print $1}' /proc/modules; fi; }

start_control_plane() {
  local state=$1 dir=$2
  local cm_port scheduler_port
  cm_port=$(free_port); scheduler_port=$(free_port)
  spawn "$state" kube-controller-manager "$KUBE_BIN_DIR/kube-controller-manager" \
    --kubeconfig="$KUBECONFIG" --bind-address=127.0.0.1 --secure-port="$cm_port" --port=0 \
    --leader-elect=false --allocate-node-cidrs=false --use-service-account-credentials=false \
    --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
    --controllers='*,-nodeipam,-cloud-node-lifecycle,-service,-route' --profiling=false
  spawn "$state" kube-scheduler "$KUBE_BIN_DIR/kube-scheduler" \
    --kubeconfig="$KUBECONFIG" --bind-address=127.0.0.1 --secure-port="$scheduler_port" --port=0 \
    --leader-elect=false --profiling=false
}

start_containerd() {
  local state=$1 dir=$2
  cat >"$dir/cni/10-snapcache.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "snapcache",
  "plugins": [{
    "type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
    "ipam": {"type": "host-local", "dataDir": "$dir/cni-ipam",
             "ranges": [[{"subnet": "$POD_SUBNET", "gateway": "$NODE_IP"}]]}
  }]
}
EOF
  cat >"$dir/containerd.toml" <<EOF
version = 2
root = "$dir/containerd/root"
state = "$dir/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "$dir/containerd.sock"
[ttrpc]
  address = "$dir/containerd.sock.ttrpc"
# Not the default /opt/containerd, which containerd would create at its start.
[plugins."io.containerd.internal.v1.opt"]
  path = "$dir/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # This VM lacks CAP_SYS_RESOURCE: without this every sandbox fails in runc create.
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$dir/cni"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "$(command -v runc)"
        Root = "$dir/runc"
        SystemdCgroup = false
EOF
  # Its shims make process groups of their own but stay in its session, which stop_session ends.
  spawn "$state" containerd /usr/bin/containerd --config "$dir/containerd.toml"
  local pid=$!
  wait_for 30 containerd ctr_ready "$dir" "$pid"
  kill -0 "$pid" 2>/dev/null || die "containerd exited: $(tail -n 20 "$state/containerd.log")"
}

ctr_ready() { ! kill -0 "$2" 2>/dev/null || ctr_k8s "$1" version; }
ctr_k8s() { local dir=$1; shift; ctr --address "$dir/containerd.sock" --namespace k8s.io "$@"; }

# The pause and busybox images, and the project's images from `make images` if built.
import_images() {
  local dir=$1 archive
  local archives=("$IMAGES_CACHE/pause.oci.tar" "$IMAGES_CACHE/busybox.oci.tar" "$IMAGES_CACHE/git.oci.tar")
  for archive in "$ENV_DIR"/../../target/images/snapcache-*.oci.tar; do
    [[ -f $archive ]] && archives+=("$archive")
  done
  for archive in "${archives[@]}"; do
    ctr_k8s "$dir" images import "$archive" >/dev/null ||
      die "importing $archive into containerd failed"
  done
  log "images on the node: $(ctr_k8s "$dir" images list -q | grep -v '^sha256:' | tr '\n' ' ')"
}

start_kubelet() {
  local state=$1 dir=$2
  local port healthz_port
  port=$(free_port); healthz_port=$(free_port)
  cat >"$dir/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: $port
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $healthz_port
cgroupDriver: cgroupfs
cgroupRoot: /
failSwapOn: false
# Only this machine reaches the bridge address; the API server calls in without a client
# certificate (logs, exec), so the kubelet allows what reaches it.
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
# The kubelet's own iptables chains would outlive it; nothing here needs them.
makeIPTablesUtilChains: false
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
# The images are imported, not pulled: one garbage-collected between two pods is gone for
# good. This disk's reserved blocks count as used, so the default 85% is reached early.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
volumePluginDir: $dir/kubelet/volume-plugins
resolvConf: /etc/resolv.conf
EOF
  # A shared mount of its own, as on a real node: the node caches' CSI plugin mounts
  # checkouts under it with Bidirectional propagation. unmount_under removes it at stop.
  mkdir -p "$dir/kubelet"
  mount --bind "$dir/kubelet" "$dir/kubelet"
  mount --make-rshared "$dir/kubelet"
  spawn "$state" kubelet "$KUBE_BIN_DIR/kubelet" \
    --config="$dir/kubelet.yaml" --kubeconfig="$NODE_KUBECONFIG" \
    --container-runtime=remote --container-runtime-endpoint="unix://$dir/containerd.sock" \
    --root-dir="$dir/kubelet" --cert-dir="$dir/kubelet/pki" --node-ip="$NODE_IP" \
    --hostname-override="$NODE_NAME" --pod-infra-container-image="$PAUSE_IMAGE" --v=1 \
    --keep-terminated-pod-volumes
}

# Each S3 server the run started, also on the node address for the pods (socat).
forward_s3_servers() {
  local state=$1 key url port
  while IFS='=' read -r key url; do
    [[ $key =~ ^(MOTO|GARAGE)_ENDPOINT$ ]] || continue
    port=$(free_port)
    # 1 MiB buffers, not socat's 8 KiB: a fraction of the copies for the pods' large reads.
    spawn "$state" "socat-${BASH_REMATCH[1],,}" socat -b 1048576 \
      "TCP-LISTEN:$port,bind=$NODE_IP,reuseaddr,fork" "TCP:${url#http://}"
    export_env "$state" "CLUSTER_S3_${BASH_REMATCH[1]}_ENDPOINT" "http://$NODE_IP:$port"
  done <"$state/env"
}

stop() {
  local state=$1 dir="$1/cluster"
  [[ -d $dir ]] || return 0
  stop_spawned "$state" kubelet
  if [[ -S $dir/containerd.sock ]]; then stop_containers "$dir"; fi
  # containerd with its shims, also those whose task would not die.
  stop_spawned "$state" containerd
  # Its etcd is thrown away with the run; a graceful stop here takes a minute.
  stop_spawned "$state" cluster-kube-apiserver 2
  unmount_under "$dir"
  remove_new_netns "$dir"
  remove_cgroups
  ip link del "$BRIDGE" 2>/dev/null || true
  if [[ -f $dir/iptables.saved ]]; then
    iptables-restore <"$dir/iptables.saved" || log "putting back the iptables rules failed: iptables-restore <$dir/iptables.saved"
  fi
  local line
  while IFS= read -r line; do sysctl -qw "$line" >/dev/null || true; done <"$dir/sysctls.saved"
  comm -13 "$dir/host-paths.before" <(node_host_paths | sort) |
    while IFS= read -r path; do rm -rf "$path" || log "could not remove $path"; done
  comm -13 "$dir/modules.before" <(loaded_modules | sort) |
    while IFS= read -r module; do modprobe -r "$module" 2>/dev/null || true; done
  return 0
}

# stop_spawned STATE NAME [GRACE]: stop_session, with GRACE (10) seconds, for the session
# spawn started for NAME.
stop_spawned() {
  local state=$1 name=$2 grace=${3:-10} sid
  sid=$(awk -v name="$name" '$2 == name {print $1}' "$state/pids" | tail -n 1)
  if [[ -n $sid ]]; then stop_session "$sid" "$grace"; fi
}

# Kills and deletes every task and container of the k8s.io namespace (the pods).
stop_containers() {
  local dir=$1 id
  for id in $(ctr_k8s "$dir" tasks list -q 2>/dev/null); do
    ctr_k8s "$dir" tasks kill --signal SIGKILL "$id" >/dev/null 2>&1 || true
  done
  for id in $(ctr_k8s "$dir" tasks list -q 2>/dev/null); do
    ctr_k8s "$dir" tasks delete --force "$id" >/dev/null 2>&1 || true
  done
  for id in $(ctr_k8s "$dir" containers list -q 2>/dev/null); do
    ctr_k8s "$dir" containers delete "$id" >/dev/null 2>&1 || true
  done
}

# Every mount point under DIR, deepest first.
unmount_under() {
  local dir=$1 mount
  awk -v dir="$dir" 'index($2, dir "/") == 1 {print $2}' /proc/self/mounts | sort -r |
    while IFS= read -r mount; do umount -l "$mount" 2>/dev/null || true; done
}

remove_new_netns() {
  local dir=$1 name
  comm -13 "$dir/netns.before" <(netns_names | sort) |
    while IFS= read -r name; do ip netns delete "$name" 2>/dev/null || true; done
}

# The kubelet's cgroup tree in every v1 controller, leaves first.
remove_cgroups() {
  local controller
  for controller in /sys/fs/cgroup/*/; do
    [[ -d $controller$CGROUP_PARENT ]] || continue
    find "$controller$CGROUP_PARENT" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
}

"$@"

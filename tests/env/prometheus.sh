#!/usr/bin/env bash
# promtool from Debian's prometheus package, and a Prometheus server with Kubernetes service
# discovery built from that same source (Debian builds it without; see build_prometheus).
source "$(dirname "$0")/lib.sh"

PROMETHEUS_VERSION=2.42.0
# The last part changes whenever the build below does, so a cached binary is rebuilt.
PROMETHEUS_ROOT="$SNAPCACHE_CACHE/prometheus-$PROMETHEUS_VERSION-kubernetes-sd-1"
PROMETHEUS_PATCH="$ENV_DIR/patches/prometheus-2.42-kubernetes-sd-client-go-1.20.patch"
# Debian's Go libraries the server needs once the discovery mechanisms other than file and
# Kubernetes are left out (a subset of the source package's Build-Depends).
PROMETHEUS_GO_LIBRARIES=(
  golang-github-alecthomas-units-dev golang-github-cespare-xxhash-dev
  golang-github-dennwc-varint-dev golang-github-edsrzf-mmap-go-dev
  golang-github-fsnotify-fsnotify-dev golang-github-go-kit-log-dev
  golang-github-go-openapi-strfmt-dev golang-github-gogo-protobuf-dev
  golang-github-golang-snappy-dev golang-github-google-pprof-dev
  golang-github-grafana-regexp-dev golang-github-grpc-ecosystem-grpc-gateway-dev
  golang-github-json-iterator-go-dev golang-github-miekg-dns-dev
  golang-github-mwitkow-go-conntrack-dev golang-github-oklog-run-dev
  golang-github-oklog-ulid-dev golang-github-opentracing-contrib-go-stdlib-dev
  golang-github-opentracing-opentracing-go-dev golang-github-pkg-errors-dev
  golang-github-prometheus-alertmanager-dev golang-github-prometheus-client-golang-dev
  golang-github-prometheus-client-model-dev golang-github-prometheus-common-dev
  golang-github-prometheus-exporter-toolkit-dev golang-go.uber-atomic-dev
  golang-golang-x-exp-dev golang-golang-x-net-dev golang-golang-x-sync-dev
  golang-golang-x-sys-dev golang-golang-x-time-dev golang-google-genproto-dev
  golang-google-grpc-dev golang-gopkg-alecthomas-kingpin.v2-dev golang-gopkg-yaml.v2-dev
  golang-gopkg-yaml.v3-dev golang-grpc-gateway golang-opentelemetry-otel-dev
  golang-uber-automaxprocs-dev golang-uber-goleak-dev gogoprotobuf
)

install() {
  # promtool; apt_install keeps the package's system-wide server on 0.0.0.0:9090 from starting.
  apt_install prometheus
  [[ -x $PROMETHEUS_ROOT/prometheus ]] || build_prometheus
}

# The server the tests run: it reads kubernetes_sd_configs, Debian's does not.
server() {
  [[ -x $PROMETHEUS_ROOT/prometheus ]] || die "$PROMETHEUS_ROOT/prometheus not built; run $0 install"
  echo "$PROMETHEUS_ROOT/prometheus"
}

# Debian disables Kubernetes discovery for want of a packaged client-go. The kubernetes
# source package vendors client-go 1.20, the API server's own version; the patch ports
# Prometheus's discovery/kubernetes back to it (no discovery/v1 EndpointSlices, which 1.20
# lacks) and registers only the file and Kubernetes mechanisms.
build_prometheus() {
  log "building Prometheus $PROMETHEUS_VERSION with Kubernetes discovery (about 3 minutes, once)"
  apt_install golang-go dpkg-dev patch "${PROMETHEUS_GO_LIBRARIES[@]}"
  local partial="$PROMETHEUS_ROOT.partial"
  local work="$partial/work"
  rm -rf "$partial"
  mkdir -p "$work/prometheus-gopath/src/github.com/prometheus" "$work/kubernetes-gopath"
  apt_source prometheus "$work"
  apt_source kubernetes "$work"
  local dscs=("$work"/prometheus_"$PROMETHEUS_VERSION"*.dsc)
  [[ -f ${dscs[0]} ]] || die "Debian's prometheus source is not $PROMETHEUS_VERSION: $(ls "$work")"
  local src="$work/prometheus-gopath/src/github.com/prometheus/prometheus"
  dpkg-source --no-check -x "${dscs[0]}" "$src" >/dev/null
  patch -s -d "$src" -p1 <"$PROMETHEUS_PATCH"
  local origs=("$work"/kubernetes_*.orig.tar.*)
  tar -xf "${origs[0]}" -C "$work"
  local kubernetes=("$work"/kubernetes-*/vendor)
  [[ -d ${kubernetes[0]} ]] || die "Debian's kubernetes source has no vendor/ tree"
  ln -s "${kubernetes[0]}" "$work/kubernetes-gopath/src"
  # Debian's libraries first, as its own build has them; the kubernetes vendor tree only
  # for what Debian does not package (client-go and its dependencies).
  (cd "$src" && env GO111MODULE=off GOFLAGS= CGO_ENABLED=0 GOCACHE="$work/.gocache" \
    GOPATH="$work/prometheus-gopath:/usr/share/gocode:$work/kubernetes-gopath" \
    go build -o "$partial/prometheus" \
    -ldflags "-X github.com/prometheus/common/version.Version=$PROMETHEUS_VERSION" ./cmd/prometheus)
  "$partial/prometheus" --version 2>&1 | grep -q "version $PROMETHEUS_VERSION" \
    || die "built prometheus reports $("$partial/prometheus" --version 2>&1 | head -1)"
  chmod -R u+w "$work" && rm -rf "$work"
  rm -rf "$PROMETHEUS_ROOT" && mv "$partial" "$PROMETHEUS_ROOT"
}

"$@"

#!/usr/bin/env bash
# bench.sh: what `make bench` runs. Builds release binaries, starts Garage and nginx,
# and runs the benchmarks, which print each figure beside its peer's from the same run.
source "$(dirname "$0")/lib.sh"
cd "$ENV_DIR/../.."

apt_install curl openssl aria2 wrk apache2-utils zstd time git
bash "$ENV_DIR/garage.sh" install
bash "$ENV_DIR/nginx.sh" install
cargo build --release --locked -p snapcache-sidecar -p snapcache-operator -p snapcache-tests \
  --bin snapcache-sidecar --bin snapcache-operator --bin snapcache-bench
components=garage,nginx
# The webhook, checkout and node parts run pods on the one-node cluster, from release images.
if [[ -z ${BENCH:-} || ,$BENCH, == *,webhook,* || ,$BENCH, == *,checkout,* || ,$BENCH, == *,node,* ]]; then
  bash "$ENV_DIR/kube.sh" install
  bash "$ENV_DIR/cluster.sh" install
  bash "$ENV_DIR/helm.sh" install
  bash "$ENV_DIR/images.sh" install
  bash "$ENV_DIR/images.sh" build
  components=$components,cluster
fi
bash "$ENV_DIR/run.sh" "$components" -- target/release/snapcache-bench

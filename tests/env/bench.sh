#!/usr/bin/env bash
# bench.sh: what `make bench` runs. Builds release binaries, starts Garage and nginx,
# and runs the benchmarks, which print each figure beside its peer's from the same run.
source "$(dirname "$0")/lib.sh"
cd "$ENV_DIR/../.."

apt_install curl openssl aria2 wrk apache2-utils
bash "$ENV_DIR/garage.sh" install
bash "$ENV_DIR/nginx.sh" install
cargo build --release --locked -p snapcache-sidecar -p snapcache-tests --bin snapcache-sidecar --bin snapcache-bench
bash "$ENV_DIR/run.sh" garage,nginx -- target/release/snapcache-bench

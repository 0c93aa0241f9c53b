#!/usr/bin/env bash
# Prometheus and promtool from Debian's prometheus package, started by hand on loopback.
source "$(dirname "$0")/lib.sh"

install() {
  apt_install prometheus
  # The package starts a system-wide Prometheus on 0.0.0.0:9090; the tests run their own.
  if command -v service >/dev/null 2>&1; then service prometheus stop >/dev/null 2>&1 || true; fi
  pkill -x prometheus || true
}

"$@"

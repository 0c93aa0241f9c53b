#!/usr/bin/env bash
# Prometheus and promtool from Debian's prometheus package, started by hand on loopback.
source "$(dirname "$0")/lib.sh"

POLICY_RC_D=/usr/sbin/policy-rc.d
# Set once this script has written $POLICY_RC_D, so that only that file is ever removed.
ADDED_POLICY_RC_D=""

remove_added_policy() {
  if [[ -n $ADDED_POLICY_RC_D ]]; then
    rm -f "$POLICY_RC_D"
    ADDED_POLICY_RC_D=""
  fi
}

install() {
  # Already installed: nothing to do, and whatever Prometheus runs on this machine is left alone.
  dpkg-query -W -f='${Status}' prometheus 2>/dev/null | grep -q 'install ok installed' && return 0
  # The package's maintainer scripts would start a system-wide Prometheus on 0.0.0.0:9090; the
  # tests run their own. Rather than stop it afterwards, keep it from starting: invoke-rc.d and
  # deb-systemd-invoke start no service while /usr/sbin/policy-rc.d exits 101 ("action
  # forbidden"). One that exists already is the machine's own policy and is left as it is; the
  # one written here is removed again, also when the install fails or is interrupted.
  trap remove_added_policy EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  # noclobber: never overwrite a policy-rc.d, even one that appeared since the check above.
  if (set -o noclobber; printf '#!/bin/sh\n# Written by snapcache tests/env/prometheus.sh for its apt-get install.\nexit 101\n' >"$POLICY_RC_D") 2>/dev/null; then
    ADDED_POLICY_RC_D=1
    chmod 755 "$POLICY_RC_D"
  fi
  apt_install prometheus
  remove_added_policy
  trap - EXIT INT TERM
}

"$@"

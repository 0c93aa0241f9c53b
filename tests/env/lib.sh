# shellcheck shell=bash
# Shared helpers for the tests/env scripts. Source it; do not run it.
#
# Conventions every component script follows:
#   <component>.sh install        idempotent; caches under $SNAPCACHE_CACHE keyed by version
#   <component>.sh start STATE    binds 127.0.0.1 on free ports, waits for readiness,
#                                 appends KEY=VALUE lines to $STATE/env and, through spawn,
#                                 each session it started to $STATE/pids
# tests/env/down.sh STATE stops everything listed in $STATE/pids.
#
# No script finds or stops a process by name: each stops only the process groups and sessions
# it started. Whatever a script changes on the machine it puts back when done, also on failure.

set -euo pipefail

SNAPCACHE_CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/snapcache"
ENV_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mkdir -p "$SNAPCACHE_CACHE"

log() { printf '[env] %s\n' "$*" >&2; }
die() { printf '[env] error: %s\n' "$*" >&2; exit 1; }

# A TCP port on 127.0.0.1 that nothing listens on right now.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# wait_for SECONDS DESCRIPTION CMD...: polls CMD every 0.2 s until it succeeds.
wait_for() {
  local seconds=$1 what=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then die "$what not ready after ${seconds}s"; fi
    sleep 0.2
  done
}

# deb_installed PKG: true if the Debian package PKG is installed.
deb_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

# apt_install PKG...: installs the Debian packages that are not installed yet, and starts none
# of the services they ship: the tests run their own servers, on free ports.
apt_install() {
  local missing=() pkg
  for pkg in "$@"; do deb_installed "$pkg" || missing+=("$pkg"); done
  ((${#missing[@]} == 0)) && return 0
  log "apt-get install ${missing[*]}"
  # At most once a day; the stamp is kept in the cache, not among apt's files.
  local updated=$SNAPCACHE_CACHE/apt-updated
  if [[ ! -f $updated ]] || [[ -n "$(find "$updated" -mmin +1440)" ]]; then
    apt-get -o DPkg::Lock::Timeout=900 update -qq
    touch "$updated"
  fi
  # invoke-rc.d and deb-systemd-invoke start no service while policy-rc.d exits 101 ("action
  # forbidden"). A policy the machine has is its own and stays; the one written here is
  # removed by the subshell's EXIT trap, whether the install passed, failed or was interrupted.
  local policy=/usr/sbin/policy-rc.d
  (
    written=""
    trap '[[ -z $written ]] || rm -f "$policy"' EXIT
    # noclobber: never overwrite a policy-rc.d, even one that appeared since the check.
    if (set -o noclobber; printf '#!/bin/sh\n# Written by snapcache tests/env/lib.sh for its apt-get install.\nexit 101\n' >"$policy") 2>/dev/null; then
      written=1
      chmod 755 "$policy"
    fi
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  )
}

# apt_source PACKAGE DIR: downloads bookworm's source package PACKAGE (the versions the builds
# pin) into DIR. The deb-src entry, its index and apt's caches live in a temporary directory
# that the subshell's EXIT trap removes: /etc/apt and /var/lib/apt stay as they are.
apt_source() {
  local package=$1 dir=$2
  (
    apt_dir=$(mktemp -d "${TMPDIR:-/tmp}/snapcache-apt.XXXXXX")
    trap 'rm -rf "$apt_dir"' EXIT
    mkdir -p "$apt_dir/sources.list.d" "$apt_dir/lists/partial" "$apt_dir/cache"
    cat >"$apt_dir/sources.list.d/bookworm-src.sources" <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    # Running as root in directories _apt cannot read: apt works without its sandbox user.
    private_apt=(-qq -o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$apt_dir/sources.list.d"
      -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -o APT::Sandbox::User=root)
    apt-get "${private_apt[@]}" update
    [[ -n $(apt-cache "${private_apt[@]}" showsrc "$package" 2>/dev/null) ]] ||
      die "bookworm has no source package '$package'"
    cd "$dir"
    apt-get "${private_apt[@]}" source --download-only "$package" >/dev/null
  )
}

# spawn STATE NAME CMD...: starts CMD as the leader of a new session (and process group),
# logging to STATE/NAME.log, and records the session so that down.sh stops it with all it
# started, also the children that made process groups of their own.
spawn() {
  local state=$1 name=$2; shift 2
  setsid "$@" >"$state/$name.log" 2>&1 < /dev/null &
  echo "$! $name" >>"$state/pids"
}

# session_groups SID: the process groups in session SID that have a running process; zombies,
# which PID 1 reaps whenever it gets to it, do not count.
session_groups() {
  ps -o pgid=,stat= -s "$1" 2>/dev/null | awk '$2 !~ /^Z/ {print $1}' | sort -u || true
}

# stop_session SID [GRACE]: SIGTERM to the process group spawn started; when no process of
# its session runs any more or GRACE (15) seconds have passed, SIGKILL to every group still in
# it (among them any a child made for itself, as containerd's shims do).
stop_session() {
  local sid=$1 grace=${2:-15} group
  kill -TERM -- "-$sid" 2>/dev/null || true
  local deadline=$((SECONDS + grace))
  while [[ -n $(session_groups "$sid") ]] && ((SECONDS < deadline)); do sleep 0.1; done
  for group in $(session_groups "$sid"); do kill -KILL -- "-$group" 2>/dev/null || true; done
}

# with_buildah CMD...: runs CMD with BUILDAH_TMP set to a new directory for all of
# buildah_isolated's state, which a subshell's EXIT trap removes however CMD ends.
with_buildah() {
  local BUILDAH_TMP
  BUILDAH_TMP=$(mktemp -d "${TMPDIR:-/tmp}/snapcache-buildah.XXXXXX")
  (
    trap 'rm -rf "$BUILDAH_TMP"' EXIT
    mkdir -p "$BUILDAH_TMP/tmp" "$BUILDAH_TMP/var-lib"
    printf '[storage]\ndriver = "vfs"\ngraphroot = "%s/root"\nrunroot = "%s/runroot"\n' \
      "$BUILDAH_TMP" "$BUILDAH_TMP" >"$BUILDAH_TMP/storage.conf"
    # Instead of /etc/cni/net.d, where buildah creates cni.lock even for builds without RUN. The
    # file replaces the packaged containers.conf, whose settings only RUN steps would use.
    printf '[network]\nnetwork_config_dir = "%s/cni"\n' "$BUILDAH_TMP" >"$BUILDAH_TMP/containers.conf"
    # For --signature-policy: images come from this throwaway storage only; any other source is refused.
    cat >"$BUILDAH_TMP/policy.json" <<'JSON'
{"default": [{"type": "reject"}],
 "transports": {"containers-storage": {"": [{"type": "insecureAcceptAnything"}]}}}
JSON
    "$@"
  )
}

# buildah_isolated ARGS...: buildah (inside with_buildah) with its storage, configuration and
# temporary files under $BUILDAH_TMP, so nothing touches /var/lib/containers, /run/containers,
# /var/tmp, /etc/containers or /etc/cni. Run as root, buildah 1.28 also writes a blob-info
# cache to /var/lib/containers/cache whatever --root says, so it runs in a private mount
# namespace whose /var/lib is $BUILDAH_TMP/var-lib (no build has a RUN step, so nothing
# else under /var/lib is needed).
buildah_isolated() {
  # shellcheck disable=SC2016 # $0 and $@ are the inner bash's
  unshare --mount --propagation private -- \
    bash -c 'mount --bind "$0" /var/lib && exec "$@"' "$BUILDAH_TMP/var-lib" \
    env CONTAINERS_CONF="$BUILDAH_TMP/containers.conf" \
    CONTAINERS_STORAGE_CONF="$BUILDAH_TMP/storage.conf" TMPDIR="$BUILDAH_TMP/tmp" \
    buildah --root "$BUILDAH_TMP/root" --runroot "$BUILDAH_TMP/runroot" --storage-driver vfs "$@"
}

# export_env STATE KEY VALUE: records one endpoint or credential for the tests.
export_env() {
  printf '%s=%s\n' "$2" "$3" >>"$1/env"
}

# timed LABEL CMD...: runs CMD and reports how long it took.
timed() {
  local label=$1; shift
  local start=$SECONDS
  "$@"
  log "$label took $((SECONDS - start))s"
}

# recorded LABEL CMD...: `timed`, and the time also goes to the file named by
# SNAPCACHE_TIMINGS when set (test.sh prints those lines in its timing table).
recorded() {
  local label=$1 start=$SECONDS
  timed "$@"
  if [[ -n ${SNAPCACHE_TIMINGS:-} ]]; then
    printf '  %-26s %4ss\n' "$label" $((SECONDS - start)) >>"$SNAPCACHE_TIMINGS"
  fi
}

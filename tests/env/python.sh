#!/usr/bin/env bash
# The Python virtualenv with moto (S3 server), boto3 and awscli (fixtures) and kubernetes-validate.
source "$(dirname "$0")/lib.sh"

VENV="$SNAPCACHE_CACHE/venv-$(sha256sum "$ENV_DIR/requirements.txt" | cut -c1-12)"

install() {
  [[ -f $VENV/.complete ]] && return 0
  log "creating python venv $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r "$ENV_DIR/requirements.txt"
  # venvs hard-code their own path, so they are built in place and marked complete at the end.
  touch "$VENV/.complete"
}

bin_dir() { echo "$VENV/bin"; }

"$@"

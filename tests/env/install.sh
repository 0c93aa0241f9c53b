#!/usr/bin/env bash
# install.sh: installs every component the tests need, skipping what is cached, timing each.
source "$(dirname "$0")/lib.sh"

apt_install curl openssl
for component in python helm prometheus garage kube cluster images; do
  recorded "install $component" bash "$ENV_DIR/$component.sh" install
done

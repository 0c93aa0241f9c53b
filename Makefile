# Thin wrappers over tests/env; every target does its own set-up on a fresh machine.
.PHONY: demo test lint bench crds

## demo: publish this repository to local S3, serve it through a sidecar, fetch it with pins, verify, stop
demo:
	bash tests/env/demo.sh

## test: format and lint checks, install and start the real components, run every test, stop them
test:
	bash tests/env/test.sh

## lint: cargo fmt --check and clippy with warnings as errors
lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

## bench: release build; the sidecar against nginx and direct S3 reads, printed as ratios
bench:
	bash tests/env/bench.sh

## crds: regenerate crds/ from the SnapshotCache types (make test fails when it drifts)
crds:
	cargo run --quiet --locked -p snapcache-operator -- crd > crds/snapcache.io_snapshotcaches.yaml

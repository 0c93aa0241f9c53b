# Thin wrappers over tests/env; every target does its own set-up on a fresh machine.
.PHONY: demo cluster-demo test test-busy lint bench crds images images-test

## demo: publish this repository to local S3, serve it through a sidecar, fetch it with pins, verify, stop
demo:
	bash tests/env/demo.sh

## cluster-demo: a real one-node cluster: helm install (the operator as a pod), a SnapshotCache, a Deployment whose app reads a snapshot from its injected sidecar
cluster-demo:
	bash tests/env/cluster-demo.sh

## test: format and lint checks, install and start the real components, run every test, stop them
test:
	bash tests/env/test.sh

## test-busy: make test RUNS times in a row (default 5), each beside a from-scratch release build; stops at the first failure
test-busy:
	bash tests/env/busy.sh

## lint: cargo fmt --check and clippy with warnings as errors
lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

## bench: release build; the sidecar against nginx and direct S3 reads, printed as ratios
bench:
	bash tests/env/bench.sh

## crds: regenerate crds/ and the chart's copy from the SnapshotCache types (make test fails when they drift)
crds:
	cargo run --quiet --locked -p snapcache-operator -- crd > crds/snapcache.io_snapshotcaches.yaml
	cp crds/snapcache.io_snapshotcaches.yaml charts/snapcache/crds/

## images: release build, then daemonless OCI images of the sidecar and the operator (buildah, FROM scratch) as target/images/snapcache-{sidecar,operator}-VERSION.oci.tar
images:
	bash tests/env/images.sh install
	bash tests/env/images.sh build

## images-test: make images, then check each archive's config and exact file list and run its binary's own code from it in a chroot
images-test: images
	bash tests/env/images.sh test

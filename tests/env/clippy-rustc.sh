#!/usr/bin/env bash
# RUSTC_WORKSPACE_WRAPPER for make test: the workspace's crates are compiled by clippy-driver,
# which is rustc plus clippy's lints (the [workspace.lints] levels), with warnings as errors,
# so one build both lints them and makes the test binaries. Cargo invokes it as
# `clippy-rustc.sh RUSTC ARGS...`, as `cargo clippy` invokes clippy-driver.
exec clippy-driver "$@" -D warnings

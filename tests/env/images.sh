#!/usr/bin/env bash
# images: OCI images of snapcache-sidecar and snapcache-operator, built without a daemon.
#
#   images.sh install   buildah (daemonless, runs as root), the CA bundle, strip
#   images.sh build     release build (SNAPCACHE_IMAGE_PROFILE=dev: the last dev build's binaries), stages target/images/context-<name>/, builds each
#                       images/<name>.Containerfile with buildah in a throwaway storage root
#                       and writes target/images/snapcache-<name>-<version>.oci.tar
#   images.sh test      checks each archive's config, its exact file list, and runs the
#                       binary from the unpacked image in a chroot on a command whose answer
#                       only its own code gives (tests/env/images_check.py)
#
# The images are FROM scratch: only x86_64-unknown-linux-gnu is installed here, so instead
# of a static build each image carries exactly the shared libraries `ldd` lists for its
# binary, and the dynamic loader, at the paths the binary asks for.
source "$(dirname "$0")/lib.sh"
cd "$ENV_DIR/../.."

# The chart's defaults (charts/snapcache/values.yaml, tag = appVersion) name these images.
REGISTRY=ghcr.io/snapcache
NAMES=(sidecar operator)
IMAGES_DIR=target/images
# `make images` ships release builds; `make test` checks images of its dev build
# (SNAPCACHE_IMAGE_PROFILE=dev), which skips a second, release compile of the workspace.
PROFILE=${SNAPCACHE_IMAGE_PROFILE:-release}
if [[ $PROFILE == dev ]]; then PROFILE_DIR=debug; else PROFILE_DIR=$PROFILE; fi
# The user the operator runs the sidecar as, and the chart runs the operator as.
RUN_AS=65532:65532
# Files each image holds besides /snapcache-<name>, its ldd libraries and the loader.
# passwd and group name uid/gid 65532 ("nonroot", as in distroless), so getpwuid() finds
# it and the runtime sets HOME=/nonexistent from it (an explicit "no home") instead of /.
# nsswitch.conf makes glibc read /etc/hosts before DNS: without it glibc's default is
# "dns [!UNAVAIL=return] files", which ignores /etc/hosts (and hostAliases) whenever DNS
# answers at all.
EXTRA_FILES=(/etc/ssl/certs/ca-certificates.crt /etc/passwd /etc/group /etc/nsswitch.conf)
# Programs an image runs besides its own binary, each with its ldd libraries: `checkout`
# applies a snapshot's delta bundle with Debian's git (only builtins: fetch, merge).
declare -A PROGRAMS=([sidecar]=/usr/bin/git [operator]=)

install() {
  apt_install buildah ca-certificates binutils git
}

# Each package's version, description, license and repository as Cargo resolves them (so
# values inherited from [workspace.package] come out right), keyed by NAMES entry.
declare -A VERSION DESCRIPTION LICENSE SOURCE
load_metadata() {
  local metadata name
  metadata=$(cargo metadata --no-deps --format-version 1 --locked)
  for name in "${NAMES[@]}"; do
    VERSION[$name]=$(package_field "$metadata" "snapcache-$name" version)
    DESCRIPTION[$name]=$(package_field "$metadata" "snapcache-$name" description)
    LICENSE[$name]=$(package_field "$metadata" "snapcache-$name" license)
    SOURCE[$name]=$(package_field "$metadata" "snapcache-$name" repository)
  done
}

# package_field METADATA PACKAGE FIELD: one field of a package in `cargo metadata` output.
package_field() {
  python3 -c '
import json, sys
metadata, package, field = sys.argv[1:]
found = [p for p in json.loads(metadata)["packages"] if p["name"] == package]
if not found or not found[0].get(field):
    sys.exit(f"[env] error: Cargo.toml sets no {field} for {package}")
print(found[0][field])' "$@"
}

image_ref() { echo "$REGISTRY/snapcache-$1:${VERSION[$1]}"; }
archive_path() { echo "$IMAGES_DIR/snapcache-$1-${VERSION[$1]}.oci.tar"; }

# labels NAME: the OCI labels, one KEY=VALUE per line (what the Containerfiles' LABEL sets).
labels() {
  printf '%s\n' \
    "org.opencontainers.image.title=snapcache-$1" \
    "org.opencontainers.image.description=${DESCRIPTION[$1]}" \
    "org.opencontainers.image.version=${VERSION[$1]}" \
    "org.opencontainers.image.licenses=${LICENSE[$1]}" \
    "org.opencontainers.image.source=${SOURCE[$1]}"
}

# shared_libs BINARY: every absolute path ldd resolves for BINARY, the loader included.
shared_libs() {
  local out
  out=$(ldd "$1") || die "ldd $1 failed"
  if grep -q 'not found' <<<"$out"; then die "ldd $1: a library is missing: $out"; fi
  awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }' <<<"$out"
}

# stage NAME: the build context target/images/context-NAME/, whose rootfs/ is copied to /.
stage() {
  local name=$1 binary=target/$PROFILE_DIR/snapcache-$1
  local context=$IMAGES_DIR/context-$name
  local rootfs=$context/rootfs
  umask 022
  rm -rf "$context"
  mkdir -p "$rootfs/etc/ssl/certs"
  strip --strip-all -o "$rootfs/snapcache-$name" "$binary"
  chmod 0755 "$rootfs/snapcache-$name"
  local libs lib program
  libs=$(shared_libs "$binary")
  for program in ${PROGRAMS[$name]}; do
    mkdir -p "$rootfs$(dirname "$program")"
    cp --dereference --preserve=mode "$program" "$rootfs$program"
    libs+=$'\n'$(shared_libs "$program")
  done
  for lib in $(sort -u <<<"$libs"); do
    mkdir -p "$rootfs$(dirname "$lib")"
    cp --dereference --preserve=mode "$lib" "$rootfs$lib"
  done
  cp --dereference /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/"
  echo "nonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin" >"$rootfs/etc/passwd"
  echo "nonroot:x:65532:" >"$rootfs/etc/group"
  printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$rootfs/etc/nsswitch.conf"
  chmod 0644 "$rootfs"/etc/{passwd,group,nsswitch.conf,ssl/certs/ca-certificates.crt}
  log "staged $context: $(du -sh --apparent-size "$rootfs" | cut -f1) ($(find "$rootfs" -type f | wc -l) files)"
}

# build_image NAME: builds images/NAME.Containerfile from the staged context and writes
# the OCI archive (run by with_buildah).
build_image() {
  local name=$1 image archive
  image=$(image_ref "$name")
  archive=$(archive_path "$name")
  local build_args=(
    --build-arg "VERSION=${VERSION[$name]}" --build-arg "DESCRIPTION=${DESCRIPTION[$name]}"
    --build-arg "LICENSES=${LICENSE[$name]}" --build-arg "SOURCE=${SOURCE[$name]}"
  )
  timed "buildah build $image" buildah_isolated build --isolation chroot --format oci \
    --pull=never --identity-label=false --signature-policy "$BUILDAH_TMP/policy.json" \
    "${build_args[@]}" -f "images/$name.Containerfile" -t "$image" "$IMAGES_DIR/context-$name"
  rm -f "$archive" "$archive.partial"
  timed "buildah push $archive" buildah_isolated push --quiet \
    --signature-policy "$BUILDAH_TMP/policy.json" "$image" "oci-archive:$archive.partial:$image"
  mv "$archive.partial" "$archive"
  log "wrote $archive ($(du -h --apparent-size "$archive" | cut -f1)) as $image"
}

build() {
  command -v buildah >/dev/null || die "buildah is not installed: run tests/env/images.sh install"
  load_metadata
  if [[ $PROFILE == dev ]]; then
    # The binaries the caller's dev build just made (make test's test build): building
    # them here with other features would recompile deps for nothing.
    local name
    for name in "${NAMES[@]}"; do
      [[ -x target/debug/snapcache-$name ]] ||
        die "target/debug/snapcache-$name is missing: build first (cargo build --workspace)"
    done
  else
    timed "cargo build --profile $PROFILE" \
      cargo build --profile "$PROFILE" --locked -p snapcache-sidecar -p snapcache-operator
  fi
  mkdir -p "$IMAGES_DIR"
  local name
  for name in "${NAMES[@]}"; do timed "staging $name" stage "$name"; done
  # One throwaway buildah state for both images.
  with_buildah build_images
}

build_images() {
  local name
  for name in "${NAMES[@]}"; do build_image "$name"; done
}

# run_check NAME: images_check.py's arguments for what the image's binary runs in the
# chroot, one a line, and what it must answer. Not `--help`: clap prints a usage for any
# binary; these go through the binary's own code (the sidecar's fetch refuses a URL before
# any request; the operator prints its CRD).
run_check() {
  case $1 in
    sidecar)
      # shellcheck disable=SC2016 # the backquotes are in what the sidecar prints
      printf '%s\n' --run=fetch '--run=not a url' --run=-o --run=/snapshot.tar.zst \
        --expect-exit=2 '--expect-output=`not a url` is not a URL' ;;
    operator) printf '%s\n' --run=crd --expect-exit=0 '--expect-output=name: snapshotcaches.snapcache.io' ;;
    *) die "no run check for $1" ;;
  esac
}

test() {
  load_metadata
  local name failed=0 args
  for name in "${NAMES[@]}"; do
    local archive
    archive=$(archive_path "$name")
    [[ -f $archive ]] || die "$archive is missing: run make images"
    grep -q "repository: $REGISTRY/snapcache-$name\$" charts/snapcache/values.yaml ||
      die "charts/snapcache/values.yaml does not default to $REGISTRY/snapcache-$name"
    grep -q "^appVersion: \"${VERSION[$name]}\"\$" charts/snapcache/Chart.yaml ||
      die "charts/snapcache/Chart.yaml's appVersion is not ${VERSION[$name]} (the image tag)"
    args=(--image "$(image_ref "$name")" --binary "/snapcache-$name" --user "$RUN_AS")
    local label file
    while IFS= read -r label; do args+=(--label "$label"); done <<<"$(labels "$name")"
    for file in "${EXTRA_FILES[@]}"; do args+=(--file "$file"); done
    for file in ${PROGRAMS[$name]}; do args+=(--program "$file"); done
    local check
    while IFS= read -r check; do args+=("$check"); done <<<"$(run_check "$name")"
    python3 "$ENV_DIR/images_check.py" "${args[@]}" "$archive" || failed=1
  done
  ((failed == 0)) || die "image checks failed (see above)"
  log "both images passed"
}

"$@"

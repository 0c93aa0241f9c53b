"""Checks one OCI archive written by `images.sh build` (run by `images.sh test`).

- the archive holds one manifest, named IMAGE, whose blobs match their digests;
- the config has exactly the expected Entrypoint, User and labels, and no Cmd;
- the root filesystem (every layer unpacked in order; no whiteouts) holds exactly BINARY and
  the --program executables (byte-identical to the host's), the libraries `ldd` lists for
  them plus the loader, and the --file paths: no other file, no
  directory that is not one of their parents, no link, device or setuid bit, all owned by root;
- each library is byte-identical to the host's, and BINARY runs the --run arguments in a
  chroot of the unpacked root filesystem, as USER and with an empty environment, so only
  the image's own files are used, exiting --expect-exit and printing --expect-output: an
  answer of the binary's own code (clap's `--help` would come from any binary built with
  clap);
- prints the archive's size, the layers' size and the unpacked size.

Standard library only.
"""

import argparse
import hashlib
import json
import os
import posixpath
import shutil
import subprocess
import sys
import tarfile
import tempfile


class CheckFailed(Exception):
    pass


def check(condition, message):
    if not condition:
        raise CheckFailed(message)


def mib(size):
    return f"{size / 1048576:.1f} MiB ({size} bytes)"


def read_blob(archive, descriptor):
    algorithm, _, digest = descriptor["digest"].partition(":")
    check(algorithm == "sha256", f"unexpected digest algorithm in {descriptor['digest']}")
    member = archive.extractfile(f"blobs/sha256/{digest}")
    check(member is not None, f"blob {descriptor['digest']} is missing from the archive")
    data = member.read()
    check(hashlib.sha256(data).hexdigest() == digest, f"blob {descriptor['digest']} does not match its digest")
    check(len(data) == descriptor["size"], f"blob {descriptor['digest']} is not {descriptor['size']} bytes")
    return data


def read_image(path, image):
    """The manifest, config and layer blobs of the one image in the OCI archive at path."""
    with tarfile.open(path) as archive:
        index = json.load(archive.extractfile("index.json"))
        manifests = index.get("manifests", [])
        check(len(manifests) == 1, f"index.json lists {len(manifests)} manifests, expected 1")
        name = manifests[0].get("annotations", {}).get("org.opencontainers.image.ref.name")
        check(name == image, f"index.json names the image {name!r}, expected {image!r}")
        manifest = json.loads(read_blob(archive, manifests[0]))
        config = json.loads(read_blob(archive, manifest["config"]))
        layers = [(layer["mediaType"], read_blob(archive, layer)) for layer in manifest["layers"]]
    return manifest, config, layers


def check_config(config, args):
    check(config.get("os") == "linux" and config.get("architecture") == "amd64",
          f"platform is {config.get('os')}/{config.get('architecture')}, expected linux/amd64")
    run = config.get("config", {})
    check(run.get("Entrypoint") == [args.binary],
          f"Entrypoint is {run.get('Entrypoint')!r}, expected {[args.binary]!r}")
    check(not run.get("Cmd"), f"Cmd is {run.get('Cmd')!r}, expected none")
    check(run.get("User") == args.user, f"User is {run.get('User')!r}, expected {args.user!r}")
    uid, _, gid = args.user.partition(":")
    check(uid.isdigit() and gid.isdigit() and int(uid) != 0 and int(gid) != 0,
          f"User {args.user!r} is not a numeric non-root uid:gid")
    expected = dict(label.split("=", 1) for label in args.label)
    labels = run.get("Labels") or {}
    for key in sorted(expected.keys() | labels.keys()):
        check(labels.get(key) == expected.get(key),
              f"label {key} is {labels.get(key)!r}, expected {expected.get(key)!r}")
    print(f"  config: Entrypoint {run['Entrypoint']}, User {run['User']}, Env {run.get('Env')}")
    for key, value in sorted(labels.items()):
        print(f"  label {key}={value}")


def open_layer(media_type, blob, tmp):
    modes = {
        "application/vnd.oci.image.layer.v1.tar": "r:",
        "application/vnd.oci.image.layer.v1.tar+gzip": "r:gz",
    }
    check(media_type in modes, f"unsupported layer media type {media_type}")
    path = os.path.join(tmp, "layer")
    with open(path, "wb") as out:
        out.write(blob)
    return tarfile.open(path, modes[media_type])


def unpack(layers, rootfs, tmp):
    """Unpacks the layers in order into rootfs; returns {path: TarInfo} of everything in it."""
    entries = {}
    for media_type, blob in layers:
        with open_layer(media_type, blob, tmp) as layer:
            for member in layer:
                check(not member.name.startswith("/") and ".." not in member.name.split("/"),
                      f"layer member {member.name!r} escapes the root")
                path = posixpath.normpath("/" + member.name)
                # Whiteouts delete what lower layers added; an image built FROM scratch with
                # one COPY has nothing to delete, so one means the build is not what we think.
                check(not posixpath.basename(path).startswith(".wh."), f"unexpected whiteout {path}")
                check(member.isfile() or member.isdir(),
                      f"{path} is a {'link' if member.issym() or member.islnk() else 'special file'};"
                      " the image should hold only regular files and directories")
                check(member.uid == 0 and member.gid == 0, f"{path} is owned by {member.uid}:{member.gid}, not root")
                check(not member.mode & 0o7022,
                      f"{path} has mode {member.mode:o} (setuid, setgid, sticky, or writable by others)")
                entries[path] = member
                if member.isfile():
                    os.makedirs(rootfs + posixpath.dirname(path), exist_ok=True)
                    with layer.extractfile(member) as src, open(rootfs + path, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                else:
                    os.makedirs(rootfs + path, exist_ok=True)
                os.chmod(rootfs + path, member.mode)
    return entries


def ldd(binary):
    """The absolute paths ldd resolves for binary (on this machine), the loader included."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    check("not found" not in out, f"ldd {binary}: a library is missing:\n{out}")
    return sorted(word for line in out.splitlines() for word in line.split() if word.startswith("/"))


def sha256_file(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_files(entries, rootfs, args):
    libraries = set(ldd(rootfs + args.binary))
    for program in args.program:
        libraries |= set(ldd(rootfs + program))
        check(sha256_file(rootfs + program) == sha256_file(program),
              f"{program} in the image differs from this machine's {program}")
    expected = sorted({args.binary, *libraries, *args.program, *args.file})
    files = sorted(path for path, member in entries.items() if member.isfile())
    print("  expected files:", " ".join(expected))
    unexpected, missing = sorted(set(files) - set(expected)), sorted(set(expected) - set(files))
    check(not unexpected, f"the image holds files nobody asked for: {unexpected}")
    check(not missing, f"the image lacks expected files: {missing}")
    parents = {"/"} | {posixpath.dirname(path) for path in expected}
    parents |= {p for path in parents for p in ancestors(path)}
    directories = sorted(path for path, member in entries.items() if member.isdir())
    check(set(directories) <= parents,
          f"the image holds directories no expected file needs: {sorted(set(directories) - parents)}")
    for library in libraries:
        check(sha256_file(rootfs + library) == sha256_file(library),
              f"{library} in the image differs from this machine's {library}")
    check(os.access(rootfs + args.binary, os.X_OK), f"{args.binary} is not executable")
    for path in expected:
        print(f"    {os.path.getsize(rootfs + path):>11}  {path}")


def ancestors(path):
    while path not in ("/", ""):
        path = posixpath.dirname(path)
        yield path


def check_runs(rootfs, args):
    """The --run command from the unpacked image, as its user, in a chroot, with an empty
    environment: its exit code and output are the binary's own answer."""
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"
    command = [chroot, f"--userspec={args.user}", rootfs, args.binary, *args.run]
    shown = " ".join(repr(arg) if " " in arg else arg for arg in [args.binary, *args.run])
    result = subprocess.run(command, env={}, capture_output=True, text=True)
    output = result.stdout + result.stderr
    check(result.returncode == args.expect_exit,
          f"`{shown}` exited {result.returncode}, expected {args.expect_exit}:\n{output}")
    check(args.expect_output in output,
          f"`{shown}` did not print {args.expect_output!r}:\n{output}")
    print(f"  chroot --userspec={args.user} ROOTFS {shown}: exit {result.returncode}")
    for line in output.splitlines()[:3]:
        print(f"    | {line}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archive")
    parser.add_argument("--image", required=True, help="expected name, e.g. ghcr.io/snapcache/snapcache-sidecar:0.1.0")
    parser.add_argument("--binary", required=True, help="the entrypoint, e.g. /snapcache-sidecar")
    parser.add_argument("--user", required=True, help="expected numeric USER, e.g. 65532:65532")
    parser.add_argument("--label", action="append", default=[], help="an expected label KEY=VALUE")
    parser.add_argument("--file", action="append", default=[], help="a file expected besides the binary and its libraries")
    parser.add_argument("--program", action="append", default=[], help="another executable expected, with its libraries")
    parser.add_argument("--run", action="append", default=[],
                        help="one argument of the command BINARY runs in the chroot (--run=-o for one that starts with -)")
    parser.add_argument("--expect-exit", type=int, required=True, help="the exit code that command must end with")
    parser.add_argument("--expect-output", required=True, help="text that command must print (stdout or stderr)")
    args = parser.parse_args()

    print(f"== {args.image} ({args.archive})")
    try:
        manifest, config, layers = read_image(args.archive, args.image)
        check_config(config, args)
        work = os.path.join(os.path.dirname(os.path.abspath(args.archive)), "check")
        os.makedirs(work, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            rootfs = os.path.join(tmp, "rootfs")
            os.mkdir(rootfs)
            entries = unpack(layers, rootfs, tmp)
            check_files(entries, rootfs, args)
            check_runs(rootfs, args)
            unpacked = sum(member.size for member in entries.values() if member.isfile())
        try:
            os.rmdir(work)
        except OSError:
            pass  # another check is using it
    except CheckFailed as failure:
        print(f"FAIL {args.image}: {failure}", file=sys.stderr)
        return 1
    layer_bytes = sum(layer["size"] for layer in manifest["layers"])
    print(f"  size: archive {mib(os.path.getsize(args.archive))}, {len(layers)} layer(s) {mib(layer_bytes)},"
          f" unpacked {mib(unpacked)}")
    print(f"OK {args.image}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# CI step: build the CPU image (docker/Dockerfile.cpu) with podman and smoke-test it. .ci/run calls this.
#
# Exit 0: the image was built and every smoke test passed, or this machine cannot run podman at all (then
# one line starting "image step skipped:" says why). Any other exit is a failure of our image or its build.
#
# Where the real base (python:3.11.13-slim-bookworm) cannot be pulled, a stand-in is made once with
# debootstrap: Debian bookworm (its python3 is 3.11) with a venv on PATH, imported as a local image and
# cached as a tarball under $SANITIZE_CI_CACHE. The build sees the host's pip configuration (index,
# find-links folders such as a local torch wheel, CA bundle: registries here sit behind a TLS-inspecting
# proxy) through a generated /etc/pip.conf mounted only while it runs; nothing of it stays in the image.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
CACHE=${SANITIZE_CI_CACHE:-/var/cache/sanitize-ci}
IMAGE=localhost/sanitize:cpu-ci
STANDIN=localhost/sanitize-ci-base:bookworm-python3
BASE=$(sed -n 's/^ARG BASE=//p' docker/Dockerfile.cpu)
case "${BASE%%/*}" in *.*|*:*|localhost) ;; *) BASE=docker.io/library/$BASE ;; esac   # podman wants it qualified

skip() { echo "image step skipped: $*"; exit 0; }
say() { echo "image: $*"; }

apt_install() {
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || return 1
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"; } >/dev/null 2>&1
}

if ! command -v podman >/dev/null || ! command -v runc >/dev/null; then
    apt_install podman runc || skip "podman and runc are not installed and cannot be installed with apt-get here"
    say "installed podman and runc with apt-get ($((SECONDS - start)) s)"
fi

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# crun, podman's default runtime, fails in containers like CI's own (setrlimit RLIMIT_NOFILE, cgroups in
# hybrid mode). runc works once podman is kept from raising the limits: files at the hard limit, processes
# at Debian's podman default of 32768 (measured here: the hard limit itself, 96365, is refused for runc)
limit() { local v; v=$(ulimit -H "$1"); [ "$v" = unlimited ] || [ "$v" -gt "$2" ] && v=$2; echo "$v:$v"; }
cat > "$TMP/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$(limit -n 1048576)", "nproc=$(limit -u 32768)"]
[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF=$TMP/containers.conf
why=$(podman info 2>&1 >/dev/null) || skip "podman cannot run here: $(tail -n 1 <<<"$why")"

# the base: the real one when it is here or can be pulled, else the cached or freshly made stand-in
if podman image exists "$BASE" || timeout 120 podman pull -q "$BASE" >/dev/null 2>&1; then
    base=$BASE
else
    base=$STANDIN
    if ! podman image exists "$STANDIN"; then
        tarball=$CACHE/bookworm-python3-venv.tar
        if [ ! -s "$tarball" ]; then
            command -v debootstrap >/dev/null || apt_install debootstrap \
                || skip "cannot pull $BASE and debootstrap is not available to make a stand-in"
            mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n 1)
            mkdir -p "$CACHE"
            rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
            debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" \
                "${mirror:-http://deb.debian.org/debian}" >"$TMP/debootstrap.log" 2>&1 \
                || { rm -rf "$rootfs"; tail -n 5 "$TMP/debootstrap.log"; skip "cannot pull $BASE and debootstrap failed"; }
            # Debian's python3 is externally managed (PEP 668): the image's pip installs into this venv
            chroot "$rootfs" python3 -m venv /opt/venv
            rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
            tar -C "$rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
            rm -rf "$rootfs"
            say "made the stand-in base with debootstrap ($((SECONDS - start)) s)"
        fi
        podman import -q --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$tarball" "$STANDIN" >/dev/null
    fi
fi

# the host's pip configuration, for the build only
mounts=()
# the interpreter CI installs with (python), whose pip reads the host's configuration
"$(command -v python || command -v python3)" - "$TMP/pip.conf" "$TMP/mounts" <<'EOF'
import os, subprocess, sys
from pathlib import Path

listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
config = {}
for line in listed.splitlines():   # global.find-links='/opt/wheels'; later files override earlier ones
    key, _, value = line.partition("=")
    config[key.split(".", 1)[-1]] = value.strip("'\"")
for key in ("index-url", "extra-index-url", "find-links", "cert"):
    env = os.environ.get("PIP_" + key.upper().replace("-", "_"))
    if env:
        config[key] = env
lines, mounts = ["[global]", "retries = 1", "timeout = 60"], []   # the PyTorch index may be unreachable
for key in ("index-url", "extra-index-url", "find-links"):
    kept = []
    for value in config.get(key, "").split():
        local = value[len("file://"):] if value.startswith("file://") else value if value.startswith("/") else None
        if local is not None and not Path(local).exists():
            continue
        if local is not None:
            mounts.append(f"{Path(local).parent if key.endswith('index-url') else local}")
        kept.append(value)
    if kept:
        lines.append(f"{key} = {' '.join(kept)}")
if config.get("cert") and Path(config["cert"]).is_file():
    mounts.append(f"{config['cert']}:/etc/pip-host-ca.crt")
    lines.append("cert = /etc/pip-host-ca.crt")
Path(sys.argv[1]).write_text("\n".join(lines) + "\n")
Path(sys.argv[2]).write_text("".join(f"{m}\n" for m in dict.fromkeys(mounts)))
EOF
while read -r m; do
    case "$m" in *:*) mounts+=(-v "$m:ro") ;; *) mounts+=(-v "$m:$m:ro") ;; esac
done < "$TMP/mounts"

t_build=$SECONDS
podman build -q --network host --build-arg "BASE=$base" -v "$TMP/pip.conf:/etc/pip.conf:ro" "${mounts[@]}" \
    -f docker/Dockerfile.cpu -t "$IMAGE" . >"$TMP/build.log" 2>&1 \
    || { tail -n 30 "$TMP/build.log"; echo "image: FAILED: podman build of docker/Dockerfile.cpu (base $base)"; exit 1; }
say "built $IMAGE from $base in $((SECONDS - t_build)) s"

# smoke tests: the container as a pipeline runs it, offline, on a mounted folder
work=$TMP/work
mkdir "$work"
cp sanitizer/demo/model.onnx sanitizer/demo/calib.npz "$work/"
fail() { echo "image: FAILED: $*"; exit 1; }
sanitize() { podman run --rm --network none -v "$work:/work" "$IMAGE" "$@" >"$TMP/out.log" 2>&1; }
expect() {   # expect CODE ARGS...: run sanitize in the container and check its exit code
    local want=$1 code=0
    shift
    sanitize "$@" || code=$?
    [ "$code" = "$want" ] || { tail -n 20 "$TMP/out.log"; fail "sanitize $* exited $code, expected $want"; }
}
expect 0 --help
grep -q "demo" "$TMP/out.log" || fail "--help does not list the demo"
expect 0 demo
grep -q "units pruned" "$TMP/out.log" || fail "the demo printed no before/after table"
podman run --rm --network none --entrypoint python "$IMAGE" -c "import torch, onnxruntime, matplotlib" \
    || fail "torch, onnxruntime or matplotlib does not import in the image"
expect 0 model.onnx --calib calib.npz --criterion linf --out clean.onnx --report r.json --report-html r.html
[ -s "$work/clean.onnx" ] && [ -s "$work/r.json" ] && [ -s "$work/r.html" ] || fail "the linf run wrote no output"
expect 3 model.onnx --calib calib.npz --criterion linf --out x.engine
[ -s "$work/x.onnx" ] || fail "--out x.engine exited 3 without writing x.onnx"
expect 6 model.onnx --calib calib.npz --criterion linf --out clean.onnx
say "smoke tests passed (--help, demo, imports, linf run, engine -> 3 with the ONNX, existing output -> 6);" \
    "step took $((SECONDS - start)) s"

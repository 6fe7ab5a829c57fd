#!/usr/bin/env bash
# Builds the serve image with podman, runs it, and checks that it answers.
# The image is built from the serve bundle (`python -m serve bundle DIR`):
# exactly the files `python -m serve deploy` uploads to a Hugging Face Space.
#
#   .ci/images.sh           everything below, in order
#   .ci/images.sh setup     only the engine and the local base images
#   .ci/images.sh lint      only hadolint on both Dockerfiles
#
# There is no Docker engine on the CI machines and no registry is reachable,
# so this sets up rootful podman (runc, cgroupfs, ulimits the machine allows,
# the host's CA bundle for pip behind a TLS-rewriting proxy) and makes the
# base images locally with debootstrap. Every step is skipped when already
# done, so a second run costs only the build cache check and the smoke test.
# Dockerfile.train is linted, not built: its CUDA base cannot be pulled here,
# and torch's CUDA wheels alone are several GB (see the report in the README).
#
# Needs root, apt-get and `make setup` (.venv holds hadolint and pytest).
# Environment: SERVE_IMAGE (tag to build, default localhost/loraship-serve:ci),
# BUILDER_IMAGE (tag for its builder stage, default
# localhost/loraship-serve-builder:ci), CI_BASE_PYTHON (base to build on,
# default: the local python stand-in), CI_IMAGE_MIN_FREE_GB (free space the
# build needs where podman stores images and in /var/tmp, default 4).
#
# Disk: each build supersedes the previous serve image and its builder stage
# (about 1 GB of layers that nothing else uses). Once the new image is built,
# the two images it replaced are removed, and with them every layer only they
# used; the builder stage carries a tag so that its llama-cpp-python compile
# layer, shared by old and new, stays cached.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

start=$(date +%s)
step_start=$start
stamp() {
    local now
    now=$(date +%s)
    echo "[images +$((now - start))s] $*"
    step_start=$now
}
took() { echo "[images +$(($(date +%s) - start))s]   ... $* ($(($(date +%s) - step_start))s)"; }
fail() {
    echo "[images +$(($(date +%s) - start))s] FAILED: $*" >&2
    exit 1
}

SERVE_IMAGE=${SERVE_IMAGE:-localhost/loraship-serve:ci}
BUILDER_IMAGE=${BUILDER_IMAGE:-localhost/loraship-serve-builder:ci}
MIN_FREE_GB=${CI_IMAGE_MIN_FREE_GB:-4}
DEBIAN_BASE=localhost/loraship-ci/debian:bookworm
PYTHON_STANDIN=localhost/loraship-ci/python:3.11-slim
# The tag Dockerfile.serve names by default, so an unmodified build works too.
PYTHON_DEFAULT=docker.io/library/python:3.11-slim
CI_BASE_PYTHON=${CI_BASE_PYTHON:-$PYTHON_STANDIN}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
STATE=$repo/.cache/containers
CONTAINER_NAME=loraship-serve-ci-$$
BUNDLE=$STATE/serve-bundle
HADOLINT=$repo/.venv/bin/hadolint
PYTHON=$repo/.venv/bin/python

# --- the engine ----------------------------------------------------------------

install_packages() {
    local missing=()
    for pkg in podman runc debootstrap catatonit curl; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        echo "  podman, runc, debootstrap, catatonit: installed"
        return
    fi
    [ "$(id -u)" = 0 ] || fail "installing ${missing[*]} needs root"
    command -v apt-get >/dev/null || fail "no apt-get: install ${missing[*]} yourself"
    echo "  apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq -o DPkg::Lock::Timeout=600 "${missing[@]}" >/dev/null
}

# The CA bundle pip trusts on this host (a proxy re-signs outside TLS here).
host_ca_bundle() {
    local cert=""
    cert=$("$PYTHON" -m pip config get global.cert 2>/dev/null || true)
    [ -n "$cert" ] || cert=${PIP_CERT:-}
    [ -n "$cert" ] || cert=${SSL_CERT_FILE:-}
    if [ -n "$cert" ] && [ -f "$cert" ]; then echo "$cert"; fi
}

# A private engine config, passed through CONTAINERS_CONF: the system's own
# config stays untouched.
write_engine_config() {
    mkdir -p "$STATE"
    local ca volumes=""
    ca=$(host_ca_bundle)
    if [ -n "$ca" ]; then
        # Mounted beside, not over, the image's own CA path: Debian's
        # ca-certificates package fails to install over a mounted bundle.
        printf '[global]\ncert = /run/host-ca.crt\n' >"$STATE/pip.conf"
        volumes="volumes = [\"$ca:/run/host-ca.crt:ro\", \"$STATE/pip.conf:/etc/pip.conf:ro\"]"
        echo "  pip in builds trusts $ca"
    fi
    # nofile/nproc: root here cannot raise hard limits, and runc fails on
    # setrlimit otherwise. runc + cgroupfs: crun refuses hybrid cgroups.
    cat >"$STATE/containers.conf.tmp" <<EOF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
$volumes

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
    mv "$STATE/containers.conf.tmp" "$STATE/containers.conf"
    export CONTAINERS_CONF=$STATE/containers.conf
}

# --- base images (no registry is reachable) -------------------------------------

make_debian_base() {
    if podman image exists "$DEBIAN_BASE"; then
        echo "  $DEBIAN_BASE: present"
        return
    fi
    local rootfs
    rootfs=$(mktemp -d /tmp/loraship-rootfs.XXXXXX)
    [ -n "$rootfs" ] && [ -d "$rootfs" ] || fail "mktemp"
    echo "  debootstrap bookworm from $DEBIAN_MIRROR"
    debootstrap --variant=minbase bookworm "$rootfs" "$DEBIAN_MIRROR" >"$STATE/debootstrap.log" 2>&1 \
        || { tail -20 "$STATE/debootstrap.log" >&2; rm -rf "$rootfs"; fail "debootstrap"; }
    # Slim like the official images: no manuals or translations, neither now
    # nor from later installs.
    printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
        'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' 'path-exclude /usr/share/locale/*' \
        >"$rootfs/etc/dpkg/dpkg.cfg.d/loraship-slim"
    (
        cd "$rootfs/usr/share" || exit 1
        [ "$(pwd)" = "$rootfs/usr/share" ] || exit 1
        rm -rf ./man/* ./info/* ./locale/*
        find ./doc -mindepth 2 -type f ! -name copyright -delete
    ) || fail "could not slim $rootfs"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$DEBIAN_BASE" >/dev/null 2>&1 \
        || fail "podman import of the Debian base"
    rm -rf "$rootfs"
}

# Stands in for python:3.11-slim: Debian's own Python 3.11 (in /usr/bin, not
# /usr/local as in the official image; the Dockerfiles never name the path).
make_python_standin() {
    if podman image exists "$PYTHON_STANDIN"; then
        echo "  $PYTHON_STANDIN: present"
    else
        printf '%s\n' \
            "FROM $DEBIAN_BASE" \
            'RUN apt-get update \' \
            '    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \' \
            '    && rm -rf /var/lib/apt/lists/* \' \
            '    && ln -s /usr/bin/python3 /usr/local/bin/python' \
            'ENV LANG=C.UTF-8' \
            'CMD ["python3"]' >"$STATE/Containerfile.python"
        podman build --pull=never -t "$PYTHON_STANDIN" -f "$STATE/Containerfile.python" "$STATE" \
            >"$STATE/python-standin.log" 2>&1 \
            || { tail -20 "$STATE/python-standin.log" >&2; fail "the python stand-in did not build"; }
    fi
    podman image exists "$PYTHON_DEFAULT" || podman tag "$PYTHON_STANDIN" "$PYTHON_DEFAULT"
}

# --- lint ---------------------------------------------------------------------

lint() {
    [ -x "$HADOLINT" ] || fail "$HADOLINT is missing: run \`make setup\` first"
    "$HADOLINT" --version
    "$HADOLINT" --no-color --failure-threshold style Dockerfile.serve Dockerfile.train \
        || fail "hadolint found problems (above)"
    echo "  hadolint: Dockerfile.serve and Dockerfile.train are clean"
}

# --- the serve image --------------------------------------------------------------

image_id() { podman image inspect --format '{{.Id}}' "$1" 2>/dev/null || true; }

# Fails before the build, naming the place and the shortfall, instead of pip
# failing half-way through a layer with "No space left on device".
check_free_space() {
    local graphroot dir avail_kb need_kb=$((MIN_FREE_GB * 1024 * 1024))
    graphroot=$(podman info --format '{{.Store.GraphRoot}}' 2>/dev/null || echo /var/lib/containers)
    for dir in "$graphroot" /var/tmp; do
        [ -d "$dir" ] || continue
        avail_kb=$(df -Pk "$dir" | awk 'NR == 2 {print $4}')
        echo "  $((avail_kb / 1024 / 1024)) GB free at $dir"
        [ "$avail_kb" -ge "$need_kb" ] || fail "only $((avail_kb / 1024)) MB free at $dir; building the serve image needs about ${MIN_FREE_GB} GB there. Free space on that disk (old images: podman images -a; old clones and caches), then run .ci/images.sh again"
    done
}

# Removes the image a tag pointed to before this build, and the layers only it
# used (podman rmi takes untagged parents with it, and stops at shared ones).
remove_superseded() {
    local old=$1 tag=$2 new
    new=$(image_id "$tag")
    [ -n "$old" ] && [ "$old" != "$new" ] || return 0
    if podman rmi "$old" >/dev/null 2>&1; then
        echo "  removed the superseded $tag (${old:0:12}) and the layers only it used"
    else
        echo "  kept the superseded $tag (${old:0:12}): something still uses it"
    fi
}

# The Space's files, fresh: its Dockerfile is Dockerfile.serve, its README.md the Space card.
write_bundle() {
    rm -rf "${BUNDLE:?}"
    "$PYTHON" -m serve bundle "$BUNDLE" >"$STATE/serve-bundle.txt" || fail "python -m serve bundle $BUNDLE"
    echo "  $(wc -l <"$STATE/serve-bundle.txt") files in $BUNDLE (python -m serve bundle)"
}

podman_build() {
    local log=$1 rc
    shift
    set +e
    podman build --pull=never --format docker \
        --build-arg BASE_IMAGE="$CI_BASE_PYTHON" \
        -f "$BUNDLE/Dockerfile" "$@" "$BUNDLE" 2>&1 \
        | tee "$log" \
        | grep --line-buffered -E 'STEP [0-9]+/[0-9]+: (FROM|RUN|COPY)|^--> Using cache|COMMIT|Successfully tagged|ERROR|Error:'
    rc=${PIPESTATUS[0]}
    set -e
    [ "$rc" = 0 ] || { tail -40 "$log" >&2; fail "podman build -f $BUNDLE/Dockerfile $* $BUNDLE (exit $rc; full log: $log)"; }
}

build_serve() {
    local old_serve old_builder bytes
    old_serve=$(image_id "$SERVE_IMAGE")
    old_builder=$(image_id "$BUILDER_IMAGE")
    check_free_space
    write_bundle
    # The builder stage first, under its own tag (the full build below finds
    # every one of its steps cached); --format docker keeps the HEALTHCHECK
    # (the OCI format has no field for it).
    podman_build "$STATE/serve-builder-build.log" --target builder -t "$BUILDER_IMAGE"
    podman_build "$STATE/serve-build.log" -t "$SERVE_IMAGE"
    bytes=$(podman image inspect --format '{{.Size}}' "$SERVE_IMAGE")
    echo "  $SERVE_IMAGE: $((bytes / 1000000)) MB ($bytes bytes) on base $CI_BASE_PYTHON"
    remove_superseded "$old_serve" "$SERVE_IMAGE"
    remove_superseded "$old_builder" "$BUILDER_IMAGE"
}

check_serve_contents() {
    # The final stage must hold no compiler and no training library.
    podman run --rm --no-healthcheck --entrypoint /bin/sh "$SERVE_IMAGE" -c '
        set -e
        for tool in gcc cc g++ c++ make cmake; do
            if command -v "$tool" >/dev/null; then echo "  unexpected compiler tool: $tool"; exit 1; fi
        done
        [ "$(id -u)" = 1000 ] || { echo "  runs as uid $(id -u), not 1000"; exit 1; }
        python -c "
import importlib.util, sys
heavy = [m for m in (\"torch\", \"transformers\", \"peft\", \"trl\", \"bitsandbytes\") if importlib.util.find_spec(m)]
sys.exit(\"  training libraries in the serve image: \" + \", \".join(heavy) if heavy else 0)
"' || fail "the serve image holds what it must not (above)"
    echo "  no compiler, no torch/transformers/peft/trl/bitsandbytes, uid 1000"
}

free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

cleanup() {
    if podman container exists "$CONTAINER_NAME" 2>/dev/null; then
        podman rm -f "$CONTAINER_NAME" >/dev/null 2>&1 || true
    fi
}

smoke_test_serve() {
    local port url status body deadline
    port=$(free_port)
    url=http://127.0.0.1:$port
    trap cleanup EXIT
    # Without systemd podman cannot schedule the HEALTHCHECK and says so on
    # stderr; the check is run by hand below instead.
    podman run -d --init --name "$CONTAINER_NAME" -p "127.0.0.1:$port:7860" "$SERVE_IMAGE" \
        >/dev/null 2>"$STATE/run.err" \
        || { cat "$STATE/run.err" >&2; fail "podman run"; }
    echo "  started $CONTAINER_NAME on $url; waiting for /health"
    deadline=$(($(date +%s) + 180))
    status=000
    while [ "$(date +%s)" -lt "$deadline" ]; do
        status=$(curl -s -o "$STATE/health.json" -w '%{http_code}' "$url/health" || true)
        [ "$status" = 200 ] && break
        if [ "$(podman inspect --format '{{.State.Running}}' "$CONTAINER_NAME")" != true ]; then
            podman logs "$CONTAINER_NAME" 2>&1 | tail -30 >&2
            fail "the container exited before answering"
        fi
        sleep 1
    done
    if [ "$status" != 200 ]; then
        podman logs "$CONTAINER_NAME" 2>&1 | tail -30 >&2
        fail "/health answered $status, not 200, within 180 s"
    fi
    took "/health 200: $(cat "$STATE/health.json")"

    body=$(curl -sS --max-time 120 -H 'Content-Type: application/json' "$url/v1/chat/completions" \
        -d '{"messages": [{"role": "user", "content": "What is the capital of France? Answer in one word."}], "max_tokens": 24, "temperature": 0}') \
        || fail "POST /v1/chat/completions"
    "$PYTHON" -c '
import json, sys
reply = json.loads(sys.argv[1])
text = reply["choices"][0]["message"]["content"]
assert text.strip(), "empty answer"
print("  chat completion (%s): %r" % (reply.get("model"), text.strip()[:120]))
' "$body" || { echo "$body" >&2; podman logs "$CONTAINER_NAME" 2>&1 | tail -30 >&2; fail "the chat completion was not an answer"; }
    took "POST /v1/chat/completions answered"

    podman healthcheck run "$CONTAINER_NAME" >/dev/null 2>&1 || fail "the image's HEALTHCHECK failed on a serving container"
    echo "  the image's own HEALTHCHECK passes"

    podman rm -f "$CONTAINER_NAME" >/dev/null 2>&1
    trap - EXIT
    took "container removed"
}

# --- main -----------------------------------------------------------------------

what=${1:-all}
case "$what" in all|setup|lint) ;; *) echo "usage: $0 [all|setup|lint]" >&2; exit 2 ;; esac

if [ "$what" != lint ]; then
    stamp "engine: packages and config"
    install_packages
    write_engine_config
    podman --version
    took "engine ready (CONTAINERS_CONF=$CONTAINERS_CONF)"

    stamp "base images"
    make_debian_base
    make_python_standin
    took "bases ready"
fi
[ "$what" = setup ] && exit 0

stamp "lint"
lint
took "lint done"
[ "$what" = lint ] && exit 0

stamp "build $SERVE_IMAGE (from the serve bundle; compiles llama-cpp-python unless cached)"
build_serve
took "built"

stamp "inspect the serve image"
check_serve_contents
took "inspected"

stamp "run and smoke-test the serve image"
smoke_test_serve

# With the image built, the image half of the secrets test runs too.
stamp "tests/containers against $SERVE_IMAGE"
LORASHIP_SERVE_IMAGE=$SERVE_IMAGE "$PYTHON" -m pytest -q -p no:cacheprovider tests/containers \
    || fail "tests/containers"
took "tests passed"

stamp "all image checks passed"

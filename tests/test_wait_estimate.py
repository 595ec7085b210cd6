"""The Retry-After arithmetic on its own: rate from recent jobs, work ahead, threads."""

from ovis_service.wait_estimate import (
    PRIOR_SECONDS_PER_STEP_MEGAPIXEL,
    WaitEstimator,
    step_pixels,
)

MP = 1_000_000


def test_without_history_the_prior_rate_applies() -> None:
    estimator = WaitEstimator()
    assert estimator.seconds_per_step_megapixel() == PRIOR_SECONDS_PER_STEP_MEGAPIXEL
    # 50 steps at 1024x1024: about Ovis-Image's published 13.5 s on one H100.
    assert estimator.seconds_for(step_pixels(50, 1024, 1024), threads=1) == 14


def test_the_rate_weighs_jobs_by_their_work_not_one_vote_each() -> None:
    estimator = WaitEstimator()
    estimator.record(seconds=10.0, work=10 * MP)  # 1 s per step-megapixel
    estimator.record(seconds=1.0, work=MP // 2)  # a small job at 2 s per step-megapixel
    assert estimator.seconds_per_step_megapixel() == 11.0 / 10.5


def test_threads_share_the_work_and_the_floor_is_one_second() -> None:
    estimator = WaitEstimator(prior=0.5)
    assert estimator.seconds_for(40 * MP, threads=1) == 20
    assert estimator.seconds_for(40 * MP, threads=4) == 5
    assert estimator.seconds_for(0, threads=1) == 1
    assert estimator.seconds_for(MP, threads=1) == 1  # 0.5 s rounds up to the floor


def test_only_the_recent_jobs_count() -> None:
    estimator = WaitEstimator()
    estimator.record(seconds=1000.0, work=MP)  # a cold first run
    for _ in range(20):
        estimator.record(seconds=1.0, work=MP)
    assert estimator.seconds_per_step_megapixel() == 1.0

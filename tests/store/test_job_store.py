"""The job store as the service uses it, on SQLite and PostgreSQL alike: submission, reading,
the runner's claims and leases, outcomes, cancellation, deletion and expiry."""

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import func, select

from ovis_service.schemas import MAX_SEED
from ovis_service.store.job_store import JobStore
from ovis_service.store.records import (
    JobRecord,
    JobStatus,
    NewImage,
    NewJob,
    WebhookStatus,
)
from ovis_service.store.tables import images
from tests.store.conftest import TTL, FakeClock

ALICE = "alice-key-digest"
BOB = "bob-key-digest"
REPLICA = "replica-a"
OTHER_REPLICA = "replica-b"


def new_job(owner: str = ALICE, webhook: str | None = None) -> NewJob:
    return NewJob(
        owner=owner,
        api="native",
        request={"params": [{"prompt": "a red fox", "seed": 7}], "format": "png"},
        base_url="https://ovis.example",
        webhook=webhook,
    )


def png(index: int = 0, seed: int = 7, data: bytes = b"\x89PNG fake") -> NewImage:
    return NewImage(index=index, seed=seed, image_format="png", media_type="image/png", data=data)


def image_rows(store: JobStore) -> int:
    """Images left in the database, reachable or not: a leak shows here and nowhere else."""
    with store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(images)).scalar_one())


def claimed(store: JobStore, owner: str = ALICE) -> JobRecord:
    """A job of `owner`'s, running on REPLICA."""
    job = store.create(new_job(owner))
    record = store.claim_next(REPLICA)
    assert record is not None
    assert record.id == job.id
    return record


def claimed_id(store: JobStore) -> str | None:
    record = store.claim_next(REPLICA)
    return record.id if record is not None else None


def succeeded(store: JobStore, files: tuple[NewImage, ...] = (png(),)) -> JobRecord:
    job = claimed(store)
    assert store.succeed(job.id, files)
    record = store.get(job.id, ALICE)
    assert record is not None
    return record


# -- submission and reading ------------------------------------------------------------------------


def test_create_commits_a_queued_job_another_replica_reads(
    store: JobStore, open_store: Callable[[], JobStore], clock: FakeClock
) -> None:
    job = store.create(new_job(webhook="https://hooks.example/done"))
    assert job.status is JobStatus.QUEUED
    assert job.created_at == clock.now
    assert (job.started_at, job.finished_at, job.expires_at) == (None, None, None)
    assert job.webhook_status is WebhookStatus.PENDING

    # Another engine sees it at once: the 202 may go out.
    seen = open_store().get(job.id, ALICE)
    assert seen == job
    assert seen.request == new_job().request
    assert seen.base_url == "https://ovis.example"


def test_another_owner_cannot_read_the_job(store: JobStore) -> None:
    job = store.create(new_job(ALICE))
    assert store.get(job.id, BOB) is None
    assert store.get(job.id, ALICE) is not None
    assert store.get("job_does-not-exist", ALICE) is None


def test_job_ids_are_distinct_and_unguessable_looking(store: JobStore) -> None:
    ids = [store.create(new_job()).id for _ in range(30)]
    assert len(set(ids)) == len(ids)
    for job_id in ids:
        assert job_id.startswith("job_")
        assert len(job_id) - len("job_") >= 20


def test_owned_by_lists_only_the_owners_jobs_newest_first(
    store: JobStore, clock: FakeClock
) -> None:
    created = []
    for _ in range(3):
        created.append(store.create(new_job(ALICE)).id)
        store.create(new_job(BOB))
        clock.advance(1)

    assert [job.id for job in store.owned_by(ALICE, limit=10)] == created[::-1]
    assert [job.id for job in store.owned_by(ALICE, limit=2)] == created[:0:-1]
    assert all(job.owner == BOB for job in store.owned_by(BOB, limit=10))
    assert store.owned_by("nobody", limit=10) == []


def test_pages_give_every_job_once_even_when_created_together(
    store: JobStore, clock: FakeClock
) -> None:
    # Three jobs share each timestamp, so a page boundary falls between equal created_at.
    created = set()
    for index in range(11):
        created.add(store.create(new_job()).id)
        if index % 3 == 2:
            clock.advance(0.5)

    seen: list[JobRecord] = []
    before: tuple[float, str] | None = None
    # Bounded, so a cursor that never advances fails instead of hanging.
    for _ in range(len(created)):
        page = store.owned_by(ALICE, limit=2, before=before)
        if not page:
            break
        seen.extend(page)
        before = (page[-1].created_at, page[-1].id)

    assert len(seen) == len(created)
    assert {job.id for job in seen} == created
    keys = [(job.created_at, job.id) for job in seen]
    assert keys == sorted(keys, reverse=True)


# -- the runner: claims, release, leases ---------------------------------------------------------


def test_claim_takes_the_oldest_queued_job(store: JobStore, clock: FakeClock) -> None:
    assert store.claim_next(REPLICA) is None
    first = store.create(new_job())
    clock.advance(1)
    second = store.create(new_job(BOB))

    record = store.claim_next(REPLICA)
    assert record is not None
    assert record.id == first.id
    assert record.status is JobStatus.RUNNING
    assert record.started_at == clock.now
    next_record = store.claim_next(REPLICA)
    assert next_record is not None
    assert next_record.id == second.id
    assert store.claim_next(REPLICA) is None


def test_two_replicas_claiming_at_once_never_share_a_job(
    store: JobStore, open_store: Callable[[], JobStore]
) -> None:
    created = {store.create(new_job()).id for _ in range(20)}
    replicas = {REPLICA: store, OTHER_REPLICA: open_store()}
    start = threading.Barrier(len(replicas))

    def drain(replica: str) -> list[str]:
        start.wait()
        taken = []
        for _ in range(len(created) + 1):  # bounded: a claim that takes nothing must not hang
            record = replicas[replica].claim_next(replica)
            if record is None:
                break
            taken.append(record.id)
        return taken

    with ThreadPoolExecutor(len(replicas)) as pool:
        taken = dict(zip(replicas, pool.map(drain, replicas), strict=True))

    first, second = (set(ids) for ids in taken.values())
    assert sum(len(ids) for ids in taken.values()) == len(created)
    assert first | second == created
    assert not first & second
    # The database agrees: each replica holds exactly the jobs it was handed.
    for replica, ids in taken.items():
        assert store.heartbeat(replica, ids) == set()
    assert store.count_queued() == 0


def test_release_puts_the_job_back_ahead_of_newer_ones(store: JobStore, clock: FakeClock) -> None:
    older = store.create(new_job())
    clock.advance(1)
    newer = store.create(new_job())
    assert claimed_id(store) == older.id

    store.release(older.id)
    released = store.get(older.id, ALICE)
    assert released is not None
    assert released.status is JobStatus.QUEUED
    assert released.started_at is None
    assert released.created_at == older.created_at
    assert claimed_id(store) == older.id
    assert claimed_id(store) == newer.id


def test_heartbeat_keeps_the_lease_of_a_live_replica(store: JobStore, clock: FakeClock) -> None:
    job = claimed(store)
    clock.advance(100)
    assert store.heartbeat(REPLICA, [job.id]) == set()
    # Renewed at +100: a cut-off at +50 does not take it away.
    assert store.requeue_stale(clock.now - 50) == []
    record = store.get(job.id, ALICE)
    assert record is not None
    assert record.status is JobStatus.RUNNING


def test_heartbeat_names_jobs_deleted_or_claimed_elsewhere(
    store: JobStore, clock: FakeClock
) -> None:
    kept = claimed(store)
    deleted = claimed(store)
    assert store.delete(deleted.id, ALICE)
    assert store.heartbeat(REPLICA, [kept.id, deleted.id]) == {deleted.id}

    # REPLICA stalls; its job is requeued and taken by another replica.
    clock.advance(60)
    assert store.requeue_stale(clock.now - 30) == [kept.id]
    retaken = store.claim_next(OTHER_REPLICA)
    assert retaken is not None
    assert retaken.id == kept.id
    assert store.heartbeat(REPLICA, [kept.id]) == {kept.id}
    assert store.heartbeat(OTHER_REPLICA, [kept.id]) == set()
    assert store.heartbeat(REPLICA, []) == set()


def test_requeue_stale_takes_back_only_running_jobs_past_the_cutoff(
    store: JobStore, clock: FakeClock
) -> None:
    stale = claimed(store)
    finished = claimed(store)
    assert store.succeed(finished.id, [png()])
    clock.advance(100)
    fresh = claimed(store)
    queued = store.create(new_job())

    assert store.requeue_stale(clock.now - 50) == [stale.id]
    statuses = {
        job.id: record.status
        for job in (stale, finished, fresh, queued)
        if (record := store.get(job.id, ALICE)) is not None
    }
    assert statuses == {
        stale.id: JobStatus.QUEUED,
        finished.id: JobStatus.SUCCEEDED,
        fresh.id: JobStatus.RUNNING,
        queued.id: JobStatus.QUEUED,
    }
    # Requeued at its old place: the next claim runs it again before the newer queued job.
    assert claimed_id(store) == stale.id


def test_progress_is_readable_while_running(store: JobStore) -> None:
    job = claimed(store)
    store.set_progress(job.id, 3, 20)
    record = store.get(job.id, ALICE)
    assert record is not None
    assert (record.progress_step, record.progress_total) == (3, 20)


# -- outcomes -------------------------------------------------------------------------------------


def test_succeed_stores_images_that_come_back_by_token(store: JobStore, clock: FakeClock) -> None:
    job = claimed(store)
    clock.advance(5)
    files = [png(0, seed=MAX_SEED, data=b"first"), png(1, seed=12, data=b"second")]
    assert store.succeed(job.id, files)

    record = store.get(job.id, ALICE)
    assert record is not None
    assert record.status is JobStatus.SUCCEEDED
    assert record.finished_at == clock.now
    assert record.expires_at == clock.now + TTL
    assert [(image.index, image.seed) for image in record.images] == [(0, MAX_SEED), (1, 12)]
    assert len({image.token for image in record.images}) == 2
    for image, sent in zip(record.images, files, strict=True):
        assert len(image.token) >= 40
        stored = store.image(image.token)
        assert stored is not None
        assert (stored.data, stored.media_type, stored.seed, stored.job_id) == (
            sent.data,
            "image/png",
            sent.seed,
            job.id,
        )
    assert store.image("not-a-token") is None


def test_succeed_stores_nothing_for_a_job_cancelled_meanwhile(store: JobStore) -> None:
    job = claimed(store)
    assert store.cancel(job.id, ALICE) is not None
    assert not store.succeed(job.id, [png()])
    record = store.get(job.id, ALICE)
    assert record is not None
    assert record.status is not JobStatus.SUCCEEDED
    assert record.images == ()
    assert image_rows(store) == 0


def test_succeed_stores_nothing_for_a_job_deleted_meanwhile(store: JobStore) -> None:
    job = claimed(store)
    assert store.delete(job.id, ALICE)
    assert not store.succeed(job.id, [png()])
    assert store.get_any(job.id) is None
    assert image_rows(store) == 0


def test_failure_records_message_and_code(store: JobStore, clock: FakeClock) -> None:
    job = claimed(store)
    assert store.finish_unsuccessfully(job.id, JobStatus.FAILED, "out of GPU memory", "oom")
    record = store.get(job.id, ALICE)
    assert record is not None
    assert record.status is JobStatus.FAILED
    assert (record.error_message, record.error_code) == ("out of GPU memory", "oom")
    assert record.expires_at == clock.now + TTL
    # Only a running job finishes: a second outcome changes nothing.
    assert not store.finish_unsuccessfully(job.id, JobStatus.CANCELLED, "late", "cancelled")
    assert store.get(job.id, ALICE) == record


# -- cancellation and deletion --------------------------------------------------------------------


def test_cancel_a_queued_job_finishes_it_at_once(store: JobStore, clock: FakeClock) -> None:
    job = store.create(new_job())
    clock.advance(2)
    record = store.cancel(job.id, ALICE)
    assert record is not None
    assert record.status is JobStatus.CANCELLED
    assert record.finished_at == clock.now
    assert record.expires_at == clock.now + TTL
    assert record.error_code == "cancelled"
    assert store.claim_next(REPLICA) is None


def test_cancel_a_running_job_asks_its_replica_to_stop(store: JobStore) -> None:
    job = claimed(store)
    record = store.cancel(job.id, ALICE)
    assert record is not None
    assert record.status is JobStatus.RUNNING
    assert record.cancel_requested
    assert store.heartbeat(REPLICA, [job.id]) == {job.id}


def test_a_cancelled_job_its_replica_gives_back_ends_cancelled(
    store: JobStore, clock: FakeClock
) -> None:
    # One replica shuts down and releases its jobs; another crashes and loses its lease. A job
    # whose owner asked to stop must not return to the queue and run again.
    released = claimed(store)
    stale = claimed(store)
    kept = claimed(store)
    for job in (released, stale):
        assert store.cancel(job.id, ALICE) is not None
    store.release(released.id)
    clock.advance(60)
    store.heartbeat(REPLICA, [kept.id])
    assert store.requeue_stale(clock.now - 30) == []

    for job in (released, stale):
        record = store.get(job.id, ALICE)
        assert record is not None
        assert record.status is JobStatus.CANCELLED
        assert record.error_code == "cancelled"
        assert record.expires_at == (record.finished_at or 0) + TTL
    assert store.claim_next(OTHER_REPLICA) is None


def test_cancel_leaves_a_finished_job_as_it_is(store: JobStore) -> None:
    done = succeeded(store)
    assert store.cancel(done.id, ALICE) == done


def test_cancel_by_another_owner_changes_nothing(store: JobStore) -> None:
    job = store.create(new_job(ALICE))
    assert store.cancel(job.id, BOB) is None
    assert store.get(job.id, ALICE) == job


def test_delete_removes_the_job_and_its_images(store: JobStore) -> None:
    done = succeeded(store)
    token = done.images[0].token
    assert not store.delete(done.id, BOB)
    assert not store.delete("job_unknown", ALICE)
    assert store.image(token) is not None

    assert store.delete(done.id, ALICE)
    assert store.get(done.id, ALICE) is None
    assert store.image(token) is None
    assert image_rows(store) == 0
    assert not store.delete(done.id, ALICE)


# -- expiry ---------------------------------------------------------------------------------------


def test_an_expired_job_disappears_and_purge_deletes_it(store: JobStore, clock: FakeClock) -> None:
    old = succeeded(store)
    token = old.images[0].token
    clock.advance(TTL / 2)
    young = succeeded(store)
    waiting = store.create(new_job())

    clock.advance(TTL / 2 - 1)
    assert store.get(old.id, ALICE) is not None
    assert store.image(token) is not None

    clock.advance(1)
    assert store.get(old.id, ALICE) is None
    assert store.get_any(old.id) is None
    assert store.image(token) is None
    assert {job.id for job in store.owned_by(ALICE, limit=10)} == {young.id, waiting.id}

    assert store.purge_expired() == 1
    assert image_rows(store) == len(young.images)
    assert store.image(young.images[0].token) is not None
    assert store.get(waiting.id, ALICE) is not None
    assert store.purge_expired() == 0


def test_create_finished_gives_a_succeeded_job_that_expires(
    store: JobStore, clock: FakeClock
) -> None:
    record = store.create_finished(new_job(), [png(data=b"already made")])
    assert record.status is JobStatus.SUCCEEDED
    assert record.expires_at == clock.now + TTL
    stored = store.image(record.images[0].token)
    assert stored is not None
    assert stored.data == b"already made"
    assert store.claim_next(REPLICA) is None
    assert store.count_queued() == 0

    clock.advance(TTL)
    assert store.get(record.id, ALICE) is None
    assert store.image(record.images[0].token) is None
    assert store.purge_expired() == 1


# -- counts and webhooks ---------------------------------------------------------------------------


def test_count_queued_counts_only_waiting_jobs(store: JobStore) -> None:
    assert store.count_queued() == 0
    claimed(store)
    store.create(new_job())
    cancelled = store.create(new_job())
    store.create(new_job(BOB))
    assert store.cancel(cancelled.id, ALICE) is not None
    assert store.count_queued() == 2


def test_webhooks_pending_lists_finished_jobs_until_delivered(store: JobStore) -> None:
    hook = "https://hooks.example/done"
    finished = store.create(new_job(webhook=hook))
    assert store.cancel(finished.id, ALICE) is not None
    running = store.create(new_job(webhook=hook))
    assert claimed_id(store) == running.id
    store.create(new_job(webhook=hook))  # queued: nothing to tell yet
    clean = store.create(new_job())  # no webhook at all
    assert store.cancel(clean.id, ALICE) is not None

    assert [job.id for job in store.webhooks_pending()] == [finished.id]

    store.set_webhook_status(finished.id, WebhookStatus.DELIVERED)
    assert store.webhooks_pending() == []
    record = store.get(finished.id, ALICE)
    assert record is not None
    assert record.webhook_status is WebhookStatus.DELIVERED

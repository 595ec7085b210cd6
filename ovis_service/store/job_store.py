"""Every read and write of async jobs, each one short transaction, the same on SQLite and
PostgreSQL. Blocking: handlers call it through `asyncio.to_thread`.

A job moves queued -> running -> succeeded | failed | cancelled. Claiming takes the oldest
queued job with `FOR UPDATE SKIP LOCKED` on PostgreSQL, so replicas never take the same one;
the guarded update (`WHERE status = 'queued'`) makes SQLite just as safe.
"""

import json
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sqlalchemy import Engine, and_, delete, func, insert, or_, select, update
from sqlalchemy.engine import Connection, Row

from ovis_service.store.database import is_postgres
from ovis_service.store.records import (
    ImageRecord,
    JobRecord,
    JobStatus,
    NewImage,
    NewJob,
    StoredImage,
    WebhookStatus,
)
from ovis_service.store.tables import images, jobs

# 128 random bits make an id nobody guesses; 256 make an image URL a capability.
_ID_BYTES = 16
_TOKEN_BYTES = 32


def new_job_id() -> str:
    return "job_" + secrets.token_urlsafe(_ID_BYTES)


class JobStore:
    def __init__(
        self, engine: Engine, *, ttl: float, clock: Callable[[], float] = time.time
    ) -> None:
        self.engine = engine
        self.ttl = ttl
        self.clock = clock
        self._skip_locked = is_postgres(engine)

    def close(self) -> None:
        self.engine.dispose()

    # -- submission ------------------------------------------------------------------------------

    def create(self, new: NewJob) -> JobRecord:
        """Commit a queued job; only then may its 202 go out."""
        job_id = new_job_id()
        with self.engine.begin() as conn:
            conn.execute(insert(jobs).values(**self._new_row(job_id, new, JobStatus.QUEUED.value)))
        return self._get(job_id)

    def create_finished(self, new: NewJob, files: Sequence[NewImage]) -> JobRecord:
        """A job that ran while its client waited (`response_format: "url"`): stored only so
        that its images have URLs, and expiring like any other."""
        job_id = new_job_id()
        now = self.clock()
        row = self._new_row(job_id, new, JobStatus.SUCCEEDED.value)
        row.update(started_at=now, finished_at=now, expires_at=now + self.ttl)
        with self.engine.begin() as conn:
            conn.execute(insert(jobs).values(**row))
            self._insert_images(conn, job_id, files)
        return self._get(job_id)

    def count_queued(self) -> int:
        with self.engine.connect() as conn:
            count = conn.execute(
                select(func.count())
                .select_from(jobs)
                .where(jobs.c.status == JobStatus.QUEUED.value)
            ).scalar_one()
        return int(count)

    # -- what clients read -----------------------------------------------------------------------

    def get(self, job_id: str, owner: str) -> JobRecord | None:
        """The job, if it exists, belongs to `owner` and has not expired."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(jobs).where(jobs.c.id == job_id, jobs.c.owner == owner, self._alive())
            ).first()
            return self._record(conn, row) if row is not None else None

    def owned_by(
        self, owner: str, *, limit: int, before: tuple[float, str] | None = None
    ) -> list[JobRecord]:
        """`owner`'s jobs, newest first; `before` is the (created_at, id) of the last one seen."""
        query = select(jobs).where(jobs.c.owner == owner, self._alive())
        if before is not None:
            created_at, job_id = before
            query = query.where(
                or_(
                    jobs.c.created_at < created_at,
                    and_(jobs.c.created_at == created_at, jobs.c.id < job_id),
                )
            )
        query = query.order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [self._record(conn, row) for row in conn.execute(query)]

    def image(self, token: str) -> StoredImage | None:
        query = (
            select(images.c.data, images.c.media_type, images.c.seed, images.c.job_id)
            .join(jobs, jobs.c.id == images.c.job_id)
            .where(images.c.token == token, self._alive())
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None:
            return None
        return StoredImage(
            data=row.data, media_type=row.media_type, seed=row.seed, job_id=row.job_id
        )

    # -- what clients change ---------------------------------------------------------------------

    def cancel(self, job_id: str, owner: str) -> JobRecord | None:
        """A queued job is cancelled now; a running one is asked to stop at its next step (the
        replica running it sees the request at its next heartbeat). A finished job stays as it
        is."""
        now = self.clock()
        with self.engine.begin() as conn:
            owned = and_(jobs.c.id == job_id, jobs.c.owner == owner, self._alive())
            conn.execute(
                update(jobs)
                .where(owned, jobs.c.status == JobStatus.QUEUED.value)
                .values(
                    status=JobStatus.CANCELLED.value,
                    finished_at=now,
                    expires_at=now + self.ttl,
                    error_message="cancelled before it ran",
                    error_code="cancelled",
                )
            )
            conn.execute(
                update(jobs)
                .where(owned, jobs.c.status == JobStatus.RUNNING.value)
                .values(cancel_requested=True)
            )
        return self.get(job_id, owner)

    def delete(self, job_id: str, owner: str) -> bool:
        """Forget the job and its images. A running job stops at its replica's next heartbeat,
        which finds the row gone."""
        with self.engine.begin() as conn:
            result = conn.execute(
                delete(jobs).where(jobs.c.id == job_id, jobs.c.owner == owner, self._alive())
            )
            if result.rowcount == 0:
                return False
            conn.execute(delete(images).where(images.c.job_id == job_id))
        return True

    # -- the runner ------------------------------------------------------------------------------

    def claim_next(self, replica: str) -> JobRecord | None:
        """Mark the oldest queued job running on `replica` and return it, or None."""
        for _ in range(5):  # another replica (or thread) may win the row; try the next one
            now = self.clock()
            with self.engine.begin() as conn:
                query = (
                    select(jobs.c.id)
                    .where(jobs.c.status == JobStatus.QUEUED.value)
                    .order_by(jobs.c.created_at, jobs.c.id)
                    .limit(1)
                )
                if self._skip_locked:
                    query = query.with_for_update(skip_locked=True)
                job_id = conn.execute(query).scalar()
                if job_id is None:
                    return None
                claimed = conn.execute(
                    update(jobs)
                    .where(jobs.c.id == job_id, jobs.c.status == JobStatus.QUEUED.value)
                    .values(
                        status=JobStatus.RUNNING.value,
                        started_at=now,
                        claimed_by=replica,
                        heartbeat_at=now,
                        progress_step=0,
                        progress_total=None,
                    )
                ).rowcount
            record = self.get_any(job_id) if claimed else None
            if record is not None:  # (None: deleted between the claim and this read)
                return record
        return None

    def release(self, job_id: str, replica: str | None = None) -> None:
        """Put a claimed job back at its place in the queue (its creation time is kept), for a
        replica that could not start it or is shutting down. A job whose owner asked it to stop
        ends cancelled instead of running again. With `replica`, only while that replica still
        holds the claim (another may have taken the job over)."""
        with self.engine.begin() as conn:
            self._give_back(conn, self._held(job_id, replica))

    def set_progress(self, job_id: str, step: int, total: int, replica: str | None = None) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(jobs)
                .where(self._held(job_id, replica), jobs.c.status == JobStatus.RUNNING.value)
                .values(progress_step=step, progress_total=total)
            )

    def heartbeat(self, replica: str, job_ids: Iterable[str]) -> set[str]:
        """Renew `replica`'s claim on its running jobs; returns those it should stop: asked to
        cancel, deleted, or no longer its own."""
        ids = list(job_ids)
        if not ids:
            return set()
        with self.engine.begin() as conn:
            conn.execute(
                update(jobs)
                .where(jobs.c.id.in_(ids), jobs.c.claimed_by == replica)
                .values(heartbeat_at=self.clock())
            )
            keep = {
                row.id
                for row in conn.execute(
                    select(jobs.c.id).where(
                        jobs.c.id.in_(ids),
                        jobs.c.claimed_by == replica,
                        jobs.c.status == JobStatus.RUNNING.value,
                        jobs.c.cancel_requested.is_(False),
                    )
                )
            }
        return set(ids) - keep

    def requeue_stale(self, older_than: float) -> list[str]:
        """Running jobs whose replica has not renewed its claim since `older_than` go back to
        the queue: that replica crashed. Returns their ids. Those whose owner asked them to stop
        end cancelled instead."""
        with self.engine.begin() as conn:
            return self._give_back(
                conn, or_(jobs.c.heartbeat_at.is_(None), jobs.c.heartbeat_at < older_than)
            )

    def succeed(self, job_id: str, files: Sequence[NewImage], replica: str | None = None) -> bool:
        """Store the images and mark the job succeeded, in one transaction; False when the job
        was cancelled, deleted or taken over meanwhile (nothing is stored then)."""
        now = self.clock()
        with self.engine.begin() as conn:
            done = conn.execute(
                update(jobs)
                .where(
                    self._held(job_id, replica),
                    jobs.c.status == JobStatus.RUNNING.value,
                    jobs.c.cancel_requested.is_(False),
                )
                .values(
                    status=JobStatus.SUCCEEDED.value,
                    finished_at=now,
                    expires_at=now + self.ttl,
                    progress_step=None,
                    progress_total=None,
                )
            ).rowcount
            if not done:
                return False
            self._insert_images(conn, job_id, files)
        return True

    def finish_unsuccessfully(
        self,
        job_id: str,
        status: JobStatus,
        message: str,
        code: str,
        replica: str | None = None,
    ) -> bool:
        """Mark a running job failed or cancelled, with the reason a client reads."""
        now = self.clock()
        with self.engine.begin() as conn:
            return bool(
                conn.execute(
                    update(jobs)
                    .where(self._held(job_id, replica), jobs.c.status == JobStatus.RUNNING.value)
                    .values(
                        status=status.value,
                        finished_at=now,
                        expires_at=now + self.ttl,
                        error_message=message,
                        error_code=code,
                        progress_step=None,
                        progress_total=None,
                    )
                ).rowcount
            )

    def get_any(self, job_id: str) -> JobRecord | None:
        """The job whoever owns it (for the runner and webhooks), unless expired."""
        with self.engine.connect() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id, self._alive())).first()
            return self._record(conn, row) if row is not None else None

    def webhooks_pending(self) -> list[JobRecord]:
        """Finished jobs whose webhook was not delivered yet (the service stopped meanwhile)."""
        finished = [status.value for status in JobStatus if status.finished]
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(jobs).where(
                    jobs.c.webhook_status == WebhookStatus.PENDING.value,
                    jobs.c.status.in_(finished),
                    self._alive(),
                )
            )
            return [self._record(conn, row) for row in rows]

    def set_webhook_status(self, job_id: str, status: WebhookStatus) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(jobs).where(jobs.c.id == job_id).values(webhook_status=status.value)
            )

    def purge_expired(self) -> int:
        """Delete expired jobs and their images; returns how many jobs went."""
        now = self.clock()
        with self.engine.begin() as conn:
            expired = select(jobs.c.id).where(jobs.c.expires_at <= now)
            conn.execute(delete(images).where(images.c.job_id.in_(expired)))
            return conn.execute(delete(jobs).where(jobs.c.expires_at <= now)).rowcount

    # -- internals -------------------------------------------------------------------------------

    def _give_back(self, conn: Connection, which: Any) -> list[str]:
        """Take the running jobs `which` selects off their replica: queued again at their place,
        or cancelled if their owner asked (else a restart would run them again). Returns the ids
        queued again."""
        now = self.clock()
        running = and_(which, jobs.c.status == JobStatus.RUNNING.value)
        conn.execute(
            update(jobs)
            .where(running, jobs.c.cancel_requested.is_(True))
            .values(
                status=JobStatus.CANCELLED.value,
                finished_at=now,
                expires_at=now + self.ttl,
                error_message="cancelled while running",
                error_code="cancelled",
                progress_step=None,
                progress_total=None,
            )
        )
        requeued = conn.execute(
            update(jobs)
            .where(running)
            .values(
                status=JobStatus.QUEUED.value,
                started_at=None,
                claimed_by=None,
                heartbeat_at=None,
                progress_step=None,
                progress_total=None,
            )
            .returning(jobs.c.id)
        )
        return [row.id for row in requeued]

    def _held(self, job_id: str, replica: str | None) -> Any:
        """The job, and with `replica` only while that replica holds its claim."""
        if replica is None:
            return jobs.c.id == job_id
        return and_(jobs.c.id == job_id, jobs.c.claimed_by == replica)

    def _alive(self) -> Any:
        return or_(jobs.c.expires_at.is_(None), jobs.c.expires_at > self.clock())

    def _new_row(self, job_id: str, new: NewJob, status: str) -> dict[str, Any]:
        return {
            "id": job_id,
            "owner": new.owner,
            "api": new.api,
            "status": status,
            "created_at": self.clock(),
            "request": json.dumps(new.request),
            "base_url": new.base_url,
            "webhook": new.webhook,
            "webhook_status": WebhookStatus.PENDING.value if new.webhook else None,
            "cancel_requested": False,
        }

    def _insert_images(self, conn: Connection, job_id: str, files: Sequence[NewImage]) -> None:
        if not files:
            return
        conn.execute(
            insert(images),
            [
                {
                    "token": secrets.token_urlsafe(_TOKEN_BYTES),
                    "job_id": job_id,
                    "idx": file.index,
                    "seed": file.seed,
                    "format": file.image_format,
                    "media_type": file.media_type,
                    "data": file.data,
                }
                for file in files
            ],
        )

    def _get(self, job_id: str) -> JobRecord:
        record = self.get_any(job_id)
        if record is None:  # just written in a committed transaction
            raise LookupError(job_id)
        return record

    def _record(self, conn: Connection, row: Row[Any]) -> JobRecord:
        image_rows = conn.execute(
            select(images.c.token, images.c.idx, images.c.seed, images.c.format)
            .where(images.c.job_id == row.id)
            .order_by(images.c.idx)
        )
        return JobRecord(
            id=row.id,
            owner=row.owner,
            api=row.api,
            status=JobStatus(row.status),
            created_at=row.created_at,
            request=json.loads(row.request),
            base_url=row.base_url,
            started_at=row.started_at,
            finished_at=row.finished_at,
            expires_at=row.expires_at,
            progress_step=row.progress_step,
            progress_total=row.progress_total,
            error_message=row.error_message,
            error_code=row.error_code,
            webhook=row.webhook,
            webhook_status=WebhookStatus(row.webhook_status) if row.webhook_status else None,
            cancel_requested=bool(row.cancel_requested),
            images=tuple(
                ImageRecord(
                    token=image.token, index=image.idx, seed=image.seed, image_format=image.format
                )
                for image in image_rows
            ),
        )

"""The schema, in SQLAlchemy Core so that one definition serves SQLite and PostgreSQL.

Images live in the database beside their job, not in files: every replica can read them, a job
and its images are deleted in one transaction, and a full disk fails one write, not a half-made
job. Times are Unix seconds.
"""

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

jobs = Table(
    "ovis_jobs",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("owner", String(64), nullable=False),
    Column("api", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("expires_at", Float),
    Column("request", Text, nullable=False),  # JSON
    Column("base_url", Text, nullable=False),
    Column("progress_step", Integer),
    Column("progress_total", Integer),
    Column("error_message", Text),
    Column("error_code", String(64)),
    Column("webhook", Text),
    Column("webhook_status", String(16)),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    # Which replica runs the job, and when it last said it still does: a replica that died
    # stops renewing, and another puts the job back in the queue.
    Column("claimed_by", String(128)),
    Column("heartbeat_at", Float),
    # The next free thread takes the oldest queued job.
    Index("ovis_jobs_queue", "status", "created_at"),
    # `GET /jobs` lists one owner's jobs, newest first.
    Index("ovis_jobs_owner", "owner", "created_at"),
    Index("ovis_jobs_expiry", "expires_at"),
)

images = Table(
    "ovis_images",
    metadata,
    Column("token", String(64), primary_key=True),
    Column("job_id", String(64), nullable=False, index=True),
    Column("idx", Integer, nullable=False),
    Column("seed", BigInteger, nullable=False),
    Column("format", String(8), nullable=False),
    Column("media_type", String(32), nullable=False),
    Column("data", LargeBinary, nullable=False),
)

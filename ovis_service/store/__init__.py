"""The job store: async jobs and their images in a real database, so that work outlives its
connection, a restart and, with PostgreSQL, any one replica.

- `records`   what a job and an image are, as the rest of the service sees them
- `tables`    the SQL schema (SQLAlchemy Core), the same on SQLite and PostgreSQL
- `database`  opening the database: SQLite in OVIS_DATA_DIR, or OVIS_DATABASE_URL
- `job_store` every read and write the service makes, one transaction each
"""

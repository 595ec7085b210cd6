"""The inference worker: a pool of threads, one per pipeline, over one bounded queue.

- `pool`    `InferencePool`: the queue, admission, the snapshot, Retry-After, start and stop
- `thread`  `InferenceThread`: one engine's load, loop, jobs and step hooks, and its release
- `types`   jobs and outcomes, states and snapshots, the observer metrics plug into
"""

"""How long a new job would wait: the Retry-After a refused client is told.

A denoising step costs roughly the same per pixel at a given image size, so recent jobs are
summarised as seconds per step per megapixel (total seconds over total step-megapixels of the
last few jobs, so big jobs weigh more than small ones). The work ahead of a new job is the steps
times the pixels of every queued job, plus the steps the running jobs have left; the threads
share it, so it is divided by their number. Attention grows faster than the pixel count, so this
is an estimate, not a promise: it errs low for a queue of images far larger than recent ones.
"""

import math
from collections import deque

MEGAPIXEL = 1_000_000
# Before any job has finished: Ovis-Image-7B's published figure, about 13.5 s for 50 steps at
# 1024x1024 on one H100, which is about 0.26 s per step per megapixel.
PRIOR_SECONDS_PER_STEP_MEGAPIXEL = 0.26
_RECENT_JOBS = 20


def step_pixels(steps: int, width: int, height: int) -> int:
    """The amount of work in `steps` denoising steps of a `width` x `height` image."""
    return steps * width * height


class WaitEstimator:
    """Not thread-safe: the worker calls it under its own lock."""

    def __init__(self, prior: float = PRIOR_SECONDS_PER_STEP_MEGAPIXEL) -> None:
        self._prior = prior
        self._recent: deque[tuple[float, int]] = deque(maxlen=_RECENT_JOBS)

    def record(self, seconds: float, work: int) -> None:
        """A finished job: its generation time and its `step_pixels`."""
        if work > 0:
            self._recent.append((seconds, work))

    def seconds_per_step_megapixel(self) -> float:
        work = sum(work for _, work in self._recent)
        if work == 0:
            return self._prior
        return sum(seconds for seconds, _ in self._recent) / work * MEGAPIXEL

    def seconds_for(self, work_ahead: int, threads: int) -> int:
        """Whole seconds (at least 1) until `work_ahead` step-pixels are done by `threads`."""
        seconds = self.seconds_per_step_megapixel() * work_ahead / MEGAPIXEL / max(1, threads)
        # Rounded first, so that float noise (18.000000000004) does not add a second.
        return max(1, math.ceil(round(seconds, 6)))

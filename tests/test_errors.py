"""Each error carries its own answer: the status, OpenAI's `code` and the reject reason are class
attributes, which the exception handler (tests/api/test_errors.py), the pool and the streams read,
never the message."""

import pytest

from ovis_service.errors import (
    BadRequestError,
    DeadlineExceededError,
    JobCancelledError,
    ModelLoadingError,
    NotReadyError,
    OutOfMemoryError,
    OverloadedError,
    ServiceError,
    ShuttingDownError,
    UnauthorizedError,
)


@pytest.mark.parametrize(
    ("error_class", "status", "code", "reason"),
    [
        (BadRequestError, 422, None, None),
        (UnauthorizedError, 401, "invalid_api_key", None),
        (OverloadedError, 503, "queue_full", "queue_full"),
        (OutOfMemoryError, 503, "out_of_memory", "out_of_memory"),
        (NotReadyError, 503, "model_not_ready", None),
        (ModelLoadingError, 503, "model_not_ready", "loading"),
        (ShuttingDownError, 503, "shutting_down", "shutting_down"),
        (DeadlineExceededError, 504, "timeout", "deadline"),
        (JobCancelledError, 499, None, None),
    ],
)
def test_each_error_knows_its_status_code_and_reason(
    error_class: type[ServiceError], status: int, code: str | None, reason: str | None
) -> None:
    error = error_class("whatever the words")
    assert (error.status_code, error.openai_code, error.reject_reason) == (status, code, reason)

"""The errors a client may see and the one table that maps them to gRPC codes and HTTP statuses.

Shared by the server (which raises these) and clients (which map answers back to codes).

TF Serving's own mapping is used: INVALID_ARGUMENT->400, NOT_FOUND->404,
RESOURCE_EXHAUSTED->429, UNAVAILABLE->503, DEADLINE_EXCEEDED->504, UNIMPLEMENTED->501,
FAILED_PRECONDITION->400, anything else INTERNAL->500 with a generic message.
"""

from __future__ import annotations

import enum


class StatusCode(enum.Enum):
    """gRPC status codes we use; values are grpc.StatusCode names (no grpc import needed)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    INTERNAL = "INTERNAL"


# The table, written out both ways.
GRPC_TO_HTTP: dict[StatusCode, int] = {
    StatusCode.INVALID_ARGUMENT: 400,
    StatusCode.FAILED_PRECONDITION: 400,
    StatusCode.UNAUTHENTICATED: 401,
    StatusCode.NOT_FOUND: 404,
    StatusCode.RESOURCE_EXHAUSTED: 429,
    StatusCode.UNIMPLEMENTED: 501,
    StatusCode.UNAVAILABLE: 503,
    StatusCode.DEADLINE_EXCEEDED: 504,
    StatusCode.INTERNAL: 500,
}
HTTP_TO_GRPC: dict[int, StatusCode] = {
    400: StatusCode.INVALID_ARGUMENT,
    401: StatusCode.UNAUTHENTICATED,
    404: StatusCode.NOT_FOUND,
    413: StatusCode.RESOURCE_EXHAUSTED,
    429: StatusCode.RESOURCE_EXHAUSTED,
    501: StatusCode.UNIMPLEMENTED,
    503: StatusCode.UNAVAILABLE,
    504: StatusCode.DEADLINE_EXCEEDED,
    500: StatusCode.INTERNAL,
}

GENERIC_INTERNAL_MESSAGE = "internal error; see the server log"


class ServingError(Exception):
    """Base of every error a client may see; carries its gRPC code."""

    code: StatusCode = StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def http_status(self) -> int:
        return GRPC_TO_HTTP[self.code]


class InvalidArgumentError(ServingError):
    code = StatusCode.INVALID_ARGUMENT


class NotFoundError(ServingError):
    code = StatusCode.NOT_FOUND


class ResourceExhaustedError(ServingError):
    code = StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, limit: str = "", retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.limit = limit  # which limit refused it (metrics count refusals by it)
        self.retry_after_s = retry_after_s  # set when waiting helps (a full budget): Retry-After


class UnavailableError(ServingError):
    code = StatusCode.UNAVAILABLE


class DeadlineExceededError(ServingError):
    code = StatusCode.DEADLINE_EXCEEDED


class UnimplementedError(ServingError):
    code = StatusCode.UNIMPLEMENTED


class FailedPreconditionError(ServingError):
    code = StatusCode.FAILED_PRECONDITION


class UnauthenticatedError(ServingError):
    code = StatusCode.UNAUTHENTICATED


_BY_CODE: dict[StatusCode, type[ServingError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        ResourceExhaustedError,
        UnavailableError,
        DeadlineExceededError,
        UnimplementedError,
        FailedPreconditionError,
        UnauthenticatedError,
    )
}


def error_for_code(code_name: str, message: str) -> ServingError:
    """The domain error for a gRPC code name (e.g. from a backend's RpcError)."""
    try:
        code = StatusCode(code_name)
    except ValueError:
        code = StatusCode.INTERNAL
    return _BY_CODE.get(code, ServingError)(message)


def to_status(exc: BaseException) -> tuple[StatusCode, int, str]:
    """(gRPC code, HTTP status, client-safe message) for any exception."""
    if isinstance(exc, ServingError):
        return exc.code, exc.http_status, exc.message
    return StatusCode.INTERNAL, 500, GENERIC_INTERNAL_MESSAGE

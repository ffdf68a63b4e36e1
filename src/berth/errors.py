"""Berth's domain errors: a small tree, mapped to HTTP in one place (`berth.http.error_response`).

    BerthError (error_code, http_status)
    ├── InvalidParameterValue   400 INVALID_PARAMETER_VALUE
    ├── BadRequest              400 BAD_REQUEST (also: JSON nested too deep, too many rows)
    ├── MalformedRequest        400 MALFORMED_REQUEST (body is not JSON)
    ├── InvalidState            400 INVALID_STATE   (served entities failed; not retryable)
    ├── Unauthenticated         401 UNAUTHENTICATED
    ├── PermissionDenied        403 PERMISSION_DENIED
    ├── ResourceDoesNotExist    404 RESOURCE_DOES_NOT_EXIST
    ├── ResourceAlreadyExists   409 RESOURCE_ALREADY_EXISTS
    ├── ResourceConflict        409 RESOURCE_CONFLICT
    ├── PayloadTooLarge         413 PAYLOAD_TOO_LARGE (body over BERTH_MAX_BODY_MB; berth.payload)
    ├── HeadersTooLarge         431 REQUEST_HEADER_FIELDS_TOO_LARGE (headers over BERTH_MAX_HEADER_KB)
    ├── RequestLimitExceeded    429 REQUEST_LIMIT_EXCEEDED (a rate limit; carries Retry-After)
    ├── ResourceExhausted       429 RESOURCE_EXHAUSTED (concurrency and queue full; carries Retry-After)
    ├── ClientCancelled         499 CANCELLED (the client left while its request was queued)
    ├── TemporarilyUnavailable  503 TEMPORARILY_UNAVAILABLE (carries Retry-After)
    ├── DeadlineExceeded        504 DEADLINE_EXCEEDED
    └── InternalError           500 INTERNAL_ERROR

No HTTP library is imported here: the gateway and the control plane turn these into responses.
"""

from __future__ import annotations


class BerthError(Exception):
    """Base of every error Berth reports to a client."""

    error_code = "INTERNAL_ERROR"
    http_status = 500

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    def to_dict(self) -> dict[str, str]:
        return {"error_code": self.error_code, "message": self.message}


class InvalidParameterValue(BerthError):
    error_code = "INVALID_PARAMETER_VALUE"
    http_status = 400


class BadRequest(BerthError):
    error_code = "BAD_REQUEST"
    http_status = 400


class InvalidState(BerthError):
    """The endpoint cannot serve: its served entities failed. 400, so clients do not retry."""

    error_code = "INVALID_STATE"
    http_status = 400


class MalformedRequest(BerthError):
    error_code = "MALFORMED_REQUEST"
    http_status = 400


class Unauthenticated(BerthError):
    error_code = "UNAUTHENTICATED"
    http_status = 401


class PermissionDenied(BerthError):
    error_code = "PERMISSION_DENIED"
    http_status = 403


class ResourceDoesNotExist(BerthError):
    error_code = "RESOURCE_DOES_NOT_EXIST"
    http_status = 404


class ResourceAlreadyExists(BerthError):
    error_code = "RESOURCE_ALREADY_EXISTS"
    http_status = 409


class ResourceConflict(BerthError):
    error_code = "RESOURCE_CONFLICT"
    http_status = 409


class PayloadTooLarge(BerthError):
    """The request body is over the size limit (`berth.payload`)."""

    error_code = "PAYLOAD_TOO_LARGE"
    http_status = 413


class HeadersTooLarge(BerthError):
    """A request header, or all of them together, are over the size limit (`berth.payload`)."""

    error_code = "REQUEST_HEADER_FIELDS_TOO_LARGE"
    http_status = 431


class RequestLimitExceeded(BerthError):
    """A rate limit's window is full (carries Retry-After: when the oldest admission leaves it)."""

    error_code = "REQUEST_LIMIT_EXCEEDED"
    http_status = 429


class ResourceExhausted(BerthError):
    """The served entity's provisioned concurrency and its bounded queue are full (carries Retry-After)."""

    error_code = "RESOURCE_EXHAUSTED"
    http_status = 429


class ClientCancelled(BerthError):
    """The client went away before its request ran (the answer is recorded, never read)."""

    error_code = "CANCELLED"
    http_status = 499


class TemporarilyUnavailable(BerthError):
    error_code = "TEMPORARILY_UNAVAILABLE"
    http_status = 503

    def __init__(self, message: str, *, retry_after: int | None = 1) -> None:
        super().__init__(message, retry_after=retry_after)


class DeadlineExceeded(BerthError):
    error_code = "DEADLINE_EXCEEDED"
    http_status = 504


class InternalError(BerthError):
    error_code = "INTERNAL_ERROR"
    http_status = 500

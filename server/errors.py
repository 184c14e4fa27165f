"""Errors a service raises; the server's interceptor turns each into its gRPC status code and message."""
from __future__ import annotations

import grpc


class ServiceError(Exception):
    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    """Bad request field; the message names the field."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ServiceError):
    """The resource is in use or in the wrong state (a dataset a job reads, a model that is loaded)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(ServiceError):
    """A path that would lead out of the data root."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Unavailable(ServiceError):
    """Not ready yet, or draining: the client may retry elsewhere or later."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(ServiceError):
    code = grpc.StatusCode.INTERNAL


# A client's own deadline fires first (the server's starts when the call arrives): its cancellation can reach the
# server this long before the server's deadline. Within it, a cancelled call is counted as the deadline it was.
DEADLINE_SLACK_S = 0.1


def call_end_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """How a call that the client left ended, as the client saw it: DEADLINE_EXCEEDED or CANCELLED."""
    left = context.time_remaining()
    return grpc.StatusCode.DEADLINE_EXCEEDED if left is not None and left <= DEADLINE_SLACK_S else (
        grpc.StatusCode.CANCELLED)

"""Mesh's error tree. Services raise these; each protocol renders them in its own shape.

::

    MeshError                      (status, kind)
    ├── InvalidRequest             400 invalid_request
    │   └── ContextLengthExceeded  400 invalid_request
    ├── AuthenticationFailed       401 authentication
    ├── InsufficientCredits        402 insufficient_credits
    ├── PermissionDenied           403 permission
    ├── NotFound                   404 not_found
    │   └── ModelNotFound          404 not_found
    ├── RequestTooLarge            413 request_too_large
    ├── RateLimited                429 rate_limit
    ├── InternalError              500 internal
    ├── DatabaseUnavailable        503 unavailable       (the database cannot be reached)
    └── EngineError                502 engine            (an engine failed)
        ├── EngineUnavailable      503 unavailable       (nothing could serve)
        ├── EngineOverloaded       503 overloaded        (engine 429 / all replicas full)
        └── EngineTimeout          504 timeout

``kind`` is protocol-neutral; ``mesh.protocols.*.render_error`` maps it to a wire type.
``retry_after`` (seconds) becomes a ``retry-after`` header where set.
"""

from __future__ import annotations


class MeshError(Exception):
    status: int = 500
    kind: str = "internal"
    code: str | None = None
    headers: dict[str, str] | None = None  # more response headers (a key budget's state)

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        should_retry: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after
        self.should_retry = should_retry


class InvalidRequest(MeshError):
    status = 400
    kind = "invalid_request"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class AuthenticationFailed(MeshError):
    status = 401
    kind = "authentication"
    code = "invalid_api_key"


class InsufficientCredits(MeshError):
    status = 402
    kind = "insufficient_credits"
    code = "insufficient_credits"


class KeyBudgetExceeded(InsufficientCredits):
    """The API key's budget (not the account's balance) cannot cover the request.
    ``headers`` tell the client what is left of the budget and when it resets."""

    code = "key_budget_exceeded"

    def __init__(self, message: str, *, headers: dict[str, str]) -> None:
        super().__init__(message, should_retry=False)
        self.headers = headers


class UserBudgetExceeded(KeyBudgetExceeded):
    """The key's cap for the request's end user (``user``) cannot cover the request."""

    code = "user_budget_exceeded"


class PermissionDenied(MeshError):
    status = 403
    kind = "permission"
    code = "model_not_allowed"


class NotFound(MeshError):
    status = 404
    kind = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class RequestTooLarge(MeshError):
    status = 413
    kind = "request_too_large"
    code = "request_too_large"


class RateLimited(MeshError):
    status = 429
    kind = "rate_limit"
    code = "rate_limit_exceeded"


class InternalError(MeshError):
    status = 500
    kind = "internal"


class DatabaseUnavailable(MeshError):
    """The database could not be reached (connection refused, reset or timed out). Requests
    fail closed with this: retryable, with ``retry-after``, rendered 503 (Anthropic: 529)."""

    status = 503
    kind = "unavailable"

    def __init__(
        self, message: str = "The service is temporarily unavailable; please retry shortly.", *,
        connection_lost: bool = False,
    ) -> None:
        super().__init__(message, retry_after=DATABASE_RETRY_AFTER, should_retry=True)
        # True when a connection was had and then lost mid-transaction (a reset, a COMMIT
        # whose reply never came): the database answered a moment ago, and the transaction
        # may or may not have committed. False: no connection could be had at all.
        self.connection_lost = connection_lost


# Seconds a client is asked to wait after DatabaseUnavailable.
DATABASE_RETRY_AFTER = 5.0


class EngineError(MeshError):
    """An engine failed. ``retryable``: another replica may succeed. ``replica_fault``: the
    replica itself looks broken (unreachable, reset, timed out), which counts against its
    circuit breaker; an error the engine answered for one request (HTTP 500) does not."""

    status = 502
    kind = "engine"
    retryable = True
    replica_fault = True


class EngineUnavailable(EngineError):
    status = 503
    kind = "unavailable"


class EngineOverloaded(EngineError):
    status = 503
    kind = "overloaded"
    replica_fault = False


class EngineTimeout(EngineError):
    status = 504
    kind = "timeout"


class EngineRejected(EngineError):
    """The engine refused the request itself (a 4xx): another replica would too."""

    status = 400
    kind = "invalid_request"
    retryable = False
    replica_fault = False

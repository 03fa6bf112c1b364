"""The gateway's own refusals, in OpenAI's error shape: the SPEC error table as one table."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import orjson


class Outcome(StrEnum):
    """The ledger's `outcome` column."""

    OK = "ok"
    UPSTREAM_ERROR = "upstream_error"
    REJECTED = "rejected"
    QUEUE_TIMEOUT = "queue_timeout"
    CLIENT_DISCONNECT = "client_disconnect"
    GATEWAY_ERROR = "gateway_error"


@dataclass(frozen=True, slots=True)
class ErrorKind:
    status: int
    type: str
    code: str | None
    outcome: Outcome


INVALID_API_KEY = ErrorKind(401, "invalid_request_error", "invalid_api_key", Outcome.REJECTED)
KEY_EXPIRED = ErrorKind(401, "invalid_request_error", "key_expired", Outcome.REJECTED)
KEY_REVOKED = ErrorKind(401, "invalid_request_error", "key_revoked", Outcome.REJECTED)
MODEL_NOT_ALLOWED = ErrorKind(403, "invalid_request_error", "model_not_allowed", Outcome.REJECTED)
ENDPOINT_NOT_ALLOWED = ErrorKind(
    403, "invalid_request_error", "endpoint_not_allowed", Outcome.REJECTED
)
RATE_LIMITED_REQUESTS = ErrorKind(429, "requests", "rate_limit_exceeded", Outcome.REJECTED)
RATE_LIMITED_TOKENS = ErrorKind(429, "tokens", "rate_limit_exceeded", Outcome.REJECTED)
QUOTA_EXHAUSTED = ErrorKind(429, "insufficient_quota", "insufficient_quota", Outcome.REJECTED)
QUEUE_FULL = ErrorKind(429, "requests", "rate_limit_exceeded", Outcome.REJECTED)
QUEUE_TIMEOUT = ErrorKind(429, "requests", "rate_limit_exceeded", Outcome.QUEUE_TIMEOUT)
REQUEST_TOO_LARGE = ErrorKind(413, "invalid_request_error", "request_too_large", Outcome.REJECTED)
INVALID_JSON = ErrorKind(400, "invalid_request_error", "invalid_json", Outcome.REJECTED)
MODEL_NOT_PRICED = ErrorKind(400, "invalid_request_error", "model_not_priced", Outcome.REJECTED)
INVALID_REQUEST = ErrorKind(400, "invalid_request_error", "invalid_request", Outcome.REJECTED)
UNSUPPORTED_CONTENT_ENCODING = ErrorKind(
    415, "invalid_request_error", "unsupported_content_encoding", Outcome.REJECTED
)
REQUEST_TIMEOUT = ErrorKind(408, "invalid_request_error", "request_timeout", Outcome.REJECTED)
# Another team's object, or one the gateway has no record of: refused as if it did not exist.
OBJECT_NOT_FOUND = ErrorKind(404, "invalid_request_error", "not_found", Outcome.REJECTED)
UPSTREAM_UNAVAILABLE = ErrorKind(
    502, "upstream_error", "upstream_unavailable", Outcome.UPSTREAM_ERROR
)
UPSTREAM_TIMEOUT = ErrorKind(504, "upstream_error", "upstream_timeout", Outcome.UPSTREAM_ERROR)
# The upstream refused the gateway's own credentials: the operator's problem, not the caller's.
UPSTREAM_AUTH_FAILED = ErrorKind(
    502, "upstream_error", "upstream_auth_failed", Outcome.UPSTREAM_ERROR
)
# The shared limits backend (Redis) is unreachable and the policy is `fail_closed`.
LIMITS_UNAVAILABLE = ErrorKind(503, "server_error", "limits_unavailable", Outcome.REJECTED)
GATEWAY_FAULT = ErrorKind(500, "server_error", "gateway_error", Outcome.GATEWAY_ERROR)
NOT_FOUND = ErrorKind(404, "invalid_request_error", "unknown_url", Outcome.REJECTED)
ADMIN_UNAUTHORIZED = ErrorKind(401, "invalid_request_error", "invalid_admin_key", Outcome.REJECTED)
# The admin key API's (`/gateway/keys`).
TEAM_NOT_FOUND = ErrorKind(404, "invalid_request_error", "team_not_found", Outcome.REJECTED)
KEY_NOT_FOUND = ErrorKind(404, "invalid_request_error", "key_not_found", Outcome.REJECTED)
KEY_EXISTS = ErrorKind(409, "invalid_request_error", "key_exists", Outcome.REJECTED)
KEY_MANAGED_BY_CONFIG = ErrorKind(
    409, "invalid_request_error", "key_managed_by_config", Outcome.REJECTED
)
KEY_IS_REVOKED = ErrorKind(409, "invalid_request_error", "key_revoked", Outcome.REJECTED)
KEY_STORE_UNAVAILABLE = ErrorKind(503, "server_error", "key_store_unavailable", Outcome.REJECTED)


class GatewayError(Exception):
    """A refusal or failure the gateway answers itself."""

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        param: str | None = None,
        retry_after_s: int | None = None,
        limit: str | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s
        self.limit = limit  # the limit that refused (its config name), for the ledger

    def body(self) -> bytes:
        return error_body(self.kind, self.message, self.param)


def error_body(kind: ErrorKind, message: str, param: str | None = None) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": kind.type, "param": param, "code": kind.code}}
    )

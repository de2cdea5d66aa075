"""Bearer-key checks for the gateway's HTTP API.

- /v1 inference routes (chat, completions, models): when an API key is configured, the request must carry
  `Authorization: Bearer <api key>` (the admin key is accepted too). No API key configured: open.
- /v1/adapters* (admin): the admin key only. A valid API key there is 403 (admin_key_required); no admin key
  configured: the admin API is disabled (403).
- /healthz and /readyz: never checked (probes).
Keys are compared with hmac.compare_digest.
"""
from __future__ import annotations

import hmac

from aiohttp import web

from shared.openai_protocol import OpenAIError

ADMIN_PREFIX = "/v1/adapters"


def _matches(token: str, key: str | None) -> bool:
    return key is not None and hmac.compare_digest(token.encode(), key.encode())


def bearer_token(request: web.Request) -> str | None:
    """The key of `Authorization: Bearer <key>`, or None when the header is missing or another scheme."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _missing() -> OpenAIError:
    return OpenAIError("You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
                       status=401, code="missing_api_key")


def _invalid() -> OpenAIError:
    return OpenAIError("Incorrect API key provided.", status=401, code="invalid_api_key")


def check_admin(token: str | None, api_key: str | None, admin_key: str | None) -> None:
    """Raise OpenAIError unless `token` is the admin key."""
    if admin_key is None:
        raise OpenAIError("adapter admin is disabled (no admin key configured)", status=403,
                          code="admin_disabled")
    if token is None:
        raise _missing()
    if _matches(token, admin_key):
        return
    if _matches(token, api_key):
        raise OpenAIError("this route needs the admin key, not the API key", status=403,
                          code="admin_key_required")
    raise _invalid()


def check_inference(token: str | None, api_key: str | None, admin_key: str | None) -> None:
    """Raise OpenAIError unless no API key is configured or `token` is the API key or the admin key."""
    if api_key is None:
        return
    if token is None:
        raise _missing()
    if not (_matches(token, api_key) or _matches(token, admin_key)):
        raise _invalid()


def auth_middleware(api_key: str | None, admin_key: str | None):
    """An aiohttp middleware applying the rules above (errors raised as OpenAIError for the error middleware)."""

    @web.middleware
    async def middleware(request: web.Request, handler):
        path = request.path
        if path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/"):
            check_admin(bearer_token(request), api_key, admin_key)
        elif path.startswith("/v1/") or path == "/v1":
            check_inference(bearer_token(request), api_key, admin_key)
        return await handler(request)

    return middleware

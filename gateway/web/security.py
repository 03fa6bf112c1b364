"""Security headers on the gateway's own answers: the portal, `/gateway/*`, the organization
usage and costs APIs, `/metrics` and the health checks.

Proxied `/v1/*` answers are the upstream's and are relayed unchanged: the hook only looks at
the request path (one prefix check), so the proxy's hot path does no other work.
"""

from __future__ import annotations

from aiohttp import web

# The portal is one HTML page, one script and one stylesheet, all served from /portal/: nothing
# inline, nothing from elsewhere, never framed. Charts are SVG built with DOM calls; a
# `data:` image is the only thing the page may show that it did not fetch from itself.
PORTAL_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
# The gateway answers these `/v1/` paths itself (SPEC "HTTP surface"); every other `/v1/` path
# is the upstream's answer.
_OWN_V1 = ("/v1/organization/usage/", "/v1/organization/costs")


def is_gateway_answer(path: str) -> bool:
    """True for a path the gateway answers itself, False for a proxied `/v1/*` one."""
    if not path.startswith("/v1/"):
        return True
    return path.startswith(_OWN_V1[0]) or path == _OWN_V1[1] or path.startswith(_OWN_V1[1] + "/")


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare` hook: nosniff and no-store on the gateway's own answers, and the
    portal's Content-Security-Policy on everything served under /portal."""
    path = request.path
    if not is_gateway_answer(path):
        return
    headers = response.headers
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Cache-Control"] = "no-store"
    if path == "/portal" or path.startswith("/portal/"):
        headers["Content-Security-Policy"] = PORTAL_CSP
        headers["Referrer-Policy"] = "no-referrer"

"""ASGI middleware that adds the X-RateLimit-* headers to successful responses.

The authentication dependency stores the state of the caller's request limit
in the request state. Error responses for a reached limit carry their own
headers, so the middleware leaves them alone.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from secapi.core.ratelimit import LimitStatus

HEADER_NAMES = (b"x-ratelimit-limit", b"x-ratelimit-remaining", b"x-ratelimit-reset")


class RateLimitHeadersMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = scope.get("state", {}).get("rate_limit")
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                if isinstance(status, LimitStatus) and not present & set(HEADER_NAMES):
                    values = (status.limit, max(0, status.remaining), status.reset_at)
                    headers += [
                        (name, str(value).encode())
                        for name, value in zip(HEADER_NAMES, values, strict=True)
                    ]
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)

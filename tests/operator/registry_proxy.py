"""A registry that demands credentials: an HTTP Basic auth gate in front of the bed's registry.

The bed's registry has no authentication, and registry auth failures must
come from a real registry conversation, so tests put this gate in front of
it. Requests without the right `Authorization` header get 401 with a
`WWW-Authenticate: Basic` challenge, as a registry with htpasswd auth
answers; the others are forwarded unchanged. It binds 127.0.0.1 only.
"""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass

import aiohttp
from aiohttp import web

# Response headers a registry client needs to see from the upstream response.
FORWARDED_HEADERS = (
    "Content-Type",
    "Docker-Content-Digest",
    "Docker-Distribution-Api-Version",
    "Location",
    "Range",
    "ETag",
)


@dataclass
class AuthRegistry:
    """A running gate; `address` is `127.0.0.1:PORT`."""

    address: str
    username: str
    password: str
    runner: web.AppRunner
    session: aiohttp.ClientSession

    async def close(self) -> None:
        await self.runner.cleanup()
        await self.session.close()

    def docker_config(self) -> str:
        """Return a docker config.json that contains this gate's credentials."""
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return json.dumps({"auths": {self.address: {"auth": token}}})


async def start_auth_registry(upstream: str) -> AuthRegistry:
    """Start a gate in front of `upstream` (`127.0.0.1:PORT`) on a free loopback port."""
    username = "scanner"
    password = secrets.token_hex(12)
    expected = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
    session = aiohttp.ClientSession(auto_decompress=False)

    async def forward(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != expected:
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
                status=401,
                headers={"WWW-Authenticate": 'Basic realm="secapi-test"'},
            )
        # A HEAD gets the response of a GET, so aiohttp sends the real Content-Length without a body.
        method = "GET" if request.method == "HEAD" else request.method
        async with session.request(
            method,
            f"http://{upstream}{request.rel_url}",
            headers={
                key: value
                for key, value in request.headers.items()
                if key.lower() in ("accept", "range")
            },
            allow_redirects=False,
        ) as answer:
            body = await answer.read()
            headers = {
                key: answer.headers[key] for key in FORWARDED_HEADERS if key in answer.headers
            }
            return web.Response(status=answer.status, body=body, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return AuthRegistry(
        address=f"127.0.0.1:{port}",
        username=username,
        password=password,
        runner=runner,
        session=session,
    )

"""How a batch's line runs: through the server's own app, in-process, as the batch's tenant.

The line's url and body go to the same ASGI app that serves HTTP (httpx's ASGITransport, no socket), so routing,
validation, admission (the tenant's concurrency and token rate), the engine path and the error mapping are the live
route's own: a line's response is byte for byte what the route answers. The caller rides in the ASGI scope
(server.auth.BATCH_CALLER), which only this process can set, so no header can claim to be a batch or a tenant; the
route's Job reads `principal.batch` and marks the engine requests `priority="batch"`.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from server.auth import BATCH_CALLER, Principal


@dataclass
class Answer:
    status: int
    body: object                  # the route's JSON
    retry_after: float | None     # seconds, on a 429 or 503


class AsCaller:
    """ASGI wrapper: every call through it is made by `principal`."""

    def __init__(self, app, principal: Principal):
        self.app, self.principal = app, principal

    async def __call__(self, scope, receive, send):
        await self.app({**scope, BATCH_CALLER: self.principal}, receive, send)


class InProcess:
    """Runs lines of one batch; `aclose` when the batch is done."""

    def __init__(self, app, principal: Principal):
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=AsCaller(app, principal)),
                                        base_url="http://batch.internal", timeout=None)

    async def __call__(self, url: str, body: dict) -> Answer:
        r = await self.client.post(url, json=body)
        try:
            data = r.json()
        except ValueError:
            data = {"error": {"type": "internal", "message": "the route answered without JSON"}}
        retry = r.headers.get("retry-after")
        return Answer(r.status_code, data, float(retry) if retry and retry.isdigit() else None)

    async def aclose(self) -> None:
        await self.client.aclose()

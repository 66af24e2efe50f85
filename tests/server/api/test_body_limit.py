"""The one body cap (server/api/body_limit.py) in both of its places: the middleware on JSON bodies and a route's own
limit on uploads. Declared and chunked (undeclared) bodies are refused alike: 413 `payload_too_large` in the one
error shape, with what was expected and what was found; multipart passes the middleware (uploads have their own)."""

from __future__ import annotations

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from pydantic import BaseModel

from server.api.body_limit import BodyLimit, limited
from server.api.errors import install_error_handlers

LIMIT, UPLOAD_LIMIT = 100, 300


class Body(BaseModel):
    text: str


@pytest.fixture(scope="module")
def client():
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/json")
    def json_route(body: Body) -> dict:  # FastAPI reads and parses this body itself
        return {"n": len(body.text)}

    @app.post("/upload")
    async def upload_route(request: Request) -> dict:
        return {"n": len(await limited(request, UPLOAD_LIMIT).body())}

    app.add_middleware(BodyLimit, limit=LIMIT)
    with TestClient(app) as c:
        yield c


def refused(r, message: str) -> None:
    assert r.status_code == 413, r.text
    assert r.json() == {"error": {"type": "payload_too_large", "message": message}}


def chunked(data: bytes, size: int = 16):  # a generator body: sent without Content-Length
    for i in range(0, len(data), size):
        yield data[i:i + size]


def test_json_body_under_and_over_the_cap(client):
    assert client.post("/json", json={"text": "x" * 50}).json() == {"n": 50}
    body = b'{"text": "' + b"x" * 200 + b'"}'
    refused(client.post("/json", content=body, headers={"Content-Type": "application/json"}),
            f"request body expected at most {LIMIT} bytes, found {len(body)}")
    refused(client.post("/json", content=chunked(body), headers={"Content-Type": "application/json"}),
            f"request body expected at most {LIMIT} bytes, found more")


def test_a_route_limit_on_uploads(client):
    multipart = {"Content-Type": "multipart/form-data; boundary=x"}  # passes the middleware's smaller cap
    assert client.post("/upload", content=b"y" * 250, headers=multipart).json() == {"n": 250}
    refused(client.post("/upload", content=b"y" * 400, headers=multipart),
            f"upload expected at most {UPLOAD_LIMIT} bytes, found 400")
    refused(client.post("/upload", content=chunked(b"y" * 400), headers=multipart),
            f"upload expected at most {UPLOAD_LIMIT} bytes, found more")

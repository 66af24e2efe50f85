"""Tenant isolation: read, list, use, export, delete x own, another tenant's private, public — every endpoint.

Another tenant's private task must be indistinguishable from a missing one (404), on the native and the OpenAI
endpoints alike; a public task is usable by all but changed only by its owner or an admin.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from .conftest import ACME, ADMIN, GLOBEX, METERED, assert_error, live_server, native_soft_prompt, pack, upload

LABELS = [{"name": "yes", "verbalizer": " yes"}, {"name": "no", "verbalizer": " no"}]


@pytest.fixture(scope="module")
def server(module_tmp):
    with live_server(module_tmp) as s:
        with s.client(ACME) as acme, s.client(GLOBEX) as globex:
            soft = pack(native_soft_prompt("prompt_tuning", T=2, seed=3, labels=LABELS))
            for client, task, visibility in ((acme, "acme-own", "private"), (globex, "globex-private", "private"),
                                             (globex, "globex-public", "public")):
                r = upload(client, task, soft, {"visibility": visibility})
                assert r.status_code == 201 and r.json()["visibility"] == visibility, r.text
        yield s


@pytest.fixture(scope="module")
def acme(server):
    with server.client(ACME) as c:
        yield c


# what acme gets for each operation on each kind of task
EXPECTED = {
    #                 own   other's private  public
    "read":          (200, 404, 200),
    "versions":      (200, 404, 200),
    "generate":      (200, 404, 200),
    "generate_sse":  (200, 404, 200),
    "classify":      (200, 404, 200),
    "completions":   (200, 404, 200),
    "chat":          (200, 404, 200),
    "model":         (200, 404, 200),
    "export":        (200, 404, 200),
    "export_native": (200, 404, 200),
}
TASKS = ("acme-own", "globex-private", "globex-public")


def call(c: httpx.Client, op: str, task: str) -> int:
    if op == "read":
        return c.get(f"/v1/tasks/{task}").status_code
    if op == "versions":
        return c.get(f"/v1/tasks/{task}/versions").status_code
    if op == "generate":
        return c.post(f"/v1/tasks/{task}/generate", json={"input": "x", "max_new_tokens": 1}).status_code
    if op == "generate_sse":
        with c.stream("POST", f"/v1/tasks/{task}/generate", json={"input": "x", "max_new_tokens": 1,
                                                                   "stream": True}) as r:
            r.read()
            return r.status_code
    if op == "classify":
        return c.post(f"/v1/tasks/{task}/classify", json={"input": "x"}).status_code
    if op == "completions":
        return c.post("/v1/completions", json={"model": task, "prompt": "x", "max_tokens": 1}).status_code
    if op == "chat":
        return c.post("/v1/chat/completions", json={"model": task, "max_tokens": 1,
                                                    "messages": [{"role": "user", "content": "x"}]}).status_code
    if op == "model":
        return c.get(f"/v1/models/{task}").status_code
    if op == "export":
        return c.get(f"/v1/tasks/{task}/export").status_code
    if op == "export_native":
        return c.get(f"/v1/tasks/{task}/export", params={"layout": "native", "format": "tar.gz"}).status_code
    raise ValueError(op)


@pytest.mark.parametrize("op", sorted(EXPECTED))
@pytest.mark.parametrize("which", range(3), ids=TASKS)
def test_matrix(acme, op, which):
    assert call(acme, op, TASKS[which]) == EXPECTED[op][which]


def test_others_private_task_looks_exactly_like_a_missing_one(acme):
    hidden = acme.get("/v1/tasks/globex-private")
    missing = acme.get("/v1/tasks/no-such-task")
    assert_error(hidden, 404, "not_found")
    assert hidden.json()["error"]["message"] == missing.json()["error"]["message"].replace("no-such-task",
                                                                                           "globex-private")
    for path in ("/v1/tasks/globex-private/generate", "/v1/tasks/globex-private/classify"):
        assert_error(acme.post(path, json={"input": "x"}), 404, "not_found")


def test_lists_and_models_show_own_and_public_only(acme, server):
    assert {t["id"] for t in acme.get("/v1/tasks").json()["data"]} == {"acme-own", "globex-public"}
    models = {"acme-own", "globex-public", "default"}  # "default": the bare model, no task
    assert {m["id"] for m in acme.get("/v1/models").json()["data"]} == models
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=ACME, max_retries=0) as oai:
        assert {m.id for m in oai.models.list()} == models
        with pytest.raises(openai.NotFoundError):
            oai.completions.create(model="globex-private", prompt="x", max_tokens=1)
        with pytest.raises(openai.NotFoundError):
            oai.chat.completions.create(model="globex-private", messages=[{"role": "user", "content": "x"}],
                                        max_tokens=1)
    with server.client(GLOBEX) as globex:
        assert {t["id"] for t in globex.get("/v1/tasks").json()["data"]} == {"globex-private", "globex-public"}


def test_changes_need_the_owner_or_an_admin(server, acme):
    soft = pack(native_soft_prompt("prompt_tuning", T=2, seed=4))
    assert_error(acme.delete("/v1/tasks/globex-private"), 404, "not_found")     # not revealed
    assert_error(acme.delete("/v1/tasks/globex-public"), 403, "forbidden")      # visible, not acme's
    assert_error(upload(acme, "globex-public", soft), 403, "forbidden")         # no new version either
    # creating each kind of id: own -> its next version; another's private -> acme's own task of that name, exactly
    # as for a free id (nothing revealed); public -> 403 (above)
    own, hidden, free = (upload(acme, task, soft) for task in ("acme-own", "globex-private", "acme-free"))
    assert own.status_code == 201 and own.json()["version"] == 2
    assert hidden.status_code == free.status_code == 201
    assert (hidden.json()["version"], hidden.json()["owner"]) == (free.json()["version"], free.json()["owner"])
    assert acme.get("/v1/tasks/globex-private").json()["owner"] == "acme"
    with server.client(GLOBEX) as globex:
        assert globex.get("/v1/tasks/globex-public").json()["version"] == 1
        mine = globex.get("/v1/tasks/globex-private").json()
        assert (mine["owner"], mine["version"]) == ("globex", 1)
        assert [v["version"] for v in globex.get("/v1/tasks/globex-private/versions").json()["data"]] == [1]
    with server.client(METERED) as other:  # a third tenant sees neither private task
        assert_error(other.get("/v1/tasks/globex-private"), 404, "not_found")
    for task in ("globex-private", "acme-free"):
        assert acme.delete(f"/v1/tasks/{task}").status_code == 204
    with server.client(GLOBEX) as globex:
        assert globex.get("/v1/tasks/globex-private").json()["version"] == 1  # acme's delete touched only its own


def test_owner_deletes_own_and_admin_sees_and_deletes_any(server, acme):
    soft = pack(native_soft_prompt("prompt_tuning", T=2, seed=5))
    assert upload(acme, "acme-tmp", soft).status_code == 201
    assert acme.delete("/v1/tasks/acme-tmp").status_code == 204
    assert acme.get("/v1/tasks/acme-tmp").status_code == 404
    with server.client(GLOBEX) as globex:
        assert upload(globex, "globex-tmp", soft).status_code == 201
    with server.client(ADMIN) as admin:
        assert admin.get("/v1/tasks/globex-tmp").status_code == 200
        assert "globex-tmp" in {t["id"] for t in admin.get("/v1/tasks").json()["data"]}
        assert admin.post("/v1/tasks/globex-tmp/generate", json={"input": "x", "max_new_tokens": 1}).status_code == 200
        assert admin.delete("/v1/tasks/globex-tmp").status_code == 204
    with server.client(GLOBEX) as globex:
        assert globex.get("/v1/tasks/globex-tmp").status_code == 404


def test_tenant_is_carried_into_metrics(server, acme):
    acme.post("/v1/tasks/acme-own/generate", json={"input": "x", "max_new_tokens": 1})
    with server.client() as anon:
        text = anon.get("/metrics").text
    assert 'promptserve_tenant_requests_total{tenant="acme"}' in text
    assert 'promptserve_tenant_tokens_total{direction="out",tenant="acme"}' in text

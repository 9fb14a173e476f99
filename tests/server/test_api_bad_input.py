"""Bad input is a 4xx with a message, never a 500: a table of bad values for every route.

The values are derived from each operation's OpenAPI description (integers get words,
negatives and huge numbers; enums get unknown members; times get non-times; strings get NUL
bytes; bodies get malformed JSON and wrong types per field), so a new route is covered the
moment it exists. Requests are made as an admin, so that validation rather than the role check
is what answers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from server.core.db import Database
from tests.server.test_api_common import POINT, World, client_for, seed_world
from tests.server.test_api_scoping import (
    REQUIRED_QUERY,
    VALID_BODY,
    fill,
    operations,
    path_values,
)

BAD_IDS = ["abc", "0", "-1", "1.5", "99999999999999999999", "2147483648", "%00", "1e3"]
BAD_CODES = ["%00", "-dash-first", "x" * 65, "sp%20ace"]
MISSING_ID = 2_000_000_000
"""A well-formed id that names nothing."""
MISSING_CODE = "no-such-site-0000"
MISSING_UUID = "00000000-0000-4000-8000-000000000000"


@pytest.fixture
async def world(db: Database) -> World:
    """A freshly seeded world."""
    return await seed_world(db)


def kinds(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The non-null alternatives of a (possibly `anyOf`) JSON schema."""
    options = schema.get("anyOf", [schema])
    return [o for o in options if o.get("type") != "null"]


def bad_values(schema: dict[str, Any]) -> Iterator[Any]:
    """Values a parameter or field of `schema` must refuse."""
    for option in kinds(schema):
        kind = option.get("type")
        if "enum" in option or "const" in option:
            yield "bogus-member"
        elif kind == "integer":
            yield from ("abc", -1, 99999999999999999999, 1.5)
        elif kind == "number":
            yield from ("abc", option.get("minimum", 0) - 1)
        elif kind == "boolean":
            yield "maybe"
        elif kind == "string" and option.get("format") == "date-time":
            yield from ("not-a-date", "2024-13-45T99:99:00", "")
        elif kind == "string":
            yield "nul\x00byte"
        elif kind == "array":
            yield from bad_values(option.get("items", {}))
        elif kind == "object":
            yield "not-an-object"


def schema_of(world: World, ref_or_schema: dict[str, Any]) -> dict[str, Any]:
    """Resolve a `$ref` into the OpenAPI components."""
    ref = ref_or_schema.get("$ref")
    if ref is None:
        return ref_or_schema
    schemas = world.app.openapi()["components"]["schemas"]
    resolved: dict[str, Any] = schemas[ref.rsplit("/", 1)[1]]
    return resolved


def assert_client_error(response: Any, where: str, *, exact: int | None = 422) -> None:
    """A 4xx (exactly `exact` if given) with a JSON message."""
    assert 400 <= response.status_code < 500, f"{where} -> {response.status_code}"
    if exact is not None:
        assert response.status_code == exact, f"{where} -> {response.status_code}"
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    assert detail


async def test_bad_path_ids_are_422_and_missing_ids_404(world: World) -> None:
    valid = path_values(world.own)
    async with client_for(world.app, world.admin_token) as client:
        for method, path, operation in operations(world.app):
            params = [p for p in operation.get("parameters", []) if p["in"] == "path"]
            body: dict[str, Any] | None = (
                dict(VALID_BODY.get(path, {})) if method in ("post", "patch") else None
            )
            query = {k: v for k, v in REQUIRED_QUERY.items()
                     if any(p["name"] == k for p in operation.get("parameters", []))}
            for param in params:
                name = param["name"]
                numeric = any(k.get("type") == "integer" for k in kinds(param["schema"]))
                uuid_like = any(k.get("format") == "uuid" for k in kinds(param["schema"]))
                for bad in BAD_IDS if numeric else BAD_CODES:
                    url = fill(path, operation, {**valid, name: bad})
                    response = await client.request(method.upper(), url, params=query, json=body)
                    assert_client_error(response, f"{method.upper()} {url}")
                missing = MISSING_ID if numeric else MISSING_UUID if uuid_like else MISSING_CODE
                url = fill(path, operation, {**valid, name: missing})
                response = await client.request(method.upper(), url, params=query, json=body)
                assert_client_error(response, f"{method.upper()} {url}", exact=404)


async def test_bad_query_values_are_422(world: World) -> None:
    valid = path_values(world.own)
    checked = 0
    async with client_for(world.app, world.admin_token) as client:
        for method, path, operation in operations(world.app):
            url = fill(path, operation, valid)
            params = [p for p in operation.get("parameters", []) if p["in"] == "query"]
            base = {p["name"]: REQUIRED_QUERY[p["name"]] for p in params if p.get("required")}
            body: dict[str, Any] | None = (
                dict(VALID_BODY.get(path, {})) if method in ("post", "patch") else None
            )
            for param in params:
                for bad in bad_values(param["schema"]):
                    query = {**base, param["name"]: bad}
                    response = await client.request(method.upper(), url, params=query, json=body)
                    assert_client_error(response, f"{method.upper()} {url} {query!r}")
                    checked += 1
    assert checked > 50


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"limit": -1}, "query.limit"),
        ({"limit": 0}, "query.limit"),
        ({"limit": 1001}, "query.limit"),
        ({"offset": -5}, "query.offset"),
        ({"class": "E"}, "query.class"),
        ({"state": "closed"}, "query.state"),
        ({"since": "yesterday"}, "query.since"),
        ({"since": "2030-01-02T00:00:00Z", "until": "2030-01-01T00:00:00Z"}, "before"),
        ({"site": "a/b"}, "query.site"),
    ],
)
async def test_fault_filter_messages_name_the_field(
    world: World, params: dict[str, Any], fragment: str
) -> None:
    async with client_for(world.app, world.engineer_token) as client:
        response = await client.get("/api/v1/faults", params=params)
    assert_client_error(response, f"GET /faults {params}")
    assert fragment in response.json()["detail"]


def body_operations(world: World) -> Iterator[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """(method, url, operation, body schema) of every operation taking a JSON body."""
    valid = path_values(world.own)
    valid["user_id"] = world.admin_id
    for method, path, operation in operations(world.app):
        content = operation.get("requestBody", {}).get("content", {})
        if "application/json" in content:
            schema = schema_of(world, content["application/json"]["schema"])
            yield method, fill(path, operation, valid), operation, schema


async def test_malformed_bodies_are_422(world: World) -> None:
    raw_bodies = [b'{"name": ', b"[]", b'"text"', b"null", b"\xff\xfe", b"{" * 5000]
    seen = 0
    async with client_for(world.app, world.admin_token) as client:
        for method, url, _, _ in body_operations(world):
            for raw in raw_bodies:
                response = await client.request(
                    method.upper(), url, content=raw, headers={"content-type": "application/json"})
                assert_client_error(response, f"{method.upper()} {url} {raw[:20]!r}")
            form = await client.request(method.upper(), url, data={"name": "x"})
            assert_client_error(form, f"{method.upper()} {url} as a form", exact=None)
            seen += 1
    assert seen >= 6


async def test_malformed_json_says_so(world: World) -> None:
    async with client_for(world.app, world.admin_token) as client:
        response = await client.post("/api/v1/organisations", content=b'{"name": ',
                                     headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert "malformed JSON" in response.json()["detail"]


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
async def test_non_finite_numbers_in_json_are_422(world: World, number: bytes) -> None:
    async with client_for(world.app, world.own.token) as client:
        response = await client.post(
            "/api/v1/users/me/tokens", content=b'{"expires_in_days": ' + number + b"}",
            headers={"content-type": "application/json"})
    assert_client_error(response, f"expires_in_days={number!r}")


async def test_wrongly_typed_body_fields_are_422(world: World) -> None:
    checked = 0
    async with client_for(world.app, world.admin_token) as client:
        for method, url, _, schema in body_operations(world):
            for field, field_schema in schema.get("properties", {}).items():
                for bad in bad_values(field_schema):
                    if isinstance(bad, str) and field_schema.get("format") != "date-time" and \
                            any(k.get("type") == "string" and "enum" not in k
                                for k in kinds(field_schema)) and "\x00" not in bad:
                        continue  # a plain string field accepts any other string
                    response = await client.request(method.upper(), url, json={field: bad})
                    assert_client_error(response, f"{method.upper()} {url} {field}={bad!r}")
                    checked += 1
    assert checked > 20


async def test_unauthenticated_bad_input_is_401_not_500(world: World) -> None:
    async with client_for(world.app) as client:
        for method, path, operation in operations(world.app):
            if path in ("/healthz", "/metrics"):
                continue
            url = fill(path, operation, dict.fromkeys(path_values(world.own), 1))
            response = await client.request(method.upper(), url,
                                             params={"point": POINT, "limit": "x"})
            assert response.status_code in (401, 422), f"{method.upper()} {url}"

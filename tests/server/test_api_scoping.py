"""A customer never sees another organisation's data: the test walks every route of the app.

The walk reads the routes from the app's OpenAPI document (FastAPI 0.165 keeps included
routers in `app.routes` as lazily expanded entries; the OpenAPI document is built from them,
and `test_every_route_is_in_the_openapi_document` makes sure none is hidden from it). Each
route is called as the customer of organisation "own" with the ids of organisation "other"
in its path and in its filters; the answer must be 403/404 or must not mention anything of
"other" (every text of "other"'s objects carries its marker).

`ROUTES` lists every operation with what a customer may do there. A route missing from it
fails `test_route_table_is_complete`: add it, with seed data in `test_api_common.seed_world`
if it reads a new kind of object, so the walk covers it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute

from server.core.db import Database
from tests.server.test_api_common import NOW, POINT, OrgWorld, World, client_for, seed_world

Access = Literal["scoped", "admin", "self", "public"]

ROUTES: dict[tuple[str, str], Access] = {
    ("post", "/api/v1/sessions"): "admin",  # staff only (engineers request)
    ("get", "/api/v1/sessions"): "scoped",
    ("get", "/api/v1/sessions/{session_id}"): "scoped",
    ("post", "/api/v1/sessions/{session_id}/approve"): "scoped",
    ("post", "/api/v1/sessions/{session_id}/deny"): "scoped",
    ("post", "/api/v1/sessions/{session_id}/revoke"): "scoped",
    ("post", "/api/v1/sessions/{session_id}/close"): "admin",
    ("get", "/api/v1/sessions/{session_id}/audit"): "scoped",
    ("get", "/api/v1/sessions/{session_id}/recordings"): "scoped",
    ("get", "/api/v1/sessions/{session_id}/recordings/{recording_id}"): "scoped",
    ("get", "/api/v1/sessions/{session_id}/connect"): "admin",
    ("post", "/api/v1/sessions/{session_id}/diagnostics"): "admin",
    ("get", "/api/v1/users/me/ssh-keys"): "self",
    ("post", "/api/v1/users/me/ssh-keys"): "admin",  # staff only
    ("delete", "/api/v1/users/me/ssh-keys/{key_id}"): "self",
    ("get", "/healthz"): "public",
    ("get", "/metrics"): "public",
    ("get", "/api/v1/organisations"): "scoped",
    ("post", "/api/v1/organisations"): "admin",
    ("get", "/api/v1/organisations/{org_id}"): "scoped",
    ("patch", "/api/v1/organisations/{org_id}"): "admin",
    ("delete", "/api/v1/organisations/{org_id}"): "admin",
    ("get", "/api/v1/sites"): "scoped",
    ("post", "/api/v1/sites"): "admin",
    ("get", "/api/v1/sites/{site_id}"): "scoped",
    ("patch", "/api/v1/sites/{site_id}"): "admin",
    ("post", "/api/v1/sites/{code}/enrolments"): "admin",
    ("post", "/api/v1/enrol"): "public",  # the one-time token in the body is the credential
    ("get", "/api/v1/agents"): "scoped",
    ("get", "/api/v1/agents/{agent_id}"): "scoped",
    ("get", "/api/v1/units"): "scoped",
    ("get", "/api/v1/units/{unit_id}"): "scoped",
    ("get", "/api/v1/units/{unit_id}/telemetry"): "scoped",
    ("get", "/api/v1/units/{unit_id}/points"): "scoped",
    ("get", "/api/v1/faults"): "scoped",
    ("get", "/api/v1/faults/{fault_id}"): "scoped",
    ("get", "/api/v1/events"): "scoped",
    ("get", "/api/v1/events/{event_id}"): "scoped",
    ("get", "/api/v1/users/me"): "self",
    ("get", "/api/v1/users/me/tokens"): "self",
    ("post", "/api/v1/users/me/password"): "self",
    ("post", "/api/v1/users/{user_id}/password"): "admin",
    ("post", "/api/v1/users/me/tokens"): "self",
    ("delete", "/api/v1/users/me/tokens/{token_id}"): "self",
    ("get", "/api/v1/users"): "admin",
    ("post", "/api/v1/users"): "admin",
    ("get", "/api/v1/users/{user_id}"): "admin",
    ("patch", "/api/v1/users/{user_id}"): "admin",
    ("delete", "/api/v1/users/{user_id}"): "admin",
    ("get", "/api/v1/users/{user_id}/tokens"): "admin",
    ("post", "/api/v1/users/{user_id}/tokens"): "admin",
    ("delete", "/api/v1/users/{user_id}/tokens/{token_id}"): "admin",
    ("get", "/api/v1/commands"): "admin",  # staff only: customers are refused
    ("get", "/api/v1/commands/{command_id}"): "admin",
    ("get", "/api/v1/tickets"): "scoped",
    # the body names the site; a customer opening one on another's site is refused with 404
    # (tests/server/tickets/test_api_tickets.py), an empty body here is just a 422
    ("post", "/api/v1/tickets"): "public",
    ("get", "/api/v1/tickets/{ticket_id}"): "scoped",
    ("post", "/api/v1/tickets/{ticket_id}/comments"): "scoped",
    ("post", "/api/v1/tickets/{ticket_id}/assign"): "admin",
    ("post", "/api/v1/tickets/{ticket_id}/breach-cause"): "admin",
    ("post", "/api/v1/tickets/{ticket_id}/class"): "admin",
    ("post", "/api/v1/tickets/{ticket_id}/diagnosis"): "admin",
    ("post", "/api/v1/tickets/{ticket_id}/links"): "admin",
    ("post", "/api/v1/tickets/{ticket_id}/links/{link_id}/installed"): "admin",
    ("post", "/api/v1/tickets/{ticket_id}/parts"): "admin",
    ("post", "/api/v1/tickets/{ticket_id}/pause"): "admin",
    ("post", "/api/v1/tickets/{ticket_id}/phone"): "admin",
    ("post", "/api/v1/tickets/{ticket_id}/resume"): "admin",
    ("post", "/api/v1/tickets/{ticket_id}/transition"): "admin",
    ("get", "/api/v1/parts"): "admin",
    ("post", "/api/v1/parts"): "admin",
    ("put", "/api/v1/parts/{part_no}/stock"): "admin",
    ("get", "/api/v1/sla/report"): "scoped",
    ("get", "/api/v1/sla/contracts/{org_id}"): "admin",
    ("put", "/api/v1/sla/contracts/{org_id}"): "admin",
    ("get", "/api/v1/commissioning/plans"): "scoped",
    ("post", "/api/v1/commissioning/plans"): "admin",  # staff only
    ("get", "/api/v1/commissioning/plans/{plan_id}"): "scoped",
    ("patch", "/api/v1/commissioning/plans/{plan_id}"): "admin",
    ("post", "/api/v1/commissioning/plans/{plan_id}/issue"): "admin",
    ("post", "/api/v1/commissioning/plans/{plan_id}/acknowledge"): "scoped",
    ("post", "/api/v1/commissioning/plans/{plan_id}/schedule"): "admin",
    ("post", "/api/v1/commissioning/plans/{plan_id}/complete"): "admin",
    ("post", "/api/v1/commissioning/plans/{plan_id}/cancel"): "admin",
    ("get", "/api/v1/commissioning/plans/{plan_id}/documents"): "scoped",
    ("get", "/api/v1/commissioning/plans/{plan_id}/document"): "scoped",
    ("get", "/api/v1/commissioning/plans/{plan_id}/report"): "scoped",
    ("post", "/api/v1/commissioning/plans/{plan_id}/runs"): "admin",
    ("get", "/api/v1/commissioning/plans/{plan_id}/runs"): "scoped",
    ("post", "/api/v1/commissioning/plans/{plan_id}/results"): "admin",
    ("get", "/api/v1/commissioning/plans/{plan_id}/results"): "scoped",
    ("post", "/api/v1/releases"): "admin",  # release manager (staff) only
    ("get", "/api/v1/releases"): "admin",
    ("get", "/api/v1/releases/{release_id}"): "admin",
    ("get", "/api/v1/releases/{release_id}/download"): "admin",  # the signed link, or 403
    ("post", "/api/v1/plans"): "admin",
    ("get", "/api/v1/plans"): "scoped",
    ("get", "/api/v1/plans/{upgrade_plan_id}"): "scoped",
    ("put", "/api/v1/plans/{upgrade_plan_id}"): "admin",
    ("post", "/api/v1/plans/{upgrade_plan_id}/issue"): "admin",
    ("post", "/api/v1/plans/{upgrade_plan_id}/revise"): "admin",
    ("post", "/api/v1/plans/{upgrade_plan_id}/confirm"): "scoped",
    ("post", "/api/v1/plans/{upgrade_plan_id}/schedule"): "admin",
    ("post", "/api/v1/plans/{upgrade_plan_id}/checkin"): "scoped",
    ("post", "/api/v1/plans/{upgrade_plan_id}/pause"): "admin",
    ("post", "/api/v1/plans/{upgrade_plan_id}/resume"): "admin",
    ("post", "/api/v1/plans/{upgrade_plan_id}/abort"): "admin",
    ("get", "/api/v1/plans/{upgrade_plan_id}/documents"): "scoped",
    ("get", "/api/v1/plans/{upgrade_plan_id}/documents/{doc_version}.{fmt}"): "scoped",
    ("get", "/api/v1/rollouts"): "scoped",
    ("get", "/api/v1/rollouts/{upgrade_plan_id}"): "scoped",
}

VALID_BODY: dict[str, dict[str, Any]] = {
    "/api/v1/plans/{upgrade_plan_id}/confirm": {"window": 0, "personnel": ["x"],
                                                "signature": "x"},
    "/api/v1/plans/{upgrade_plan_id}/checkin": {"site_id": 1, "name": "x"},
    "/api/v1/users/{user_id}/password": {"password": "a long enough password"},
    "/api/v1/users/me/password": {"new_password": "a long enough password"},
    "/api/v1/sessions/{session_id}/diagnostics": {"action": "agent_log"},
}
"""Bodies for routes whose body has required fields (others are walked with `{}`)."""

REQUIRED_QUERY = {"point": POINT, "month": NOW.strftime("%Y-%m"),
                  "exp": "1", "sig": "0" * 64}  # a package download's (forged) link
"""Values for required query parameters (both organisations' units have this point)."""


@pytest.fixture
async def world(db: Database) -> World:
    """A freshly seeded world."""
    return await seed_world(db)


def path_values(org: OrgWorld) -> dict[str, int | str]:
    """What each path parameter is filled with to aim at `org`'s objects."""
    return {
        "code": org.site_code, "org_id": org.org_id, "site_id": org.site_id,
        "agent_id": org.agent_id, "unit_id": org.unit_id, "fault_id": org.fault_ids[0],
        "event_id": org.event_id, "user_id": org.user_id, "token_id": org.token_id,
        "command_id": "00000000-0000-4000-8000-000000000001",
        "ticket_id": org.ticket_id, "link_id": org.link_id, "part_no": f"part-{org.marker}",
        "session_id": org.session_id, "recording_id": org.recording_id, "key_id": 1,
        "plan_id": org.plan_id, "upgrade_plan_id": org.upgrade_plan_id,
        "release_id": org.release_id, "doc_version": 1, "fmt": "html",
    }


def filter_values(org: OrgWorld) -> dict[str, object]:
    """What each list filter is set to, to ask for `org`'s objects."""
    return {**path_values(org), "site": org.site_code}


def operations(app: FastAPI) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(method, path, operation) of every operation in the app's OpenAPI document."""
    for path, item in app.openapi()["paths"].items():
        for method, operation in item.items():
            yield method, path, operation


def fill(path: str, operation: dict[str, Any], values: dict[str, int | str]) -> str:
    """`path` with its parameters replaced from `values` (fails on an unknown parameter)."""
    for param in operation.get("parameters", []):
        if param["in"] != "path":
            continue
        name = param["name"]
        if name not in values:
            pytest.fail(f"{path}: the walk has no value for path parameter {name!r}; "
                        "teach path_values() which object it names")
        path = path.replace("{" + name + "}", str(values[name]))
    return path


def required_query(path: str, operation: dict[str, Any]) -> dict[str, str]:
    """Values for the operation's required query parameters."""
    query = {}
    for param in operation.get("parameters", []):
        if param["in"] == "query" and param.get("required"):
            if param["name"] not in REQUIRED_QUERY:
                pytest.fail(f"{path}: no value for required query parameter {param['name']!r}")
            query[param["name"]] = REQUIRED_QUERY[param["name"]]
    return query


def api_routes(routes: list[Any]) -> Iterator[APIRoute]:
    """Every APIRoute, descending into included routers."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        nested = getattr(route, "original_router", None) or getattr(route, "router", None)
        if nested is not None and nested is not route:
            yield from api_routes(list(nested.routes))


def test_every_route_is_in_the_openapi_document(db: Database) -> None:
    from server.app import create_app
    from tests.server.test_api_common import settings_for

    app = create_app(settings_for(db), db)
    routes = list(api_routes(list(app.routes)))
    assert len(routes) >= len(ROUTES) - 2
    hidden = [r.path for r in routes if not r.include_in_schema]
    assert hidden == [], f"routes hidden from OpenAPI escape the scoping walk: {hidden}"


def test_route_table_is_complete(db: Database) -> None:
    from server.app import create_app
    from tests.server.test_api_common import settings_for

    app = create_app(settings_for(db), db)
    found = {(m, p) for m, p, _ in operations(app)}
    missing = sorted(found - ROUTES.keys())
    assert not missing, (
        f"new routes {missing}: add them to ROUTES (and seed their data) so the scoping "
        "walk checks that a customer sees only its own organisation's objects"
    )
    assert not ROUTES.keys() - found, f"stale entries in ROUTES: {ROUTES.keys() - found}"


async def test_customer_never_sees_another_organisations_data(world: World) -> None:
    own, other = world.own, world.other
    foreign_paths = path_values(other)
    foreign_filters = filter_values(other)
    checked = 0
    async with client_for(world.app, own.token) as client:
        for method, path, operation in operations(world.app):
            access = ROUTES[(method, path)]
            url = fill(path, operation, foreign_paths)
            query = required_query(path, operation)
            filters = [p["name"] for p in operation.get("parameters", [])
                       if p["in"] == "query" and p["name"] in foreign_filters]
            variants: list[dict[str, Any]] = [query]
            variants += [{**query, name: foreign_filters[name]} for name in filters]
            body: dict[str, Any] | None = (
                dict(VALID_BODY.get(path, {})) if method in ("post", "patch") else None
            )
            for params in variants:
                response = await client.request(method.upper(), url, params=params, json=body)
                where = f"{method.upper()} {url} {params} -> {response.status_code}"
                checked += 1
                assert response.status_code < 500, where
                assert other.marker not in response.text, f"leak: {where}: {response.text}"
                if access == "admin":
                    assert response.status_code == 403, where
                elif url != path:  # aimed at one of the other organisation's objects
                    assert response.status_code == 404, where
                elif access != "public":
                    assert response.status_code in (200, 201, 204), where
    assert checked > len(ROUTES)
    async with client_for(world.app, other.token) as victim:  # nothing of theirs was touched
        assert (await victim.get("/api/v1/users/me")).status_code == 200


async def test_customer_sees_its_own_data_on_every_read_route(world: World) -> None:
    """The other half: the same walk with the customer's own ids answers 200 with its data."""
    own = world.own
    async with client_for(world.app, own.token) as client:
        for method, path, operation in operations(world.app):
            if method != "get" or ROUTES[(method, path)] not in ("scoped", "self"):
                continue
            url = fill(path, operation, path_values(own))
            response = await client.get(url, params=required_query(path, operation))
            assert response.status_code == 200, f"GET {url} -> {response.status_code}"
            if ROUTES[(method, path)] == "scoped" and "telemetry" not in path:
                assert own.marker in response.text, f"GET {url} shows none of its own data"

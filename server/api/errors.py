"""The HTTP edge of our errors: every failure becomes JSON `{"detail": "..."}` with a status.

    ServerError (server/errors.py)   -> its `status` (404, 403, 409, 422)
    └── Unauthorized (core/security)  -> 401 with `WWW-Authenticate: Bearer`
    RequestValidationError           -> 422, the message names each bad field
    sqlalchemy IntegrityError        -> 409 (a race past our own checks, e.g. a duplicate name)
    sqlalchemy DataError             -> 422 (a value the database refuses)
    anything else                    -> 500, logged with its traceback (a bug, never bad input)

The last one is a plain ASGI middleware rather than an `Exception` handler: Starlette re-raises
after such a handler, which would log every bug twice. The same middleware counts requests.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, IntegrityError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.core.security import Unauthorized
from server.errors import ServerError
from server.metrics import HTTP_REQUESTS

log = logging.getLogger(__name__)

MAX_REPORTED_ERRORS = 10


def _location(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] == "body" and len(parts) > 1:
        parts = parts[1:]
    return ".".join(parts) or "request"


def describe_validation(errors: Sequence[Any]) -> str:
    """One line naming each bad field: `invalid request: query.limit: must be ...; ...`."""
    items = []
    for err in errors[:MAX_REPORTED_ERRORS]:
        where = _location(err.get("loc", ()))
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") == "json_invalid":
            where, msg = "body", "malformed JSON"
        elif err.get("type") == "extra_forbidden":
            msg = "unknown field"
        items.append(f"{where}: {msg}")
    more = len(errors) - MAX_REPORTED_ERRORS
    if more > 0:
        items.append(f"and {more} more")
    return "invalid request: " + "; ".join(items)


def _error_list(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """The validation errors without the offending input (it may be a secret)."""
    return [
        {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg")),
         "type": str(e.get("type"))}
        for e in errors[:MAX_REPORTED_ERRORS]
    ]


async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, ServerError):  # pragma: no cover - registered for ServerError only
        raise exc
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
    return JSONResponse({"detail": str(exc) or type(exc).__name__}, exc.status, headers=headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, RequestValidationError):  # pragma: no cover - as registered
        raise exc
    errors = exc.errors()
    return JSONResponse(
        {"detail": describe_validation(errors), "errors": _error_list(errors)}, 422
    )


async def _integrity_error(request: Request, exc: Exception) -> JSONResponse:
    log.info("integrity error on %s %s: %s", request.method, request.url.path, exc)
    return JSONResponse({"detail": "conflicts with existing data (duplicate or in use)"}, 409)


async def _data_error(request: Request, exc: Exception) -> JSONResponse:
    log.info("data error on %s %s: %s", request.method, request.url.path, exc)
    return JSONResponse({"detail": "a value is out of range for the database"}, 422)


def install_error_handlers(app: FastAPI) -> None:
    """Register the mapping in the module docstring on `app`."""
    app.add_exception_handler(ServerError, _server_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(IntegrityError, _integrity_error)
    app.add_exception_handler(DataError, _data_error)
    app.add_middleware(ObserveMiddleware)


_INTERNAL = json.dumps({"detail": "internal server error"}).encode()
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""Methods counted by name; anything else is counted as OTHER (label values stay few)."""


class ObserveMiddleware:
    """Counts requests by method and status; turns an unhandled exception into a logged 500."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = False

        async def observe(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = int(message["status"])
                started = True
            await send(message)

        try:
            await self.app(scope, receive, observe)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            status = 500
            if not started:
                await send({
                    "type": "http.response.start", "status": 500,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(_INTERNAL)).encode())],
                })
                await send({"type": "http.response.body", "body": _INTERNAL})
        finally:
            method = scope.get("method", "")
            HTTP_REQUESTS.labels(method=method if method in _METHODS else "OTHER",
                                 status=str(status)).inc()

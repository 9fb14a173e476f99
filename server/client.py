"""A small synchronous client of the HTTP API, for the `emu` operator verbs.

    ClientError              the request did not give an answer we can use
    ├── ServerUnreachable    no connection, or no answer in time
    └── ApiError             the server answered 4xx/5xx; `status` and its `detail`

httpx's exceptions are mapped here, once; callers see only these.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any

import httpx

DEFAULT_TIMEOUT_S = 10.0
API_PREFIX = "/api/v1"


class ClientError(Exception):
    """Base of every error this client raises."""


class ServerUnreachable(ClientError):
    """The server could not be reached or did not answer in time."""


class ApiError(ClientError):
    """The server refused the request; `status` is the HTTP status, `detail` its message."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:200] or response.reason_phrase
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])
    return str(body)[:200]


class ApiClient:
    """Bearer-authenticated calls to `/api/v1/...` returning decoded JSON."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url + API_PREFIX,
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            timeout=timeout,
            transport=transport,
        )

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        content: bytes | None = None,
    ) -> Any:
        """`method` on `/api/v1{path}`; the decoded JSON body (None for 204)."""
        query = {k: v for k, v in (params or {}).items() if v is not None and v != []}
        headers = {"Content-Type": "application/octet-stream"} if content is not None else None
        try:
            response = self._http.request(method, path, params=query, json=json,
                                          content=content, headers=headers)
        except httpx.TimeoutException as exc:
            raise ServerUnreachable(f"{self.base_url} did not answer in time") from exc
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"cannot reach the server at {self.base_url}: {exc}") from exc
        if response.status_code >= 400:
            raise ApiError(response.status_code, _detail(response))
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise ApiError(response.status_code, "the server's answer is not JSON") from exc

    def download(self, path: str, **params: Any) -> bytes:
        """GET a document (HTML, PDF) as bytes."""
        query = {k: v for k, v in params.items() if v is not None}
        try:
            response = self._http.get(path, params=query, headers={"Accept": "*/*"})
        except httpx.TimeoutException as exc:
            raise ServerUnreachable(f"{self.base_url} did not answer in time") from exc
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"cannot reach the server at {self.base_url}: {exc}") from exc
        if response.status_code >= 400:
            raise ApiError(response.status_code, _detail(response))
        return response.content

    def patch(self, path: str, body: Any) -> Any:
        """PATCH a JSON body."""
        return self.request("PATCH", path, json=body)

    def get(self, path: str, **params: Any) -> Any:
        """GET with query parameters (None values are left out)."""
        return self.request("GET", path, params=params)

    def post(self, path: str, body: Any) -> Any:
        """POST a JSON body."""
        return self.request("POST", path, json=body)

    def delete(self, path: str) -> None:
        """DELETE."""
        self.request("DELETE", path)

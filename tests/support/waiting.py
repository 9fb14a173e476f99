"""Wait on a condition with a deadline instead of sleeping a fixed time.

`wait_until` (threads, sync code) and `wait_for` (async code) return as soon as the condition
holds and raise an `AssertionError` naming what was awaited when the deadline passes, so a
failing test says what never happened rather than hanging or flaking.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, overload

T = TypeVar("T")

POLL_INTERVAL = 0.01
"""Seconds between two evaluations of a polled predicate (not a wait for the outcome)."""


def _timeout_error(timeout: float, what: str) -> AssertionError:
    return AssertionError(f"timed out after {timeout:g} s waiting for {what}")


@overload
def wait_until(condition: threading.Event, timeout: float, what: str) -> bool: ...
@overload
def wait_until(condition: Callable[[], T], timeout: float, what: str) -> T: ...
def wait_until(condition: threading.Event | Callable[[], T], timeout: float, what: str) -> bool | T:
    """Block until `condition` is set or returns a truthy value; return that value.

    A `threading.Event` is waited on directly; a callable is polled every `POLL_INTERVAL`.
    Raises `AssertionError` naming `what` if `timeout` seconds pass first.
    """
    if isinstance(condition, threading.Event):
        if not condition.wait(timeout):
            raise _timeout_error(timeout, what)
        return True
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _timeout_error(timeout, what)
        time.sleep(min(POLL_INTERVAL, remaining))


# ASYNC109 prefers `asyncio.timeout` at the call site; turning that timeout into an assertion
# that names what never happened is this helper's whole purpose.
@overload
async def wait_for(condition: asyncio.Event, timeout: float, what: str) -> bool: ...  # noqa: ASYNC109
@overload
async def wait_for(condition: Awaitable[T], timeout: float, what: str) -> T: ...  # noqa: ASYNC109
@overload
async def wait_for(
    condition: Callable[[], Awaitable[T]],
    timeout: float,  # noqa: ASYNC109
    what: str,
) -> T: ...
@overload
async def wait_for(condition: Callable[[], T], timeout: float, what: str) -> T: ...  # noqa: ASYNC109
async def wait_for(
    condition: asyncio.Event | Awaitable[T] | Callable[[], Awaitable[T] | T],
    timeout: float,  # noqa: ASYNC109
    what: str,
) -> bool | T:
    """Await `condition` with a deadline and return its result.

    An `asyncio.Event` is waited on, an awaitable (coroutine, task, future) is awaited; a callable
    is polled every `POLL_INTERVAL` (awaiting its result when it returns an awaitable) until it
    gives a truthy value. Raises `AssertionError` naming `what` if `timeout` seconds pass first.
    """
    if isinstance(condition, asyncio.Event):
        return await _await(condition.wait(), timeout, what)
    if inspect.isawaitable(condition):
        return await _await(condition, timeout, what)
    if not callable(condition):
        raise TypeError(f"wait_for needs an event, awaitable or callable, not {condition!r}")
    return await _poll(condition, timeout, what)


async def _await(awaitable: Awaitable[T], timeout: float, what: str) -> T:  # noqa: ASYNC109
    try:
        async with asyncio.timeout(timeout):
            return await awaitable
    except TimeoutError:
        raise _timeout_error(timeout, what) from None


async def _poll(
    predicate: Callable[[], Awaitable[T] | T],
    timeout: float,  # noqa: ASYNC109
    what: str,
) -> T:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        outcome = predicate()
        if inspect.isawaitable(outcome):
            value: T = await _await(outcome, max(deadline - loop.time(), 0), what)
        else:
            value = outcome
        if value:
            return value
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise _timeout_error(timeout, what)
        await asyncio.sleep(min(POLL_INTERVAL, remaining))

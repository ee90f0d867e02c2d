"""Work handed to a thread pool from the event loop, which its shutdown cannot leave hanging."""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor, Future
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class ExecutorShutDown(RuntimeError):
    """The executor was shut down before its thread took the work (or before it was asked)."""


def shut_down(name: str) -> ExecutorShutDown:
    return ExecutorShutDown(f"the {name} executor shut down")


def submit(executor: Executor, name: str, fn: Callable[..., T], *args: Any) -> Future[T]:
    """``executor.submit``, whose refusal after the shutdown is an ``ExecutorShutDown``. The
    work a shutdown cancels before a thread took it (``Runtime.aclose``: ``cancel_futures``)
    ends cancelled: whoever waits on it reports ``shut_down(name)`` for it."""
    try:
        return executor.submit(fn, *args)
    except RuntimeError as exc:  # asked after the shutdown
        raise shut_down(name) from exc


async def run_in(executor: Executor, name: str, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on ``executor``. A run its shutdown cancelled before a thread took it
    reaches the awaiting task as a CancelledError, which would end it answering nobody: it
    is an ``ExecutorShutDown`` here, as a run asked after the shutdown is. A cancel of the
    awaiting task itself still passes."""
    work = submit(executor, name, fn, *args)
    try:
        return await asyncio.wrap_future(work)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if work.cancelled() and (task is None or not task.cancelling()):
            raise shut_down(name) from None
        raise

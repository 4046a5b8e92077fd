"""Where independent jobs run: here, one after the other (:class:`SerialExecutor`), or on a Ray actor
pool (``ray_executor.RayExecutor``, imported only when ``--executor ray`` asks for it).

A job needs state that is expensive to build and cheap to reuse: a model with its cached quantized
weights, the profile's pre-pass. So an executor does not run bare functions. ``executor.pool(build)``
gives every worker the state ``build()`` returns, built once where the worker runs, and
``pool.map(job, items)`` calls ``job(state, item)`` for every item and returns the results in the
items' order (``imap`` yields them in that order as they arrive). Jobs are small: a layer, an
allocation, a seed.

Same numbers on every executor: ``build`` and ``job`` must be deterministic functions of their
arguments, and a remote worker runs torch with this process's thread count. A remote worker's state
is its own copy, so a job that changes it (a model's weights) changes nothing here. For Ray, ``build``
and ``job`` must pickle: module-level functions, methods of module-level classes, partials of them.

Closing a pool releases its workers; closing an executor (or leaving its ``with`` block) closes every
pool it opened.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

from automp.errors import AutompError

S = TypeVar("S")  # a worker's state
T = TypeVar("T")  # a job's item
R = TypeVar("R")  # a job's result

EXECUTORS = ("serial", "ray")


class Pool(ABC, Generic[S]):
    """Workers that each hold one state; ``workers`` jobs run at the same time."""

    workers: int

    @abstractmethod
    def imap(self, job: Callable[[S, T], R], items: Iterable[T]) -> Iterator[R]:
        """``job(state, item)`` for every item, yielded in the items' order."""

    def map(self, job: Callable[[S, T], R], items: Iterable[T]) -> list[R]:
        """``job(state, item)`` for every item, in the items' order."""
        return list(self.imap(job, items))

    @abstractmethod
    def close(self) -> None:
        """Release the workers and their state; the pool takes no jobs afterwards."""

    def __enter__(self) -> Pool[S]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Executor(ABC):
    """Opens pools of workers; ``remote`` says whether they run outside this process."""

    remote: bool

    def __init__(self) -> None:
        self._pools: list[Pool] = []

    def pool(self, build: Callable[[], S]) -> Pool[S]:
        """A pool whose every worker holds the state ``build()`` returns, built where it runs."""
        pool = self._open(build)
        self._pools.append(pool)
        return pool

    @abstractmethod
    def _open(self, build: Callable[[], S]) -> Pool[S]:
        """A new pool of this executor's kind, its workers' states built (``pool`` records it for ``close``)."""

    def close(self) -> None:
        """Close every pool this executor opened."""
        for pool in self._pools:
            pool.close()
        self._pools = []

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LocalPool(Pool[S]):
    """One worker, this process: jobs run one after the other on the one state."""

    workers = 1

    def __init__(self, state: S) -> None:
        self.state: S | None = state

    def imap(self, job: Callable[[S, T], R], items: Iterable[T]) -> Iterator[R]:
        return (job(self.state, item) for item in items)

    def close(self) -> None:
        self.state = None


class SerialExecutor(Executor):
    """Everything here, in order: the state is built once in this process (and is this process's objects)."""

    remote = False

    def _open(self, build: Callable[[], S]) -> LocalPool[S]:
        return LocalPool(build())


def get_executor(name: str = "serial", address: str | None = None) -> Executor:
    """The executor ``--executor NAME [--ray-address ADDRESS]`` names. Ray is imported only here, for ``ray``;
    Ray starts (or joins ``address``) on the first pool."""
    if name not in EXECUTORS:
        raise AutompError(f"unknown executor {name!r}: use one of {', '.join(EXECUTORS)}")
    if name == "serial":
        if address is not None:
            raise AutompError("--ray-address is for --executor ray")
        return SerialExecutor()
    try:
        from automp.execution.ray_executor import RayExecutor
    except ImportError as err:
        if (err.name or "").split(".")[0] != "ray":
            raise
        raise AutompError("--executor ray needs Ray: pip install 'automp[ray]'") from err
    return RayExecutor(address)

"""The Ray executor (``--executor ray``): a pool of Ray actors behind ``executor.Executor``.

Each actor builds its state once (``build()``, shipped through Ray's object store once for all
actors) and then runs jobs on it; ``ray.util.ActorPool`` hands out the items and gives the results
back in order. With GPUs in the cluster there is one actor per GPU (``num_gpus=1``: the actor sees its
GPU as ``cuda``); otherwise there are CPU actors, as many as the cluster's CPUs hold at this process's
torch thread count. Every actor runs torch with this process's thread count, so its floating-point
results are this process's.

``ray.init`` runs on the first pool: a local cluster, or the one at ``address``. Models and texts the
state names by path must be readable where the actors run, and automp must be installed there. An
``AutompError`` raised in an actor is raised here as itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import ray
import torch
from ray.exceptions import RayTaskError
from ray.util import ActorPool

from automp.errors import AutompError
from automp.execution.executor import Executor, Pool, R, S, T


@ray.remote
class _Worker:
    """One actor: the state ``build()`` returns, and the jobs run on it."""

    def __init__(self, build: Callable[[], S], threads: int) -> None:
        torch.set_num_threads(threads)
        self.build, self.state = build, None

    def setup(self) -> None:  # a method, not __init__: its errors come back as the error raised
        self.state = self.build()

    def run(self, job: Callable[[S, T], R], item: T) -> R:
        return job(self.state, item)


def _raise(err: RayTaskError) -> None:
    """An ``AutompError`` raised in an actor as itself (one clear line); anything else as Ray reports it."""
    if isinstance(err.cause, AutompError):
        raise err.cause from None
    raise err


class RayPool(Pool[S]):
    """Jobs handed to idle actors in turn; the results come back in the items' order."""

    def __init__(self, actors: list) -> None:
        self.actors, self.workers = actors, len(actors)
        self._pool = ActorPool(actors)

    def imap(self, job: Callable[[S, T], R], items: Iterable[T]) -> Iterator[R]:
        try:
            yield from self._pool.map(lambda actor, item: actor.run.remote(job, item), items)
        except RayTaskError as err:
            _raise(err)

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


class RayExecutor(Executor):
    """Actor pools on the Ray cluster at ``address`` (None: a local one, unless Ray is already running)."""

    remote = True

    def __init__(self, address: str | None = None) -> None:
        super().__init__()
        self.address = address

    def _open(self, build: Callable[[], S]) -> RayPool[S]:
        if not ray.is_initialized() and self.address:
            ray.init(address=self.address)
        elif not ray.is_initialized():
            ray.init(include_dashboard=False)  # a local cluster of this machine's CPUs and GPUs
        threads = torch.get_num_threads()
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        count = gpus or max(1, int(resources.get("CPU", 1)) // threads)
        options = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": threads}
        shared = ray.put(build)  # one copy in the object store for every actor
        pool = RayPool([_Worker.options(**options).remote(shared, threads) for _ in range(count)])
        try:
            ray.get([actor.setup.remote() for actor in pool.actors])
        except RayTaskError as err:
            pool.close()
            _raise(err)
        return pool

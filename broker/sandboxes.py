"""Every pool of one broker, and the supply they share, chosen per port from the configuration.

The pools are siblings behind one protocol (broker/pool.py), picked by name from a table as uvicorn picks
its protocol implementations: a port whose `sessions-per-worker` is 1 shares the one-worker-per-session
pool with the other such ports (its warm workers serve any of them); the ports served densely with the
global --sessions-per-worker share one DensePool, and a port with dense settings of its own in the
config file gets a DensePool of its own. All draw workers from one WorkerSupply, under one --workers and
the fair share (broker/capacity.py), where the tenants are the plain ports and the dense pools.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Protocol

from broker.capacity import Tenant
from broker.dense import DensePool, retire_after
from broker.pool import Pool, ProcessPool
from broker.privileges import RunAs
from broker.tasks import Background
from broker.workers import WorkerSupply
from broker.zygote import DirectSpawner, Spawner
from deadend import wire
from deadend.config import Config
from deadend.logs import EventLog
from deadend.scripts import Script

POOL_KINDS = {"process": ProcessPool, "dense": DensePool}  # by sessions-per-worker: 1, or more


class SandboxSet(Protocol):
    """What the server and the doorman need of the sandboxes: Sandboxes below, or the bench's in-process
    baseline (bench/inprocess.py), which runs each script in the broker's own process."""

    async def start(self) -> None: ...

    def serve(self, scripts: Iterable[Script]) -> None: ...

    def pool_for(self, script: Script) -> Pool: ...

    @property
    def compiler(self) -> Pool:
        """Where scripts are compiled (start-up, reload)."""
        ...

    @property
    def failed(self) -> asyncio.Future[str] | None:
        """Set once the sandboxes cannot recover (the broker stops, non-zero)."""
        ...

    @property
    def queued(self) -> int: ...

    @property
    def started(self) -> int: ...

    @property
    def busy(self) -> int: ...

    @property
    def warm(self) -> int: ...

    def stop_acquiring(self) -> None: ...

    async def close(self) -> None: ...


def kind_of(sessions_per_worker: int) -> str:
    return "process" if sessions_per_worker == 1 else "dense"


class Sandboxes:
    def __init__(
        self,
        config: Config,
        log: EventLog,
        background: Background,
        spawner: Spawner,
        run_as: RunAs | None = None,
        preparer: Callable[[Script], wire.Start] | None = None,
    ) -> None:
        self.config = config
        self.log = log
        self.supply = WorkerSupply(
            log,
            spawner,
            background,
            workers=config.workers,
            queue_size=config.queue_size,
            zygote_forks=config.zygote_forks,
            run_as=run_as,
        )
        # The address space a plain worker may map: room for the largest Lua heap any port may set (its
        # script is known only once the worker is taken).
        plain_ports = [p for p in config.ports if config.sessions_per_worker_for(p) == 1]
        memory = max([config.ceilings.memory, *(config.ceilings_for(p).memory for p in plain_ports)])
        self.process = ProcessPool(
            self.supply,
            log,
            wire.ForkRequest(address_space=(memory + 96) << 20, cpu_seconds=config.ceilings.session_cpu),
            warm_target=min(config.warm, config.workers),
            preparer=preparer,
        )
        self.dense: dict[str, DensePool] = {}
        self._pools: dict[int, Pool] = {}

    async def start(self) -> None:
        await self.supply.start()
        await self.process.start()

    def serve(self, scripts: Iterable[Script]) -> None:
        """The scripts served now (at start-up, and after each reload): which pool each port uses."""
        tenants: set[Tenant] = set()
        caps: dict[Tenant, int] = {}
        for port in {script.port for script in scripts}:
            pool = self._pools.get(port) or self._pool_of(port)
            self._pools[port] = pool
            tenant: Tenant = pool.name if isinstance(pool, DensePool) else port
            tenants.add(tenant)
            cap = self.config.workers_cap(port)
            if cap is not None:
                caps[tenant] = cap
        self.supply.budget.set_tenants(tenants, caps)

    def _pool_of(self, port: int) -> Pool:
        k = self.config.sessions_per_worker_for(port)
        if kind_of(k) == "process":
            return self.process
        # A port with settings of its own gets a dense pool of its own; the others share the global one.
        name = f"dense-{port}" if port in self.config.ports else "dense"
        pool = self.dense.get(name)
        if pool is None:
            ceilings = self.config.ceilings_for(port)
            request = wire.ForkRequest(
                # room for every Lua heap it may hold at once, plus the interpreter
                address_space=ceilings.address_space + (k - 1) * ceilings.memory_bytes,
                cpu_seconds=ceilings.session_cpu * retire_after(k) + 10,  # the meter acts first
                dense_session_cpu=float(ceilings.session_cpu),
            )
            pool = self.dense[name] = DensePool(self.supply, self.log, request, name, k, ceilings.cpu_slice)
        return pool

    def pool_for(self, script: Script) -> Pool:
        return self._pools.get(script.port, self.process)

    @property
    def compiler(self) -> Pool:
        return self.process

    @property
    def failed(self) -> asyncio.Future[str] | None:
        return self.supply.failed

    @property
    def queued(self) -> int:
        return self.supply.queued

    @property
    def started(self) -> int:
        return self.supply.started

    @property
    def pools(self) -> list[Pool]:
        return [self.process, *self.dense.values()]

    @property
    def busy(self) -> int:
        return sum(pool.busy for pool in self.pools)

    @property
    def warm(self) -> int:
        return sum(pool.warm for pool in self.pools)

    def stop_acquiring(self) -> None:
        self.supply.stop_acquiring()

    async def close(self) -> None:
        self.supply.stop_acquiring()
        for pool in self.pools:
            await pool.close()
        await self.supply.close()


@contextlib.asynccontextmanager
async def standalone(config: Config, log: EventLog) -> AsyncIterator[Sandboxes]:
    """Sandboxes for the tools (`deadend check`, `try`, `test`): no listener, no privileges dropped."""
    background = Background(log, lambda _why: None)
    sandboxes = Sandboxes(config, log, background, DirectSpawner())
    try:
        await sandboxes.start()
        yield sandboxes
    finally:
        await sandboxes.close()
        await background.cancel_all()

"""How the ports share the workers: the fair-share rule, as pure logic (no processes, no clock).

`--workers` bounds the sandbox processes alive at once, all ports and pools together. Without a rule,
one busy port takes them all: the internet never runs out of SSH scanners, and a tarpit that holds each
of them for an hour would leave the ports that record credentials nothing. So:

- half of `--workers` is a reserve, split evenly between the ports: a port can always get its part
  (`reserve` workers), whatever the others hold;
- the other half is shared, first come, first served;
- a port's own `workers` setting (config file, per port) caps it further.

A port may therefore hold at most `workers - (the other ports' unused reserve)`. Warm workers belong to
no port: they are capacity not yet assigned. The pools ask `may_assign` before giving a port a worker
(a fresh one, or a warm one) and report each assignment and its end.

What shares is a "tenant": a port served one worker per session, or a dense pool (whose workers hold
sessions of the ports it serves: one port with settings of its own, or every port of the global
--sessions-per-worker together).
"""

from __future__ import annotations

import collections
from collections.abc import Hashable, Iterable, Mapping

Tenant = Hashable  # a port (int), or a dense pool's name (str)


def fair_reserve(workers: int, tenants: int) -> int:
    """The workers each tenant can always get: half of them split evenly, at least one while there are
    enough to go round, none for a single tenant (it has them all)."""
    if tenants <= 1:
        return 0
    return max(workers // (2 * tenants), 1 if tenants <= workers else 0)


class Budget:
    """Workers assigned to tenants, against --workers, each tenant's reserve, and its own cap."""

    def __init__(
        self, workers: int, tenants: Iterable[Tenant] = (), caps: Mapping[Tenant, int] | None = None
    ) -> None:
        self.workers = workers
        self.caps: dict[Tenant, int] = dict(caps or {})
        self.used: collections.Counter[Tenant] = collections.Counter()
        self.tenants: set[Tenant] = set()
        self.reserve = 0
        self.set_tenants(tenants)

    def set_tenants(self, tenants: Iterable[Tenant], caps: Mapping[Tenant, int] | None = None) -> None:
        """The tenants served now (start-up and each reload); their assignments are kept."""
        self.tenants = set(tenants)
        if caps is not None:
            self.caps = dict(caps)
        self.reserve = fair_reserve(self.workers, len(self.tenants))

    def cap(self, tenant: Tenant) -> int:
        return min(self.caps.get(tenant, self.workers), self.workers)

    def may_assign(self, tenant: Tenant) -> bool:
        """May `tenant` get one more worker, if one is free? (Whether one is, is the pools' business.)"""
        used = self.used[tenant]
        if used >= self.cap(tenant):
            return False
        if used < self.reserve:
            return True
        unused_reserves = sum(max(0, self.reserve - self.used[t]) for t in self.tenants if t != tenant)
        return self.workers - sum(self.used.values()) - 1 >= unused_reserves

    def assign(self, tenant: Tenant) -> None:
        self.used[tenant] += 1

    def unassign(self, tenant: Tenant) -> None:
        self.used[tenant] -= 1
        if self.used[tenant] <= 0:
            del self.used[tenant]

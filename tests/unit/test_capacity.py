"""broker.capacity: the fair share of --workers between ports (tenants), as pure rules."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from broker.capacity import Budget, fair_reserve


def test_reserve() -> None:
    assert fair_reserve(64, 1) == 0  # a single port has them all
    assert fair_reserve(8, 2) == 2  # half of the workers, split between the two
    assert fair_reserve(64, 11) == 2
    assert fair_reserve(16, 11) == 1  # at least one each while there are enough to go round
    assert fair_reserve(8, 11) == 0


def fill(budget: Budget, tenant: object) -> int:
    """Assign workers to `tenant` until refused; how many it got."""
    n = 0
    while budget.may_assign(tenant):
        budget.assign(tenant)
        n += 1
    return n


def test_a_busy_port_leaves_the_others_their_reserve() -> None:
    budget = Budget(8, [22, 25])
    assert fill(budget, 22) == 6  # 8 less port 25's reserve of 2
    assert fill(budget, 25) == 2
    budget.unassign(22)
    assert budget.may_assign(25)  # the shared half again, first come
    assert not budget.may_assign(25) or fill(budget, 25) == 1


def test_an_idle_port_reserve_is_not_lost_to_the_shared_half() -> None:
    budget = Budget(8, [22, 25])
    assert fill(budget, 25) == 6
    assert fill(budget, 22) == 2


def test_a_port_cap_limits_it_further() -> None:
    budget = Budget(8, [22, 25], caps={22: 3})
    assert fill(budget, 22) == 3
    assert fill(budget, 25) == 5


def test_a_single_tenant_may_take_everything() -> None:
    budget = Budget(4, ["dense"])
    assert fill(budget, "dense") == 4


@given(
    workers=st.integers(1, 40),
    tenants=st.integers(1, 8),
    steps=st.lists(st.tuples(st.integers(0, 7), st.booleans()), max_size=200),
)
def test_never_past_workers_and_every_reserve_stays_reachable(
    workers: int, tenants: int, steps: list[tuple[int, bool]]
) -> None:
    budget = Budget(workers, range(tenants))
    for raw, take in steps:
        t = raw % tenants
        if take and budget.may_assign(t):
            budget.assign(t)
        elif not take and budget.used[t]:
            budget.unassign(t)
        assert sum(budget.used.values()) <= workers
        # whatever the others hold, a tenant below its reserve can still get a worker (if one is free)
        for u in range(tenants):
            if budget.used[u] < budget.reserve:
                assert budget.may_assign(u)
        unused = sum(max(0, budget.reserve - budget.used[u]) for u in range(tenants))
        assert sum(budget.used.values()) + unused <= workers

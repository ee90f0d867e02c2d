"""The garbage-collector policy: full collections on the gateway's timer, not Python's."""

import gc
import weakref

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from gateway.clock import ManualClock
from gateway.collector import CollectorPolicy, PauseHistogram


class Node:
    """A cycle: only the collector frees it."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def thresholds():
    saved = gc.get_threshold()
    yield saved
    gc.set_threshold(*saved)


def old_cyclic_garbage() -> weakref.ref:
    """A cycle promoted to the oldest generation while alive, then dropped: only a full
    collection frees it."""
    node = Node()
    gc.collect(1)  # survives two young collections: now in the oldest generation
    ref = weakref.ref(node)
    del node
    gc.collect(1)  # the young generations do not see it
    return ref


async def test_a_full_collection_runs_on_the_timer_and_python_runs_none(thresholds):
    clock = ManualClock()
    policy = CollectorPolicy(600, clock=clock)
    policy.start()
    try:
        young, middle, oldest = gc.get_threshold()
        assert (young, middle) == thresholds[:2]
        assert oldest > 10**6  # Python's own full collections: never
        garbage = old_cyclic_garbage()
        assert garbage() is not None
        await clock.advance(599)
        assert garbage() is not None and policy.full_collections == 0
        await clock.advance(1)
        assert garbage() is None and policy.full_collections == 1
        await clock.advance(600)
        assert policy.full_collections == 2
    finally:
        await policy.aclose()
    assert gc.get_threshold() == thresholds
    assert policy.full_collections == 2  # the timer stopped with it
    await clock.advance(1200)
    assert policy.full_collections == 2


async def test_interval_zero_leaves_pythons_schedule(thresholds):
    clock = ManualClock()
    policy = CollectorPolicy(0, clock=clock)
    policy.start()
    try:
        assert gc.get_threshold() == thresholds
        await clock.advance(10_000)
        assert policy.full_collections == 0
    finally:
        await policy.aclose()


async def test_every_pause_is_observed_by_generation_and_exposed_to_prometheus():
    pauses = PauseHistogram()
    registry = CollectorRegistry()
    registry.register(pauses)
    policy = CollectorPolicy(600, observe=pauses.observe, clock=ManualClock())
    policy.start()  # its own full collection came before the callback was installed
    try:
        gc.collect(0)
        gc.collect(0)
        policy.collect_full()
        assert pauses.count(0) >= 2 and pauses.count(2) >= 1
    finally:
        await policy.aclose()
    counted = pauses.count(0)
    gc.collect(0)
    assert pauses.count(0) == counted  # no longer observed
    exposed = generate_latest(registry).decode()
    assert f'voicegate_gc_pause_seconds_count{{generation="0"}} {counted}.0' in exposed
    assert 'voicegate_gc_pause_seconds_bucket{generation="2",le="+Inf"}' in exposed


def test_the_histogram_puts_a_pause_in_its_bucket():
    pauses = PauseHistogram()
    pauses.observe(1, 0.003)  # between 2 and 5 ms
    pauses.observe(1, 1.0)  # beyond the last bound
    registry = CollectorRegistry()
    registry.register(pauses)
    exposed = generate_latest(registry).decode()
    assert 'voicegate_gc_pause_seconds_bucket{generation="1",le="0.002"} 0.0' in exposed
    assert 'voicegate_gc_pause_seconds_bucket{generation="1",le="0.005"} 1.0' in exposed
    assert 'voicegate_gc_pause_seconds_bucket{generation="1",le="0.25"} 1.0' in exposed
    assert 'voicegate_gc_pause_seconds_bucket{generation="1",le="+Inf"} 2.0' in exposed
    assert 'voicegate_gc_pause_seconds_sum{generation="1"} 1.003' in exposed


async def test_overlapping_policies_give_the_thresholds_back_once_the_last_closes(thresholds):
    # Tests run several gateways in one process, closing them in any order.
    pauses = PauseHistogram()
    first = CollectorPolicy(600, observe=pauses.observe, clock=ManualClock())
    second = CollectorPolicy(600, observe=pauses.observe, clock=ManualClock())
    first.start()
    second.start()
    try:
        counted = pauses.count(0)
        gc.collect(0)
        assert pauses.count(0) == counted + 1  # one histogram: each pause counted once
        await first.aclose()
        assert gc.get_threshold()[2] > 10**6  # the second still holds the collector
    finally:
        await first.aclose()
        await second.aclose()
    assert gc.get_threshold() == thresholds
    counted = pauses.count(0)
    gc.collect(0)
    assert pauses.count(0) == counted


async def test_starting_twice_is_starting_once(thresholds):
    pauses = PauseHistogram()
    clock = ManualClock()
    policy = CollectorPolicy(600, observe=pauses.observe, clock=clock)
    policy.start()
    policy.start()
    await clock.advance(600)
    assert policy.full_collections == 1  # one timer
    counted = pauses.count(0)
    gc.collect(0)
    assert pauses.count(0) == counted + 1
    await policy.aclose()
    assert gc.get_threshold() == thresholds
    gc.collect(0)
    assert pauses.count(0) == counted + 1

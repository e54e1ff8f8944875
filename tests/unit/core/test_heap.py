"""bloodcell.core.heap: the garbage collector off while a run starts, its long-lived objects frozen once
it is built, and everything as it was when the run ends, however it ends."""

from __future__ import annotations

import gc

import pytest

from bloodcell.core.heap import deferred_collection


@pytest.fixture(autouse=True)
def collector_as_found():
    enabled = gc.isenabled()
    yield
    gc.unfreeze()
    (gc.enable if enabled else gc.disable)()


def test_off_while_starting_frozen_once_settled_and_handed_back():
    gc.enable()
    with deferred_collection() as collector:
        assert not gc.isenabled()
        made_at_start = [object(), {}]
        collector.settle()
        assert gc.isenabled() and gc.get_freeze_count() > 0
        assert not in_a_generation(made_at_start)  # frozen: no collection walks it
        collector.settle()  # a second call changes nothing
    assert gc.isenabled() and gc.get_freeze_count() == 0
    assert in_a_generation(made_at_start)  # collectable again


def in_a_generation(thing) -> bool:
    return any(o is thing for generation in range(3) for o in gc.get_objects(generation=generation))


def test_handed_back_when_the_run_fails():
    gc.enable()
    with pytest.raises(RuntimeError), deferred_collection() as collector:
        collector.settle()
        raise RuntimeError("a run that fails")
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_a_disabled_collector_stays_disabled():
    gc.disable()
    with deferred_collection() as collector:
        collector.settle()
        assert not gc.isenabled()
    assert not gc.isenabled() and gc.get_freeze_count() == 0


def test_objects_someone_else_froze_stay_frozen():
    gc.enable()
    theirs = [object()]
    gc.freeze()
    with deferred_collection() as collector:
        assert gc.isenabled()  # not ours to manage
        collector.settle()
    assert gc.get_freeze_count() > 0 and not in_a_generation(theirs)

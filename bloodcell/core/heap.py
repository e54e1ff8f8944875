"""Python's cyclic garbage collector, kept out of a run's start-up and off the objects that live as long
as the run.

A full collection walks every live object. Once TensorFlow, Keras, MLflow and a model are loaded that is
some 750,000 objects and 0.3-0.5 s a pass, and a run's start-up set off ten such passes (1.3 s on this
project's 2-core machine) that found some 8,000 objects of garbage between them: the garbage is too little
to matter and the passes are pure cost. So `deferred_collection` turns the collector off while a run
starts; once the run is built (`Collector.settle`) it moves every live object to the permanent generation
(``gc.freeze``, which is how CPython recommends keeping long-lived objects out of collections) and turns
the collector on again: the passes after it (plots, sheets) walk only what the run made since. At the end
it hands everything back (``gc.unfreeze``), so that a sweep's next trial in the same process frees this
trial's cycles as usual. benchmarks/overhead.py measures what it saves.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


class Collector:
    """The collector's state while a run starts (off) and once it has settled (on, long-lived objects
    frozen); `deferred_collection` makes one and puts things back."""

    def __init__(self) -> None:
        self.was_enabled = gc.isenabled()
        # objects someone else froze would be handed back by our gc.unfreeze: leave the collector alone then
        self.ours = gc.get_freeze_count() == 0
        self.frozen = False
        if self.ours:
            gc.disable()

    def settle(self) -> None:
        """The run is built: what lives now lives as long as the run. Freeze it and collect again."""
        if self.ours and not self.frozen:
            gc.freeze()
            self.frozen = True
            if self.was_enabled:
                gc.enable()

    def restore(self) -> None:
        if not self.ours:
            return
        if self.frozen:
            gc.unfreeze()
        if self.was_enabled:
            gc.enable()
        else:
            gc.disable()


@contextlib.contextmanager
def deferred_collection() -> Iterator[Collector]:
    """The collector off until the caller calls ``settle()`` on what it yields, then on for the objects
    made since; as it was before once the block ends, however it ends."""
    collector = Collector()
    try:
        yield collector
    finally:
        collector.restore()

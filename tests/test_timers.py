"""The timer heap on its own: order, due times, stale generations."""

from __future__ import annotations

from spoold.timers import Timers


def test_entries_come_out_by_time_then_by_arming_order() -> None:
    timers = Timers()
    gens = {key: timers.arm(key, when) for key, when in [("b", 5.0), ("a", 1.0), ("c", 1.0)]}
    assert len(set(gens.values())) == 3
    assert timers.next_time() == 1.0
    assert timers.pop_due(0.5) is None  # nothing due yet
    assert timers.pop_due(10.0) == ("a", gens["a"])
    assert timers.pop_due(10.0) == ("c", gens["c"])
    assert timers.pop_due(4.9) is None
    assert timers.pop_due(5.0) == ("b", gens["b"])
    assert timers.pop_due(99.0) is None
    assert timers.next_time() is None


def test_re_arming_leaves_the_old_entry_stale() -> None:
    timers = Timers()
    old = timers.arm("m", 1.0)
    new = timers.arm("m", 2.0)
    cancelled = timers.new_generation()
    assert len({old, new, cancelled}) == 3
    assert len(timers) == 2  # stale entries stay until they come up
    key, gen = timers.pop_due(3.0) or ("", 0)
    assert (key, gen) == ("m", old)  # the caller compares with its latest: stale
    assert timers.pop_due(3.0) == ("m", new)

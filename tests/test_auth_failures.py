"""The per-address log of failed AUTH (spoold.daemon.auth_failures), on a
fake clock."""

from __future__ import annotations

from spoold.daemon.auth_failures import AuthFailureLog, client_key


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_failures_age_out_of_the_window() -> None:
    clock = Clock()
    log = AuthFailureLog(3, 60.0, clock=clock)
    assert [log.failed("192.0.2.1") for _ in range(3)] == [1, 2, 3]
    assert log.refused("192.0.2.1")
    assert not log.refused("192.0.2.2")
    clock.now = 60.0
    assert log.count("192.0.2.1") == 0
    assert not log.refused("192.0.2.1")
    assert len(log) == 0  # forgotten once nothing is recent


def test_each_process_allows_its_share_of_the_limit() -> None:
    assert AuthFailureLog(10, 60.0, share=2).limit == 5
    assert AuthFailureLog(10, 60.0, share=3).limit == 4  # rounded up
    assert AuthFailureLog(1, 60.0, share=4).limit == 1


def test_an_ipv6_client_is_counted_by_its_slash_64() -> None:
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::9")
    assert client_key("2001:db8:1:2::1") != client_key("2001:db8:1:3::1")
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    log = AuthFailureLog(2, 60.0, clock=Clock())
    log.failed("2001:db8::1")
    log.failed("2001:db8::2")
    assert log.refused("2001:db8::3")


def test_the_delay_doubles_up_to_32_times_the_base() -> None:
    log = AuthFailureLog(3, 60.0)
    assert [log.delay(1.0, n) for n in (1, 2, 3, 6, 50)] == [1.0, 2.0, 4.0, 32.0, 32.0]


def test_memory_is_bounded() -> None:
    clock = Clock()
    log = AuthFailureLog(3, 600.0, clock=clock, max_addresses=100)
    for n in range(1000):
        clock.now = n / 1000
        log.failed(f"10.0.{n // 256}.{n % 256}")
        log.failed("192.0.2.1")  # kept: failing all along
    assert len(log) == 100
    assert log.count("192.0.2.1") == 6  # at most twice the limit kept
    assert log.count("10.0.0.0") == 0  # the oldest went first

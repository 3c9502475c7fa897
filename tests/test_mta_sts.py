"""MTA-STS records and policies (spoold/mta_sts.py): parsing, the MX
pattern match, and the per-domain cache with its refresh, on a fake clock
and stub lookups."""

from __future__ import annotations

import anyio
import pytest

from spoold.errors import TlsPolicyError
from spoold.mta_sts import MtaStsPolicies, StsPolicy, mx_matches, parse_policy, parse_record

GOOD = (
    "version: STSv1\r\nmode: enforce\r\n"
    "mx: mx1.example.org\r\nmx: *.example.net\r\nmax_age: 86400\r\n"
)


def test_a_good_policy_is_read() -> None:
    policy = parse_policy(GOOD)
    assert policy == StsPolicy("enforce", ("mx1.example.org", "*.example.net"), 86400)


def test_a_policy_with_lf_lines_unknown_keys_and_testing_mode() -> None:
    text = "version: STSv1\nmode: testing\nfuture: yes\nmx: MX.Example.ORG.\nmax_age: 0\n"
    assert parse_policy(text) == StsPolicy("testing", ("mx.example.org",), 0)


def test_mode_none_needs_no_mx() -> None:
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 60\n").mode == "none"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 60\n", "not STSv1"),
        ("mode: enforce\nmx: a.example\nmax_age: 60\n", "not STSv1"),
        ("version: STSv1\nmx: a.example\nmax_age: 60\n", "mode None"),
        ("version: STSv1\nmode: strict\nmx: a.example\nmax_age: 60\n", "mode 'strict'"),
        ("version: STSv1\nmode: enforce\nmx: a.example\n", "max_age ''"),
        ("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1\n", "max_age '-1'"),
        ("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 99999999\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmax_age: 60\n", "without mx"),
        ("version: STSv1\nmode: enforce\nmx: a.*.example\nmax_age: 60\n", "bad mx pattern"),
        ("<html>hello</html>\n", "without 'key:'"),
        ("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: \u0666\u0660\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 31557601\n", "max_age"),
        ("version: STSv1\x0bmode: enforce\nmx: a.example\nmax_age: 60\n", "not STSv1"),
        (
            "version: STSv1\nmode: enforce\n" + "mx: a.example\n" * 101 + "max_age: 60\n",
            "101 mx lines",
        ),
    ],
)
def test_a_malformed_policy_says_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(TlsPolicyError, match=says.replace("(", r"\(").replace("*", r"\*")):
        parse_policy(text)


def test_records() -> None:
    assert parse_record(["v=STSv1; id=20260101T000000;"]) is not None
    assert parse_record(["v=STSv1; id=abc"]).id == "abc"  # type: ignore[union-attr]
    assert parse_record(["v=spf1 -all"]) is None
    assert parse_record([]) is None
    assert parse_record(["v=STSv1; id=a", "v=STSv1; id=b"]) is None  # two: no policy
    with pytest.raises(TlsPolicyError, match="without a valid id"):
        parse_record(["v=STSv1;"])
    with pytest.raises(TlsPolicyError, match="without a valid id"):
        parse_record(["v=STSv1; id=has space!"])
    assert parse_record(["v=STSv10; id=abc"]) is None  # another version, not ours
    assert parse_record(["v=STSv1x; id=abc"]) is None
    assert parse_record(["v=STSv1 ; id=abc"]) is not None


def test_policy_lines_end_with_lf_or_crlf_only() -> None:
    """A line separator Python knows but the RFC does not (\\x85, \\u2028)
    does not split an mx value into another pattern."""
    policy = parse_policy(
        "version: STSv1\r\nmode: enforce\r\nmx: a.example\u2028mx: b.example\r\nmax_age: 60"
    )
    assert policy.mx == ("a.example\u2028mx: b.example",)
    assert not policy.allows("b.example")


@pytest.mark.parametrize(
    ("pattern", "host", "matches"),
    [
        ("mx1.example.org", "mx1.example.org", True),
        ("mx1.example.org", "MX1.Example.Org.", True),
        ("mx1.example.org", "mx2.example.org", False),
        ("*.example.net", "mx.example.net", True),
        ("*.example.net", "example.net", False),
        ("*.example.net", "a.b.example.net", False),
        ("*.example.net", "mx.example.net.evil", False),
        ("*.example.net", ".example.net", False),
    ],
)
def test_mx_patterns(pattern: str, host: str, matches: bool) -> None:
    assert mx_matches(pattern, host) is matches


class Published:
    """What a domain publishes, changed by the test; lookups counted."""

    def __init__(self) -> None:
        self.txt: dict[str, list[str]] = {}
        self.policy: dict[str, str] = {}
        self.fail_txt = False
        self.txt_asked = 0

    async def fetch_txt(self, name: str) -> list[str]:
        self.txt_asked += 1
        if self.fail_txt:
            raise OSError("SERVFAIL")
        return self.txt.get(name, [])

    async def fetch_policy(self, domain: str) -> str:
        if domain not in self.policy:
            raise TlsPolicyError("HTTP 404")
        return self.policy[domain]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _policies(published: Published, clock: Clock) -> MtaStsPolicies:
    return MtaStsPolicies(
        published.fetch_txt,
        published.fetch_policy,
        clock=clock,
        negative_ttl=60,
        refresh_before=3600,
    )


def _enforce(mx: str, max_age: int = 86400) -> str:
    return f"version: STSv1\nmode: enforce\nmx: {mx}\nmax_age: {max_age}\n"


async def test_a_policy_is_fetched_once_and_kept_for_its_max_age() -> None:
    published, clock = Published(), Clock()
    published.txt["_mta-sts.example.org"] = ["v=STSv1; id=1"]
    published.policy["example.org"] = _enforce("mx.example.org")
    policies = _policies(published, clock)

    first = await policies.policy_for("Example.ORG")
    assert first is not None and first.policy.mx == ("mx.example.org",)
    clock.now += 86000
    assert await policies.policy_for("example.org") is first
    assert policies.fetches == 1
    assert published.txt_asked == 1  # a kept policy asks no DNS at attempt time


async def test_no_record_is_no_policy_and_is_remembered_for_a_while() -> None:
    published, clock = Published(), Clock()
    policies = _policies(published, clock)
    assert await policies.policy_for("example.org") is None
    assert await policies.policy_for("example.org") is None
    assert published.txt_asked == 1
    clock.now += 61
    published.txt["_mta-sts.example.org"] = ["v=STSv1; id=1"]
    published.policy["example.org"] = _enforce("mx.example.org")
    assert await policies.policy_for("example.org") is not None


async def test_a_record_whose_policy_cannot_be_fetched_is_no_policy() -> None:
    published, clock = Published(), Clock()
    published.txt["_mta-sts.example.org"] = ["v=STSv1; id=1"]
    published.policy["example.org"] = "version: STSv9\n"
    policies = _policies(published, clock)
    assert await policies.policy_for("example.org") is None


async def test_refresh_fetches_again_when_the_id_changes() -> None:
    published, clock = Published(), Clock()
    published.txt["_mta-sts.example.org"] = ["v=STSv1; id=1"]
    published.policy["example.org"] = _enforce("old.example.org")
    policies = _policies(published, clock)
    await policies.policy_for("example.org")

    await policies.refresh_due()  # same id, far from expiry: nothing fetched
    assert policies.fetches == 1

    published.txt["_mta-sts.example.org"] = ["v=STSv1; id=2"]
    published.policy["example.org"] = _enforce("new.example.org")
    await policies.refresh_due()
    kept = policies.cached("example.org")
    assert kept is not None and kept.id == "2" and kept.policy.mx == ("new.example.org",)


async def test_refresh_before_expiry_and_a_failed_refresh_keeps_the_policy() -> None:
    published, clock = Published(), Clock()
    published.txt["_mta-sts.example.org"] = ["v=STSv1; id=1"]
    published.policy["example.org"] = _enforce("mx.example.org", max_age=7200)
    policies = _policies(published, clock)
    first = await policies.policy_for("example.org")
    assert first is not None

    clock.now += 4000  # within refresh_before (3600 s) of expiry
    del published.policy["example.org"]  # the web server is down
    await policies.refresh_due()
    assert policies.fetches == 2
    assert policies.cached("example.org") is first  # kept
    assert await policies.policy_for("example.org") is first

    published.fail_txt = True  # DNS down too: the attempt still uses the kept policy
    assert await policies.policy_for("example.org") is first

    published.fail_txt = False
    published.policy["example.org"] = _enforce("mx.example.org", max_age=7200)
    await policies.refresh_due()
    refreshed = policies.cached("example.org")
    assert refreshed is not None and refreshed.expires == clock.now + 7200


async def test_an_expired_policy_that_cannot_be_refreshed_is_dropped() -> None:
    published, clock = Published(), Clock()
    published.txt["_mta-sts.example.org"] = ["v=STSv1; id=1"]
    published.policy["example.org"] = _enforce("mx.example.org", max_age=100)
    policies = _policies(published, clock)
    await policies.policy_for("example.org")
    del published.policy["example.org"]
    clock.now += 101
    await policies.refresh_due()
    assert policies.cached("example.org") is None
    assert await policies.policy_for("example.org") is None


async def test_a_stripped_record_does_not_drop_a_valid_policy() -> None:
    """An attacker who removes the TXT record does not turn a kept policy off."""
    published, clock = Published(), Clock()
    published.txt["_mta-sts.example.org"] = ["v=STSv1; id=1"]
    published.policy["example.org"] = _enforce("mx.example.org")
    policies = _policies(published, clock)
    first = await policies.policy_for("example.org")
    del published.txt["_mta-sts.example.org"]
    await policies.refresh_due()
    assert policies.cached("example.org") is first
    assert await policies.policy_for("example.org") is first


async def test_attempts_to_one_domain_share_one_lookup() -> None:
    """A thousand queued messages to one domain fetch its policy once."""
    published, clock = Published(), Clock()
    published.txt["_mta-sts.example.org"] = ["v=STSv1; id=1"]
    published.policy["example.org"] = _enforce("mx.example.org")
    release = anyio.Event()
    fetch = published.fetch_policy

    async def slow_fetch(domain: str) -> str:
        await release.wait()
        return await fetch(domain)

    policies = MtaStsPolicies(published.fetch_txt, slow_fetch, clock=clock)
    results: list[object] = []

    async def attempt() -> None:
        results.append(await policies.policy_for("example.org"))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(attempt)
            await anyio.wait_all_tasks_blocked()
            release.set()
    assert policies.fetches == 1
    assert published.txt_asked == 1
    assert len(results) == 5 and all(r is results[0] and r is not None for r in results)


async def test_a_short_lived_policy_is_refreshed_at_half_its_life() -> None:
    published, clock = Published(), Clock()
    published.txt["_mta-sts.example.org"] = ["v=STSv1; id=1"]
    published.policy["example.org"] = _enforce("mx.example.org", max_age=1000)
    policies = _policies(published, clock)  # refresh_before: an hour
    await policies.policy_for("example.org")
    clock.now += 400
    await policies.refresh_due()
    assert policies.fetches == 1  # 600 s left of 1000: not yet
    clock.now += 101
    await policies.refresh_due()
    assert policies.fetches == 2


async def test_a_failed_txt_lookup_is_not_remembered_as_no_policy_for_long() -> None:
    """A failure is not an answer: asked again after error_ttl, not after
    negative_ttl (one failure must not turn MTA-STS off for ten minutes)."""
    published, clock = Published(), Clock()
    policies = MtaStsPolicies(
        published.fetch_txt, published.fetch_policy, clock=clock, negative_ttl=600, error_ttl=30
    )
    published.fail_txt = True
    assert await policies.policy_for("example.org") is None
    assert await policies.policy_for("example.org") is None
    assert published.txt_asked == 1  # briefly remembered
    published.fail_txt = False
    published.txt["_mta-sts.example.org"] = ["v=STSv1; id=1"]
    published.policy["example.org"] = _enforce("mx.example.org")
    clock.now += 31
    found = await policies.policy_for("example.org")
    assert found is not None and found.policy.mode == "enforce"


async def test_a_failed_fetch_is_retried_after_error_ttl() -> None:
    published, clock = Published(), Clock()
    published.txt["_mta-sts.example.org"] = ["v=STSv1; id=1"]
    policies = MtaStsPolicies(
        published.fetch_txt, published.fetch_policy, clock=clock, negative_ttl=600, error_ttl=30
    )
    assert await policies.policy_for("example.org") is None  # 404
    published.policy["example.org"] = _enforce("mx.example.org")
    clock.now += 31
    assert await policies.policy_for("example.org") is not None


async def test_a_lookup_given_up_is_not_started_again_by_every_attempt() -> None:
    published, clock = Published(), Clock()
    published.txt["_mta-sts.example.org"] = ["v=STSv1; id=1"]
    fetches = 0

    async def hanging(domain: str) -> str:
        nonlocal fetches
        fetches += 1
        await anyio.sleep_forever()
        raise AssertionError

    policies = MtaStsPolicies(published.fetch_txt, hanging, clock=clock, error_ttl=30)
    with anyio.move_on_after(0.01):
        await policies.policy_for("example.org")
    assert await policies.policy_for("example.org") is None
    assert fetches == 1


async def test_kept_domains_are_bounded() -> None:
    published, clock = Published(), Clock()
    for n in range(5):
        published.txt[f"_mta-sts.d{n}.example"] = ["v=STSv1; id=1"]
        published.policy[f"d{n}.example"] = _enforce(f"mx.d{n}.example")
    policies = MtaStsPolicies(
        published.fetch_txt, published.fetch_policy, clock=clock, max_domains=3
    )
    for n in range(5):
        assert await policies.policy_for(f"d{n}.example") is not None
        assert await policies.policy_for(f"none{n}.example") is None
    assert policies.sizes() == (3, 3)
    assert policies.cached("d0.example") is None  # the oldest went
    assert policies.cached("d4.example") is not None


async def test_refresh_asks_a_few_domains_at_once() -> None:
    published, clock = Published(), Clock()
    for n in range(20):
        published.txt[f"_mta-sts.d{n}.example"] = ["v=STSv1; id=1"]
        published.policy[f"d{n}.example"] = _enforce(f"mx.d{n}.example")
    policies = MtaStsPolicies(
        published.fetch_txt, published.fetch_policy, clock=clock, refresh_concurrency=8
    )
    for n in range(20):
        await policies.policy_for(f"d{n}.example")
    release = anyio.Event()
    in_flight = most = 0
    lookup = published.fetch_txt

    async def slow_txt(name: str) -> list[str]:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await release.wait()
        in_flight -= 1
        return await lookup(name)

    policies.fetch_txt = slow_txt
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(policies.refresh_due)
            await anyio.wait_all_tasks_blocked()
            assert in_flight == 8
            release.set()
    assert most == 8 and in_flight == 0

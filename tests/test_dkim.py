"""DKIM signing (spoold/dkim.py) and where it happens: once, as a message
is added (Spool.add, SpoolWriter.add), so every attempt sends the same
signed bytes. Signatures are checked by dkimpy against a stub DNS and by
the tests' own verifier (tests/dkim_helpers.py, from RFC 6376/8463)."""

from __future__ import annotations

import base64
import gc
import os
import re
import time
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

import spoold.dkim
from spoold import Body, LineEndingPolicy, RoutedBatch, RoutedEnvelope, SendAt, Spool, SpoolWriter
from spoold.dkim import DkimSigner
from spoold.dkim_keys import (
    DkimAlgorithm,
    DkimKey,
    load_key,
    new_private_key,
    public_key_record,
    record_problem,
    txt_strings,
    write_new_key,
)
from spoold.errors import DkimKeyError
from spoold.outcome import DeliveryPolicy, OnPermanentFailure
from spoold.spool import DEFAULT_RETRY_INTERVALS
from spoold.testing import FakeClock, InMemoryRelay
from tests.dkim_helpers import (
    BadSignature,
    StubDns,
    dkimpy_verify_all,
    key_file,
    signature_fields,
    verify_all,
)
from tests.spool_helpers import NO_SUCH_USER, OK, TRY_LATER, status_of
from tests.support import wait_until

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)

# Made once: RSA key generation takes a while.
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_KEY_2 = rsa.generate_private_key(public_exponent=65537, key_size=1024)
ED_KEY = ed25519.Ed25519PrivateKey.generate()

MESSAGE = (
    "From: Jane Doe <jane@Example.ORG>\r\n"
    "To: bob@example.com,\r\n"
    "\tcarol@example.com\r\n"
    "Subject:   Grüße   aus  Köln \r\n"
    "Date: Sun, 06 Dec 2026 12:00:00 +0000\r\n"
    "Message-ID: <1@example.org>\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n"
    "\r\n"
    ".a line that starts with a dot\r\n"
    "..and one with two\r\n"
    ".\r\n"
    "8-bit text: Grüße, naïve café, 日本語  with   spaces \t\r\n"
    + "long "
    * 300  # 1,500 characters on one line (over SMTP's 998)
    + "\r\n"
    "\r\n"
    "\r\n"
).encode()


def key(domain: str, selector: str, private: object = ED_KEY, **kw: object) -> DkimKey:
    alg = (
        DkimAlgorithm.RSA_SHA256
        if isinstance(private, rsa.RSAPrivateKey)
        else DkimAlgorithm.ED25519_SHA256
    )
    return DkimKey(domain, selector, alg, private, **kw)  # type: ignore[arg-type]


def dns_for(*keys: DkimKey) -> StubDns:
    dns = StubDns()
    for k in keys:
        dns.publish(k.domain, k.selector, public_key_record(k.private_key))
    return dns


def signed(signer: DkimSigner, content: bytes) -> tuple[bytes, str]:
    """The message as a next hop gets it (content, not dot-stuffed) and
    the reason when unsigned."""
    body = Body.from_content(content)
    outcome = signer.sign(body.wire, NOW)
    return outcome.header + body.content(), outcome.reason


# ------------------------------------------------------------ the signer


@pytest.mark.parametrize("private", [RSA_KEY, ED_KEY], ids=["rsa-sha256", "ed25519-sha256"])
def test_a_signature_verifies_for_both_algorithms(private: object) -> None:
    k = key("example.org", "s1", private)
    message, _ = signed(DkimSigner([k]), MESSAGE)
    dns = dns_for(k)
    assert verify_all(message, dns) == [("example.org", "s1")]
    assert dkimpy_verify_all(message, dns) == 1
    (tags,) = signature_fields(message)
    assert tags["a"] == k.algorithm.value
    assert tags["c"] == "relaxed/relaxed"
    assert tags["t"] == str(int(NOW.timestamp()))
    signed_names = tags["h"].split(":")
    assert signed_names.count("from") == 2  # oversigned: From once more than present
    assert {"to", "subject", "date", "message-id", "content-type"} <= set(signed_names)
    assert "l" not in tags  # the whole body is signed


def test_two_keys_of_one_domain_give_two_valid_signatures() -> None:
    """A rotation (two RSA selectors) and RSA beside Ed25519: one each."""
    keys = [
        key("example.org", "old", RSA_KEY_2),
        key("example.org", "new", RSA_KEY),
        key("example.org", "ed", ED_KEY),
    ]
    message, _ = signed(DkimSigner(keys), MESSAGE)
    dns = dns_for(*keys)
    assert verify_all(message, dns) == [
        ("example.org", "old"),
        ("example.org", "new"),
        ("example.org", "ed"),
    ]
    assert dkimpy_verify_all(message, dns) == 3


def test_a_changed_message_fails_the_verifiers() -> None:
    """The verifiers are not yes-machines."""
    k = key("example.org", "s1", RSA_KEY)
    message, _ = signed(DkimSigner([k]), MESSAGE)
    dns = dns_for(k)
    for changed in (
        message.replace("naïve".encode(), b"naive"),  # the body
        message.replace(b"Subject:   Gr", b"Subject: Re: Gr"),  # a signed header
        message.replace(b"From: Jane", b"From: Mallory <m@evil.example>\r\nFrom: Jane"),
        # Fields a message has once are oversigned: none can be added.
        b"Subject: Your invoice\r\n" + message,
        message.replace(b"From: Jane", b"Reply-To: m@evil.example\r\nFrom: Jane"),
        message.replace(
            b"From: Jane", b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\nFrom: Jane"
        ),
    ):
        with pytest.raises(BadSignature):
            verify_all(changed, dns)
        assert not __import__("dkim").verify(changed, dnsfunc=dns.dkimpy)
    # What relaxed canonicalisation forgives: folding and whitespace.
    refolded = message.replace(b"Subject:   Gr\xc3\xbc\xc3\x9fe", b"Subject: Gr\xc3\xbc\xc3\x9fe")
    assert verify_all(refolded, dns) == [("example.org", "s1")]


@pytest.mark.parametrize(
    ("from_field", "subdomains", "signs"),
    [
        ("jane@example.org", False, True),
        ("jane@EXAMPLE.org", False, True),  # case does not matter
        ("jane@mail.example.org", False, False),
        ("jane@mail.example.org", True, True),
        ("jane@deep.mail.example.org", True, True),
        ("jane@notexample.org", True, False),  # not a subdomain, only a suffix
        ("jane@example.net", True, False),
    ],
)
def test_which_from_domains_a_key_signs(from_field: str, subdomains: bool, signs: bool) -> None:
    k = key("example.org", "s1", subdomains=subdomains)
    message, reason = signed(
        DkimSigner([k]), f"From: {from_field}\r\nSubject: x\r\n\r\nhi\r\n".encode()
    )
    assert bool(signature_fields(message)) is signs, reason
    if signs:
        assert verify_all(message, dns_for(k)) == [("example.org", "s1")]
        assert dkimpy_verify_all(message, dns_for(k)) == 1


def test_the_most_specific_domain_signs() -> None:
    parent = key("example.org", "p", subdomains=True)
    child = key("mail.example.org", "c")
    signer = DkimSigner([parent, child])
    message, _ = signed(signer, b"From: a@mail.example.org\r\n\r\nhi\r\n")
    assert verify_all(message, dns_for(parent, child)) == [("mail.example.org", "c")]
    message, _ = signed(signer, b"From: a@other.example.org\r\n\r\nhi\r\n")
    assert verify_all(message, dns_for(parent, child)) == [("example.org", "p")]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"Subject: no from\r\n\r\nhi\r\n", "no From: field"),
        (b"From: a@example.org\r\nFrom: b@example.org\r\n\r\nhi\r\n", "more than one From"),
        (b"From: a@example.org, b@example.org\r\n\r\nhi\r\n", "exactly one address"),
        (b"From: undisclosed\r\n\r\nhi\r\n", "exactly one address"),
        (b"From: a@example.net\r\n\r\nhi\r\n", "no key for example.net"),
        # The display name is not the address: this is mail from evil.example.
        (b'From: "boss@example.org" <x@evil.example>\r\n\r\nhi\r\n', "no key for evil.example"),
        (b"From: <x@example.org.evil.example>\r\n\r\nhi\r\n", "no key for example.org.evil"),
        (b"From a@example.org Sun Dec  6\r\nFrom: a@example.org\r\n\r\nhi\r\n", "malformed"),
        (b"", "no From: field"),
    ],
)
def test_a_message_that_cannot_be_signed_is_left_as_it_is(content: bytes, reason: str) -> None:
    message, why = signed(DkimSigner([key("example.org", "s1")]), content)
    assert message == Body.from_content(content).content()
    assert reason in why


def test_a_header_section_of_many_folded_lines_is_read_in_linear_time() -> None:
    """100,000 continuation lines (400 kB) are signed, and cost about ten
    times what 10,000 do, not a hundred (a parse that copied the field per
    line). CPU time of this process, compared within the test: no bound
    that a slow machine could miss."""
    k = key("example.org", "s1")

    def folded(lines: int) -> bytes:
        return b"From: a@example.org\r\nX-Long: x\r\n" + b" x\r\n" * lines + b"\r\nhi\r\n"

    def cpu_to_sign(content: bytes) -> tuple[float, bytes]:
        started = time.process_time()
        message, why = signed(DkimSigner([k]), content)
        spent = time.process_time() - started
        assert why == ""
        return spent, message

    small = min(cpu_to_sign(folded(10_000))[0] for _ in range(3))
    large, message = cpu_to_sign(folded(100_000))
    assert large < 40 * max(small, 0.001), (small, large)
    assert verify_all(message, dns_for(k)) == [("example.org", "s1")]


@pytest.mark.parametrize("blank_line", [True, False])
def test_a_header_section_over_1_mib_is_left_unsigned(blank_line: bool) -> None:
    content = b"From: a@example.org\r\nX-Long: x\r\n" + b" x\r\n" * 300_000
    content += b"\r\nhi\r\n" if blank_line else b""
    message, why = signed(DkimSigner([key("example.org", "s1")]), content)
    assert why == "header section too large"
    assert message == Body.from_content(content).content()


def test_a_message_with_more_than_1000_fields_to_sign_is_left_unsigned() -> None:
    """Each would be listed in h= (a To: given 1,001 times: a 4 kB h=)."""
    k = key("example.org", "s1")
    many = b"From: a@example.org\r\n" + b"To: x@example.com\r\n" * 999 + b"X-Other: 1\r\n" * 5000
    message, why = signed(DkimSigner([k]), many + b"\r\nhi\r\n")
    assert verify_all(message, dns_for(k)) == [("example.org", "s1")]
    message, why = signed(DkimSigner([k]), many + b"Cc: y@example.com\r\n\r\nhi\r\n")
    assert why == "too many header fields to sign"


@pytest.mark.parametrize(
    ("from_value", "reason"),
    [
        (b"(" * 1000, "cannot read the From: field"),  # the parser recurses per "("
        (b"a@example.org" + b"\r\n (c)" * 100_000, "From: too long"),
        (b"x" * 1990 + b" <a@example.org>", "From: too long"),
    ],
)
def test_a_from_field_that_cannot_be_read_leaves_the_message_unsigned(
    from_value: bytes, reason: str
) -> None:
    content = b"From: " + from_value + b"\r\n\r\nhi\r\n"
    started = time.monotonic()
    message, why = signed(DkimSigner([key("example.org", "s1")]), content)
    assert time.monotonic() - started < 5
    assert why == reason
    assert message == Body.from_content(content).content()


def test_an_unforeseen_parse_error_leaves_the_message_unsigned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(fields: object) -> tuple[str | None, str]:
        raise AttributeError("a parser's own bug")

    monkeypatch.setattr(spoold.dkim, "_from_domain", broken)
    outcome = DkimSigner([key("example.org", "s1")]).sign(b"From: a@example.org\r\n\r\n", NOW)
    assert outcome.header == b""
    assert outcome.reason == "cannot read the message (AttributeError: a parser's own bug)"


def test_an_internationalised_from_domain_is_matched_as_its_a_label() -> None:
    k = key("bücher.example", "s1")
    assert k.domain == "xn--bcher-kva.example"
    message, _ = signed(DkimSigner([k]), "From: a@BÜCHER.example\r\n\r\nhi\r\n".encode())
    assert verify_all(message, dns_for(k)) == [("xn--bcher-kva.example", "s1")]


@pytest.mark.parametrize(
    "domain", ["faß.de", "σοφός.example", "a\u200db.example", "\uff45\uff58.example"]
)
def test_a_domain_idna_2003_and_2008_read_differently_is_refused(domain: str) -> None:
    """Python's codec (IDNA 2003) would make faß.de fass.de; receivers
    (IDNA 2008) read xn--fa-hia.de. The key asks for the xn-- form; mail
    from such a domain goes unsigned."""
    with pytest.raises(ValueError, match="write its xn-- form"):
        key(domain, "s1")
    assert key("xn--fa-hia.de", "s1").domain == "xn--fa-hia.de"
    signer = DkimSigner([key("fass.de", "s1"), key("xn--fa-hia.de", "s1")])
    _, why = signed(signer, f"From: a@{domain}\r\n\r\nhi\r\n".encode())
    assert why == "From: has no usable domain"


def test_headers_to_sign_can_be_chosen_and_single_fields_are_oversigned() -> None:
    k = key("example.org", "s1", headers=("From", "Subject", "X-Campaign"))
    content = (
        b"From: a@example.org\r\nTo: b@example.com\r\nSubject: s\r\nX-Campaign: 7\r\n\r\nhi\r\n"
    )
    message, _ = signed(DkimSigner([k]), content)
    (tags,) = signature_fields(message)
    # Oversigned: the fields of the list a message has at most once.
    assert tags["h"] == "from:subject:x-campaign:from:subject"
    assert verify_all(message, dns_for(k)) == [("example.org", "s1")]
    # To: is not signed: changing it keeps the signature valid.
    assert verify_all(message.replace(b"To: b@", b"To: c@"), dns_for(k))
    with pytest.raises(ValueError, match="must hold From"):
        key("example.org", "s1", headers=("Subject",))
    with pytest.raises(ValueError, match="cannot be signed"):
        key("example.org", "s1", headers=("From", "DKIM-Signature"))
    with pytest.raises(ValueError, match="not a header field name"):
        key("example.org", "s1", headers=("From", "Subject;x"))  # would end h=


# ------------------------------------------------------------ one signer, many messages


def test_one_signer_signs_each_message_as_a_new_signer_would() -> None:
    """Messages of one sender through one long-lived signer, which
    remembers what they share: the same fields refolded, respaced, in
    another case, among fields no key signs, a field twice, over 64 fields
    to sign, a long From:, signed at another time (t= one digit shorter,
    so h= starts elsewhere). Each signature is byte for byte a new
    signer's, and verifies, the first time and when all is remembered."""
    keys = [
        key("example.org", "rsa", RSA_KEY_2),
        key(
            "example.org", "ed", ED_KEY, headers=("From", "Subject", "To", "X-Campaign", "Received")
        ),
    ]
    contents = [
        b"From: Jane <jane@example.org>\r\nTo: bob@example.com\r\nSubject: hello world\r\n"
        b"X-Campaign: 7\r\n\r\nhi\r\n",
        b"FROM: Jane <jane@EXAMPLE.org>\r\nto:bob@example.com\r\nSubject:  hello\r\n\t world \r\n"
        b"x-campaign:\t7\r\n\r\nhi\r\n",
        b"Received: from a\r\nReceived: from b\r\nFrom: Jane <jane@example.org>\r\n"
        b"X-Mailer: m\r\nTo: bob@example.com\r\nX-Spam: no\r\nSubject: hello world\r\n"
        b"X-Campaign: 7\r\n\r\nhi\r\n",
        b"From: Jane <jane@example.org>\r\nX-Mailer: m\r\nTo: bob@example.com\r\n"
        b"Subject: hello world\r\nX-Campaign: 7\r\n\r\nhi\r\n",
        b"From: Jane <jane@example.org>\r\nSubject: hello world\r\nTo: bob@example.com\r\n"
        b"TO: carol@example.com\r\nX-Campaign: 7\r\n\r\nhi\r\n",
        b"From: jane@example.org\r\n"
        + b"".join(b"Cc: c%d@example.com\r\n" % i for i in range(70))
        + b"Subject: s\r\n\r\nhi\r\n",
        b"From: jane@example.org\r\n"
        + b"".join(b"cc:\r\n  c%d@example.com\r\n" % i for i in range(70))
        + b"Subject: s\r\n\r\nhi\r\n",
        b'From: "' + b"J" * 600 + b'" <jane@example.org>\r\nSubject: s\r\n\r\nhi\r\n',
    ]
    times = [NOW, datetime(1973, 3, 3, tzinfo=UTC)]
    signer = DkimSigner(keys)
    dns = dns_for(*keys)
    for _ in range(2):
        for now in times:
            for content in contents:
                body = Body.from_content(content)
                outcome = signer.sign(body.wire, now)
                assert outcome == DkimSigner(keys).sign(body.wire, now), content
                message = outcome.header + body.content()
                assert verify_all(message, dns) == [("example.org", "rsa"), ("example.org", "ed")]
                assert dkimpy_verify_all(message, dns) == 2


def kept_by(signer: DkimSigner, contents: list[bytes]) -> tuple[int, list[str]]:
    """The octets ``signer`` keeps from signing ``contents`` (still
    allocated once the messages and signatures are gone), and why each
    went unsigned ("" when signed)."""
    wires = [Body.from_content(c).wire for c in contents]
    signer.sign(Body.from_content(MESSAGE).wire, NOW)  # what a first message sets up
    gc.collect()
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        reasons = [signer.sign(wire, NOW).reason for wire in wires]
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before, reasons
    finally:
        if not tracing:
            tracemalloc.stop()


def long_from(i: int) -> bytes:
    """A From: of 256 kB in 1,000 lines of 260 octets: legal SMTP."""
    fold = b"".join(b"\r\n %04d%s" % (i, b"x" * 250) for _ in range(1000))
    return b"From: a@example.org" + fold + b"\r\nSubject: s\r\n\r\nhi\r\n"


def many_unsigned(i: int) -> bytes:
    """20,000 fields no key signs (180 kB), in an order of their own."""
    names = (b"X-%05d" % ((j + i) % 20_000) for j in range(20_000))
    return b"From: a@example.org\r\n" + b"".join(n + b":\r\n" for n in names) + b"\r\nhi\r\n"


def many_signed(i: int) -> bytes:
    """1,000 fields to sign (the most signed), in an order of their own."""
    fields = [b"To: t@example.com\r\n"] * 998
    fields.insert(i, b"Cc: c@example.com\r\n")
    return b"From: a@example.org\r\n" + b"".join(fields) + b"\r\nhi\r\n"


@pytest.mark.parametrize(
    ("content", "count", "reason"),
    [(long_from, 8, "From: too long"), (many_unsigned, 3, ""), (many_signed, 30, "")],
    ids=["a long From", "many fields not signed", "many fields signed"],
)
def test_what_a_signer_remembers_stays_small_whatever_messages_hold(
    content: Callable[[int], bytes], count: int, reason: str
) -> None:
    """A signer remembers the domain of each From: value and, per key, its
    plan for each order of fields to sign, for thousands of each: what it
    keeps of one message must be small, whatever the message holds. Here
    each message would leave over 64 kB (over 2 MB in all), and together
    they leave under 256 kB."""
    signer = DkimSigner([key("example.org", "s1")])
    kept, reasons = kept_by(signer, [content(i) for i in range(count)])
    assert reasons == [reason] * count
    assert kept < 256 * 1024, kept


lines = st.lists(
    st.text(alphabet=" \t.ax\u00e9", max_size=12).map(lambda s: s.encode()), max_size=12
)


@settings(max_examples=150, deadline=None)
@given(body_lines=lines, chunk=st.sampled_from([1, 3, 64, 1 << 16]))
def test_any_body_verifies_whatever_the_chunk_size(body_lines: list[bytes], chunk: int) -> None:
    """The body is hashed a chunk of lines at a time: every cut gives the
    canonical body both verifiers compute from the whole."""
    import spoold.dkim as module

    old = module._CHUNK
    module._CHUNK = chunk
    try:
        k = key("example.org", "s1")
        content = b"From: a@example.org\r\n\r\n" + b"".join(x + b"\r\n" for x in body_lines)
        message, _ = signed(DkimSigner([k]), content)
    finally:
        module._CHUNK = old
    assert verify_all(message, dns_for(k)) == [("example.org", "s1")]
    assert dkimpy_verify_all(message, dns_for(k)) == 1


TRICKY_BODIES = {
    "trailing whitespace": b"a \r\nb\t\r\nc \t \r\n \r\nd\r\n",
    "empty lines at the end": b"text\r\n\r\n\r\n\r\n",
    "whitespace-only lines at the end": b"text\r\n \r\n\t\r\n  \r\n",
    "only empty lines": b"\r\n\r\n\r\n",
    "only whitespace": b" \t \r\n\t\r\n",
    "empty": b"",
    "one line": b"x\r\n",
    "no empty line at the end": b"a\r\nb\r\n",
    "runs of whitespace inside": b"a  b\t\tc \t d\r\n",
    "long lines": (b"word " * 400).rstrip() + b"\r\n" + b"y" * 5000 + b"\r\n",
    "8-bit": "Grüße,  naïve café\t日本語 \r\n".encode() + bytes(range(0x80, 0x100)) + b"\r\n",
    "dot-stuffing": b".\r\n..\r\n.a line\r\n...\r\nend.\r\n.\r\n",
    "a dot-only line at the end": b"text\r\n.\r\n",
    "control characters": b"a\x0bb\x0c \r\n\x0b\r\n",
}


@pytest.mark.parametrize("body", list(TRICKY_BODIES.values()), ids=list(TRICKY_BODIES))
@pytest.mark.parametrize("private", [RSA_KEY, ED_KEY], ids=["rsa-sha256", "ed25519-sha256"])
@pytest.mark.parametrize("chunk", [1 << 16, 1, 5])
def test_tricky_bodies_verify(body: bytes, private: object, chunk: int) -> None:
    """Each body both verifiers check (the body hash is this module's own
    canonicalisation), whatever the chunk a body is hashed by."""
    import spoold.dkim as module

    k = key("example.org", "s1", private)
    old = module._CHUNK
    module._CHUNK = chunk
    try:
        message, why = signed(DkimSigner([k]), b"From: a@example.org\r\n\r\n" + body)
    finally:
        module._CHUNK = old
    assert why == ""
    assert verify_all(message, dns_for(k)) == [("example.org", "s1")]
    assert dkimpy_verify_all(message, dns_for(k)) == 1


def test_a_body_with_line_feeds_alone_is_signed_as_normalised() -> None:
    """Bare LF (and CR) lines, taken under ``normalize``: the signature
    covers the CRLF form the spool keeps and sends."""
    k = key("example.org", "s1")
    content = b"From: a@example.org\nSubject: x \n\nline one \nline\rtwo\n\n\n"
    body = Body.from_content(content, LineEndingPolicy.NORMALIZE)
    outcome = DkimSigner([k]).sign(body.wire, NOW)
    message = outcome.header + body.content()
    assert verify_all(message, dns_for(k)) == [("example.org", "s1")]
    assert dkimpy_verify_all(message, dns_for(k)) == 1


body_bytes = st.lists(
    st.sampled_from(
        [b" ", b"\t", b"  ", b"a", b"\xc3\xa9", b".", b"..", b"\r\n", b"\r\n", b" \r\n", b"\x0b"]
    ),
    max_size=30,
).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(body=body_bytes, ends=st.integers(0, 3), chunk=st.sampled_from([1, 2, 7, 1 << 16]))
def test_the_body_hash_is_dkimpys_relaxed_canonicalisation(
    body: bytes, ends: int, chunk: int
) -> None:
    """Byte for byte dkimpy's relaxed body (an implementation not ours),
    the fast path (nothing to change) and the substitutions alike."""
    import hashlib

    from dkim.canonicalization import CanonicalizationPolicy  # type: ignore[import-untyped]

    import spoold.dkim as module

    content = body + b"\r\n" * ends
    wire = Body.from_content(b"From: a@example.org\r\n\r\n" + content).wire
    start = wire.index(b"\r\n\r\n") + 4
    expected = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed").canonicalize_body(
        Body(wire[start:]).content() if start < len(wire) else b""
    )
    old = module._CHUNK
    module._CHUNK = chunk
    try:
        got = module._relaxed_body_hash(wire, start)
    finally:
        module._CHUNK = old
    assert got == hashlib.sha256(expected).digest()


# ------------------------------------------------------------ keys


def test_load_key_reads_pem_keys_and_checks_them(tmp_path: Path) -> None:
    rsa_path = key_file(tmp_path, "rsa.key", RSA_KEY)
    loaded = load_key(rsa_path, domain="Example.org", selector="s1", algorithm="rsa-sha256")
    assert loaded.domain == "example.org" and loaded.source == str(rsa_path)
    pkcs1 = tmp_path / "pkcs1.key"
    pkcs1.write_bytes(
        RSA_KEY.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    pkcs1.chmod(0o600)
    load_key(pkcs1, domain="example.org", selector="s1", algorithm="rsa-sha256")
    ed_path = key_file(tmp_path, "ed.key", ED_KEY)
    load_key(ed_path, domain="example.org", selector="s1", algorithm="ed25519-sha256")
    seed = tmp_path / "seed.key"  # what dkimpy's dknewkey writes for Ed25519
    seed.write_bytes(
        base64.b64encode(
            ED_KEY.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
        )
        + b"\n"
    )
    seed.chmod(0o640)  # the daemon's group may read it too
    load_key(seed, domain="example.org", selector="s1", algorithm="ed25519-sha256")


def test_a_key_that_cannot_be_used_is_a_clear_error_naming_the_file(tmp_path: Path) -> None:
    def error(path: Path, algorithm: str = "rsa-sha256") -> str:
        if path.is_file():
            path.chmod(path.stat().st_mode & 0o770)
        with pytest.raises(DkimKeyError) as caught:
            load_key(path, domain="example.org", selector="s1", algorithm=algorithm)
        assert str(path) in str(caught.value)
        return str(caught.value)

    assert "cannot read" in error(tmp_path / "missing.key")
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key\n")
    assert "not a PEM private key" in error(garbage)
    broken = tmp_path / "broken.key"
    broken.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    assert "not a usable PEM private key" in error(broken)
    public = tmp_path / "public.pem"
    public.write_bytes(
        RSA_KEY.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    assert "not a usable PEM private key" in error(public)
    ed_path = key_file(tmp_path, "ed.key", ED_KEY)
    assert "holds an Ed25519 key, but the algorithm is rsa-sha256" in error(ed_path)
    rsa_path = key_file(tmp_path, "rsa.key", RSA_KEY)
    assert "holds an RSA key, but the algorithm is ed25519-sha256" in error(
        rsa_path, "ed25519-sha256"
    )
    ec_path = key_file(tmp_path, "ec.key", ec.generate_private_key(ec.SECP256R1()))  # type: ignore[arg-type]
    assert "but the algorithm is rsa-sha256" in error(ec_path)
    small = Path(__file__).parent / "fixtures" / "dkim-rsa-512.key"  # too small to be made here
    assert "512-bit RSA key" in error(small)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        RSA_KEY.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    assert "encrypted" in error(encrypted)
    assert "unknown algorithm" in error(rsa_path, "rsa-sha1")
    if os.geteuid() != 0:  # root reads any file
        rsa_path.chmod(0)
        assert "Permission denied" in error(rsa_path)


def test_a_key_file_others_may_read_or_that_is_no_regular_file_is_refused(
    tmp_path: Path,
) -> None:
    """Like OpenDKIM's RequireSafeKeys; and nothing but a regular file of
    a key's size is read (a FIFO would block the reader, /dev/zero fill
    its memory)."""

    def error(path: Path | str) -> str:
        with pytest.raises(DkimKeyError) as caught:
            load_key(path, domain="example.org", selector="s1", algorithm="rsa-sha256")
        return str(caught.value)

    rsa_path = key_file(tmp_path, "rsa.key", RSA_KEY)
    rsa_path.chmod(0o644)
    assert error(rsa_path) == (
        f"key_file {rsa_path}: open to every user (mode 0644); a private key must be "
        "readable by the daemon only: chmod 0600 (or 0640 with the daemon's group)"
    )
    rsa_path.chmod(0o602)
    assert "open to every user (mode 0602)" in error(rsa_path)
    rsa_path.chmod(0o640)
    load_key(rsa_path, domain="example.org", selector="s1", algorithm="rsa-sha256")
    assert error("/dev/zero") == "key_file /dev/zero: not a regular file"
    fifo = tmp_path / "fifo.key"
    os.mkfifo(fifo, 0o600)
    assert error(fifo) == f"key_file {fifo}: not a regular file"
    assert error(tmp_path) == f"key_file {tmp_path}: not a regular file"
    large = tmp_path / "large.key"
    large.write_bytes(rsa_path.read_bytes() + b"\n" * 70_000)
    large.chmod(0o600)
    assert (
        error(large)
        == f"key_file {large}: {large.stat().st_size} bytes; a key file is at most 65536"
    )


def test_write_new_key_is_0600_and_never_replaces_a_file(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    old_umask = os.umask(0)
    try:
        write_new_key(path, new_private_key("ed25519-sha256"))
    finally:
        os.umask(old_umask)
    assert path.stat().st_mode & 0o777 == 0o600
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        write_new_key(path, new_private_key("ed25519-sha256"))
    assert path.read_bytes() == before
    assert txt_strings("x" * 600) == ["x" * 255, "x" * 255, "x" * 90]


# ------------------------------------------------ signing in the add path


def envelope_batch(content: bytes) -> RoutedBatch:
    env = RoutedEnvelope("jane@example.org", ["a@example.com"], ["mx.example:25"])
    return RoutedBatch([env], Body.from_content(content))


async def test_spool_add_signs_once_and_a_retry_sends_the_same_bytes(tmp_path: Path) -> None:
    k = key("example.org", "s1", RSA_KEY)
    answers = [TRY_LATER, OK]
    relay = InMemoryRelay(respond=lambda _m, _r: answers.pop(0))
    clock = FakeClock(NOW)
    with anyio.fail_after(20):
        async with Spool.open(tmp_path, relay=relay, clock=clock, dkim=DkimSigner([k])) as spool:
            (mid,) = await spool.add(envelope_batch(MESSAGE))
            stored = (tmp_path / "data" / mid).read_bytes()
            assert stored.startswith(b"DKIM-Signature:")
            await wait_until(
                lambda: isinstance(status_of(spool, mid), SendAt), "the first attempt to fail"
            )
            clock.advance(timedelta(days=1))  # past the retry timer
            outcome = await spool.wait(mid, timeout=10)
    assert outcome.kind.value == "delivered"
    sent = [wire for _, _, wire in relay.delivered]
    assert len(sent) == 1 and sent[0] == stored  # the stored bytes, not signed again
    message = Body(sent[0]).content()
    assert len(signature_fields(message)) == 1
    assert verify_all(message, dns_for(k)) == [("example.org", "s1")]
    assert dkimpy_verify_all(message, dns_for(k)) == 1


async def test_a_message_of_several_hashing_chunks_is_signed_through_add(tmp_path: Path) -> None:
    """A body over one hashing chunk (and one under), added: stored signed,
    and the signatures verify."""
    k = key("example.org", "s1", RSA_KEY)
    head = b"From: a@example.org\r\nSubject: size\r\n\r\n"
    line = b"x" * 78 + b"\r\n"
    small = head + line * 20
    large = head + line * (3 * spoold.dkim._CHUNK // len(line)) + b"..dot\r\n"
    relay = InMemoryRelay()
    with anyio.fail_after(20):
        async with Spool.open(tmp_path, relay=relay, dkim=DkimSigner([k])) as spool:
            ids = [(await spool.add(envelope_batch(c)))[0] for c in (small, large)]
            await wait_until(lambda: len(relay.delivered) == 2, "two deliveries")
    by_id = {mid: Body(wire).content() for mid, _, wire in relay.delivered}
    for mid, content in zip(ids, (small, large), strict=True):
        assert by_id[mid].endswith(content)
        assert verify_all(by_id[mid], dns_for(k)) == [("example.org", "s1")]
        assert dkimpy_verify_all(by_id[mid], dns_for(k)) == 1


async def test_a_writer_signs_and_a_new_signer_applies_to_the_next_add(tmp_path: Path) -> None:
    old, new = key("example.org", "old"), key("example.org", "new", RSA_KEY)
    relay = InMemoryRelay()
    with anyio.fail_after(20):
        async with (
            Spool.open(tmp_path, relay=relay) as spool,
            SpoolWriter.open(
                tmp_path, default_retry_intervals=DEFAULT_RETRY_INTERVALS, dkim=DkimSigner([old])
            ) as writer,
        ):
            (first,) = await writer.add(envelope_batch(MESSAGE))
            writer.dkim = DkimSigner([new])
            (second,) = await writer.add(envelope_batch(MESSAGE))
            spool.dkim = DkimSigner([old, new])  # the owner's add signs too
            (third,) = await spool.add(envelope_batch(MESSAGE))
            spool.dkim = None
            (fourth,) = await spool.add(envelope_batch(MESSAGE))
            await wait_until(lambda: len(relay.delivered) == 4, "four deliveries")
    by_id = {mid: Body(wire).content() for mid, _, wire in relay.delivered}
    dns = dns_for(old, new)
    assert verify_all(by_id[first], dns) == [("example.org", "old")]
    assert verify_all(by_id[second], dns) == [("example.org", "new")]
    assert verify_all(by_id[third], dns) == [("example.org", "old"), ("example.org", "new")]
    assert verify_all(by_id[fourth], dns) == []
    assert by_id[fourth] == MESSAGE


async def test_a_fan_out_shares_one_signature(tmp_path: Path) -> None:
    """One submission, two routes: both messages carry the same signature."""
    k = key("example.org", "s1")
    envs = [
        RoutedEnvelope("jane@example.org", ["a@example.com"], ["mx1.example:25"]),
        RoutedEnvelope("jane@example.org", ["b@example.net"], ["mx2.example:25"]),
    ]
    relay = InMemoryRelay()
    with anyio.fail_after(20):
        async with Spool.open(tmp_path, relay=relay, dkim=DkimSigner([k])) as spool:
            await spool.add(RoutedBatch(envs, Body.from_content(MESSAGE)))
            await wait_until(lambda: len(relay.delivered) == 2, "two deliveries")
    first, second = (Body(wire).content() for _, _, wire in relay.delivered)
    assert first == second
    assert verify_all(first, dns_for(k)) == [("example.org", "s1")]


async def test_a_bounce_the_spool_makes_is_signed_too(tmp_path: Path) -> None:
    """A delivery status notification is spooled like any message: from
    MAILER-DAEMON@reporting_mta, signed by a key of that domain."""
    k = key("example.org", "s1", subdomains=True)
    relay = InMemoryRelay(respond=lambda _m, rcpt: NO_SUCH_USER if rcpt == "a@example.com" else OK)
    with anyio.fail_after(20):
        async with Spool.open(
            tmp_path,
            relay=relay,
            dkim=DkimSigner([k]),
            reporting_mta="mx.example.org",
            delivery_policy=DeliveryPolicy(on_permanent_failure=OnPermanentFailure.BOUNCE),
        ) as spool:
            await spool.add(envelope_batch(MESSAGE))
            await wait_until(lambda: len(relay.delivered) == 1, "the bounce to be delivered")
    ((_, to, wire),) = relay.delivered
    assert to == "jane@example.org"
    notice = Body(wire).content()
    assert b"From: Mail Delivery System <MAILER-DAEMON@mx.example.org>" in notice
    assert verify_all(notice, dns_for(k)) == [("example.org", "s1")]
    assert dkimpy_verify_all(notice, dns_for(k)) == 1


@settings(max_examples=300, deadline=None)
@given(
    head=st.lists(
        st.sampled_from(
            [
                b"From: ",
                b"from:",
                b"From :",
                b" ",
                b"\t",
                b"<",
                b">",
                b"@",
                b'"',
                b",",
                b"(",
                b")",
                b"example.org",
                b"x",
                b"\xc3\xa9",
                b"\xff",
                b":",
                b"\r\n",
                b".",
                b"=?utf-8?q?a?=",
            ]
        ),
        max_size=40,
    )
)
def test_any_header_section_is_signed_verifiably_or_left_unsigned(head: list[bytes]) -> None:
    """Whatever the header section holds, sign answers and never raises (a
    message is never refused for it): a signature it makes verifies, with
    this suite's verifier and dkimpy's; else it says why not."""
    k = key("example.org", "s1")
    content = b"From: a@example.org\r\n" + b"".join(head) + b"\r\n\r\nbody\r\n"
    body = Body.from_content(content, LineEndingPolicy.NORMALIZE)
    outcome = DkimSigner([k]).sign(body.wire, NOW)
    if outcome.header:
        message = outcome.header + body.content()
        assert verify_all(message, dns_for(k)) == [("example.org", "s1")]
        if not re.search(rb"^[!-9;-~]+[ \t]+:", message, re.MULTILINE):
            # dkimpy reads no field with blanks before its colon (RFC 5322's
            # obsolete syntax, which the signer takes as the field).
            assert dkimpy_verify_all(message, dns_for(k)) == 1
    else:
        assert outcome.reason


def test_record_problem_says_why_a_record_does_not_publish_a_key() -> None:
    rsa_key = key("example.org", "s1", RSA_KEY)
    ed_key = key("example.org", "e1", ED_KEY)
    ours = public_key_record(RSA_KEY)
    assert record_problem(rsa_key, [ours]) is None
    assert record_problem(rsa_key, ["v=spf1 -all", ours.replace("; ", " ;\t")]) is None
    assert record_problem(rsa_key, []) == "no TXT record"
    assert record_problem(rsa_key, ["v=spf1 -all"]) == "no DKIM key record (v=DKIM1; k=...; p=...)"
    assert record_problem(rsa_key, ["v=DKIM1; k=rsa; p="]) == "the key is revoked (p= is empty)"
    assert record_problem(ed_key, [ours]) == "k=rsa, not k=ed25519"
    assert record_problem(rsa_key, [ours.replace("k=rsa", "k=RSA")]) is None  # any case
    assert record_problem(rsa_key, [ours.replace("v=DKIM1", "v=DKIM2")]) == "v=DKIM2, not v=DKIM1"
    assert record_problem(rsa_key, ["v=DKIM1; p=!!"]) == "p= is not base64"
    assert record_problem(rsa_key, [public_key_record(RSA_KEY_2)]) == (
        "p= is another key than this one"
    )

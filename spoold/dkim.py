"""DKIM signing of new messages (RFC 6376, and RFC 8463 for Ed25519).

The keys (:class:`~spoold.dkim_keys.DkimKey`) and their files and DNS
records are :mod:`spoold.dkim_keys`'s.

A :class:`DkimSigner` holds the keys of a spool. :meth:`DkimSigner.sign`
takes a message in its wire form (as stored: CRLF, dot-stuffed) and gives
the ``DKIM-Signature:`` header fields to put before it, one per key of the
``From:`` header's domain, or none, with the reason
(:class:`DkimOutcome`). Which keys sign:

* the message must have exactly one ``From:`` field holding exactly one
  address; its domain is compared without regard to case (an
  internationalised domain as its A-label);
* a key signs when its domain is that domain, or a parent of it and the key
  has ``subdomains``; when keys of several domains match (``example.org``
  for subdomains and ``mail.example.org`` itself), only those of the
  longest (most specific) domain sign;
* every key of that domain signs: two keys of one domain (a rotation, or
  RSA next to Ed25519) give two signatures, in the order of the keys.

Canonicalisation is relaxed/relaxed, done here (the same steps, in the
same order, as dkimpy's ``dkim.canonicalization``, which the tests check
it against byte for byte): a body with nothing to change (no tab, no run
of spaces, no space at a line's end, no dot-stuffing: the usual case) is
hashed straight from the wire bytes, without a copy, and only its empty
lines at the end are left out; any other body goes through the
substitutions. The signature itself is made with ``cryptography``
(dkimpy's RSA is pure Python: 12-14 ms a message for a 2048-bit key on the
reference machine; ``bench/dkim_sign.py``); it holds the GIL while it
signs (an RSA-2048 signature is about 0.4 ms of it). The header fields
signed are those of the key's list present in the message, each instance
once; those of the list that a message has at most once
(:data:`OVERSIGNED_HEADERS`: ``From``, ``Subject``, ``Reply-To``, ...) are
listed once more than they appear, absent ones once ("oversigned"), so
none can be added without breaking the signature. ``t=``
is the signing time; no ``l=``, no ``x=``, no ``i=`` (it defaults to
``@d``).

The body is hashed in chunks of whole lines straight from the wire bytes
(dot-stuffing undone per chunk), so signing adds a bounded amount of memory
to the message it is given (which the spool holds whole anyway, within the
listener's ``max_message_size``); a header section over
:data:`MAX_HEADER_BYTES`, a ``From:`` over :data:`MAX_FROM_CHARS` or more
than :data:`MAX_SIGNED_FIELDS` fields to sign leaves the message unsigned,
so the parse stays cheap whatever a client sends.
:meth:`DkimSigner.sign` never raises for what a message holds: a message it
cannot read goes unsigned, with the reason. Nothing here does I/O; signing
is CPU work the caller may move off its event loop.

A :class:`DkimSigner`'s keys never change (a reload makes a new signer),
but it remembers what messages of one sender share: the domain of a
``From:`` value, and per key, for an order of the names of the fields
the message's keys sign, which fields it hashes and its ``h=`` tag.
Both memos are bounded in entries and in the size of each (a ``From:``
over 512 octets, or an order of more than 64 fields to sign, is not
remembered; fields no key signs are no part of an order), so whatever
clients send, a signer keeps a few MiB at most per key. One signer may
sign in several threads at once: each memo is read and changed only by
single dict operations, atomic under the GIL, and the worst a race does
is work something out twice.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from spoold.body import unstuff
from spoold.dkim_keys import DkimKey, signing_domain

__all__ = [
    "MAX_FROM_CHARS",
    "MAX_HEADER_BYTES",
    "MAX_SIGNED_FIELDS",
    "OVERSIGNED_HEADERS",
    "DkimOutcome",
    "DkimSigner",
]


OVERSIGNED_HEADERS: frozenset[str] = frozenset(
    {
        "from",
        "sender",
        "reply-to",
        "subject",
        "date",
        "to",
        "cc",
        "message-id",
        "in-reply-to",
        "references",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "list-unsubscribe",
        "list-unsubscribe-post",
    }
)


@dataclass(frozen=True, slots=True)
class DkimOutcome:
    """What :meth:`DkimSigner.sign` did: ``header`` (the signature fields,
    CRLF-terminated, to put before the message; empty when unsigned),
    ``signed_by`` (``(domain, selector)`` per signature) and, unsigned,
    ``reason``; ``no_key`` when it is only that no key covers the
    ``From:`` domain (the usual case for mail of other domains)."""

    header: bytes = b""
    signed_by: tuple[tuple[str, str], ...] = ()
    reason: str = ""
    no_key: bool = False


_HEADER_END = re.compile(rb"\r\n\r\n")
_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:")
_CHUNK = 1 << 16  # body bytes canonicalised at a time
_LINE_WITH_TEXT = re.compile(rb"[^ \t\r\n]\r\n")  # a chunk may end after one
# Relaxed canonicalisation (RFC 6376 §3.4.2, §3.4.4), as dkimpy writes it.
_TRAILING_WSP = re.compile(rb"[\t ]+\r\n")
_WSP = re.compile(rb"[\t ]+")
_LINE_BREAK = re.compile(rb"\r?\n")
_WIDTH = 78  # header lines are folded before this
# Beyond these a message goes unsigned (no receiver needs more, and the
# parse stays cheap whatever a client sends).
MAX_HEADER_BYTES = 1 << 20  # the header section, in wire form
MAX_FROM_CHARS = 2000  # the From: field's value, unfolded
MAX_SIGNED_FIELDS = 1000  # fields a signature lists (h=); a real message has tens
_RSA_PADDING = padding.PKCS1v15()
_PREHASHED_SHA256 = utils.Prehashed(hashes.SHA256())
_FROM_MEMO_SIZE = 4096  # From: values whose domain is remembered
_FROM_MEMO_VALUE = 512  # octets of the longest From: value remembered


class DkimSigner:
    """The signing keys of a spool (see the module's docstring), and the
    memos of what its messages share: one signer is shared by the threads
    that sign."""

    def __init__(self, keys: Sequence[DkimKey]) -> None:
        self.keys = tuple(keys)
        seen: set[tuple[str, str]] = set()
        for key in self.keys:
            if (key.domain, key.selector) in seen:
                raise ValueError(f"two keys for selector {key.selector} of {key.domain}")
            seen.add((key.domain, key.selector))
        # What each key's signatures share, made once per signer (a reload
        # makes a new one): not per message.
        self._plans = {id(key): _KeyPlan(key) for key in self.keys}
        # From: values (as in the message, up to _FROM_MEMO_VALUE octets)
        # and their domains, or why none.
        self._from_memo: dict[bytes, tuple[str | None, str]] = {}

    def __bool__(self) -> bool:
        return bool(self.keys)

    def keys_for(self, domain: str) -> list[DkimKey]:
        """The keys that sign mail from ``domain``: those of the longest
        key domain that covers it."""
        matching = [k for k in self.keys if k.covers(domain)]
        if not matching:
            return []
        best = max(len(k.domain) for k in matching)
        return [k for k in matching if len(k.domain) == best]

    def sign(self, wire: bytes, now: datetime) -> DkimOutcome:
        """The signatures of the message in wire form ``wire`` (CRLF,
        dot-stuffed), made at ``now``. Never raises for what the message
        holds: a message it cannot read is left unsigned, with the reason
        (it is never refused for that)."""
        if not self.keys:
            return DkimOutcome(reason="no keys")
        try:
            return self._sign(wire, now)
        except Exception as exc:  # noqa: BLE001 - not swallowed: the reason is logged
            # A parse this module did not foresee: the message goes unsigned.
            return DkimOutcome(reason=f"cannot read the message ({type(exc).__name__}: {exc})")

    def _sign(self, wire: bytes, now: datetime) -> DkimOutcome:
        end = _HEADER_END.search(wire, 0, MAX_HEADER_BYTES + 4)
        if end is None and len(wire) > MAX_HEADER_BYTES:
            return DkimOutcome(reason="header section too large")
        head_end, body_start = (end.start() + 2, end.end()) if end else (len(wire), len(wire))
        if head_end > MAX_HEADER_BYTES:
            return DkimOutcome(reason="header section too large")
        fields = _parse_fields(unstuff(wire[:head_end]))
        if fields is None:
            return DkimOutcome(reason="malformed header section")
        domain, why = self._from_domain(fields)
        if domain is None:
            return DkimOutcome(reason=why)
        keys = self.keys_for(domain)
        if not keys:
            return DkimOutcome(reason=f"no key for {domain}", no_key=True)
        names = [n.decode().lower() for n, _ in fields]
        plans = [self._plans[id(k)] for k in keys]
        wanted = (
            plans[0].wanted if len(plans) == 1 else frozenset().union(*(p.wanted for p in plans))
        )
        signed = [i for i, n in enumerate(names) if n in wanted]
        if len(signed) > MAX_SIGNED_FIELDS:
            return DkimOutcome(reason="too many header fields to sign")
        body_hash = base64.b64encode(_relaxed_body_hash(wire, body_start)).decode()
        header = _Header(fields, names, signed)
        timestamp = int(now.timestamp())
        signatures = b"".join(plan.sign(header, body_hash, timestamp) for plan in plans)
        return DkimOutcome(signatures, tuple((k.domain, k.selector) for k in keys))

    def _from_domain(self, fields: list[tuple[bytes, bytes]]) -> tuple[str | None, str]:
        """:func:`_from_domain`, remembered by the ``From:`` value (a spool
        signs mail of few senders: each one's address is read once). A
        value over :data:`_FROM_MEMO_VALUE` octets is read every time, never
        kept: a legal folded ``From:`` may be a megabyte, and the memo holds
        thousands of values."""
        values = [v for n, v in fields if n.lower() == b"from"]
        if len(values) != 1:
            return None, "no From: field" if not values else "more than one From: field"
        if len(values[0]) > _FROM_MEMO_VALUE:
            return _from_domain(values[0])
        memo = self._from_memo
        found = memo.get(values[0])
        if found is None:
            found = _from_domain(values[0])
            if len(memo) >= _FROM_MEMO_SIZE:
                memo.clear()
            memo[values[0]] = found
        return found


def _parse_fields(head: bytes) -> list[tuple[bytes, bytes]] | None:
    """The header fields as (name, value with its CRLF), folding kept;
    None when a line is neither a field nor a continuation. Linear in the
    size of ``head`` (a field's lines are joined once)."""
    names: list[bytes] = []
    values: list[list[bytes]] = []
    lines = head.split(b"\r\n")
    if lines[-1] == b"":
        lines.pop()  # what follows the last CRLF
    for line in lines:
        if line[:1] in (b" ", b"\t") and values:
            values[-1].append(line)
            continue
        m = _FIELD.match(line)
        if m is None:
            return None
        names.append(m.group(1))
        values.append([line[m.end() :]])
    return [(n, b"\r\n".join(v) + b"\r\n") for n, v in zip(names, values, strict=True)]


def _from_domain(value: bytes) -> tuple[str | None, str]:
    """The domain of the one address of the ``From:`` field ``value``, or
    None and why."""
    text = value.decode("utf-8", "replace").replace("\r\n", "")
    if len(text) > MAX_FROM_CHARS:
        return None, "From: too long"
    try:
        addresses = [a for _, a in email.utils.getaddresses([text]) if a]
    except (RecursionError, ValueError, IndexError):
        return None, "cannot read the From: field"
    if len(addresses) != 1 or "@" not in addresses[0]:
        return None, "From: does not hold exactly one address"
    try:
        return signing_domain(addresses[0].rpartition("@")[2]), ""
    except ValueError:
        return None, "From: has no usable domain"


def _relaxed_body_hash(wire: bytes, start: int) -> bytes:
    """SHA-256 of the relaxed canonical body of ``wire[start:]`` (wire form),
    a chunk of whole lines at a time: a chunk ends after a line that holds
    more than whitespace, so the canonicaliser's "empty lines at the end"
    are only ever those at the end of the body."""
    h = hashlib.sha256()
    view = memoryview(wire)
    pos = start
    while True:
        m = _LINE_WITH_TEXT.search(wire, pos + _CHUNK) if len(wire) - pos > _CHUNK else None
        cut = m.end() if m else len(wire)
        h.update(_relaxed_chunk(wire, view, pos, cut))
        if m is None:
            return h.digest()
        pos = cut


def _relaxed_chunk(wire: bytes, view: memoryview, lo: int, hi: int) -> bytes | memoryview:
    """The relaxed canonical form of ``wire[lo:hi]``, whole lines of the
    body in wire form: a view of ``wire`` when there is nothing to change
    but empty lines at the end (found by C-speed searches), else a copy."""
    if lo == hi:
        return b""
    if (
        wire.startswith(b".", lo)
        or wire.find(b"\n.", lo, hi) >= 0  # dot-stuffed
        or wire.find(b"\t", lo, hi) >= 0
        or wire.find(b"  ", lo, hi) >= 0
        or wire.find(b" \r\n", lo, hi) >= 0  # whitespace to take out
        or not wire.endswith(b"\r\n", lo, hi)
    ):
        return _relaxed_body(unstuff(wire[lo:hi]))
    end = hi
    while wire.endswith(b"\r\n", lo, end - 2):
        end -= 2  # an empty line at the end
    return b"" if end - lo == 2 else view[lo:end]  # a body of empty lines is empty


def _relaxed_body(body: bytes) -> bytes:
    """RFC 6376 §3.4.4 on ``body`` (not dot-stuffed): no whitespace at a
    line's end, runs of whitespace one space, no empty lines at the end, a
    CRLF at the end of a body that has text, and nothing for one that has
    none: dkimpy's steps, in its order."""
    body = _WSP.sub(b" ", _TRAILING_WSP.sub(b"\r\n", body))
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    else:
        end = len(body)
        while body.endswith(b"\r\n", 0, end - 2):
            end -= 2
        body = body[:end]
    return b"" if body == b"\r\n" else body


def _relaxed_header(name: bytes, value: bytes) -> bytes:
    """RFC 6376 §3.4.2 on one field (``value`` with its CRLF): the name in
    lower case, the value unfolded, runs of whitespace one space, none at
    either end, then the colon between them and the CRLF after (as dkimpy
    writes it, which strips the value of all ASCII whitespace at its ends)."""
    if value.find(b"\n") == len(value) - 1 and value.endswith(b"\r\n"):
        value = value[:-2]  # one line: nothing to unfold
    else:
        value = _LINE_BREAK.sub(b"", value)
    if b"\t" in value or b"  " in value:
        value = _WSP.sub(b" ", value)
    return name.lower().rstrip() + b":" + value.strip() + b"\r\n"


class _Header:
    """A message's header fields as its signatures read them: the fields
    (name, value), their names in lower case, where those that a key of
    the message signs are (``signed``, top down) and their names
    (``order``); each field's canonical form made once, when a signature
    first takes it."""

    __slots__ = ("_canonical", "fields", "names", "order", "signed")

    def __init__(
        self, fields: list[tuple[bytes, bytes]], names: list[str], signed: list[int]
    ) -> None:
        self.fields = fields
        self.names = names
        self.signed = signed
        self.order = tuple([names[i] for i in signed])
        self._canonical: dict[int, bytes] = {}

    def canonical(self, i: int) -> bytes:
        """Field ``i`` in relaxed form (``name:value`` and CRLF)."""
        found = self._canonical.get(i)
        if found is None:
            found = self._canonical[i] = _relaxed_header(*self.fields[i])
        return found


class _KeyPlan:
    """What every signature of one key shares (made once per signer): the
    fields it signs, those it oversigns, its first tags folded, its signing
    call, and for each order of field names seen, which fields it hashes
    and its ``h=`` tag folded (messages of one program share an order)."""

    def __init__(self, key: DkimKey) -> None:
        self.wanted = frozenset(h.lower() for h in key.headers)
        # Oversigned: one more of each field a message has at most once.
        self.oversigned = [
            n for n in dict.fromkeys(h.lower() for h in key.headers) if n in OVERSIGNED_HEADERS
        ]
        self.head = _fold(
            len(_SIGNATURE_NAME),
            [
                ("v=1;", " "),
                (f"a={key.algorithm.value};", " "),
                ("c=relaxed/relaxed;", " "),
                (f"d={key.domain};", " "),
                (f"s={key.selector};", " "),
            ],
        )
        self._orders: dict[tuple[tuple[str, ...], int], tuple[list[int], _Folded]] = {}
        private = key.private_key
        self._sign: Callable[[bytes], bytes]
        if isinstance(private, rsa.RSAPrivateKey):
            rsa_key = private

            def sign_rsa(digest: bytes) -> bytes:
                return rsa_key.sign(digest, _RSA_PADDING, _PREHASHED_SHA256)

            self._sign = sign_rsa
        else:
            self._sign = private.sign  # RFC 8463: Ed25519 over the SHA-256

    def sign(self, header: _Header, body_hash: str, timestamp: int) -> bytes:
        """One ``DKIM-Signature:`` field (CRLF-terminated) of the message."""
        head = self.head
        stamp = _fold(head.column, [(f"t={timestamp};", " ")])
        # The plan is remembered by the names of the fields the message's
        # keys sign, not of all its fields (those no key signs are not
        # bounded in number), and only for a message of few of them: an
        # entry stays small. Where these fields are is the message's own.
        order = (header.order, stamp.column)
        remember = len(header.signed) <= _ORDER_FIELDS_KEPT
        planned = self._orders.get(order) if remember else None
        if planned is None:
            planned = self._plan(header.order, stamp.column)
            if remember:
                if len(self._orders) >= _ORDERS_KEPT:
                    self._orders.clear()
                self._orders[order] = planned
        taken, names = planned
        tail = _fold(names.column, [(f"bh={body_hash};", " "), ("b=", " ")])
        hashed = hashlib.sha256()
        signed = header.signed
        for k in taken:
            hashed.update(header.canonical(signed[k]))
        # The field itself, relaxed (its folds one space, no space at its
        # ends), without its CRLF.
        value = head.canonical + stamp.canonical + names.canonical + tail.canonical
        hashed.update(b"dkim-signature:" + value.strip().encode())
        b64 = base64.b64encode(self._sign(hashed.digest())).decode()
        b = _fold(tail.column, [(b64[i : i + 64], "") for i in range(0, len(b64), 64)])
        folded = head.text + stamp.text + names.text + tail.text + b.text
        return b"DKIM-Signature:" + folded.encode() + b"\r\n"

    def _plan(self, order: tuple[str, ...], column: int) -> tuple[list[int], _Folded]:
        """For ``order``, the names of the fields the message's keys sign
        (top down): those this key hashes, in order (indexes into
        ``order``), and its ``h=`` tag folded from ``column``."""
        wanted = self.wanted
        names = [n for n in order if n in wanted] + self.oversigned
        instances: dict[str, list[int]] = {}
        for i, name in enumerate(order):
            instances.setdefault(name, []).append(i)
        # Each name takes the lowest instance not taken yet (RFC 6376 §5.4.2).
        taken = []
        for name in names:
            left = instances.get(name)
            if left:
                taken.append(left.pop())
        last = len(names) - 1
        segments = [
            (("h=" if i == 0 else "") + name + (":" if i < last else ";"), " " if i == 0 else "")
            for i, name in enumerate(names)
        ]
        return taken, _fold(column, segments)


_ORDERS_KEPT = 1024  # orders of signed field names a key remembers
_ORDER_FIELDS_KEPT = 64  # fields to sign of the longest order remembered


@dataclass(frozen=True, slots=True)
class _Folded:
    """A run of a field's value: as written (``text``, folded), in relaxed
    form (``canonical``: a fold is one space), and the column it ends at."""

    text: str
    canonical: str
    column: int


_SIGNATURE_NAME = "DKIM-Signature:"


def _fold(column: int, segments: list[tuple[str, str]]) -> _Folded:
    """``segments`` (text, what joins it to the one before on the same
    line) after ``column``, folded before ``_WIDTH`` columns with CRLF TAB
    where a segment would not fit. No text holds whitespace, so the relaxed
    form is the joints and texts with each fold one space."""
    out: list[str] = []
    canonical: list[str] = []
    for text, joint in segments:
        if column + len(joint) + len(text) > _WIDTH and column > 1:
            out.append("\r\n\t")
            canonical.append(" ")
            column = 8  # a tab, as most readers show it
        else:
            out.append(joint)
            canonical.append(joint)
            column += len(joint)
        out.append(text)
        canonical.append(text)
        column += len(text)
    return _Folded("".join(out), "".join(canonical), column)

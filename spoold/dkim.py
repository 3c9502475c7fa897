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

Canonicalisation is relaxed/relaxed, done by dkimpy's own canonicaliser
(``dkim.canonicalization``); the signature itself is made with
``cryptography`` (dkimpy's RSA is pure Python: 12-14 ms a message for a
2048-bit key on the reference machine, against 0.5 ms for the whole
signature here, canonicalisation included; ``bench/dkim_sign.py``). The
header fields signed are those of the key's list present in the message,
each instance once; those of the list that a message has at most once
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
is CPU work the caller may move off its event loop. :class:`DkimSigner` is
immutable: a reload makes a new one.
"""

from __future__ import annotations

import base64
import email.utils
import functools
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

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


@functools.cache
def _relaxed() -> Any:
    """dkimpy's relaxed/relaxed canonicaliser, imported at the first signer
    made (importing dkimpy loads dnspython and PyNaCl, which a program that
    signs nothing need not pay for)."""
    from dkim.canonicalization import CanonicalizationPolicy  # type: ignore[import-untyped]

    return CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")


_HEADER_END = re.compile(rb"\r\n\r\n")
_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:")
_CHUNK = 1 << 16  # body bytes canonicalised at a time
_LINE_WITH_TEXT = re.compile(rb"[^ \t\r\n]\r\n")  # a chunk may end after one
_WIDTH = 78  # header lines are folded before this
# Beyond these a message goes unsigned (no receiver needs more, and the
# parse stays cheap whatever a client sends).
MAX_HEADER_BYTES = 1 << 20  # the header section, in wire form
MAX_FROM_CHARS = 2000  # the From: field's value, unfolded
MAX_SIGNED_FIELDS = 1000  # fields a signature lists (h=); a real message has tens


class DkimSigner:
    """The signing keys of a spool (see the module's docstring)."""

    def __init__(self, keys: Sequence[DkimKey]) -> None:
        self.keys = tuple(keys)
        if self.keys:
            _relaxed()
        seen: set[tuple[str, str]] = set()
        for key in self.keys:
            if (key.domain, key.selector) in seen:
                raise ValueError(f"two keys for selector {key.selector} of {key.domain}")
            seen.add((key.domain, key.selector))

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
        domain, why = _from_domain(fields)
        if domain is None:
            return DkimOutcome(reason=why)
        keys = self.keys_for(domain)
        if not keys:
            return DkimOutcome(reason=f"no key for {domain}", no_key=True)
        wanted = {h.lower() for k in keys for h in k.headers}
        if sum(1 for n, _ in fields if n.decode().lower() in wanted) > MAX_SIGNED_FIELDS:
            return DkimOutcome(reason="too many header fields to sign")
        body_hash = base64.b64encode(_relaxed_body_hash(wire, body_start)).decode()
        canonical = _relaxed().canonicalize_headers(fields)
        timestamp = int(now.timestamp())
        header = b"".join(_signature(key, fields, canonical, body_hash, timestamp) for key in keys)
        return DkimOutcome(header, tuple((k.domain, k.selector) for k in keys))


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


def _from_domain(fields: list[tuple[bytes, bytes]]) -> tuple[str | None, str]:
    """The domain of the one address of the one ``From:``, or None and why."""
    values = [v for n, v in fields if n.lower() == b"from"]
    if len(values) != 1:
        return None, "no From: field" if not values else "more than one From: field"
    text = values[0].decode("utf-8", "replace").replace("\r\n", "")
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
    pos = start
    while True:
        m = _LINE_WITH_TEXT.search(wire, pos + _CHUNK) if len(wire) - pos > _CHUNK else None
        cut = m.end() if m else len(wire)
        h.update(_relaxed().canonicalize_body(unstuff(wire[pos:cut])))
        if m is None:
            return h.digest()
        pos = cut


def _signature(
    key: DkimKey,
    fields: list[tuple[bytes, bytes]],
    canonical: list[tuple[bytes, bytes]],
    body_hash: str,
    timestamp: int,
) -> bytes:
    """One ``DKIM-Signature:`` field (CRLF-terminated) by ``key``."""
    wanted = {h.lower() for h in key.headers}
    names = [n.decode().lower() for n, _ in fields if n.decode().lower() in wanted]
    # Oversigned: one more of each field a message has at most once.
    names += [n for n in dict.fromkeys(h.lower() for h in key.headers) if n in OVERSIGNED_HEADERS]
    # Each name takes the lowest instance not taken yet (RFC 6376 §5.4.2).
    taken: dict[str, int] = {}
    hashed = hashlib.sha256()
    for name in names:
        i = taken.get(name, len(canonical))
        while i > 0:
            i -= 1
            if canonical[i][0].decode() == name:
                hashed.update(canonical[i][0] + b":" + canonical[i][1])
                break
        taken[name] = i
    segments = [
        ("v=1;", " "),
        (f"a={key.algorithm.value};", " "),
        ("c=relaxed/relaxed;", " "),
        (f"d={key.domain};", " "),
        (f"s={key.selector};", " "),
        (f"t={timestamp};", " "),
    ]
    segments += [
        (
            ("h=" if i == 0 else "") + name + (":" if i < len(names) - 1 else ";"),
            " " if i == 0 else "",
        )
        for i, name in enumerate(names)
    ]
    segments += [(f"bh={body_hash};", " "), ("b=", " ")]
    unsigned = _fold("DKIM-Signature:", segments)
    ((own_name, own_value),) = _relaxed().canonicalize_headers(
        [(b"DKIM-Signature", unsigned.encode())]
    )
    hashed.update(own_name + b":" + own_value.rstrip(b"\r\n"))  # hashed without its CRLF
    digest = hashed.digest()
    if isinstance(key.private_key, rsa.RSAPrivateKey):
        signature = key.private_key.sign(
            digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256())
        )
    else:
        signature = key.private_key.sign(digest)  # RFC 8463: Ed25519 over the SHA-256
    b64 = base64.b64encode(signature).decode()
    segments += [(b64[i : i + 64], "") for i in range(0, len(b64), 64)]
    return b"DKIM-Signature:" + _fold("DKIM-Signature:", segments).encode() + b"\r\n"


def _fold(name: str, segments: list[tuple[str, str]]) -> str:
    """The field's value from ``segments`` (text, what joins it to the one
    before on the same line), folded before ``_WIDTH`` columns with CRLF TAB
    where a segment would not fit."""
    out: list[str] = []
    column = len(name)
    for text, joint in segments:
        if column + len(joint) + len(text) > _WIDTH and column > 1:
            out.append("\r\n\t")
            column = 8  # a tab, as most readers show it
        else:
            out.append(joint)
            column += len(joint)
        out.append(text)
        column += len(text)
    return "".join(out)

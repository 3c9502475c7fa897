"""DANE for SMTP (RFC 7672): TLSA records and the check of a server's
certificate against them.

A TLSA record (``_25._tcp.MXHOST``) has a certificate usage, a selector
(0: the whole certificate, 1: its SubjectPublicKeyInfo), a matching type
(0: the bytes themselves, 1: SHA-256, 2: SHA-512) and the data to match.
Records only count when the resolver validated them with DNSSEC (the
caller decides that from the AD bit; this module only sees records already
trusted).

Which records are usable here (:func:`usable`):

* DANE-EE (usage 3) with a known selector and matching type: the server's
  own certificate (the first of the chain) must match; its name and its
  dates are not checked (RFC 7672 §3.1.1);
* PKIX-TA and PKIX-EE (usages 0 and 1) are unusable for SMTP (RFC 7672
  §3.1.3);
* DANE-TA (usage 2) is unusable *in spoold*: it names a certificate of the
  chain above the server's, and Python 3.11's ``ssl`` does not give a
  client the chain the server sent, so spoold cannot check it. A host that
  publishes only DANE-TA records is therefore treated like one whose
  records are all unusable: TLS is required, without authentication
  (RFC 7672 §2.2 for a TLSA RRset of only unusable records);
* anything else (unknown usage, selector or matching type, data of the
  wrong length for its digest) is unusable.

:func:`certificate_matches` checks a DER certificate against the usable
records: one match is enough.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from spoold.errors import TlsPolicyError

__all__ = ["TlsaRecord", "usable", "certificate_matches", "DANE_EE"]

DANE_EE = 3

_DIGEST_SIZES = {1: 32, 2: 64}


@dataclass(frozen=True, slots=True)
class TlsaRecord:
    """One TLSA record (hashable: it becomes part of a connection's key)."""

    usage: int
    selector: int
    matching: int
    data: bytes

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.matching} {self.data.hex()}"


def usable(records: Iterable[TlsaRecord]) -> tuple[TlsaRecord, ...]:
    """The records spoold can use (see the module docstring), in order,
    without repeats."""
    out: dict[TlsaRecord, None] = {}
    for r in records:
        if r.usage != DANE_EE or r.selector not in (0, 1) or r.matching not in (0, 1, 2):
            continue
        size = _DIGEST_SIZES.get(r.matching)
        if (size is not None and len(r.data) != size) or not r.data:
            continue
        out[r] = None
    return tuple(out)


def _selected(der: bytes, selector: int) -> bytes:
    if selector == 0:
        return der
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise TlsPolicyError(f"the server's certificate cannot be read: {exc}") from None
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _matched(selected: bytes, matching: int) -> bytes:
    if matching == 1:
        return hashlib.sha256(selected).digest()
    if matching == 2:
        return hashlib.sha512(selected).digest()
    return selected


def certificate_matches(records: Sequence[TlsaRecord], der: bytes) -> bool:
    """Whether the server certificate ``der`` matches one of ``records``
    (usable DANE-EE records: :func:`usable`). A certificate that cannot be
    read matches nothing."""
    parts: dict[int, bytes] = {}
    for r in records:
        if r.usage != DANE_EE:
            continue
        try:
            selected = parts.get(r.selector)
            if selected is None:
                selected = parts[r.selector] = _selected(der, r.selector)
        except TlsPolicyError:
            return False
        if _matched(selected, r.matching) == r.data:
            return True
    return False

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
* DANE-TA (usage 2) with selector 0 and matching type 0 (``2 0 0``: the
  whole certificate of a trust anchor, root or intermediate): usable as
  the one CA the server's chain must lead to, with the MX host's name
  checked (RFC 7672 §3.1.2; :func:`trust_anchors` gives them, the
  connection loads them in place of every other CA). Other DANE-TA
  records (a digest, or a bare key) are unusable *in spoold*: they name a
  certificate the server sends in its chain, and Python 3.11's ``ssl``
  does not give a client that chain to compare. A host that publishes
  only such records is treated like one whose records are all unusable:
  TLS is required, without authentication (RFC 7672 §2.2). When a host
  has usable DANE-EE records, those decide and its DANE-TA records are
  not tried (one handshake cannot check both ways);
* anything else (unknown usage, selector or matching type, data of the
  wrong length for its digest) is unusable.

:func:`certificate_matches` checks a DER certificate against the usable
records: one match is enough.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from spoold.errors import TlsPolicyError

__all__ = ["TlsaRecord", "usable", "certificate_matches", "trust_anchors", "DANE_EE", "DANE_TA"]

DANE_TA = 2
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
        if r.usage == DANE_TA and r.selector == 0 and r.matching == 0:
            if _certificate(r.data):
                out[r] = None
            continue
        if r.usage != DANE_EE or r.selector not in (0, 1) or r.matching not in (0, 1, 2):
            continue
        size = _DIGEST_SIZES.get(r.matching)
        if (size is not None and len(r.data) != size) or not r.data:
            continue
        out[r] = None
    return tuple(out)


def _certificate(der: bytes) -> bool:
    # Imported when a certificate is first read: cryptography.x509 is a
    # tenth of a second of every ``spoold`` command's start otherwise (this
    # module comes with the connection cache, which the config uses).
    from cryptography import x509

    try:
        x509.load_der_x509_certificate(der)
    except ValueError:
        return False
    return True


def trust_anchors(records: Iterable[TlsaRecord]) -> tuple[bytes, ...]:
    """The DER certificates of the usable DANE-TA records among ``records``
    (``2 0 0``, see :func:`usable`)."""
    return tuple(r.data for r in records if r.usage == DANE_TA)


def _selected(der: bytes, selector: int) -> bytes:
    if selector == 0:
        return der
    from cryptography import x509  # see _certificate

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

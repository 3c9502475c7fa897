"""DANE TLSA records (spoold/dane.py): which are usable, and the check of
a certificate against them, for each selector and matching type."""

from __future__ import annotations

import hashlib
import ssl

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from spoold.dane import TlsaRecord, certificate_matches, trust_anchors, usable


def _der(name: str) -> bytes:
    pem = trustme.CA().issue_cert(name).cert_chain_pems[0].bytes().decode()
    return ssl.PEM_cert_to_DER_cert(pem)


def _spki(der: bytes) -> bytes:
    key = x509.load_der_x509_certificate(der).public_key()
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


CERT = _der("mx.example.org")
OTHER = _der("mx.example.org")  # same name, another key


def _records(der: bytes) -> dict[str, TlsaRecord]:
    spki = _spki(der)
    return {
        "3 0 0": TlsaRecord(3, 0, 0, der),
        "3 0 1": TlsaRecord(3, 0, 1, hashlib.sha256(der).digest()),
        "3 0 2": TlsaRecord(3, 0, 2, hashlib.sha512(der).digest()),
        "3 1 0": TlsaRecord(3, 1, 0, spki),
        "3 1 1": TlsaRecord(3, 1, 1, hashlib.sha256(spki).digest()),
        "3 1 2": TlsaRecord(3, 1, 2, hashlib.sha512(spki).digest()),
    }


@pytest.mark.parametrize("kind", ["3 0 0", "3 0 1", "3 0 2", "3 1 0", "3 1 1", "3 1 2"])
def test_a_matching_dane_ee_record_matches(kind: str) -> None:
    record = _records(CERT)[kind]
    assert usable([record]) == (record,)
    assert certificate_matches([record], CERT)
    assert not certificate_matches([record], OTHER)


def test_one_match_among_several_is_enough() -> None:
    records = [_records(OTHER)["3 1 1"], _records(CERT)["3 0 1"]]
    assert certificate_matches(records, CERT)
    assert not certificate_matches(records[:1], CERT)


def test_unusable_records_are_left_out() -> None:
    digest = hashlib.sha256(CERT).digest()
    unusable = [
        TlsaRecord(0, 0, 1, digest),  # PKIX-TA: not for SMTP
        TlsaRecord(1, 0, 1, digest),  # PKIX-EE: not for SMTP
        TlsaRecord(2, 0, 1, digest),  # DANE-TA digest: spoold cannot see the chain
        TlsaRecord(2, 1, 0, _spki(CERT)),  # DANE-TA bare key: likewise
        TlsaRecord(2, 0, 0, b"not a certificate"),
        TlsaRecord(3, 2, 1, digest),  # unknown selector
        TlsaRecord(3, 0, 3, digest),  # unknown matching type
        TlsaRecord(3, 0, 1, digest[:20]),  # a digest of the wrong length
        TlsaRecord(3, 0, 0, b""),
    ]
    assert usable(unusable) == ()
    assert not certificate_matches(unusable, CERT)


def test_a_certificate_that_cannot_be_read_matches_no_spki_record() -> None:
    assert not certificate_matches([_records(CERT)["3 1 1"]], b"not a certificate")


def test_a_dane_ta_full_certificate_is_a_trust_anchor() -> None:
    ca = trustme.CA()
    anchor = ssl.PEM_cert_to_DER_cert(ca.cert_pem.bytes().decode())
    records = [TlsaRecord(2, 0, 0, anchor), _records(CERT)["3 1 1"]]
    assert usable(records) == tuple(records)
    assert trust_anchors(usable(records)) == (anchor,)
    assert not certificate_matches(records[:1], anchor)  # an anchor is no end-entity match

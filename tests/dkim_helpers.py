"""Checking DKIM signatures in tests, without the network.

* :class:`StubDns` -- the TXT records of the test's keys, as a dict; its
  :meth:`StubDns.dkimpy` is the ``dnsfunc`` dkimpy's ``dkim.verify`` asks;
* :func:`verify_all` -- a verifier of the tests' own, written from RFC 6376
  (relaxed/relaxed only) and RFC 8463, with ``cryptography`` for the
  signature checks, so a signature is not only checked by the library that
  helped make it; it returns ``(d, s)`` of every signature and raises
  :class:`BadSignature` for the first that does not verify;
* :func:`dkimpy_verify_all` -- every signature of a message checked by
  dkimpy (``dkim.DKIM.verify(idx=...)``);
* :func:`key_file` -- a new key written to a file, as ``spoold dkim keygen``
  would.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

__all__ = [
    "BadSignature",
    "StubDns",
    "dkimpy_verify_all",
    "key_file",
    "signature_fields",
    "verify_all",
]


class BadSignature(AssertionError):
    """A signature that does not verify (the text says why)."""


@dataclass
class StubDns:
    """TXT records by name (``s._domainkey.d``, no final dot)."""

    records: dict[str, str] = field(default_factory=dict)

    def publish(self, domain: str, selector: str, record: str) -> None:
        self.records[f"{selector}._domainkey.{domain}"] = record

    def txt(self, name: str) -> str | None:
        return self.records.get(name.rstrip(".").lower())

    def dkimpy(self, name: bytes, timeout: float = 5) -> bytes | None:
        record = self.txt(name.decode())
        return None if record is None else record.encode()


def key_file(
    directory: Path, name: str, key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
) -> Path:
    path = directory / name
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


# ------------------------------------------------ the tests' own verifier

_WSP = re.compile(rb"[ \t]+")


def _split(message: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Header fields (name, raw value after the colon, folding kept, no
    final CRLF) and the body."""
    head, sep, body = message.partition(b"\r\n\r\n")
    if not sep:
        head, body = message.removesuffix(b"\r\n"), b""
    fields: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            name, value = fields[-1]
            fields[-1] = (name, value + b"\r\n" + line)
        else:
            name, _, value = line.partition(b":")
            fields.append((name, value))
    return fields, body


def _relaxed_header(name: bytes, value: bytes) -> bytes:
    """RFC 6376 §3.4.2: lower-case name; unfold; runs of WSP to one SP;
    no WSP at either end of the value nor around the colon."""
    value = _WSP.sub(b" ", value.replace(b"\r\n", b"")).strip(b" ")
    return name.strip(b" \t").lower() + b":" + value


def _relaxed_body(body: bytes) -> bytes:
    """RFC 6376 §3.4.4: WSP at line ends removed, runs of WSP to one SP,
    empty lines at the end removed; a non-empty body ends with CRLF."""
    lines = body.split(b"\r\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the split after the last CRLF
    out = [_WSP.sub(b" ", line).rstrip(b" ") for line in lines]
    while out and out[-1] == b"":
        out.pop()
    return b"".join(line + b"\r\n" for line in out)


def _tags(value: bytes) -> dict[str, str]:
    tags: dict[str, str] = {}
    for part in value.replace(b"\r\n", b"").decode().split(";"):
        if part.strip():
            name, _, val = part.partition("=")
            tags[name.strip()] = val.strip()
    return tags


def signature_fields(message: bytes) -> list[dict[str, str]]:
    """The tags of each ``DKIM-Signature:`` of ``message``, top down (the
    folding whitespace inside ``h=``, ``bh=`` and ``b=`` taken out)."""
    fields, _ = _split(message)
    found = []
    for name, value in fields:
        if name.strip().lower() == b"dkim-signature":
            tags = _tags(value)
            found.append(
                {k: re.sub(r"\s", "", v) if k in ("h", "bh", "b") else v for k, v in tags.items()}
            )
    return found


def verify_all(message: bytes, dns: StubDns) -> list[tuple[str, str]]:
    """Check every signature of ``message`` (its bytes as received, not
    dot-stuffed); ``(d, s)`` of each, top down. Raises BadSignature."""
    fields, body = _split(message)
    found = []
    for index, (name, value) in enumerate(fields):
        if name.strip().lower() != b"dkim-signature":
            continue
        tags = _tags(value)
        where = f"signature d={tags.get('d')} s={tags.get('s')}"
        if tags.get("v") != "1" or tags.get("c") != "relaxed/relaxed":
            raise BadSignature(f"{where}: v={tags.get('v')} c={tags.get('c')}")
        body_hash = base64.b64encode(hashlib.sha256(_relaxed_body(body)).digest()).decode()
        if body_hash != re.sub(r"\s", "", tags["bh"]):
            raise BadSignature(f"{where}: the body hash differs (the body changed)")
        data = b""
        taken: dict[bytes, int] = {}
        for wanted in (re.sub(r"\s", "", h).lower().encode() for h in tags["h"].split(":")):
            i = taken.get(wanted, len(fields))
            while i > 0:
                i -= 1
                if fields[i][0].strip().lower() == wanted:
                    data += _relaxed_header(*fields[i]) + b"\r\n"
                    break
            taken[wanted] = i
        without_b = re.sub(rb"(^|;)([ \t\r\n]*b[ \t\r\n]*=)[^;]*", rb"\1\2", value)
        data += _relaxed_header(name, without_b)
        record = dns.txt(f"{tags['s']}._domainkey.{tags['d']}")
        if record is None:
            raise BadSignature(f"{where}: no key in DNS")
        key_tags = _tags(record.encode())
        public = base64.b64decode(re.sub(r"\s", "", key_tags["p"]))
        signature = base64.b64decode(re.sub(r"\s", "", tags["b"]))
        try:
            if tags["a"] == "rsa-sha256" and key_tags.get("k", "rsa") == "rsa":
                rsa_key = serialization.load_der_public_key(public)
                assert isinstance(rsa_key, rsa.RSAPublicKey)
                rsa_key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
            elif tags["a"] == "ed25519-sha256" and key_tags.get("k") == "ed25519":
                ed_key = ed25519.Ed25519PublicKey.from_public_bytes(public)
                ed_key.verify(signature, hashlib.sha256(data).digest())
            else:
                raise BadSignature(f"{where}: a={tags['a']} with k={key_tags.get('k')}")
        except BadSignature:
            raise
        except Exception as exc:
            raise BadSignature(f"{where} (field {index}): {type(exc).__name__}") from None
        found.append((tags["d"], tags["s"]))
    return found


def dkimpy_verify_all(message: bytes, dns: StubDns) -> int:
    """Check every signature with dkimpy; how many there are (each must
    verify)."""
    import dkim  # type: ignore[import-untyped]

    count = len(signature_fields(message))
    for idx in range(count):
        checker = dkim.DKIM(message)
        assert checker.verify(idx=idx, dnsfunc=dns.dkimpy), f"dkimpy: signature {idx} fails"
    return count


class DnsServer:
    """A DNS server of the test's own on 127.0.0.1 (UDP, a thread) that
    answers TXT questions from a :class:`StubDns` (each record cut into
    strings of 255 characters) and NXDOMAIN for any other name. Use as a
    context manager; ``address`` is ``127.0.0.1:PORT``."""

    def __init__(self, dns: StubDns) -> None:
        import socket
        import threading

        self.dns = dns
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.address = f"127.0.0.1:{self._sock.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> DnsServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def _serve(self) -> None:
        import dns.message
        import dns.rcode
        import dns.rdataclass
        import dns.rdatatype
        import dns.rdtypes.ANY.TXT
        import dns.rrset

        while not self._stop.is_set():
            try:
                data, peer = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            query = dns.message.from_wire(data)
            reply = dns.message.make_response(query)
            question = query.question[0]
            record = self.dns.txt(question.name.to_text())
            if record is None:
                reply.set_rcode(dns.rcode.NXDOMAIN)
            elif question.rdtype == dns.rdatatype.TXT:
                # Made directly: dnspython's text path first looks for an
                # IN-class TXT module, and the suite's import guard would
                # take that miss for a missing dependency.
                strings = [record[i : i + 255].encode() for i in range(0, len(record), 255)]
                rdata = dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, strings)
                reply.answer.append(dns.rrset.from_rdata(question.name, 60, rdata))
            self._sock.sendto(reply.to_wire(), peer)

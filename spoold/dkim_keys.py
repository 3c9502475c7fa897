"""DKIM signing keys and the DNS records that publish them (RFC 6376, and
RFC 8463 for Ed25519).

A :class:`DkimKey` is one signing key: the domain and selector it signs
as, its algorithm (``rsa-sha256`` or ``ed25519-sha256``), the private key,
the header fields it signs and whether it also signs for subdomains of its
domain. :func:`load_key` reads one from a PEM file and checks it;
:func:`new_private_key` and :func:`write_new_key` make one (``spoold dkim
keygen``) and :func:`public_key_record` / :func:`txt_strings` give the DNS
record that publishes it; :func:`record_problem` says whether a record
found in DNS publishes a key. :func:`signing_domain` and
:func:`check_selector` are the one check of a key's domain and selector
(the config's ``[[dkim]]`` tables use them too).

Nothing here does I/O but :func:`load_key` and :func:`write_new_key`
(blocking: the daemon calls them from its config loading, the CLI
directly). The signer of messages is :mod:`spoold.dkim`.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from spoold.errors import DkimKeyError
from spoold.store.directory import fsync_directory

__all__ = [
    "DEFAULT_SIGNED_HEADERS",
    "MAX_KEY_FILE_BYTES",
    "MIN_RSA_BITS",
    "DkimAlgorithm",
    "DkimKey",
    "PrivateKey",
    "check_header_names",
    "check_selector",
    "load_key",
    "new_private_key",
    "public_key_record",
    "record_problem",
    "signing_domain",
    "txt_strings",
    "write_new_key",
]


class DkimAlgorithm(StrEnum):
    RSA_SHA256 = "rsa-sha256"
    ED25519_SHA256 = "ed25519-sha256"


# RFC 6376 §5.4.1's recommended fields, and those that say how the body
# reads (MIME), which a changed copy would otherwise keep valid.
DEFAULT_SIGNED_HEADERS: tuple[str, ...] = (
    "From",
    "Reply-To",
    "Subject",
    "Date",
    "To",
    "Cc",
    "Resent-Date",
    "Resent-From",
    "Resent-To",
    "Resent-Cc",
    "In-Reply-To",
    "References",
    "List-Id",
    "List-Help",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",  # RFC 8058: signed with List-Unsubscribe
    "List-Subscribe",
    "List-Post",
    "List-Owner",
    "List-Archive",
    "Sender",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
)
# Fields a message has at most once (RFC 5322 §3.6, RFC 2045, RFC 8058):
# a key that signs one lists it once more than it appears, absent ones
# once (RFC 6376 §8.15), so none can be added after signing.
MIN_RSA_BITS = 1024  # RFC 8301: verifiers may refuse shorter keys

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

# RFC 5322 ftext without ";", which would end h= in the signature.
_FIELD_NAME = re.compile(r"[!-9<-~]+")
_NEVER_SIGNED = {"dkim-signature"}  # a signature does not sign signatures


def check_header_names(names: Iterable[str]) -> tuple[str, ...]:
    """``names`` as a key's list of fields to sign; ValueError when one is
    not a field name, when ``From`` is missing (RFC 6376 requires it) or a
    ``DKIM-Signature`` is named."""
    out = tuple(names)
    for name in out:
        if not isinstance(name, str) or not _FIELD_NAME.fullmatch(name):
            raise ValueError(f"not a header field name: {name!r}")
        if name.lower() in _NEVER_SIGNED:
            raise ValueError(f"{name} cannot be signed")
    if "from" not in {n.lower() for n in out}:
        raise ValueError("the list must hold From (RFC 6376 requires it signed)")
    return out


_LABELS = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*")
_SELECTOR = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_-]+)*")


def signing_domain(domain: str) -> str:
    """``domain`` in lower case, without a final dot, an internationalised
    one as its A-label (``xn--...``); ValueError when it is not a domain.

    Python's codec converts by IDNA 2003, receivers by IDNA 2008: they
    differ for a few characters (``ß``, final sigma, joiners, compatibility
    forms), which IDNA 2003 maps to others (``faß.de`` to ``fass.de``, not
    ``xn--fa-hia.de``). Such a domain is refused, asking for its ``xn--``
    form: only a domain that reads back as it was written is converted."""
    text = domain.strip().rstrip(".").lower()
    if not text.isascii():
        try:
            ascii_form = text.encode("idna").decode("ascii")
            same = ascii_form.encode("ascii").decode("idna") == text
        except UnicodeError:
            raise ValueError(f"expected a domain like 'example.org', got {domain!r}") from None
        if not same:
            raise ValueError(
                f"{domain!r} reads differently by IDNA 2003 and IDNA 2008 "
                f"(Python makes it {ascii_form!r}): write its xn-- form"
            )
        text = ascii_form
    if not _LABELS.fullmatch(text):
        raise ValueError(f"expected a domain like 'example.org', got {domain!r}")
    return text


def check_selector(selector: str) -> str:
    """``selector`` when it is a DKIM selector (labels of letters, digits,
    ``-`` and ``_``); else ValueError."""
    if not _SELECTOR.fullmatch(selector):
        raise ValueError(
            f"expected a selector like 's2026' (letters, digits, - _ .), got {selector!r}"
        )
    return selector


@dataclass(frozen=True, slots=True)
class DkimKey:
    """One signing key (see the module's docstring). ``source``: where it
    was read from, for messages. Make one with :func:`load_key`, or give a
    ``cryptography`` private key directly."""

    domain: str
    selector: str
    algorithm: DkimAlgorithm
    private_key: PrivateKey = field(repr=False)
    headers: tuple[str, ...] = DEFAULT_SIGNED_HEADERS
    subdomains: bool = False
    source: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "domain", signing_domain(self.domain))
        check_selector(self.selector)
        object.__setattr__(self, "algorithm", DkimAlgorithm(self.algorithm))
        object.__setattr__(self, "headers", check_header_names(self.headers))
        _check_key_type(self.private_key, self.algorithm, self.source or "the key")

    def covers(self, domain: str) -> bool:
        """Whether this key signs for mail from ``domain`` (lower case)."""
        return domain == self.domain or (self.subdomains and domain.endswith("." + self.domain))


def _check_key_type(key: object, algorithm: DkimAlgorithm, where: str) -> None:
    if algorithm is DkimAlgorithm.RSA_SHA256:
        if not isinstance(key, rsa.RSAPrivateKey):
            raise DkimKeyError(f"{where}: holds {_kind(key)}, but the algorithm is rsa-sha256")
        if key.key_size < MIN_RSA_BITS:
            raise DkimKeyError(
                f"{where}: a {key.key_size}-bit RSA key; DKIM needs at least {MIN_RSA_BITS} "
                "(2048 is usual)"
            )
    elif not isinstance(key, ed25519.Ed25519PrivateKey):
        raise DkimKeyError(f"{where}: holds {_kind(key)}, but the algorithm is ed25519-sha256")


def _kind(key: object) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return "an RSA key"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "an Ed25519 key"
    return f"a {type(key).__name__.removeprefix('_')}"


def load_key(
    path: str | Path,
    *,
    domain: str,
    selector: str,
    algorithm: DkimAlgorithm | str,
    headers: Sequence[str] = DEFAULT_SIGNED_HEADERS,
    subdomains: bool = False,
) -> DkimKey:
    """Read the private key at ``path`` (PEM, PKCS#8 or PKCS#1, not
    encrypted; for Ed25519 also the base64 32-byte seed that dkimpy's
    ``dknewkey`` writes) and check it against ``algorithm``. The file must
    be a regular file of at most :data:`MAX_KEY_FILE_BYTES` that not every
    user may read or write (mode 0600 or 0640, as ``spoold dkim keygen``
    writes).
    Raises
    :class:`~spoold.errors.DkimKeyError` naming the file. Blocking I/O."""
    where = f"key_file {path}"
    try:
        alg = DkimAlgorithm(algorithm)
    except ValueError:
        raise DkimKeyError(
            f"{where}: unknown algorithm {algorithm!r} (rsa-sha256 or ed25519-sha256)"
        ) from None
    key = _parse_private_key(_read_key_file(path, where), alg, where)
    try:
        return DkimKey(domain, selector, alg, key, tuple(headers), subdomains, str(path))
    except ValueError as exc:
        if isinstance(exc, DkimKeyError):
            raise
        raise DkimKeyError(f"{where}: {exc}") from None


MAX_KEY_FILE_BYTES = 64 * 1024  # an 8192-bit RSA key in PEM is under 7 KiB


def _read_key_file(path: str | Path, where: str) -> bytes:
    """The bytes of the key file at ``path``: a regular file (a FIFO or a
    device is refused, without waiting on it), of at most
    :data:`MAX_KEY_FILE_BYTES`, that not every user may read or write
    (like OpenDKIM's ``RequireSafeKeys``: a private key others can read is
    no longer private, one they can write no longer the operator's)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise DkimKeyError(f"cannot read {where}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DkimKeyError(f"{where}: not a regular file")
        if st.st_mode & (stat.S_IROTH | stat.S_IWOTH):
            raise DkimKeyError(
                f"{where}: open to every user (mode {stat.S_IMODE(st.st_mode):04o}); "
                "a private key must be readable by the daemon only: chmod 0600 (or 0640 "
                "with the daemon's group)"
            )
        if st.st_size > MAX_KEY_FILE_BYTES:
            raise DkimKeyError(
                f"{where}: {st.st_size} bytes; a key file is at most {MAX_KEY_FILE_BYTES}"
            )
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, MAX_KEY_FILE_BYTES + 1 - size):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_KEY_FILE_BYTES:
                raise DkimKeyError(f"{where}: a key file is at most {MAX_KEY_FILE_BYTES} bytes")
        return b"".join(chunks)
    except OSError as exc:
        raise DkimKeyError(f"cannot read {where}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def _parse_private_key(data: bytes, algorithm: DkimAlgorithm, where: str) -> PrivateKey:
    if b"-----BEGIN" not in data:
        if algorithm is DkimAlgorithm.ED25519_SHA256:
            try:
                seed = base64.b64decode(data.strip(), validate=True)
            except ValueError:
                seed = b""
            if len(seed) == 32:
                return ed25519.Ed25519PrivateKey.from_private_bytes(seed)
        raise DkimKeyError(f"{where}: not a PEM private key")
    if b"ENCRYPTED" in data:
        raise DkimKeyError(f"{where}: the key is encrypted; spoold needs it without a passphrase")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise DkimKeyError(f"{where}: not a usable PEM private key ({exc})") from None
    _check_key_type(key, algorithm, where)
    assert isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey)
    return key


def public_key_record(key: PrivateKey) -> str:
    """The TXT record that publishes ``key``'s public half
    (``v=DKIM1; k=rsa; p=...``), as one string."""
    if isinstance(key, rsa.RSAPrivateKey):
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"


def new_private_key(algorithm: DkimAlgorithm | str, bits: int = 2048) -> PrivateKey:
    """A new private key for ``algorithm`` (``bits``: an RSA key's size,
    at least :data:`MIN_RSA_BITS`)."""
    if DkimAlgorithm(algorithm) is DkimAlgorithm.ED25519_SHA256:
        return ed25519.Ed25519PrivateKey.generate()
    if not MIN_RSA_BITS <= bits <= 8192:
        raise ValueError(f"an RSA key of {bits} bits: give {MIN_RSA_BITS} to 8192 (2048 is usual)")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def write_new_key(path: str | Path, key: PrivateKey) -> None:
    """Write ``key`` (PKCS#8 PEM, not encrypted) to a new file at ``path``,
    mode 0600, durably. Never replaces a file: FileExistsError when
    ``path`` exists (nothing is written then). Blocking I/O."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        view = memoryview(pem)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):  # the write's error is the one to see
            os.unlink(path)
        raise
    os.close(fd)
    fsync_directory(Path(path).absolute().parent)  # the new name is durable too


def record_problem(key: DkimKey, records: Sequence[str]) -> str | None:
    """Why none of the TXT ``records`` found at ``key``'s name (each one's
    strings joined) publishes ``key``, or None when one does."""
    dkim_records = [r for r in records if "p=" in r]
    if not dkim_records:
        return "no DKIM key record (v=DKIM1; k=...; p=...)" if records else "no TXT record"
    ours = base64.b64decode(public_key_record(key.private_key).rpartition("p=")[2])
    kind = "rsa" if key.algorithm is DkimAlgorithm.RSA_SHA256 else "ed25519"
    seen = []
    for record in dkim_records:
        tags = {}
        for part in record.split(";"):
            name, _, value = part.partition("=")
            tags[name.strip()] = re.sub(r"\s", "", value)
        if "v" in tags and tags["v"] != "DKIM1":
            seen.append(f"v={tags['v']}, not v=DKIM1")
            continue
        if tags.get("k", "rsa").lower() != kind:
            seen.append(f"k={tags.get('k', 'rsa')}, not k={kind}")
            continue
        if not tags.get("p"):
            seen.append("the key is revoked (p= is empty)")
            continue
        try:
            published = base64.b64decode(tags["p"], validate=True)
        except ValueError:
            seen.append("p= is not base64")
            continue
        if published == ours:
            return None
        seen.append(f"p= is another key than {key.source or 'this one'}")
    return "; ".join(seen)


def txt_strings(record: str, size: int = 255) -> list[str]:
    """``record`` cut into the character-strings of one TXT record (each at
    most 255 bytes; a resolver joins them back without a separator)."""
    return [record[i : i + size] for i in range(0, len(record), size)] or [""]

"""Mail addresses: the one validator every way in uses.

An address in spoold is the ``Mailbox`` of RFC 5321 §4.1.2, written without
the angle brackets: ``local-part@domain``. With SMTPUTF8 (RFC 6531) the
local part and the domain may also hold UTF-8 beyond ASCII. The null
reverse path ``<>`` is the empty string and is only ever a sender.

What is checked, and refused with an :class:`~spoold.errors.AddressError`
that says why:

* syntax: a dot-string or quoted-string local part, then ``@``, then a
  domain of LDH labels (or, with SMTPUTF8, U-labels) or an address literal
  such as ``[192.0.2.1]`` or ``[IPv6:2001:db8::1]``;
* no control character anywhere (CR, LF and NUL included), so an address can
  never split an SMTP command line or a header;
* lengths: local part at most 64 octets, domain at most 255, the whole path
  with its brackets at most 256 (RFC 5321 §4.5.3.1), a label at most 63;
* non-ASCII only when SMTPUTF8 is allowed (``kind`` is then
  ``"non_ascii"``, so SMTP can answer ``553 5.6.7``).

The SMTP listener, ``spoold sendmail``, the control protocol, ``Spool.add``
and the relay all call :func:`validate_address`; a record that somehow
holds an address it refuses fails that recipient permanently at the relay.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final, Literal

from spoold.errors import AddressError

__all__ = [
    "MAX_LOCAL_PART",
    "MAX_DOMAIN",
    "MAX_PATH",
    "AddressRole",
    "validate_address",
    "validate_recipients",
    "is_ascii_address",
]

MAX_LOCAL_PART: Final = 64
MAX_DOMAIN: Final = 255
MAX_PATH: Final = 256  # "<" local-part "@" domain ">"
_MAX_LABEL = 63

AddressRole = Literal["sender", "recipient"]

# RFC 5321 atext (RFC 5322 §3.2.3): letters, digits and these.
_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_ATOM = re.compile(rf"[{_ATEXT}]+")
_ATOM_UTF8 = re.compile(rf"(?:[{_ATEXT}]|[^\x00-\x7f])+")
# Inside quotes: printable ASCII but '"' and '\', or a backslash pair.
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"')
_QUOTED_UTF8 = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|[^\x00-\x7f]|\\[\x20-\x7e])*"')
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")
_LABEL_UTF8 = re.compile(
    r"(?:[A-Za-z0-9]|[^\x00-\x7f])(?:(?:[A-Za-z0-9-]|[^\x00-\x7f])*(?:[A-Za-z0-9]|[^\x00-\x7f]))?"
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f\x80-\x9f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")  # undecodable bytes (surrogateescape)
_GENERAL_LITERAL = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+")
# Usual addresses seen lately (a bounded set: emptied when full). Whatever
# the role or SMTPUTF8, one is valid: it is not "" and it is ASCII.
_usual: dict[str, None] = {}
_USUAL_KEPT = 4096

# The usual address, all ASCII: a dot-atom local part, a domain of labels of
# at most 63 characters. One match says it passes every check below but the
# lengths (checked beside it), so most addresses need no more.
_PLAIN = re.compile(
    rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*"
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


def is_ascii_address(address: str) -> bool:
    return address.isascii()


def _octets(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))


def _check_local_part(local: str, address: str, smtputf8: bool) -> None:
    if not local:
        raise AddressError(f"{address!r} has no local part before '@'", address)
    if local.startswith('"'):
        pattern = _QUOTED_UTF8 if smtputf8 else _QUOTED
        if pattern.fullmatch(local) is None:
            raise AddressError(f"{address!r}: the quoted local part is malformed", address)
    else:
        pattern = _ATOM_UTF8 if smtputf8 else _ATOM
        for atom in local.split("."):
            if not atom:
                raise AddressError(
                    f"{address!r}: the local part has an empty part between dots", address
                )
            if pattern.fullmatch(atom) is None:
                bad = next(
                    (c for c in atom if not (smtputf8 and ord(c) > 0x7F) and not _ATOM.match(c)),
                    atom[0],
                )
                raise AddressError(
                    f"{address!r}: {bad!r} is not allowed in a local part (quote it)", address
                )
    if _octets(local) > MAX_LOCAL_PART:
        raise AddressError(
            f"{address!r}: local part of {_octets(local)} octets "
            f"(at most {MAX_LOCAL_PART} allowed)",
            address,
            kind="too_long",
        )


def _check_literal(literal: str, address: str) -> None:
    inner = literal[1:-1]
    if inner[:5].lower() == "ipv6:":
        try:
            ipaddress.IPv6Address(inner[5:])
        except ValueError:
            raise AddressError(f"{address!r}: {literal} is not an IPv6 address", address) from None
        return
    try:
        ipaddress.IPv4Address(inner)
    except ValueError:
        if _GENERAL_LITERAL.fullmatch(inner) is None:
            raise AddressError(
                f"{address!r}: {literal} is not an address literal", address
            ) from None


def _check_domain(domain: str, address: str, smtputf8: bool) -> None:
    if not domain:
        raise AddressError(f"{address!r} has no domain after '@'", address)
    if domain.startswith("["):
        if not domain.endswith("]"):
            raise AddressError(f"{address!r}: unterminated address literal", address)
        _check_literal(domain, address)
        return
    pattern = _LABEL_UTF8 if smtputf8 else _LABEL
    for label in domain.split("."):
        if not label:
            raise AddressError(f"{address!r}: the domain {domain!r} has an empty label", address)
        if pattern.fullmatch(label) is None:
            raise AddressError(
                f"{address!r}: {label!r} is not a valid domain label "
                "(letters, digits and inner hyphens)",
                address,
            )
        if _octets(label) > _MAX_LABEL:
            raise AddressError(
                f"{address!r}: domain label of {_octets(label)} octets "
                f"(at most {_MAX_LABEL} allowed)",
                address,
                kind="too_long",
            )
    if _octets(domain) > MAX_DOMAIN:
        raise AddressError(
            f"{address!r}: domain of {_octets(domain)} octets (at most {MAX_DOMAIN} allowed)",
            address,
            kind="too_long",
        )


def validate_address(
    address: object, *, role: AddressRole = "recipient", smtputf8: bool = True
) -> str:
    """Return ``address`` if it may be used as a ``role``; raise
    :class:`~spoold.errors.AddressError` saying why not.

    ``""`` (the null reverse path ``<>``) is a valid sender and never a
    valid recipient. ``smtputf8=False`` refuses anything beyond ASCII (the
    SMTP listener passes whether the client asked for SMTPUTF8). Nothing is
    rewritten: what is returned is what was given.
    """
    if not isinstance(address, str):
        raise AddressError(
            f"an address must be a string, not {type(address).__name__}", repr(address)
        )
    if address in _usual:
        return address  # seen lately (a mail flow repeats its addresses)
    if (
        len(address) + 2 <= MAX_PATH
        and _PLAIN.fullmatch(address) is not None
        and address.index("@") <= MAX_LOCAL_PART
        and len(address) - address.index("@") - 1 <= MAX_DOMAIN
    ):
        if len(_usual) >= _USUAL_KEPT:
            _usual.clear()
        _usual[address] = None
        return address  # the usual case (ASCII: its octets are its characters)
    if address == "":
        if role == "sender":
            return address
        raise AddressError("the null address <> cannot be a recipient", address, kind="null")
    control = _CONTROL.search(address)
    if control is not None:
        raise AddressError(
            f"{address!r} holds the control character {control.group()!r}",
            address,
            kind="control",
        )
    if _SURROGATE.search(address) is not None:
        raise AddressError(f"{address!r} is not valid UTF-8", address, kind="non_ascii")
    if not smtputf8 and not address.isascii():
        raise AddressError(
            f"{address!r} is not ASCII; it needs SMTPUTF8", address, kind="non_ascii"
        )
    if _octets(address) + 2 > MAX_PATH:
        raise AddressError(
            f"address of {_octets(address)} octets (at most {MAX_PATH - 2} allowed)",
            address,
            kind="too_long",
        )
    local, at, domain = address.rpartition("@")
    if not at:
        raise AddressError(f"{address!r} is not an address (expected local-part@domain)", address)
    if not local.startswith('"') and "@" in local:
        raise AddressError(f"{address!r} has more than one '@'", address)
    _check_local_part(local, address, smtputf8)
    _check_domain(domain, address, smtputf8)
    return address


def validate_recipients(recipients: object, *, smtputf8: bool = True) -> list[str]:
    """Every recipient checked (see :func:`validate_address`); at least one."""
    if isinstance(recipients, str) or not isinstance(recipients, list | tuple):
        raise AddressError("recipients must be a list of addresses", repr(recipients))
    if not recipients:
        raise AddressError("a message needs at least one recipient", "", kind="null")
    return [validate_address(r, role="recipient", smtputf8=smtputf8) for r in recipients]

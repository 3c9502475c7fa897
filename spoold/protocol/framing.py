"""The control protocol's lines: replies, error kinds and pages.

One request per connection: the client sends one line (see
:mod:`spoold.protocol.operations`), the daemon answers one line and the
connection is done::

    -> {"v":1,"op":"freeze","ids":["8Dq..."]}
    <- {"ok":true,"result":null}
    <- {"ok":false,"kind":"refused","error":"cannot remove 8Dq...: ..."}

Three operations answer with more than one line: ``events`` (one
``{"ok":true,"event":{...}}`` line per event until the client hangs up),
``status`` with ``stream`` (one ``{"ok":true,"page":[...]}`` line per page,
then ``{"ok":true,"result":{"listed":N,"next_after":ID}}``) and none other;
``submit`` sends the message's bytes after its request line.

A reply is written compact, non-ASCII as ``\\u`` escapes, times RFC 3339
UTC; a listing's objects as msgspec writes them (UTF-8). ``kind`` is one of
:data:`ERROR_KINDS`; programs branch on it, and ``error`` is a sentence for
a person.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, cast, get_args

import msgspec

from spoold.errors import ControlErrorKind
from spoold.times import rfc3339

__all__ = [
    "ErrorKind",
    "ERROR_KINDS",
    "Reply",
    "Encoded",
    "PAGE_HEAD",
    "ok_reply",
    "error_reply",
    "encode_reply",
    "decode_reply",
    "decode_raw_page",
    "reply_kind",
]

ErrorKind = Literal[
    "invalid",  # a bad request: not JSON, a wrong version or operation, a bad parameter
    "not_found",  # no such message
    "refused",  # not allowed for the message's status now
    "closed",  # the daemon is stopping
    "temporary",  # try again later: a disk error, a full disk, a DNS timeout
    "busy",  # too many control clients at once
    "timeout",  # wait: the message has no outcome yet after the time given
    "denied",  # an admin operation asked on the submission socket
    "suppressed",  # submit: a recipient is on the suppression list (nothing spooled)
    "internal",  # a bug: the daemon logs it
]
"""The ``kind`` of an error reply (the daemon sends no other)."""

ERROR_KINDS: frozenset[str] = frozenset(get_args(ErrorKind))

PAGE_HEAD = b'{"ok":true,"page":['
"""How a page line of a paged ``status`` starts, as the daemon writes it."""


class Reply(msgspec.Struct):
    """One reply line as a client reads it: ``ok`` and ``result``, or
    ``kind`` and ``error``; ``page`` and ``event`` in the streams."""

    ok: bool = False
    result: Any = None
    kind: str | None = None
    error: str = "unknown error"
    page: list[Any] | msgspec.UnsetType = msgspec.UNSET
    event: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET


@dataclass(frozen=True, slots=True)
class Encoded:
    """A result already encoded as JSON (a listing, page by page)."""

    json: bytes


def ok_reply(result: Any) -> dict[str, Any]:
    return {"ok": True, "result": result}


def error_reply(kind: ErrorKind, text: str) -> dict[str, Any]:
    return {"ok": False, "kind": kind, "error": text}


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return rfc3339(value)
    raise TypeError(f"cannot encode {type(value).__name__}")


def encode_reply(reply: dict[str, Any]) -> bytes:
    """One reply line (with its newline); a result :class:`Encoded`
    already goes in as it is."""
    if isinstance(result := reply.get("result"), Encoded):
        head = json.dumps({k: v for k, v in reply.items() if k != "result"}, separators=(",", ":"))
        return head[:-1].encode() + b',"result":' + result.json + b"}\n"
    return json.dumps(reply, default=_json_default, separators=(",", ":")).encode() + b"\n"


_REPLY = msgspec.json.Decoder(Reply)
_RAW_PAGE = msgspec.json.Decoder(list[msgspec.Raw])


def decode_reply(line: bytes) -> Reply:
    """A reply line as a client reads it (``ValueError`` if it is not one)."""
    try:
        return _REPLY.decode(line)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not a reply of the control protocol: {exc}") from None


def decode_raw_page(line: bytes) -> list[bytes] | None:
    """The listing objects of a page line as their JSON text, undecoded;
    None for a line that is not a page."""
    if not line.startswith(PAGE_HEAD):
        return None
    return [bytes(v) for v in _RAW_PAGE.decode(line[len(PAGE_HEAD) - 1 : -1])]


def reply_kind(reply: Reply) -> ControlErrorKind:
    """The ``kind`` of an error reply (an unknown one reads as internal)."""
    kind = reply.kind
    return cast(ControlErrorKind, kind) if kind in ERROR_KINDS else "internal"

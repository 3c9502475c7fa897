"""The sendmail-compatible entry point: ``/usr/sbin/sendmail``, ``mailq``
and ``spoold sendmail``.

Programs written for a local MTA (cron, mail(1), PHP's ``mail()``, git
send-email, monitoring scripts) run ``sendmail`` with the flags of the
original; this module reads those flags (:func:`parse_args`, getopt style:
flags may be grouped, ``-fADDR`` or ``-f ADDR``, options and recipients in
any order, ``--`` ends the options) and hands the message to the daemon's
submission socket, which any local user may use. The ``spoold-sendmail``
console script is :func:`main`; invoked under the name ``mailq`` it lists
the queue (``-bp``).

Which socket (the config is usually not readable by a user who is not an
admin, so it is never required): ``spoold --socket PATH``, else
``$SPOOLD_SUBMISSION_SOCKET``, else ``control.submission_socket`` of the
config (``-C PATH``, ``spoold --config PATH``, ``$SPOOLD_CONFIG``, then
``/etc/spoold/spoold.toml``) when this user can read it, else
``/run/spoold/submit.sock``. ``mailq`` needs the admin socket (the queue
holds every user's addresses; Exim's default too); for anyone else it says
so and exits 77.

Exit codes are sendmail's (``sysexits.h``): 0 the message is on disk; 64 a
usage error (an unknown flag, a mode spoold does not have); 65 a message or
address it cannot take; 70 a bug; 75 try again later (no daemon, a full
disk, a daemon stopping or busy); 77 this user may not use the socket.
Every address is checked before the daemon is asked, and nothing is
rewritten.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

import anyio

from spoold.address import AddressRole, validate_address
from spoold.daemon.config import (
    find_control_socket,
    find_submission_socket,
    load_config,
)
from spoold.daemon.control_client import ControlClient
from spoold.errors import AddressError, ConfigError, ControlError, SpooldError
from spoold.protocol import StatusRequest, message_view, unreadable_view

__all__ = [
    "EX_USAGE",
    "EX_DATAERR",
    "EX_NOUSER",
    "EX_SOFTWARE",
    "EX_TEMPFAIL",
    "EX_NOPERM",
    "SendmailArgs",
    "parse_args",
    "submission_socket",
    "run",
    "main",
    "mailq_main",
]

EX_USAGE = 64
EX_DATAERR = 65
EX_NOUSER = 67  # a recipient we will not send to (suppressed)
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_NOPERM = 77

DEFAULT_CONFIG = "/etc/spoold/spoold.toml"
SUBMISSION_SOCKET_ENV = "SPOOLD_SUBMISSION_SOCKET"

Mode = Literal["deliver", "list", "queue_run", "help"]

# Flags that take no value and change nothing here (sendmail's -m "me too",
# -n no aliasing, -U initial submission, -G gateway), and flags whose value
# is read and dropped (-h hop count, -L syslog tag, -N/-R/-V DSN options,
# -O long option, -B body type).
_IGNORED_FLAGS = frozenset("mnUG")
_IGNORED_WITH_VALUE = frozenset("hLNRVOB")
_WITH_VALUE = _IGNORED_WITH_VALUE | frozenset("frFCob")

USAGE = """\
usage: sendmail [OPTIONS] [--] [RECIPIENT...]   (spoold's sendmail)
Reads a message on standard input and hands it to the spoold daemon; exits 0
once it is on disk.
  -t          recipients also from the To:, Cc: and Bcc: headers (Bcc: is removed)
  -i, -oi     a line holding only '.' does not end the message
  -f ADDR, -r ADDR   the envelope sender (default: USER@HOSTNAME)
  -F NAME     the sender's full name (accepted; not used)
  -bm         deliver mail (the default)
  -bp         list the queue, as mailq (admins only)
  -q[TIME]    accepted; spoold runs its queue by itself
  -v          print the queued message ids on standard error
  -C PATH     spoold's config file (to find the submission socket)
  -B TYPE, -N DSN, -R RET, -V ENVID, -h N, -L TAG, -O OPT=VAL, -oX..., -m, -n, -U, -G
              accepted and ignored
  --idempotency-key KEY   run again with the same KEY within spool.idempotency_window,
              nothing more is queued (exit 0, no output either way)
Exit codes: 0 sent to the spool, 64 usage, 65 bad message or address,
75 try again later, 77 not allowed, 70 internal error.
"""


@dataclass
class SendmailArgs:
    """What a sendmail command line asks for."""

    mode: Mode = "deliver"
    from_headers: bool = False  # -t
    ignore_dots: bool = False  # -i, -oi
    sender: str | None = None  # -f, -r
    full_name: str | None = None  # -F
    verbose: bool = False  # -v
    config: str | None = None  # -C
    idempotency_key: str | None = None
    recipients: list[str] = field(default_factory=list)


def parse_args(argv: Sequence[str], prog: str = "sendmail") -> SendmailArgs:
    """Read a sendmail command line (without the program name); raise
    ``ValueError`` naming the flag for what is not sendmail's or not
    supported here. ``prog`` ``mailq`` means ``-bp``."""
    args = SendmailArgs()
    if Path(prog).name == "mailq":
        args.mode = "list"
    i = 0
    options_done = False
    while i < len(argv):
        arg = argv[i]
        i += 1
        if options_done or not arg.startswith("-") or arg == "-":
            args.recipients.append(arg)
            continue
        if arg == "--":
            options_done = True
            continue
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            if name == "--help":
                args.mode = "help"
            elif name == "--idempotency-key":
                if not eq:
                    if i >= len(argv):
                        raise ValueError("--idempotency-key needs a value")
                    value = argv[i]
                    i += 1
                args.idempotency_key = value
            else:
                raise ValueError(f"unknown option {name}")
            continue
        j = 1
        while j < len(arg):
            letter = arg[j]
            rest = arg[j + 1 :]
            j += 1
            if letter in "tiv" or letter in _IGNORED_FLAGS:
                if letter == "t":
                    args.from_headers = True
                elif letter == "i":
                    args.ignore_dots = True
                elif letter == "v":
                    args.verbose = True
                continue
            if letter == "q":  # -q, -q15m, -qf...: the rest is its own
                args.mode = "queue_run"
                break
            if letter not in _WITH_VALUE:
                raise ValueError(f"unknown option -{letter}")
            # It takes a value: the rest of this argument, or the next one.
            if rest:
                value = rest
            elif i < len(argv):
                value = argv[i]
                i += 1
            else:
                raise ValueError(f"-{letter} needs a value")
            if letter in "fr":
                args.sender = value
            elif letter == "F":
                args.full_name = value
            elif letter == "C":
                args.config = value
            elif letter == "o":
                if value == "i":
                    args.ignore_dots = True
                # others (-oem, -oee, -odb, -om, -oXvalue...) have no meaning here
            elif letter == "b":
                args.mode = _mode_of(value)
            break
    if args.mode == "list" and args.recipients:
        raise ValueError("listing the queue (-bp, mailq) takes no recipients")
    return args


def _mode_of(value: str) -> Mode:
    if value == "m":
        return "deliver"
    if value == "p":
        return "list"
    if value == "s":
        raise ValueError(
            "-bs (SMTP on standard input) is not supported: use the SMTP listener "
            "([smtp] listen) or give the message on standard input"
        )
    if value == "i":
        raise ValueError("-bi (newaliases) is not supported: spoold keeps no alias database")
    raise ValueError(f"-b{value} is not supported (spoold has -bm and -bp)")


def _fail(label: str, message: str, code: int) -> NoReturn:
    print(f"{label}: {message}", file=sys.stderr)
    sys.exit(code)


def submission_socket(socket: str | None, config: str | None) -> Path:
    """The submission socket to use (see the module docstring for the order)."""
    if socket:
        return Path(socket)
    env = os.environ.get(SUBMISSION_SOCKET_ENV)
    if env:
        return Path(env)
    return find_submission_socket(config or os.environ.get("SPOOLD_CONFIG") or DEFAULT_CONFIG)


# ----------------------------------------------------------------- deliver


def header_recipients(content: bytes) -> tuple[list[str], bytes]:
    """Recipients from To/Cc/Bcc (for -t), and the content without Bcc."""
    import email.parser
    import email.policy
    import email.utils
    import re

    end = re.search(rb"\r?\n\r?\n", content)
    head = content[: end.start()] if end else content
    parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)
    fields = parsed.get_all("To", []) + parsed.get_all("Cc", []) + parsed.get_all("Bcc", [])
    found = [addr for _, addr in email.utils.getaddresses([str(f) for f in fields]) if addr]
    kept: list[bytes] = []
    in_bcc = False
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):  # a continuation belongs to the field above
            if not in_bcc:
                kept.append(line)
            continue
        in_bcc = line[:4].lower() == b"bcc:"
        if not in_bcc:
            kept.append(line)
    rest = content[end.start() :] if end else b""
    if not kept:
        return found, rest.lstrip(b"\r\n")  # no headers left: no separator either
    return found, b"".join(kept).rstrip(b"\r\n") + rest


def cut_at_dot_line(content: bytes) -> bytes:
    """Traditional sendmail input: a line holding only '.' ends the message."""
    kept = []
    for line in content.splitlines(keepends=True):
        if line.rstrip(b"\r\n") == b".":
            break
        kept.append(line)
    return b"".join(kept)


def _valid_address(label: str, address: str, role: AddressRole, what: str = "") -> None:
    """Exit 65 (EX_DATAERR), naming the address, unless it may be a ``role``."""
    try:
        validate_address(address, role=role, smtputf8=True)
    except AddressError as exc:
        why = str(exc)  # names the address itself, mostly
        if not why.startswith(repr(address)):
            why = f"{address!r}: {why}"
        _fail(label, f"bad {what or role} address {why}; nothing was sent", EX_DATAERR)


def _login_name() -> str:
    """Who runs this, by the real uid (not what $USER claims), as Postfix does."""
    import getpass
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return getpass.getuser()


def _deliver(label: str, args: SendmailArgs, socket: str | None, config: str | None) -> None:
    import socket as socketlib

    if args.idempotency_key is not None:
        from spoold.idempotency import validate_key

        try:
            validate_key(args.idempotency_key)
        except SpooldError as exc:
            _fail(label, f"--idempotency-key: {exc}; nothing was sent", EX_DATAERR)
    rcpts = list(args.recipients)
    for rcpt in rcpts:
        _valid_address(label, rcpt, "recipient")
    if args.sender is not None:
        _valid_address(label, args.sender, "sender")
    content = sys.stdin.buffer.read()
    if not content:
        _fail(label, "empty message: nothing on standard input; nothing was sent", EX_DATAERR)
    if not args.ignore_dots:
        content = cut_at_dot_line(content)
    if args.from_headers:
        found, content = header_recipients(content)
        for rcpt in found:
            _valid_address(label, rcpt, "recipient", "recipient (from the headers)")
        rcpts += found
    if not rcpts:
        _fail(
            label, "no recipients (give addresses, or -t to read them from the headers)", EX_DATAERR
        )
    if not content:
        _fail(label, "empty message: nothing before the '.' line; nothing was sent", EX_DATAERR)
    envelope_sender = args.sender
    if envelope_sender is None:
        envelope_sender = f"{_login_name()}@{socketlib.getfqdn()}"
        _valid_address(label, envelope_sender, "sender", "sender (user@host; give -f)")
    path = submission_socket(socket, config or args.config)
    if not socket and not os.environ.get(SUBMISSION_SOCKET_ENV) and not path.exists():
        # A daemon from before the submission socket (not restarted since
        # an upgrade) takes submissions on its admin socket, for those who
        # may use it.
        admin = find_control_socket(
            config or args.config or os.environ.get("SPOOLD_CONFIG") or DEFAULT_CONFIG
        )
        if admin.exists() and os.access(admin, os.R_OK | os.W_OK):
            path = admin
    client = ControlClient(path)

    async def go() -> list[str]:
        return await client.submit(envelope_sender, rcpts, content, args.idempotency_key)

    try:
        ids = anyio.run(go)
    except ControlError as exc:
        code = {
            "invalid": EX_DATAERR,
            "internal": EX_SOFTWARE,
            "denied": EX_NOPERM,
            "suppressed": EX_NOUSER,
        }.get(exc.kind, EX_TEMPFAIL)
        _fail(label, f"message not accepted: {exc}", code)
    except SpooldError as exc:
        _fail(label, f"message not accepted: {exc}", EX_TEMPFAIL)
    if args.verbose:
        print(f"sendmail: queued as {' '.join(ids)}", file=sys.stderr)


# -------------------------------------------------------------------- mailq


def _mailq(label: str, socket: str | None, config: str | None) -> None:
    """List the queue as ``exim -bp`` (and sendmail's mailq) do, from the
    admin socket, or from the spool directory when no daemon runs."""
    # Imported here: sendmail itself starts without the printing's imports.
    from spoold.daemon.status_output import print_status

    config_path = config or os.environ.get("SPOOLD_CONFIG") or DEFAULT_CONFIG
    admin = Path(socket) if socket else find_control_socket(config_path)

    async def from_disk() -> list[dict[str, Any]]:
        from spoold.spool import Spool

        try:
            cfg = await anyio.to_thread.run_sync(load_config, config_path)
        except ConfigError:
            if await anyio.to_thread.run_sync(_kept_out, config_path):  # not an admin
                raise ControlError(
                    f"{config_path} may not be read by this user", "denied"
                ) from None
            raise
        messages, unreadable = await Spool.status_from_disk(cfg.spool.dir)
        views = [message_view(m) for m in messages] + [unreadable_view(u) for u in unreadable]
        return sorted(views, key=lambda v: str(v["id"]))

    async def listing() -> list[dict[str, Any]]:
        try:
            views: list[dict[str, Any]] = await ControlClient(admin).ask(StatusRequest())
        except ControlError as exc:
            if exc.kind != "unavailable" or socket:
                raise
            return await from_disk()
        return views

    try:
        views = anyio.run(listing)
    except ControlError as exc:
        if exc.kind == "denied":
            _fail(
                label,
                f"listing the queue is for administrators (it holds every user's "
                f"addresses): {exc}; run it as root or a member of the admin socket's "
                "group, or ask an administrator",
                EX_NOPERM,
            )
        _fail(label, str(exc), EX_TEMPFAIL)
    except ConfigError as exc:
        _fail(
            label, f"no daemon answers at {admin}, and the spool cannot be read: {exc}", EX_TEMPFAIL
        )
    except SpooldError as exc:
        _fail(label, str(exc), EX_TEMPFAIL)
    if not views:
        print("Mail queue is empty")
        return
    print_status(views, "exim")


def _kept_out(path: str) -> bool:
    """Whether this user may not read the file at ``path``."""
    try:
        with open(path, "rb"):
            return False
    except PermissionError:
        return True
    except OSError:
        return False


# --------------------------------------------------------------------- main


def run(
    argv: Sequence[str],
    prog: str = "sendmail",
    *,
    socket: str | None = None,
    config: str | None = None,
    label: str | None = None,
) -> None:
    """Do what the command line ``prog argv...`` asks; exits the process
    on failure with a sendmail exit code. ``socket`` and ``config`` are
    ``spoold``'s own ``--socket`` and ``--config``, when given; ``label``
    starts each message (default: the program's name)."""
    label = label or Path(prog).name
    try:
        args = parse_args(argv, prog)
    except ValueError as exc:
        _fail(label, f"{exc} (see --help)", EX_USAGE)
    if args.mode == "help":
        print(USAGE, end="")
    elif args.mode == "queue_run":
        return  # spoold runs its queue by itself; `spoold send --all` kicks it
    elif args.mode == "list":
        _mailq(label, socket, config or args.config)
    else:
        _deliver(label, args, socket, config)


def main() -> None:
    """The ``spoold-sendmail`` console script (installed as
    /usr/sbin/sendmail and /usr/bin/mailq): what it does follows the name it
    was run by."""
    run(sys.argv[1:], Path(sys.argv[0]).name)
    sys.exit(0)


def mailq_main() -> None:
    """The ``spoold-mailq`` console script: ``mailq``."""
    run(sys.argv[1:], "mailq")
    sys.exit(0)


if __name__ == "__main__":
    main()

"""The ``spoold`` command: the daemon and a thin client of its control socket.

Every command finds the daemon through ``--socket PATH``, or the
``control.socket`` of ``--config PATH`` (default ``$SPOOLD_CONFIG``, then
``/etc/spoold/spoold.toml``). ``status``, ``count``, ``check``, ``show``
and ``history`` also work with no daemon running: they then read the spool
directory (``--spool-dir``, or ``spool.dir`` of the config).

Exit codes: 0 done; 1 the daemon refused (e.g. removing a message that is
not frozen) or no such message; 2 usage error, bad id, no daemon, a
daemon busy with too many control clients, or a socket this user may not
use. ``suppress check`` exits 0 when no address given is suppressed, 1
when one is. Every id is validated here before anything is sent. ``sendmail`` is
:mod:`spoold.daemon.sendmail` (sendmail's flags and exit codes; it uses the
submission socket, which any local user may use).
"""

from __future__ import annotations

import base64
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import anyio
import click

from spoold.address import validate_address
from spoold.daemon.config import dkim_signer, find_control_socket, load_config
from spoold.daemon.control_client import ControlClient
from spoold.daemon.status_output import StatusPrinter
from spoold.errors import (
    AddressError,
    ConfigError,
    ControlError,
    InvalidIdError,
    NotFoundError,
    SpooldError,
)
from spoold.ids import validate_id
from spoold.protocol import (
    CheckRequest,
    CountRequest,
    FleetStatusRequest,
    FreezeRequest,
    HistoryRequest,
    InfoRequest,
    QueueChoice,
    RecoverRequest,
    RecoverSource,
    ReloadRequest,
    RemoveRequest,
    Request,
    RerouteRequest,
    RetryPlanRequest,
    SendRequest,
    ShowRequest,
    StatusRequest,
    SuppressAddRequest,
    SuppressListRequest,
    SuppressRemoveRequest,
    WebhooksRequest,
    departed_view,
    describe_view,
    history_view,
)
from spoold.suppression import normalise

__all__ = ["main"]

DEFAULT_CONFIG = "/etc/spoold/spoold.toml"
_T = TypeVar("_T")


class _Target:
    def __init__(self, config: str | None, socket: str | None, spool_dir: str | None) -> None:
        self.config_path = config or os.environ.get("SPOOLD_CONFIG") or DEFAULT_CONFIG
        self.explicit_config = config is not None or "SPOOLD_CONFIG" in os.environ
        self.socket = socket
        self.spool_dir = spool_dir

    def _config(self) -> Any:
        try:
            return load_config(self.config_path)
        except ConfigError as exc:
            _fail(str(exc), 2)

    def client(self) -> ControlClient:
        """The daemon's control socket: ``--socket``, else the config's. A
        config that is not valid still names its socket (read on its own),
        so a broken file never locks the operator out of the daemon."""
        if self.socket:
            return ControlClient(self.socket)
        if not Path(self.config_path).is_file():
            self._config()  # fails with the reason the file cannot be read
        try:
            load_config(self.config_path)
        except ConfigError as exc:
            where = find_control_socket(self.config_path)
            click.echo(
                f"spoold: note: {self.config_path} is not valid ({len(exc.problems)} "
                f"problem(s)); reaching the daemon at {where}",
                err=True,
            )
            return ControlClient(where)
        return ControlClient(find_control_socket(self.config_path))

    def spool_directory(self) -> Path:
        if self.spool_dir:
            return Path(self.spool_dir)
        return Path(self._config().spool.dir)


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"spoold: {message}", err=True)
    sys.exit(code)


def _run(fn: Callable[[], Awaitable[_T]]) -> _T:
    try:
        return anyio.run(fn)
    except ControlError as exc:
        _fail(str(exc), 1 if exc.kind in ("refused", "not_found") else 2)
    except InvalidIdError as exc:
        _fail(str(exc), 2)
    except NotFoundError as exc:  # read from disk: the daemon's not_found is 1 too
        _fail(str(exc), 1)
    except SpooldError as exc:
        _fail(str(exc), 2)


def _valid_ids(ids: Sequence[str]) -> list[str]:
    try:
        return [validate_id(i) for i in ids]
    except InvalidIdError as exc:
        _fail(str(exc), 2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="spoold", prog_name="spoold", message="%(prog)s %(version)s")
@click.option("--config", "config", metavar="PATH", help="config file (finds the socket)")
@click.option("--socket", "socket", metavar="PATH", help="control socket of the daemon")
@click.option("--spool-dir", metavar="PATH", help="spool directory (when no daemon runs)")
@click.pass_context
def main(ctx: click.Context, config: str | None, socket: str | None, spool_dir: str | None) -> None:
    """spoold: a mail spool daemon and its admin commands."""
    ctx.obj = _Target(config, socket, spool_dir)


# ----------------------------------------------------------------- daemon


@main.command()
@click.option("--config", "config", metavar="PATH", help="config file")
@click.pass_obj
def run(target: _Target, config: str | None) -> None:
    """Run the daemon in the foreground (for systemd, Type=notify)."""
    from spoold.daemon.main import run as run_daemon
    from spoold.daemon.resources import event_loop_options

    sys.exit(
        anyio.run(run_daemon, config or target.config_path, backend_options=event_loop_options())
    )


# ------------------------------------------------------------ read-only


async def _daemon_or_disk(
    target: _Target, request: Request, from_disk: Callable[[], Awaitable[Any]]
) -> Any:
    """Ask the daemon; with no daemon (or with --spool-dir) read the disk.
    With ``--socket`` alone there is no spool directory to read: no daemon
    there is an error."""
    if not target.spool_dir:
        try:
            return await target.client().ask(request)
        except ControlError as exc:
            if exc.kind != "unavailable" or target.socket:
                raise
    return await from_disk()


@main.command()
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "exim", "json", "id", "qshape"]),
    default="table",
    help=(
        "table (default), exim (like exim -bp), json (one object per line), id, "
        "or qshape (recipient domains by age in minutes, like Postfix's qshape)"
    ),
)
@click.option("--frozen-only", is_flag=True, help="only frozen messages")
@click.option("--active-only", is_flag=True, help="only active messages")
@click.option(
    "--quarantined", is_flag=True, help="only quarantined messages, with the reason of each"
)
@click.option("--wide", is_flag=True, help="table: show every column whole, wrapping lines")
@click.option("--domain", metavar="DOMAIN", help="only messages with a recipient left in DOMAIN")
@click.option("--older-than", metavar="SPAN", help="only messages queued at least SPAN ago")
@click.option("--newer-than", metavar="SPAN", help="only messages queued less than SPAN ago")
@click.option("--error", metavar="TEXT", help="only messages whose last error contains TEXT")
@click.option("--limit", type=click.IntRange(min=1), help="list at most this many messages")
@click.option("--after", metavar="ID", help="list the messages after this id (a cursor)")
@click.option(
    "--webhooks",
    "webhooks",
    is_flag=True,
    help="the webhooks instead of the queue: outbox, last success, last error, next retry",
)
@click.pass_obj
def status(
    target: _Target,
    fmt: str,
    frozen_only: bool,
    active_only: bool,
    quarantined: bool,
    wide: bool,
    domain: str | None,
    older_than: str | None,
    newer_than: str | None,
    error: str | None,
    limit: int | None,
    after: str | None,
    webhooks: bool,
) -> None:
    """List the queue (from the daemon, or from disk when none runs), by id.

    The listing comes in pages and is printed as it comes, so a queue of
    any size takes little memory here or in the daemon. With --webhooks,
    each webhook of the running daemon instead (table, or json)."""
    if webhooks:
        _webhook_status(target, fmt)
        return
    from spoold.listing import ListingFilter
    from spoold.times import parse_span

    if frozen_only + active_only + quarantined > 1:
        _fail("--frozen-only, --active-only and --quarantined exclude each other", 2)
    queue: QueueChoice = (
        "frozen"
        if frozen_only
        else "active"
        if active_only
        else "quarantine"
        if quarantined
        else "all"
    )
    try:
        wanted = ListingFilter(
            domain=domain,
            older_than=None if older_than is None else parse_span(older_than),
            newer_than=None if newer_than is None else parse_span(newer_than),
            error=error,
        )
    except ValueError as exc:
        _fail(f"status: {exc}", 2)
    if after is not None:
        after = _valid_ids([after])[0]
    asked = StatusRequest(
        queue=queue,
        only_ids=fmt == "id",
        after=after,
        limit=limit,
        domain=domain,
        older_than=older_than,
        newer_than=newer_than,
        error=error,
    )
    printer = StatusPrinter(fmt, wide)

    async def from_disk() -> None:
        from spoold.message import Queue
        from spoold.ondisk import Unreadable
        from spoold.spool import Spool

        queues = {
            "all": (Queue.ACTIVE, Queue.FROZEN),
            "active": (Queue.ACTIVE,),
            "frozen": (Queue.FROZEN,),
            "quarantine": (Queue.QUARANTINE,),
        }[queue]
        now = datetime.now(UTC)

        def keep(item: Any) -> bool:
            if isinstance(item, Unreadable) and queue != "quarantine":
                click.echo(f"spoold: unreadable record {item.path}: {item.reason}", err=True)
                return False
            return wanted.keeps(item, now)

        async def on_page(page: list[Any]) -> None:
            printer.page([describe_view(item) for item in page])

        await Spool.status_from_disk_pages(
            target.spool_directory(), queues, on_page, keep=keep, after=after, limit=limit
        )

    async def go() -> None:
        if not target.spool_dir:
            try:
                async for page in target.client().status_pages(fmt == "json", asked):
                    printer.page(page)
            except ControlError as exc:
                if exc.kind != "unavailable" or target.socket or printer.count:
                    raise
            else:
                return
        await from_disk()

    _run(go)
    printer.end()


def _webhook_status(target: _Target, fmt: str) -> None:
    """``status --webhooks``: one line per webhook (or one JSON object)."""
    if fmt not in ("table", "json"):
        _fail("status --webhooks: --format is table or json", 2)
    hooks: list[dict[str, Any]] = _run(lambda: target.client().ask(WebhooksRequest()))
    if fmt == "json":
        for hook in hooks:
            click.echo(json.dumps(hook))
    elif not hooks:
        click.echo("no webhooks configured")
    else:
        _print_webhooks(hooks)
    if any(not hook["up"] for hook in hooks):
        sys.exit(1)  # a monitoring check: some endpoint is failing


def _print_webhooks(hooks: list[dict[str, Any]]) -> None:
    for hook in hooks:
        state = "up" if hook["up"] else "DOWN"
        click.echo(
            f"{hook['name']}  {hook['url']}  {state}  outbox={hook['outbox']} "
            f"dropped={hook['dropped']} rejected={hook['rejected']} "
            f"posted={hook['posted']} failures={hook['failures']}"
        )
        click.echo(f"  last success: {hook['last_success'] or '-'}")
        if hook["last_error"]:
            click.echo(f"  last error:   {hook['last_error_time']} {hook['last_error']}")
            click.echo(f"  next retry:   {hook['next_retry'] or '-'}")


@main.command()
@click.pass_obj
def count(target: _Target) -> None:
    """How many messages per queue."""

    async def from_disk() -> dict[str, int]:
        from spoold.spool import Spool

        return await Spool.count_from_disk(target.spool_directory())

    async def go() -> dict[str, int]:
        counts: dict[str, int] = await _daemon_or_disk(target, CountRequest(), from_disk)
        return counts

    for name, n in _run(go).items():
        click.echo(f"{name} {n}")


@main.command()
@click.option("--max-age", default=3600, show_default=True, help="seconds before stale")
@click.option("--quick", is_flag=True, help="check bodies by size only (no checksums)")
@click.pass_obj
def check(target: _Target, max_age: int, quick: bool) -> None:
    """Consistency check of the spool directory (exit 1 if problems)."""

    async def from_disk() -> list[str]:
        from spoold.ondisk import OnDiskSpool

        ondisk, _ = await OnDiskSpool.open(target.spool_directory(), owner=False, create=False)
        async with ondisk:
            return [str(p) for p in await ondisk.check(float(max_age), quick=quick)]

    async def go() -> list[str]:
        # quick goes only when asked (a default is never sent): a daemon
        # from before --quick refuses the key
        asked = CheckRequest(max_age=max_age, quick=quick)
        found: list[str] = await _daemon_or_disk(target, asked, from_disk)
        return found

    problems = _run(go)
    for p in problems:
        click.echo(p)
    if problems:
        sys.exit(1)
    click.echo("spool is consistent")


@main.command()
@click.argument("message_id")
@click.option("--body", is_flag=True, help="also print the message itself")
@click.pass_obj
def show(target: _Target, message_id: str, body: bool) -> None:
    """Show one message's record (JSON) and, with --body, its content.

    Works for every queue (active, frozen, removed, quarantine); a record
    that cannot be read shows the reason it was set aside. A message that
    has left the queue (delivered, bounced, removed and deleted) is shown
    from the history journal while it keeps it: its final outcome."""
    (mid,) = _valid_ids([message_id])

    async def from_disk() -> dict[str, Any]:
        from spoold.history import read_history
        from spoold.ondisk import OnDiskSpool

        ondisk, _ = await OnDiskSpool.open(target.spool_directory(), owner=False, create=False)
        async with ondisk:
            try:
                found = await ondisk.find(mid)
            except NotFoundError:
                left = [o for o in await read_history(ondisk.dir) if o.id == mid]
                if not left:
                    raise
                if body:  # as the daemon says it
                    raise NotFoundError(
                        f"{mid}: {left[-1].outcome.value}; its body is gone"
                    ) from None
                return departed_view(left[-1])
            view = describe_view(found)
            if body:
                content = (await ondisk.read_body(mid)).content()
                view["body"] = base64.b64encode(content).decode()
            return view

    async def go() -> dict[str, Any]:
        view: dict[str, Any] = await _daemon_or_disk(
            target, ShowRequest(id=mid, body=body), from_disk
        )
        return view

    view = _run(go)
    content = view.pop("body", None)
    click.echo(json.dumps(view, indent=2))
    if content is not None:
        click.echo("")
        sys.stdout.flush()
        sys.stdout.buffer.write(base64.b64decode(content))


def retry_plan_attempt_lines(attempts: list[dict[str, Any]]) -> list[str]:
    """The table of planned attempts: a header, then one line per attempt,
    its columns as wide as the widest time so the header stays above them."""
    width = max([len("EARLIEST"), *(len(str(a["earliest"])) for a in attempts)])
    lines = [f"{'#':>3}  {'EARLIEST':<{width}}  LATEST"]
    for a in attempts:
        note = "  (only if not ended before)" if a["conditional"] else ""
        lines.append(f"{a['number']:>3}  {a['earliest']:<{width}}  {a['latest']}{note}")
    return lines


def _span_text(seconds: float) -> str:
    """A span for a person: ``8h``, ``7h12m``, ``1d2h``, ``90.5s``."""
    whole, rest = divmod(seconds, 1)
    parts = []
    left = int(whole)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if left >= size:
            parts.append(f"{left // size}{unit}")
            left %= size
    if left or rest or not parts:
        parts.append(f"{left + rest:g}s")
    return "".join(parts)


def retry_plan_repeats_line(repeats: dict[str, Any]) -> str:
    """The attempts of a repeating last interval, in one line: how often,
    until when, how many and when the first of them comes."""
    shortest = _span_text(repeats["shortest_wait"])
    longest = _span_text(repeats["longest_wait"])
    every = shortest if shortest == longest else f"{shortest} to {longest}"
    low, high = repeats["min_count"], repeats["max_count"]
    count = f"{high}" if low == high else f"{low} to {high}"
    noun = "attempt" if high == 1 else "attempts"
    first = repeats["earliest"]
    if repeats["latest"] != first:
        first = f"between {first} and {repeats['latest']}"
    return (
        f"then every {every} until {repeats['until']} "
        f"({count} more {noun}, #{repeats['first']} on; the first {first})"
    )


@main.command("retry-plan")
@click.argument("message_id")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json"]),
    default="table",
    help="table (default) or json (one object)",
)
@click.pass_obj
def retry_plan(target: _Target, message_id: str, fmt: str) -> None:
    """When a message would be tried again, and when it would freeze or
    bounce, if every attempt from now failed. Sends nothing."""
    (mid,) = _valid_ids([message_id])
    plan: dict[str, Any] = _run(lambda: target.client().ask(RetryPlanRequest(id=mid)))
    if fmt == "json":
        click.echo(json.dumps(plan, indent=2))
        return
    click.echo(f"retry plan of {plan['id']} (now {plan['now']})")
    if plan["note"]:
        click.echo(plan["note"])
        return
    expiry = plan["expiry"] or "never"
    click.echo(
        f"queue lifetime ends: {expiry}; on permanent failure: {plan['on_permanent_failure']}"
    )
    for line in retry_plan_attempt_lines(plan["attempts"]):
        click.echo(line)
    if plan.get("repeats"):
        click.echo(retry_plan_repeats_line(plan["repeats"]))
    reasons = {"lifetime": "the queue lifetime ends", "intervals": "no retry interval left"}
    for end in plan["ends"]:
        when = end["earliest"]
        if end["latest"] != when:
            when = f"between {when} and {end['latest']}"
        click.echo(f"then {end['action']} ({reasons[end['reason']]}): {when}")
    warning = plan["delay_warning"]
    if warning:
        when = warning["earliest"]
        if warning["latest"] != when:
            when = f"between {when} and {warning['latest']}"
        click.echo(f"delay warning to the sender: {when}")


@main.command()
@click.option(
    "--since",
    "since",
    default="1h",
    show_default=True,
    metavar="SPAN",
    help="how far back (e.g. 30m, 1h, 2d)",
)
@click.option("--recipient", metavar="ADDR", help="only outcomes for this recipient")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
)
@click.pass_obj
def history(target: _Target, since: str, recipient: str | None, fmt: str) -> None:
    """Final outcomes of messages that left the queue (delivered, bounced,
    removed), oldest first, from the history journal."""
    from spoold.times import parse_span

    try:
        span = parse_span(since)
    except ValueError as exc:
        _fail(f"--since: {exc}", 2)
    if recipient is not None:
        try:
            validate_address(recipient, role="recipient", smtputf8=True)
        except AddressError as exc:
            _fail(f"--recipient: {exc}", 2)
    asked = HistoryRequest(since=since, recipient=recipient)

    async def from_disk() -> list[dict[str, Any]]:
        from spoold.history import read_history

        found = await read_history(
            target.spool_directory(), since=datetime.now(UTC) - span, recipient=recipient
        )
        return [history_view(o) for o in found]

    async def go() -> list[dict[str, Any]]:
        views: list[dict[str, Any]] = await _daemon_or_disk(target, asked, from_disk)
        return views

    views = _run(go)
    if fmt == "json":
        for v in views:
            click.echo(json.dumps(v, separators=(",", ":")))
        return
    if not views:
        who = f" for {recipient}" if recipient is not None else ""
        click.echo(f"no outcomes{who} in the last {since}")
        return
    for v in views:
        hop = f" via {v['hop']}" if v.get("hop") else ""
        doubt = " (in doubt)" if v.get("in_doubt") else ""
        click.echo(f"{v['time']} {v['id']} {v['outcome']}{doubt} <{v['sender']}>{hop}")
        for r in v["recipients"]:
            reply = " ".join(
                str(part) for part in (r.get("code"), r.get("enhanced_status")) if part
            )
            text = f" {r['text']}" if r.get("text") else ""
            if r.get("rerouted_to"):
                now = f" (now {r['rerouted_state']})" if r.get("rerouted_state") else ""
                text = f" to {r['rerouted_to']}{now}{text}"
            click.echo(f"    {r['recipient']} {r['state']}{' ' + reply if reply else ''}{text}")
        if v.get("detail"):
            click.echo(f"    ({v['detail']})")


# ---------------------------------------------------------- operations


@main.command()
@click.argument("ids", nargs=-1, required=True)
@click.pass_obj
def freeze(target: _Target, ids: tuple[str, ...]) -> None:
    """Freeze messages (no more attempts until sent)."""
    valid = _valid_ids(ids)
    _run(lambda: target.client().ask(FreezeRequest(ids=valid)))
    click.echo(f"frozen: {' '.join(valid)}")


@main.command()
@click.argument("ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="every frozen and delayed message")
@click.option("--frozen-only", is_flag=True, help="every frozen message")
@click.option(
    "--retry-interval",
    "spans",
    multiple=True,
    metavar="SPAN",
    help="add a retry interval at the head (repeatable)",
)
@click.pass_obj
def send(
    target: _Target, ids: tuple[str, ...], all_: bool, frozen_only: bool, spans: tuple[str, ...]
) -> None:
    """Send now: thaw frozen messages, kick delayed ones."""
    chosen = sum([bool(ids), all_, frozen_only])
    if chosen != 1:
        _fail("give message ids, --all or --frozen-only (one of them)", 2)
    from spoold.times import parse_span

    for s in spans:
        try:
            parse_span(s)
        except ValueError as exc:
            _fail(f"--retry-interval: {exc}", 2)
    asked = SendRequest(retry_intervals=list(spans))
    if ids:
        asked.ids = _valid_ids(ids)
    else:
        asked.which = "all" if all_ else "frozen_only"
    sent = _run(lambda: target.client().ask(asked))
    click.echo(f"sending {len(sent)} message(s)")


@main.command()
@click.argument("ids", nargs=-1, required=True)
@click.pass_obj
def remove(target: _Target, ids: tuple[str, ...]) -> None:
    """Move frozen messages to the removed queue."""
    valid = _valid_ids(ids)
    _run(lambda: target.client().ask(RemoveRequest(ids=valid)))
    click.echo(f"removed: {' '.join(valid)}")


@main.command()
@click.argument("ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="every message in active and frozen")
@click.pass_obj
def reroute(target: _Target, ids: tuple[str, ...], all_: bool) -> None:
    """Route messages again through the current routes (may split them)."""
    if bool(ids) == all_:
        _fail("give message ids or --all (one of them)", 2)
    asked = RerouteRequest(which="all") if all_ else RerouteRequest(ids=_valid_ids(ids))
    result = _run(lambda: target.client().ask(asked))
    click.echo(f"rerouted: {len(result)} message(s) {' '.join(result)}".rstrip())


@main.command()
@click.option("--from", "source", type=click.Choice(["removed", "quarantine"]), required=True)
@click.argument("ids", nargs=-1, required=True)
@click.pass_obj
def recover(target: _Target, source: RecoverSource, ids: tuple[str, ...]) -> None:
    """Bring messages back from removed or quarantine, frozen."""
    valid = _valid_ids(ids)
    _run(lambda: target.client().ask(RecoverRequest(ids=valid, source=source)))
    click.echo(f"recovered (frozen): {' '.join(valid)}")


@main.command()
@click.pass_obj
def events(target: _Target) -> None:
    """Stream events as JSON lines until interrupted."""

    async def go() -> None:
        async for event in target.client().events():
            click.echo(json.dumps(event, separators=(",", ":")))

    try:
        _run(go)
    except KeyboardInterrupt:
        return
    _fail("the daemon closed the event stream (it stopped or restarted)", 1)


@main.command()
@click.option(
    "--interval",
    default=2.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    metavar="SECONDS",
    help="time between two refreshes",
)
@click.pass_obj
def top(target: _Target, interval: float) -> None:
    """A live view of the daemon: queues, rates, next hops, oldest
    messages, latest events. q or Ctrl-C quits."""
    from spoold.daemon.top import run_top

    if not sys.stdout.isatty():  # the view draws on a terminal's screen: elsewhere nothing shows
        _fail(
            "top needs a terminal (standard output is not one); "
            "for a script use status --format json, or count",
            2,
        )
    client = target.client()
    _run(lambda: run_top(client, interval, where=str(client.path)))


@main.command()
@click.pass_obj
def info(target: _Target) -> None:
    """What the running daemon is using (pid, config, live limits), as JSON."""
    click.echo(json.dumps(_run(lambda: target.client().ask(InfoRequest())), indent=2))


@main.command()
@click.pass_obj
def reload(target: _Target) -> None:
    """Re-read the daemon's config (like SIGHUP)."""
    result = _run(lambda: target.client().ask(ReloadRequest()))
    if not result.get("applied"):
        for problem in result.get("errors", []):
            click.echo(f"spoold: {problem}", err=True)
        _fail("reload refused; the running config stays", 1)
    for setting in result.get("restart_needed", []):
        click.echo(f"needs a restart to change: {setting}")
    click.echo("reloaded")


# ------------------------------------------------------------------ dkim


@main.group()
def dkim() -> None:
    """DKIM signing keys."""


@dkim.command()
@click.argument("domain")
@click.argument("selector")
@click.option(
    "--algorithm",
    type=click.Choice(["rsa-sha256", "ed25519-sha256"]),
    default="rsa-sha256",
    show_default=True,
    help="the key's algorithm",
)
@click.option("--bits", type=int, help="RSA key size (rsa-sha256 only)  [default: 2048]")
@click.option(
    "--directory",
    metavar="DIR",
    default=".",
    show_default=True,
    help="where to write DOMAIN.SELECTOR.key",
)
@click.option("--output", metavar="PATH", help="the key file to write (instead of --directory)")
def keygen(
    domain: str, selector: str, algorithm: str, bits: int | None, directory: str, output: str | None
) -> None:
    """Make a signing key for DOMAIN with SELECTOR: write it to a new file
    (mode 0600; an existing file is never replaced) and print the DNS TXT
    record to publish and the [[dkim]] table for the config."""
    from spoold.dkim_keys import (
        DkimAlgorithm,
        DkimKey,
        new_private_key,
        public_key_record,
        txt_strings,
        write_new_key,
    )

    alg = DkimAlgorithm(algorithm)
    if bits is not None and alg is DkimAlgorithm.ED25519_SHA256:
        _fail("--bits is for rsa-sha256 keys; an Ed25519 key has one size", 2)
    bits = 2048 if bits is None else bits
    try:
        key = new_private_key(alg, bits)
        # Checks domain and selector as the config will (a key of no use is
        # not written); an internationalised domain becomes its A-label.
        domain = DkimKey(domain, selector, alg, key).domain
    except ValueError as exc:
        _fail(str(exc), 2)
    path = Path(output) if output else Path(directory) / f"{domain}.{selector}.key"
    path = path.absolute()
    try:
        write_new_key(path, key)
    except FileExistsError:
        _fail(f"{path} exists; a key is never overwritten (remove it, or give --output)", 1)
    except OSError as exc:
        _fail(f"cannot write {path}: {exc.strerror or exc}", 1)
    record = public_key_record(key)
    strings = " ".join(f'"{s}"' for s in txt_strings(record))
    kind = "Ed25519" if alg is DkimAlgorithm.ED25519_SHA256 else f"RSA {bits}-bit"
    click.echo(f"wrote {kind} key {path} (mode 0600)")
    click.echo("")
    click.echo("publish this TXT record:")
    click.echo(f"{selector}._domainkey.{domain}. IN TXT ( {strings} )")
    click.echo("")
    click.echo("then add this table to the config and reload (spoold reload):")
    click.echo("[[dkim]]")
    click.echo(f'domain = "{domain}"')
    click.echo(f'selector = "{selector}"')
    # A TOML basic string: JSON's escapes are TOML's (non-ASCII kept as is).
    click.echo(f"key_file = {json.dumps(str(path), ensure_ascii=False)}")
    click.echo(f'algorithm = "{alg.value}"')


@dkim.command("check")
@click.option(
    "--nameserver",
    metavar="HOST[:PORT]",
    help="ask this DNS server (e.g. the zone's own); default: [dns] nameservers, "
    "else the system's resolver",
)
@click.pass_obj
def dkim_check(target: _Target, nameserver: str | None) -> None:
    """Look up the TXT record of every [[dkim]] key of the config and say
    whether it publishes that key (exit 1 when one does not)."""
    import ipaddress

    import dns.exception
    import dns.nameserver
    import dns.resolver

    from spoold.daemon.dns import nameserver_address
    from spoold.dkim_keys import record_problem

    config = target._config()
    try:
        signer = dkim_signer(config)
    except ConfigError as exc:
        _fail(str(exc), 2)
    if signer is None:
        click.echo(f"no [[dkim]] table in {config.path}: nothing is signed")
        return
    servers = (nameserver,) if nameserver else config.dns.nameservers
    try:
        resolver = dns.resolver.Resolver(configure=not servers)
        addresses = [nameserver_address(n) for n in servers]
        for host, _ in addresses:
            ipaddress.ip_address(host)  # a server is given by its address
        if servers:
            resolver.nameservers = [dns.nameserver.Do53Nameserver(*a) for a in addresses]
    except (ValueError, dns.exception.DNSException) as exc:
        _fail(f"no DNS server to ask: {exc}", 2)
    resolver.lifetime = 10.0
    bad = 0
    for key in signer.keys:
        name = f"{key.selector}._domainkey.{key.domain}"
        try:
            answer = resolver.resolve(name, "TXT")
            records = [b"".join(r.strings).decode("ascii", "replace") for r in answer]
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            records = []
        except dns.exception.DNSException as exc:
            bad += 1
            click.echo(f"unknown  {name} ({key.algorithm.value}): DNS failed: {exc}")
            continue
        problem = record_problem(key, records)
        if problem is None:
            click.echo(f"ok       {name} ({key.algorithm.value})")
        else:
            bad += 1
            click.echo(f"wrong    {name} ({key.algorithm.value}): {problem}")
    if bad:
        _fail(f"{bad} key(s) of {len(signer.keys)} not published as configured", 1)


# ------------------------------------------------------------------ fleet


@main.group()
def fleet() -> None:
    """Several nodes sharing one Redis ([fleet] in the config)."""


def _heartbeat_time(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@fleet.command("status")
@click.option("--json", "as_json", is_flag=True, help="one JSON object, as the control protocol")
@click.pass_obj
def fleet_status(target: _Target, as_json: bool) -> None:
    """This node's Redis (up or down, and since when it fell back to its
    local limits), and every node with a live heartbeat: its queues and
    when it last beat. Exit 1 when this node's Redis is down."""
    found: dict[str, Any] = _run(lambda: target.client().ask(FleetStatusRequest()))
    if as_json:
        click.echo(json.dumps(found, indent=2))
    elif not found["enabled"]:
        click.echo("not in a fleet: the config has no [fleet] table")
        return
    else:
        state = "up" if found["redis_up"] else f"DOWN ({found['last_error']}): local limits"
        click.echo(f"this node: {found['node']}; redis {found['redis']}: {state}")
        click.echo(f"outages since start: {found['outages']}")
        slots = found.get("slots") or {}  # (a daemon of an earlier version has none)
        held = " ".join(f"{route}={n}" for route, n in sorted(slots.items()))
        click.echo(f"connection slots held: {held or 'none'}")
        if found["nodes"] is None:
            click.echo("nodes: unknown (Redis did not answer)")
        for node in found["nodes"] or []:
            queues = " ".join(f"{q}={n}" for q, n in sorted(node["queues"].items()))
            click.echo(f"{node['node']}  {_heartbeat_time(node['heartbeat'])}  {queues}")
    if found["enabled"] and not found["redis_up"]:
        sys.exit(1)


# ----------------------------------------------------- the suppression list


@main.group()
def suppress() -> None:
    """The suppression list: recipients spoold does not send to (after a
    hard bounce, or added here), each until a time."""


def _valid_addresses(addresses: Sequence[str]) -> list[str]:
    for address in addresses:
        try:
            validate_address(address, role="recipient", smtputf8=True)
        except AddressError as exc:
            _fail(str(exc), 2)
    return list(addresses)


def _entry_line(entry: dict[str, Any]) -> str:
    reason = f" ({entry['reason']})" if entry["reason"] else ""
    return f"{entry['address']}  until {entry['until']}  {entry['source']}{reason}"


@suppress.command("list")
@click.option("--json", "as_json", is_flag=True, help="one JSON object: entries and counts")
@click.pass_obj
def suppress_list(target: _Target, as_json: bool) -> None:
    """Every suppressed address, until when and why, and what the list did."""
    found: dict[str, Any] = _run(lambda: target.client().ask(SuppressListRequest()))
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    for entry in found["entries"]:
        click.echo(_entry_line(entry))
    counts = found["counts"]
    click.echo(
        f"{found['total']} suppressed (at most {found['max_suppressed']}); since the daemon "
        f"started: {counts['refused']} refused, {counts['failed']} failed unsent, "
        f"{counts['bounced']} suppressed by a hard bounce"
    )


def _check_positive_span(option: str, text: str) -> None:
    """Exit 2 unless ``text`` is a span longer than nothing."""
    from spoold.times import parse_span

    try:
        length = parse_span(text)
    except ValueError as exc:
        _fail(f"{option}: {exc}", 2)
    if length <= timedelta(0):
        _fail(f"{option}: expected a span > 0, got {text!r}", 2)


@suppress.command("add")
@click.argument("addresses", nargs=-1, required=True)
@click.option(
    "--for",
    "span",
    metavar="SPAN",
    help="how long (e.g. 30d); default: spool.suppress_after_hard_bounce, else 30d",
)
@click.option("--reason", default="", metavar="TEXT", help="why, for whoever reads the list")
@click.pass_obj
def suppress_add(
    target: _Target, addresses: tuple[str, ...], span: str | None, reason: str
) -> None:
    """Suppress ADDRESSES: no new mail to them is taken (or it fails at
    once), no queued message is sent to them."""
    if span is not None:
        _check_positive_span("--for", span)
    asked = SuppressAddRequest(addresses=_valid_addresses(addresses), span=span, reason=reason)
    made: list[dict[str, Any]] = _run(lambda: target.client().ask(asked))
    for entry in made:
        click.echo(f"suppressed: {_entry_line(entry)}")
    dropped = sorted({normalise(a) for a in addresses} - {e["address"] for e in made})
    if dropped:
        for address in dropped:
            click.echo(f"not kept: {address} (the list is full: spool.max_suppressed)", err=True)
        sys.exit(1)


@suppress.command("remove")
@click.argument("addresses", nargs=-1)
@click.option(
    "--source",
    type=click.Choice(["bounce", "operator"]),
    help="lift every entry this source made (instead of ADDRESSES)",
)
@click.option(
    "--since", metavar="SPAN", help="with --source: only the entries made in the last SPAN"
)
@click.pass_obj
def suppress_remove(
    target: _Target, addresses: tuple[str, ...], source: str | None, since: str | None
) -> None:
    """Lift the suppression of ADDRESSES, or of every entry --source made
    (--source bounce --since 2h: after a hop refused good addresses):
    mail to them is taken again."""
    if source is None:
        if since is not None:
            _fail("--since goes with --source", 2)
        if not addresses:
            _fail("give ADDRESSES or --source", 2)
        # not checked here: one the list holds as it is (edited by hand) may go
        asked = SuppressRemoveRequest(addresses=list(addresses))
    else:
        if addresses:
            _fail("give ADDRESSES or --source, not both", 2)
        if since is not None:
            _check_positive_span("--since", since)
        asked = SuppressRemoveRequest(
            source="bounce" if source == "bounce" else "operator", since=since
        )
    lifted: list[str] = _run(lambda: target.client().ask(asked))
    for address in lifted:
        click.echo(f"lifted: {address}")
    if source is not None:
        click.echo(f"{len(lifted)} lifted")
        return
    for address in sorted({normalise(a) for a in addresses} - set(lifted)):
        click.echo(f"was not suppressed: {address}")


@suppress.command("check")
@click.argument("addresses", nargs=-1, required=True)
@click.pass_obj
def suppress_check(target: _Target, addresses: tuple[str, ...]) -> None:
    """Whether ADDRESSES are suppressed now. Exit 0: none is; 1: at least
    one is (each is printed); 2: an error."""
    asked = SuppressListRequest(addresses=_valid_addresses(addresses))
    found: dict[str, Any] = _run(lambda: target.client().ask(asked))
    entries = {e["address"]: e for e in found["entries"]}
    held = False
    for address in addresses:
        entry = entries.get(normalise(address))
        if entry is None:
            click.echo(f"{address}: not suppressed")
            continue
        held = True
        reason = f" ({entry['reason']})" if entry["reason"] else ""
        click.echo(f"{address}: suppressed until {entry['until']}{reason}")
    sys.exit(1 if held else 0)


# --------------------------------------------------------------- sendmail


@main.command(
    context_settings={"ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def sendmail(target: _Target, args: tuple[str, ...]) -> None:
    """Read a message on stdin and hand it to the daemon, with sendmail's
    flags and exit codes (spoold sendmail --help lists them)."""
    from spoold.daemon.sendmail import run as run_sendmail

    config = target.config_path if target.explicit_config else None
    run_sendmail(args, "sendmail", socket=target.socket, config=config, label="spoold")


if __name__ == "__main__":
    main()

"""Routes by sender through a real daemon (``spoold run`` in a subprocess):
two sending identities share one next hop (an aiosmtpd server on
127.0.0.1 with STARTTLS and two accounts), each route with credentials of
its own. Mail is submitted with ``spoold sendmail -f``; the server records
the login each message arrived under and the connection it came on.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio

from tests.daemon_helpers import DaemonFactory, cli, sendmail, write_config
from tests.smtp_server import SmtpTestServer, StartServer, TlsCertificate
from tests.support import wait_until

MESSAGE = b"Subject: hello\r\n\r\nbody\r\n"


def _auth_file(directory: Path, user: str) -> str:
    path = directory / f"{user}.auth"
    path.write_text(f"{user}:{user}-secret\n")
    os.chmod(path, 0o600)
    return path.name


ACCOUNTS = {"billing": "billing-secret", "support": "support-secret"}


def _with_identities(config: Path, base: str, hop: str, cert: Path, support_senders: str) -> None:
    """The config ``base`` (write_config's: a smarthost route to ``hop``
    without TLS or login) and two identity routes to the same hop."""
    text = base
    for user, senders in (("billing", '["billing@example.org"]'), ("support", support_senders)):
        text += (
            f"\n[routes.{user}]\n"
            f"senders = {senders}\n"
            f'next_hops = ["{hop}"]\n'
            'tls = "required"\n'
            f'ca_file = "{cert}"\n'
            f'auth_file = "{_auth_file(config.parent, user)}"\n'
        )
    config.write_text(text)


async def _identities_hop(
    start_smtp_server: StartServer, tls_certificate: TlsCertificate
) -> SmtpTestServer:
    """The shared next hop: STARTTLS, and a login for each identity."""
    return await start_smtp_server(
        tls_context=tls_certificate.server_context(),
        accounts=ACCOUNTS,
        auth_require_tls=True,
    )


async def _send(config: Path, sender: str) -> None:
    done = await sendmail(config, "-f", sender, "rcpt@example.com", stdin=MESSAGE)
    assert done.code == 0, done.err


async def test_two_identities_through_one_hop_each_with_its_own_login(
    tmp_path: Path,
    start_daemon: DaemonFactory,
    start_smtp_server: StartServer,
    tls_certificate: TlsCertificate,
) -> None:
    server = await _identities_hop(start_smtp_server, tls_certificate)
    config = write_config(tmp_path, next_hops=[server.hop])
    _with_identities(
        config, config.read_text(), server.hop, tls_certificate.cert, '["@example.org"]'
    )
    daemon = await start_daemon(config)

    for sender in ("billing@example.org", "jane@example.org", "billing@example.org"):
        await _send(config, sender)
    await _send(config, "other@example.net")

    await wait_until(
        lambda: len(server.messages) == 4,
        lambda: f"4 deliveries; {len(server.messages)} so far:\n{daemon.log_text()}",
    )
    arrived = {(m.mail_from, m.login, m.tls) for m in server.messages}
    assert arrived == {
        ("billing@example.org", "billing", True),  # the exact address
        ("jane@example.org", "support", True),  # @example.org
        ("other@example.net", None, False),  # no sender route: the default
    }
    # Each identity on connections of its own: none carried another's mail.
    connections: dict[int, set[str | None]] = {}
    for m in server.messages:
        connections.setdefault(m.connection, set()).add(m.login)
    assert all(len(logins) == 1 for logins in connections.values()), connections
    assert {u for u, ok in server.auth_attempts if ok} == {"billing", "support"}
    assert all(ok for _, ok in server.auth_attempts)


async def test_a_reload_routes_new_mail_by_the_new_senders(
    tmp_path: Path,
    start_daemon: DaemonFactory,
    start_smtp_server: StartServer,
    tls_certificate: TlsCertificate,
) -> None:
    server = await _identities_hop(start_smtp_server, tls_certificate)
    config = write_config(tmp_path, next_hops=[server.hop])
    base = config.read_text()
    cert = tls_certificate.cert
    _with_identities(config, base, server.hop, cert, '["@example.org"]')
    daemon = await start_daemon(config)

    await _send(config, "jane@example.org")
    await wait_until(lambda: len(server.messages) == 1, daemon.log_text)

    # support now speaks for example.net only
    _with_identities(config, base, server.hop, cert, '["@example.net"]')
    done = await anyio.to_thread.run_sync(cli, "--socket", str(daemon.socket), "reload")
    assert done.code == 0, done.err
    await _send(config, "jane@example.org")
    await _send(config, "joe@example.net")

    await wait_until(lambda: len(server.messages) == 3, daemon.log_text)
    assert [(m.mail_from, m.login) for m in server.messages] == [
        ("jane@example.org", "support"),
        ("jane@example.org", None),  # no sender route any more: the smarthost
        ("joe@example.net", "support"),
    ]

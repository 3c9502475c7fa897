"""Submission on the SMTP listener: STARTTLS and AUTH."""

from __future__ import annotations

import smtplib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from spoold.daemon.config import parse_config
from spoold.daemon.ingest import Submitter
from spoold.daemon.listener import SmtpListener, listener_settings
from spoold.daemon.routing import Router
from spoold.errors import SpooldError
from spoold.spool import Spool
from spoold.testing import InMemoryRelay
from tests.ingest_helpers import client_context
from tests.smtp_server import TlsCertificate
from tests.support import WAIT_TIMEOUT, free_port

MESSAGE = b"Subject: submitted\r\n\r\nhello\r\n"


@asynccontextmanager
async def listening(tmp_path: Path, smtp: dict[str, Any]) -> AsyncIterator[tuple[int, Spool]]:
    port = free_port()
    config = parse_config(
        {
            "spool": {"dir": "spool"},
            "smtp": {"listen": [f"127.0.0.1:{port}"], **smtp},
            "relay": {"default_route": "out"},
            "routes": {"out": {"next_hops": ["127.0.0.1:9"], "tls": "none"}},
        },
        tmp_path / "spoold.toml",
    )
    assert config.smtp is not None
    settings = await anyio.to_thread.run_sync(listener_settings, config.smtp)
    gate = anyio.Event()  # hold attempts: what was spooled stays visible
    async with Spool.open(config.spool.dir, relay=InMemoryRelay(gate=gate)) as spool:
        router = Router(config)
        listener = SmtpListener(Submitter(spool, lambda: router), lambda: settings)
        async with anyio.create_task_group() as tg:
            await tg.start(listener.serve)
            try:
                yield port, spool
            finally:
                gate.set()
                tg.cancel_scope.cancel()


def users_file(tmp_path: Path, mode: int = 0o600) -> Path:
    path = tmp_path / "users"
    path.write_text("# submission users\nalice:s3cret:with:colons\nbob:hunter2\n")
    path.chmod(mode)
    return path


async def session(port: int, steps: Any) -> Any:
    def run() -> Any:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            return steps(client)

    with anyio.fail_after(WAIT_TIMEOUT):
        return await anyio.to_thread.run_sync(run)


async def test_starttls_then_auth_then_mail(
    tmp_path: Path,
    tls_certificate: TlsCertificate,
) -> None:
    smtp = {
        "tls_cert": str(tls_certificate.cert),
        "tls_key": str(tls_certificate.key),
        "require_tls": True,
        "auth_file": str(users_file(tmp_path)),
        "relay_networks": ["10.0.0.0/8"],  # 127.0.0.1 must authenticate
    }
    async with listening(tmp_path, smtp) as (port, spool):

        def steps(client: smtplib.SMTP) -> dict[str, Any]:
            client.ehlo()
            before = {"starttls": client.has_extn("starttls"), "auth": client.has_extn("auth")}
            mail_before_tls = client.mail("a@example.org")
            client.rset()
            client.starttls(context=client_context())
            client.ehlo()
            after_auth = client.has_extn("auth")
            no_auth = client.mail("a@example.org")
            client.rset()
            client.login("alice", "s3cret:with:colons")
            client.sendmail("a@example.org", ["b@example.com"], MESSAGE)
            return {
                **before,
                "mail_before_tls": mail_before_tls,
                "after": after_auth,
                "no_auth": no_auth,
            }

        seen = await session(port, steps)
        assert seen["starttls"] is True
        assert seen["auth"] is False  # not offered before TLS
        assert seen["mail_before_tls"][0] == 530
        assert b"STARTTLS" in seen["mail_before_tls"][1]
        assert seen["after"] is True
        assert seen["no_auth"][0] == 530
        assert b"Authentication required" in seen["no_auth"][1]
        (msg,) = spool.status()
        assert msg.remaining_recipients == ["b@example.com"]


async def test_wrong_password_is_refused_and_nothing_spooled(
    tmp_path: Path,
    tls_certificate: TlsCertificate,
) -> None:
    smtp = {
        "tls_cert": str(tls_certificate.cert),
        "tls_key": str(tls_certificate.key),
        "auth_file": str(users_file(tmp_path)),
        "relay_networks": ["10.0.0.0/8"],
        "auth_failure_delay": "0s",  # (the delays have their own tests)
    }
    async with listening(tmp_path, smtp) as (port, spool):

        def steps(client: smtplib.SMTP) -> int:
            client.starttls(context=client_context())
            try:
                client.login("bob", "wrong")
            except smtplib.SMTPAuthenticationError as exc:
                return exc.smtp_code
            return 0

        assert await session(port, steps) == 535
        assert spool.status() == []


async def test_clients_in_relay_networks_need_no_auth(tmp_path: Path) -> None:
    smtp = {"auth_file": str(users_file(tmp_path))}  # 127.0.0.0/8 is trusted by default
    async with listening(tmp_path, smtp) as (port, spool):
        refused = await session(
            port, lambda c: c.sendmail("a@example.org", ["b@example.com"], MESSAGE)
        )
        assert refused == {}
        assert len(spool.status()) == 1


async def test_a_group_readable_users_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SpooldError, match=r"readable by group or others \(mode 0640\)"):
        async with listening(tmp_path, {"auth_file": str(users_file(tmp_path, 0o640))}):
            pass


@pytest.mark.parametrize(
    ("smtp", "problem"),
    [
        ({"tls_cert": "c.pem"}, "smtp.tls_cert, smtp.tls_key: give both or neither"),
        ({"require_tls": True}, "smtp.require_tls: needs smtp.tls_cert and smtp.tls_key"),
    ],
)
def test_tls_settings_are_validated(tmp_path: Path, smtp: dict[str, Any], problem: str) -> None:
    from spoold.daemon.config import ConfigError

    with pytest.raises(ConfigError) as info:
        parse_config(
            {
                "spool": {"dir": "s"},
                "smtp": smtp,
                "relay": {"default_route": "r"},
                "routes": {"r": {"next_hops": ["h:25"]}},
            },
            tmp_path / "x.toml",
        )
    assert info.value.problems == [problem]

"""The Django email backend of docs/client.md, run as written.

Django is not a dependency: the two names the backend imports
(``django.conf.settings`` and ``BaseEmailBackend``) are stood in for by
small modules, and the messages are built the way Django's ``EmailMessage``
builds them (a ``MIMEText`` from ``message()``, Bcc left out of the
headers, ``recipients()`` holding To, Cc and Bcc). The backend then talks
to a real daemon, which relays to an SMTP server in this test's loop.
"""

from __future__ import annotations

import re
import sys
import types
from collections.abc import Iterator
from email.mime.text import MIMEText
from pathlib import Path
from typing import Any

import anyio
import pytest

from spoold import Client, SpooldError
from tests.daemon_helpers import DaemonFactory, write_config
from tests.smtp_server import SmtpTestServer
from tests.support import WAIT_TIMEOUT, wait_until

DOC = Path(__file__).resolve().parent.parent / "docs" / "client.md"


def backend_source() -> str:
    blocks = re.findall(r"^```python\n(.*?)^```", DOC.read_text(), re.S | re.M)
    (source,) = [b for b in blocks if "class SpooldBackend" in b]
    return str(source)


class FakeDjangoMessage:
    """What Django's EmailMessage gives a backend."""

    def __init__(self, from_email: str, to: list[str], bcc: list[str], subject: str) -> None:
        self.from_email = from_email
        self.to = to
        self.bcc = bcc
        self.subject = subject

    def recipients(self) -> list[str]:
        return self.to + self.bcc

    def message(self) -> MIMEText:
        msg = MIMEText("Hello from Django.\n", "plain", "utf-8")
        msg["Subject"] = self.subject
        msg["From"] = self.from_email
        msg["To"] = ", ".join(self.to)
        return msg


@pytest.fixture
def django_stand_in(tmp_path: Path) -> Iterator[types.SimpleNamespace]:
    settings = types.SimpleNamespace(SPOOLD_SOCKET="")

    class BaseEmailBackend:
        def __init__(self, fail_silently: bool = False, **kwargs: Any) -> None:
            self.fail_silently = fail_silently

    modules = {
        name: types.ModuleType(name)
        for name in (
            "django",
            "django.conf",
            "django.core",
            "django.core.mail",
            "django.core.mail.backends",
            "django.core.mail.backends.base",
        )
    }
    modules["django.conf"].settings = settings  # type: ignore[attr-defined]
    modules["django.core.mail.backends.base"].BaseEmailBackend = BaseEmailBackend  # type: ignore[attr-defined]
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield settings
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


async def test_the_django_backend_of_the_docs(
    tmp_path: Path,
    start_daemon: DaemonFactory,
    smtp_server: SmtpTestServer,
    django_stand_in: types.SimpleNamespace,
) -> None:
    daemon = await start_daemon(write_config(tmp_path, next_hops=[smtp_server.hop]))
    django_stand_in.SPOOLD_SOCKET = str(daemon.socket)
    namespace: dict[str, Any] = {}
    exec(compile(backend_source(), str(DOC), "exec"), namespace)
    backend = namespace["SpooldBackend"]()

    messages = [
        FakeDjangoMessage(
            "Shop <shop@example.org>",
            ["Ann <ann@example.com>"],
            ["audit@example.com"],
            "order 1",
        ),
        FakeDjangoMessage("shop@example.org", [], [], "nobody to send to"),
    ]
    sent = await anyio.to_thread.run_sync(backend.send_messages, messages)
    assert sent == 1
    await wait_until(lambda: smtp_server.messages, "the message relayed", timeout=WAIT_TIMEOUT)
    (received,) = smtp_server.messages
    assert received.mail_from == "shop@example.org"
    assert sorted(received.rcpt_tos) == ["ann@example.com", "audit@example.com"]
    assert b"Subject: order 1" in received.content
    assert b"audit@example.com" not in received.content  # Bcc stays out of the headers

    # Errors: raised by default, counted out with fail_silently.
    bad = [FakeDjangoMessage("shop@example.org", ["not an address"], [], "bad")]
    with pytest.raises(SpooldError):
        await anyio.to_thread.run_sync(backend.send_messages, bad)
    quiet = namespace["SpooldBackend"](fail_silently=True)
    assert await anyio.to_thread.run_sync(quiet.send_messages, bad) == 0
    # Nothing of the bad message was queued; the good one leaves the queue
    # once the daemon has written its delivery (just after the server has it).
    client = Client(daemon.socket)
    counts: dict[str, int] = {}

    async def queue_empty() -> bool:
        counts.update(await anyio.to_thread.run_sync(client.count))
        return counts["active"] == counts["frozen"] == 0

    with anyio.fail_after(WAIT_TIMEOUT):
        while not await queue_empty():
            await anyio.sleep(0.02)
    assert counts["removed"] == 0

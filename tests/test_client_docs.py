"""The Django email backend of docs/client.md, run as written, with real Django.

Django is configured in this process (``settings.configure``: the backend
by dotted path, ``SPOOLD_SOCKET``), the backend's source is taken from the
document and made importable as a module, and mail goes out through
Django's own API (``send_mail``, ``EmailMultiAlternatives``). The backend
talks to a real daemon, which relays to an SMTP server in this test's loop;
each test checks what that next hop received.
"""

from __future__ import annotations

import email
import email.policy
import re
import signal
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from spoold import Client, ControlError, SpooldError
from tests.daemon_helpers import DaemonFactory, DaemonProcess, write_config
from tests.smtp_server import ReceivedMessage, SmtpTestServer
from tests.support import WAIT_TIMEOUT, wait_until

django = pytest.importorskip("django", reason="Django is a test dependency: pip install django")
from django.conf import settings  # noqa: E402
from django.core import mail  # noqa: E402
from django.test.utils import override_settings  # noqa: E402

DOC = Path(__file__).resolve().parent.parent / "docs" / "client.md"
BACKEND_MODULE = "spoold_docs_backend"  # the document's myproject/spoold_backend.py


def backend_source() -> str:
    blocks = re.findall(r"^```python\n(.*?)^```", DOC.read_text(), re.S | re.M)
    (source,) = [b for b in blocks if "class SpooldBackend" in b]
    return str(source)


@pytest.fixture(scope="module")
def django_with_backend() -> Iterator[None]:
    """Django set up once for this process, sending through the backend of
    the document (a module importable by its dotted path)."""
    module = types.ModuleType(BACKEND_MODULE)
    module.__file__ = str(DOC)
    sys.modules[BACKEND_MODULE] = module
    try:
        exec(compile(backend_source(), str(DOC), "exec"), module.__dict__)
        if not settings.configured:
            settings.configure(
                EMAIL_BACKEND=f"{BACKEND_MODULE}.SpooldBackend",
                SPOOLD_SOCKET="/nonexistent/spoold.sock",
                DEFAULT_CHARSET="utf-8",
            )
            django.setup()
        with override_settings(EMAIL_BACKEND=f"{BACKEND_MODULE}.SpooldBackend"):
            yield
    finally:
        sys.modules.pop(BACKEND_MODULE, None)


async def relaying_daemon(
    tmp_path: Path, start_daemon: DaemonFactory, smtp_server: SmtpTestServer
) -> DaemonProcess:
    return await start_daemon(write_config(tmp_path, next_hops=[smtp_server.hop]))


async def in_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Django's API is synchronous: run it off this loop, which serves the
    next hop."""
    return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))


async def relayed(smtp_server: SmtpTestServer, count: int = 1) -> list[ReceivedMessage]:
    await wait_until(
        lambda: len(smtp_server.messages) >= count, "the mail relayed", timeout=WAIT_TIMEOUT
    )
    return list(smtp_server.messages)


def only_crlf(content: bytes) -> bool:
    return b"\n" not in content.replace(b"\r\n", b"") and b"\r" not in content.replace(b"\r\n", b"")


@pytest.mark.usefixtures("django_with_backend")
async def test_send_mail_goes_out_through_the_daemon(
    tmp_path: Path, start_daemon: DaemonFactory, smtp_server: SmtpTestServer
) -> None:
    daemon = await relaying_daemon(tmp_path, start_daemon, smtp_server)
    with override_settings(SPOOLD_SOCKET=str(daemon.socket)):
        sent = await in_thread(
            mail.send_mail,
            "Grüße from the shop",
            "Your order is on its way.\nKöln, 3 parcels.\n",
            "Shop <shop@example.org>",
            ["Ann <ann@example.com>"],
        )
    assert sent == 1
    (received,) = await relayed(smtp_server)
    assert received.mail_from == "shop@example.org"
    assert received.rcpt_tos == ("ann@example.com",)
    assert only_crlf(received.content)
    parsed = email.message_from_bytes(received.content, policy=email.policy.default)
    assert parsed["Subject"] == "Grüße from the shop"
    assert parsed["To"] == "Ann <ann@example.com>"
    text = parsed.get_content().replace("\r\n", "\n")
    assert text == "Your order is on its way.\nKöln, 3 parcels.\n"
    assert "Köln".encode() in received.content  # 8-bit UTF-8, as Django wrote it


@pytest.mark.usefixtures("django_with_backend")
async def test_alternatives_attachment_and_bcc(
    tmp_path: Path, start_daemon: DaemonFactory, smtp_server: SmtpTestServer
) -> None:
    daemon = await relaying_daemon(tmp_path, start_daemon, smtp_server)
    attachment = "id,total\n1,12.50 €\n2,7.00 €\n"

    def send() -> int:
        message = mail.EmailMultiAlternatives(
            subject="Invoice 42",
            body="Plain text: your invoice is attached.\n",
            from_email="billing@example.org",
            to=["Ann <ann@example.com>"],
            cc=["bob@example.net"],
            bcc=["audit@example.com"],
        )
        message.attach_alternative("<p>Your <b>invoice</b> is attached.</p>", "text/html")
        message.attach("invoice.csv", attachment, "text/csv")
        return message.send()

    with override_settings(SPOOLD_SOCKET=str(daemon.socket)):
        assert await in_thread(send) == 1
    (received,) = await relayed(smtp_server)
    assert received.mail_from == "billing@example.org"
    assert sorted(received.rcpt_tos) == ["ann@example.com", "audit@example.com", "bob@example.net"]
    assert only_crlf(received.content)
    header, _, _ = received.content.partition(b"\r\n\r\n")
    assert b"bcc" not in header.lower()
    assert b"audit@example.com" not in received.content  # Bcc's address is not shown
    parsed = email.message_from_bytes(received.content, policy=email.policy.default)
    assert parsed["Cc"] == "bob@example.net"
    assert parsed.get_content_type() == "multipart/mixed"
    alternative, invoice = parsed.iter_parts()
    assert [p.get_content_type() for p in alternative.iter_parts()] == ["text/plain", "text/html"]
    assert "<b>invoice</b>" in alternative.get_body(("html",)).get_content()
    assert invoice.get_filename() == "invoice.csv"
    assert invoice.get_content().replace("\r\n", "\n") == attachment


@pytest.mark.usefixtures("django_with_backend")
async def test_fail_silently_when_the_daemon_is_down(
    tmp_path: Path, start_daemon: DaemonFactory, smtp_server: SmtpTestServer
) -> None:
    daemon = await relaying_daemon(tmp_path, start_daemon, smtp_server)
    socket = str(daemon.socket)
    daemon.send_signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0

    def send(fail_silently: bool) -> int:
        return mail.send_mail(
            "down",
            "nobody home\n",
            "shop@example.org",
            ["ann@example.com"],
            fail_silently=fail_silently,
        )

    with override_settings(SPOOLD_SOCKET=socket):
        assert await in_thread(send, True) == 0
        with pytest.raises(ControlError) as raised:
            await in_thread(send, False)
    assert raised.value.kind == "unavailable"
    assert smtp_server.messages == []


@pytest.mark.usefixtures("django_with_backend")
async def test_a_refused_message_is_raised_or_counted_out(
    tmp_path: Path, start_daemon: DaemonFactory, smtp_server: SmtpTestServer
) -> None:
    daemon = await relaying_daemon(tmp_path, start_daemon, smtp_server)

    def send(fail_silently: bool) -> int:
        return mail.send_mail(
            "bad",
            "to no one\n",
            "shop@example.org",
            ["not an address"],
            fail_silently=fail_silently,
        )

    with override_settings(SPOOLD_SOCKET=str(daemon.socket)):
        with pytest.raises(SpooldError):
            await in_thread(send, False)
        assert await in_thread(send, True) == 0
        # A message with no recipient at all is left out, not an error.
        assert await in_thread(mail.send_mail, "none", "x\n", "shop@example.org", []) == 0
    counts = await in_thread(Client(daemon.socket).count)
    assert counts["active"] == counts["frozen"] == 0

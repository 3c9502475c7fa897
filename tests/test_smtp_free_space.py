"""Short of disk space, a running daemon refuses new mail at MAIL FROM.

A real SMTP client (the standard library's ``smtplib``) talks to the
daemon's listener. Below ``spool.min_free_space`` every MAIL gets ``452
4.3.1`` (before the client sends any of the message); with a declared
``SIZE=``, the floor plus that size must be free. A reload that lowers the
floor lets mail in again at once.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from tests.daemon_helpers import DaemonFactory, cli, set_config_value, write_config
from tests.support import free_port, wait_until

SENDER, RCPT = "app@example.org", "ops@example.com"
CONTENT = b"Subject: room?\r\n\r\nhello\r\n"
MiB = 1024 * 1024


def smtp_config(directory: Path, min_free_space: str) -> tuple[Path, int]:
    port = free_port()
    config = write_config(directory, next_hops=[f"127.0.0.1:{free_port()}"])
    text = config.read_text().replace(
        "[control]", f'min_free_space = "{min_free_space}"\n\n[control]'
    )
    config.write_text(text + f'\n[smtp]\nlisten = ["127.0.0.1:{port}"]\n')
    return config, port


def mail_from(port: int, *options: str) -> tuple[int, str]:
    """EHLO, then MAIL FROM with ``options``; the reply to MAIL."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.example")
        code, text = client.mail(SENDER, list(options))
        return code, text.decode()


def send(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail(SENDER, [RCPT], CONTENT)


async def in_thread(fn: Callable[..., tuple[int, str]], *args: object) -> tuple[int, str]:
    return await anyio.to_thread.run_sync(lambda: fn(*args))


async def test_below_the_floor_mail_from_gets_452_until_a_reload_lowers_it(
    tmp_path: Path, start_daemon: DaemonFactory
) -> None:
    config, port = smtp_config(tmp_path, "1000000GiB")  # more than any disk has free
    daemon = await start_daemon(config)
    for options in ((), (f"SIZE={len(CONTENT)}",)):
        code, text = await in_thread(mail_from, port, *options)
        assert (code, text) == (452, "4.3.1 Insufficient system storage, try again later")
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        await anyio.to_thread.run_sync(send, port)
    assert refused.value.smtp_code == 452
    short = await daemon.wait_log(lambda line: line["event"].startswith("short of space"))
    assert (short["level"], short["min_free_space"]) == ("warning", "1000000 GiB")

    set_config_value(config, "min_free_space", '"1MiB"')
    done = await anyio.to_thread.run_sync(cli, "--socket", str(daemon.socket), "reload")
    assert done.code == 0, done.err

    async def mail_taken() -> bool:  # ingest workers apply the reload as it reaches them
        code, _text = await in_thread(mail_from, port)
        return code == 250

    await wait_until(mail_taken, "MAIL taken after the reload", interval=0.05)
    await daemon.wait_log(lambda line: line["event"] == "room again: new mail is taken")
    await anyio.to_thread.run_sync(send, port)
    assert sorted(os.listdir(tmp_path / "spool" / "active"))  # spooled


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 20 MiB tmpfs as the spool directory (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    if shutil.which("mount") is None:
        pytest.skip("mount not found: install Debian package 'mount'")
    spool = tmp_path / "spool"
    spool.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=20m,mode=0750", "tmpfs", str(spool)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield spool
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=False)


async def test_a_declared_size_that_would_cross_the_floor_is_refused_at_mail(
    tmp_path: Path, small_disk: Path, start_daemon: DaemonFactory
) -> None:
    config, port = smtp_config(tmp_path, "8MiB")
    await start_daemon(config)
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    assert 18 * MiB < free <= 20 * MiB
    code, text = await in_thread(mail_from, port, f"SIZE={15 * MiB}")  # would leave < 8 MiB
    assert (code, text) == (452, "4.3.1 Insufficient system storage, try again later")
    for options in ((f"SIZE={1 * MiB}",), ()):
        code, text = await in_thread(mail_from, port, *options)
        assert code == 250, text
    await anyio.to_thread.run_sync(send, port)
    assert os.listdir(small_disk / "active")

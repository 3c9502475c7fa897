"""``systemd/install.sh --sendmail``: spoold as the machine's sendmail and
mailq, into a staged root (never this machine's /), and its refusals: a
package of another MTA owns /usr/sbin/sendmail (a dpkg database in the
staged root says so), a sendmail that is not spoold's is already there, or
(``--check-sendmail`` on this machine, which changes nothing) something else
listens on port 25.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).absolute().parent.parent
INSTALL = REPO / "systemd" / "install.sh"
MTA_PATHS = ("/usr/sbin/sendmail", "/usr/lib/sendmail", "/usr/bin/mailq")

pytestmark = [
    pytest.mark.skipif(
        shutil.which("systemd-sysusers") is None or shutil.which("systemd-analyze") is None,
        reason="install.sh needs systemd's offline tools: apt-get install systemd",
    ),
    pytest.mark.make_venv,  # /opt/spoold is this checkout's .venv
]


def staged_root(tmp_path: Path) -> Path:
    """An empty tree where /opt/spoold is this checkout's venv."""
    root = tmp_path / "root"
    (root / "opt").mkdir(parents=True)
    (root / "opt" / "spoold").symlink_to(REPO / ".venv")
    return root


def install(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(INSTALL), *args], capture_output=True, text=True, timeout=120, check=False
    )


def resolve_in(root: Path, path: str) -> str:
    """Where the chain of links at ``path`` ends, read inside ``root``."""
    for _ in range(10):
        here = root / path.lstrip("/")
        if not here.is_symlink():
            break
        target = str(here.readlink())
        path = os.path.normpath(
            target if target.startswith("/") else f"{Path(path).parent}/{target}"
        )
    return path


def test_sendmail_and_mailq_point_at_spoolds_entry_point(tmp_path: Path) -> None:
    root = staged_root(tmp_path)
    done = install("--root", str(root), "--sendmail")
    assert done.returncode == 0, done.stderr
    for path in MTA_PATHS:
        assert resolve_in(root, path) == "/opt/spoold/bin/spoold-sendmail", path
    assert (root / "opt/spoold/bin/spoold-sendmail").is_file()
    assert "/usr/sbin/sendmail, /usr/lib/sendmail, /usr/bin/mailq -> " in done.stdout
    again = install("--root", str(root), "--sendmail")  # an upgrade runs it again
    assert again.returncode == 0, again.stderr
    check = install("--root", str(root), "--check-sendmail")
    assert check.returncode == 0, check.stderr


def test_without_sendmail_no_mta_path_is_touched(tmp_path: Path) -> None:
    root = staged_root(tmp_path)
    done = install("--root", str(root))
    assert done.returncode == 0, done.stderr
    assert not any((root / p.lstrip("/")).is_symlink() for p in MTA_PATHS)


def fake_dpkg(root: Path, package: str, files: list[str]) -> None:
    """A dpkg database in ``root`` in which ``package`` owns ``files``."""
    info = root / "var/lib/dpkg/info"
    info.mkdir(parents=True)
    (root / "var/lib/dpkg/status").write_text(
        f"Package: {package}\nStatus: install ok installed\nMaintainer: nobody\n"
        "Version: 1\nArchitecture: all\nProvides: mail-transport-agent\nDescription: an MTA\n\n"
    )
    (info / f"{package}.list").write_text("".join(f"{f}\n" for f in files))


def test_a_package_of_another_mta_owning_sendmail_is_a_refusal(tmp_path: Path) -> None:
    if shutil.which("dpkg-query") is None:
        pytest.skip("dpkg-query not found (not Debian): apt-get install dpkg")
    root = staged_root(tmp_path)
    fake_dpkg(root, "exim4-daemon-light", ["/usr/sbin/sendmail", "/usr/sbin/exim4"])
    done = install("--root", str(root), "--sendmail")
    assert done.returncode == 1
    assert "/usr/sbin/sendmail belongs to the package exim4-daemon-light" in done.stderr
    assert "apt-get remove exim4-daemon-light" in done.stderr
    assert "nothing was installed" in done.stderr
    assert not (root / "usr").exists()  # not even spoold's own files
    check = install("--root", str(root), "--check-sendmail")
    assert check.returncode == 1
    assert "exim4-daemon-light" in check.stderr


def test_a_sendmail_that_is_not_spoolds_is_left_alone(tmp_path: Path) -> None:
    root = staged_root(tmp_path)
    other = root / "usr/sbin/sendmail"
    other.parent.mkdir(parents=True)
    other.write_text("#!/bin/sh\n# another MTA\n")
    done = install("--root", str(root), "--sendmail")
    assert done.returncode == 1
    assert "/usr/sbin/sendmail is already there" in done.stderr
    assert other.read_text() == "#!/bin/sh\n# another MTA\n"
    assert not (root / "usr/bin/mailq").exists()


def test_another_listener_on_port_25_is_a_refusal(tmp_path: Path) -> None:
    """On this machine, read only: ``--check-sendmail`` installs nothing."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind(("127.0.0.1", 25))
        except PermissionError:
            pytest.skip("binding port 25 needs root (CI runs as root)")
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            pytest.skip("port 25 is in use on this machine already")
        listener.listen(1)
        check = install("--check-sendmail")
    finally:
        listener.close()
    assert check.returncode == 1
    assert "something already listens on port 25" in check.stderr
    assert "systemctl disable --now postfix" in check.stderr

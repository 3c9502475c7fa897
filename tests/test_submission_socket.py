"""A local user who is not an admin submits mail and is denied every admin
operation (the submission socket beside the admin socket).

The daemon runs as this test's user (root); the other user is ``nobody``
(uid 65534), through ``setpriv``, running Debian's ``/usr/bin/python3`` on a
copy of spoold and its runtime dependencies that nobody may read (the
venv's own python lives under /root, which nobody cannot enter). Both
sockets are in one directory of mode 0755, as /run/spoold is in production:
the admin socket keeps others out with its own mode (0660), the submission
socket (0666) lets them in. The config stays where nobody cannot read it, as
/etc/spoold/spoold.toml does, so nobody's sendmail finds its socket without
it (``$SPOOLD_SUBMISSION_SOCKET`` here, the default path in production).

Each test asserts what nobody saw (exit codes, error kinds) and, as root,
what the daemon did: the messages on disk with nobody's uid in their
``Received:`` header, or nothing changed at all.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from importlib import metadata
from pathlib import Path

import anyio
import pytest
from packaging.requirements import Requirement

from spoold.daemon.control import ControlClient
from spoold.message import Frozen, SendAt
from spoold.times import utcnow
from tests.daemon_helpers import (
    CliResult,
    DaemonFactory,
    DaemonProcess,
    cli,
    prefill,
    sendmail,
    spooled,
    write_config,
)
from tests.smtp_server import SmtpTestServer
from tests.support import WAIT_TIMEOUT, free_port
from tests.test_sendmail import content_of, waiting_messages

TIMEOUT = 90.0  # a safety net per test: none comes near it
NOBODY = 65534
SYSTEM_PYTHON = Path("/usr/bin/python3")
REPO = Path(__file__).absolute().parent.parent


@dataclass(frozen=True)
class NobodyRuntime:
    """A tree nobody may read: ``lib/`` (spoold and its dependencies) and
    ``bin/sendmail`` (the console script's body; ``bin/mailq`` links to it,
    so the name it runs by is tested too)."""

    root: Path

    @property
    def lib(self) -> Path:
        return self.root / "lib"

    @property
    def sendmail(self) -> Path:
        return self.root / "bin" / "sendmail"

    @property
    def mailq(self) -> Path:
        return self.root / "bin" / "mailq"

    def run(
        self, argv: Sequence[str], *, stdin: bytes = b"", env: dict[str, str] | None = None
    ) -> CliResult:
        """``argv`` as nobody, with a bare environment (cron gives little more)."""
        done = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv],
            input=stdin,
            capture_output=True,
            timeout=TIMEOUT / 3,
            check=False,
            cwd=self.root,
            env={
                "PATH": "/usr/bin:/bin",
                "LANG": "C.UTF-8",
                "PYTHONPATH": str(self.lib),
                "PYTHONDONTWRITEBYTECODE": "1",
                **(env or {}),
            },
        )
        return CliResult(
            done.returncode,
            done.stdout.decode(errors="replace"),
            done.stderr.decode(errors="replace"),
            done.stdout,
        )

    def python(self, code: str, env: dict[str, str] | None = None) -> CliResult:
        return self.run([str(SYSTEM_PYTHON), "-c", code], env=env)

    def spoold(self, *args: str) -> CliResult:
        """The ``spoold`` command as nobody."""
        return self.run([str(SYSTEM_PYTHON), "-m", "spoold.daemon.cli", *args])


def _runtime_distributions() -> list[metadata.Distribution]:
    """spoold's runtime dependencies, and theirs (no extras)."""
    seen: dict[str, metadata.Distribution] = {}
    todo = [str(r) for r in metadata.requires("spoold") or []]
    while todo:
        req = Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = req.name.lower().replace("_", "-")
        if key in seen:
            continue
        dist = metadata.distribution(req.name)
        seen[key] = dist
        todo += dist.requires or []
    return list(seen.values())


def _copy_runtime(root: Path) -> None:
    lib = root / "lib"
    shutil.copytree(REPO / "spoold", lib / "spoold", ignore=shutil.ignore_patterns("__pycache__"))
    for dist in _runtime_distributions():
        for file in dist.files or []:
            if file.parts[0] == ".." or "__pycache__" in file.parts:
                continue  # console scripts; byte code
            source = Path(str(dist.locate_file(file)))
            target = lib / file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    bin_dir = root / "bin"
    bin_dir.mkdir()
    entry = bin_dir / "sendmail"  # what pip writes for the spoold-sendmail script
    script = "import sys\nfrom spoold.daemon.sendmail import main\nsys.exit(main())\n"
    entry.write_text(f"#!{SYSTEM_PYTHON}\n{script}")
    (bin_dir / "mailq").symlink_to("sendmail")
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() or path == entry else 0o644)


@pytest.fixture(scope="module")
def nobody() -> Iterator[NobodyRuntime]:
    if os.geteuid() != 0:
        pytest.skip("runs another user through setpriv: needs root (CI runs as root)")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv not found: apt-get install util-linux")
    if not SYSTEM_PYTHON.exists():
        pytest.skip(f"{SYSTEM_PYTHON} not found: apt-get install python3")
    version = subprocess.run(
        [str(SYSTEM_PYTHON), "-c", "import sys; print(sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if version != str(sys.version_info[:2]):
        pytest.skip(
            f"{SYSTEM_PYTHON} is Python {version}, the venv's {sys.version_info[:2]}: "
            "its compiled dependencies would not load"
        )
    root = Path(tempfile.mkdtemp(prefix="spoold-nobody-"))
    try:
        _copy_runtime(root)
        runtime = NobodyRuntime(root)
        check = runtime.python("import spoold.daemon.sendmail, spoold.daemon.cli, spoold.client")
        assert check.code == 0, f"nobody cannot import spoold from {root}: {check.err}"
        yield runtime
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def sockets_dir() -> Iterator[Path]:
    """A directory like /run/spoold: 0755, so anyone reaches what is in it."""
    path = Path(tempfile.mkdtemp(prefix="spoold-run-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def start(
    tmp_path: Path,
    sockets_dir: Path,
    start_daemon: DaemonFactory,
    *,
    prefilled: int = 0,
    next_hop: str = "",
) -> tuple[DaemonProcess, list[str]]:
    """A daemon whose only hop is ``next_hop`` (default: one that refuses
    connections), its config unreadable to nobody, its sockets in
    ``sockets_dir``; with ``prefilled``, that many pairs of messages (one
    frozen, one waiting far ahead) already queued."""
    hops = [next_hop or f"127.0.0.1:{free_port()}"]
    config = write_config(tmp_path, next_hops=hops, run_dir=sockets_dir)
    ids: list[str] = []
    hop = f"127.0.0.1:{free_port()}"
    for _ in range(prefilled):
        ids += await prefill(
            tmp_path / "spool",
            [
                spooled(hop, status=Frozen()),
                spooled(hop, status=SendAt(utcnow() + timedelta(days=30))),
            ],
        )
    daemon = await start_daemon(config)
    return daemon, ids


# -------------------------------------------------------------- submitting

# (what calls sendmail so, its arguments, its message, who it goes to, the
# envelope sender: None for nobody's own address)
CALLERS = [
    (
        "cron",  # Debian's cron: sendmail -FCronDaemon -i -B8BITMIME -oem RCPT
        ["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "ops@example.com"],
        b"From: root (Cron Daemon)\nTo: ops@example.com\nSubject: cron\n\nline\n.\nafter\n",
        ["ops@example.com"],
        None,
    ),
    (
        "mail(1)",  # bsd-mailx: sendmail -i -- RCPT...
        ["-i", "--", "alice@example.com", "bob@example.net"],
        b"To: alice@example.com, bob@example.net\nSubject: mailx\n\nhello\n",
        ["alice@example.com", "bob@example.net"],
        None,
    ),
    (
        "mail -r",  # mail(1) with a sender: sendmail -i -r ADDR -- RCPT
        ["-i", "-r", "reports@example.org", "--", "carol@example.com"],
        b"Subject: mail-r\n\nhello\n",
        ["carol@example.com"],
        "reports@example.org",
    ),
    (
        "PHP",  # php.ini's sendmail_path default: sendmail -t -i
        ["-t", "-i"],
        b"To: dave@example.com\nBcc: erin@example.com\nSubject: php\n\nhello\n",
        ["dave@example.com", "erin@example.com"],
        None,
    ),
    (
        "git send-email",  # sendmail -i -f FROM RCPT...
        ["-i", "-f", "dev@example.org", "frank@example.com"],
        b"From: dev@example.org\nSubject: git\n\n[PATCH] fix\n",
        ["frank@example.com"],
        "dev@example.org",
    ),
]


async def test_a_user_who_is_not_an_admin_submits_with_the_flags_of_cron_mail_php_and_git(
    tmp_path: Path, sockets_dir: Path, start_daemon: DaemonFactory, nobody: NobodyRuntime
) -> None:
    env = {"SPOOLD_SUBMISSION_SOCKET": str(sockets_dir / "submit.sock")}
    with anyio.fail_after(TIMEOUT):
        daemon, _ = await start(tmp_path, sockets_dir, start_daemon)
        for name, argv, message, _, _ in CALLERS:
            done = await anyio.to_thread.run_sync(
                lambda argv=argv, message=message: nobody.run(
                    [str(nobody.sendmail), *argv], stdin=message, env=env
                )
            )
            assert (done.code, done.err) == (0, ""), (name, done)
        messages = await waiting_messages(daemon.spool_dir, len(CALLERS))
    by_subject = {}
    for msg in messages:
        content = content_of(daemon.spool_dir, msg.id)
        subject = content.split(b"\r\nSubject: ", 1)[1].split(b"\r\n", 1)[0].decode()
        by_subject[subject] = (msg, content)
    nobody_address = f"nobody@{socket.getfqdn()}"
    for name, _, message, recipients, sender in CALLERS:
        subject = message.split(b"Subject: ", 1)[1].split(b"\n", 1)[0].decode()
        msg, content = by_subject[subject]
        assert msg.envelope_info.recipients == recipients, name
        assert msg.envelope_info.sender == (sender or nobody_address), name
        # The kernel's word on who submitted, not anything the caller said.
        assert content.startswith(b"Received: from localhost (uid 65534, user nobody)\r\n"), name
        assert msg.submitter_uid == NOBODY, name
        assert b"\r\nBcc:" not in content, name
    assert by_subject["cron"][1].endswith(b"\r\nline\r\n.\r\nafter\r\n")  # -i: '.' is text
    logged = [line for line in daemon.log_lines() if line.get("event") == "local submission"]
    assert {(line["uid"], line["user"]) for line in logged} == {(NOBODY, "nobody")}
    assert len(logged) == len(CALLERS)


async def test_a_user_who_is_not_an_admin_submits_and_waits_with_the_python_client(
    tmp_path: Path,
    sockets_dir: Path,
    start_daemon: DaemonFactory,
    smtp_server: SmtpTestServer,
    nobody: NobodyRuntime,
) -> None:
    code = f"""
import json
from spoold import Client
client = Client({str(sockets_dir / "submit.sock")!r})
ids = client.submit("app@example.org", ["ops@example.com"], b"Subject: client\\r\\n\\r\\nhi\\r\\n")
outcome = client.wait(ids[0], timeout={WAIT_TIMEOUT})
print(json.dumps({{"ping": client.ping(), "ids": ids, "outcome": outcome.kind}}))
"""
    with anyio.fail_after(TIMEOUT):
        await start(tmp_path, sockets_dir, start_daemon, next_hop=smtp_server.hop)
        done = await anyio.to_thread.run_sync(lambda: nobody.python(code))
        assert done.code == 0, done
        (mid,) = json.loads(done.out)["ids"]
        history = await ControlClient(sockets_dir / "ctl.sock").request("history")
    assert json.loads(done.out) == {"ping": True, "ids": [mid], "outcome": "delivered"}
    (received,) = smtp_server.messages
    assert received.content.startswith(b"Received: from localhost (uid 65534, user nobody)\r\n")
    # The history journal keeps who submitted it.
    assert [(h["id"], h["outcome"], h["submitter_uid"]) for h in history] == [
        (mid, "delivered", NOBODY)
    ]


# ------------------------------------------------------------- administering

ADMIN_CALLS = {
    "freeze": "client.freeze([active])",
    "remove": "client.remove([frozen])",
    "send": "client.send(which='all')",
    "recover": "client.recover([frozen], from_='removed')",
    "reroute": "client.reroute(which='all')",
    "reload": "client.reload()",
    "status": "client.status()",
    "show": "client.show(frozen)",
    "info": "client.info()",
}


async def test_a_user_who_is_not_an_admin_cannot_freeze_remove_or_reload(
    tmp_path: Path, sockets_dir: Path, start_daemon: DaemonFactory, nobody: NobodyRuntime
) -> None:
    admin = sockets_dir / "ctl.sock"
    submission = sockets_dir / "submit.sock"
    calls = "\n".join(
        f"""
for name, client in (("submission", by_submission), ("admin", by_admin)):
    try:
        {call}
        kinds[f"{op} on " + name] = "done"
    except ControlError as exc:
        kinds[f"{op} on " + name] = exc.kind
"""
        for op, call in ADMIN_CALLS.items()
    )
    with anyio.fail_after(TIMEOUT):
        daemon, (frozen, active) = await start(tmp_path, sockets_dir, start_daemon, prefilled=1)
        before = await ControlClient(admin).request("status")
        code = f"""
import json
from spoold import Client
from spoold.errors import ControlError, NotFoundError
frozen, active = {frozen!r}, {active!r}
by_submission = Client({str(submission)!r})
by_admin = Client({str(admin)!r})
kinds = {{}}
{calls}
try:  # waiting is for one's own messages: another's id is not known
    by_submission.wait(frozen, timeout=0)
    kinds["wait for a message root queued"] = "done"
except NotFoundError as exc:
    kinds["wait for a message root queued"] = "not_found"
print(json.dumps(kinds))
"""
        done = await anyio.to_thread.run_sync(lambda: nobody.python(code))
        assert done.code == 0, done
        # The CLI as nobody: told what to do, exit 2.
        cli_freeze = await anyio.to_thread.run_sync(
            lambda: nobody.spoold("--socket", str(submission), "freeze", active)
        )
        cli_remove = await anyio.to_thread.run_sync(
            lambda: nobody.spoold("--socket", str(admin), "remove", frozen)
        )
        mailq = await anyio.to_thread.run_sync(
            lambda: nobody.spoold("--socket", str(admin), "sendmail", "-bp")
        )
        # Named mailq, finding the admin socket through a config it may not read.
        named_mailq = await anyio.to_thread.run_sync(
            lambda: nobody.run([str(nobody.mailq)], env={"SPOOLD_CONFIG": str(daemon.config)})
        )
        after = await ControlClient(admin).request("status")
    kinds = json.loads(done.out)
    assert kinds == {
        **{f"{op} on {where}": "denied" for op in ADMIN_CALLS for where in ("submission", "admin")},
        "wait for a message root queued": "not_found",
    }
    assert cli_freeze.code == 2, cli_freeze
    assert "freeze is an admin operation and this is the submission socket" in cli_freeze.err
    assert "use the admin socket (control.socket)" in cli_freeze.err
    assert cli_remove.code == 2, cli_remove
    assert f"cannot reach the daemon at {admin}: permission denied" in cli_remove.err
    assert mailq.code == 77, mailq  # EX_NOPERM
    assert "listing the queue is for administrators" in mailq.err
    assert named_mailq.code == 77, named_mailq
    assert named_mailq.err.startswith("mailq: listing the queue is for administrators")
    # Nothing changed: the same two messages, in the same state, and no reload.
    assert after == before
    assert {(v["id"], v["status"]) for v in after} == {(frozen, "frozen"), (active, "send_at")}
    assert not (tmp_path / "spool" / "removed" / frozen).exists()
    assert not any(line.get("event") == "reloading" for line in daemon.log_lines())


async def test_an_admin_lists_the_queue_with_mailq(
    tmp_path: Path, sockets_dir: Path, start_daemon: DaemonFactory
) -> None:
    """``sendmail -bp`` (the name ``mailq``) for whoever may use the admin
    socket: the listing of ``spoold status --format exim``."""
    with anyio.fail_after(TIMEOUT):
        daemon, (frozen, active) = await start(tmp_path, sockets_dir, start_daemon, prefilled=1)
        listed = await anyio.to_thread.run_sync(
            lambda: cli("--config", str(daemon.config), "sendmail", "-bp")
        )
    assert listed.code == 0, listed
    assert frozen in listed.out and active in listed.out
    exim = await anyio.to_thread.run_sync(
        lambda: cli("--config", str(daemon.config), "status", "--format", "exim")
    )
    assert without_ages(listed.out) == without_ages(exim.out)


def without_ages(listing: str) -> list[str]:
    """The exim-style lines without the age column (it may tick between two runs)."""
    return [re.sub(r"^ *\d+[smhd] ", "", line) for line in listing.splitlines()]


async def test_one_users_idempotency_key_never_touches_another_users_mail(
    tmp_path: Path, sockets_dir: Path, start_daemon: DaemonFactory, nobody: NobodyRuntime
) -> None:
    """Keys are kept per user: nobody giving the key of root's cron job
    first (with another envelope, or the same one) neither suppresses nor
    gets refused root's own submission; each user's retry still queues
    nothing."""
    env = {"SPOOLD_SUBMISSION_SOCKET": str(sockets_dir / "submit.sock")}
    key = "nightly-report-2026-12-07"
    with anyio.fail_after(TIMEOUT):
        daemon, _ = await start(tmp_path, sockets_dir, start_daemon)
        for _ in range(2):  # nobody's submission and its retry
            done = await anyio.to_thread.run_sync(
                lambda: nobody.run(
                    [str(nobody.sendmail), "--idempotency-key", key, "boss@example.com"],
                    stdin=b"Subject: forged\n\nnot root's text\n",
                    env=env,
                )
            )
            assert (done.code, done.err) == (0, ""), done
        for _ in range(2):  # root's own, the same key, and its retry
            done = await sendmail(
                daemon.config,
                "--idempotency-key",
                key,
                "ops@example.com",
                stdin=b"Subject: report\n\nroot's text\n",
            )
            assert done.code == 0, done.err
        messages = await waiting_messages(daemon.spool_dir, 2)
    by_uid = {m.submitter_uid: m for m in messages}
    assert set(by_uid) == {0, NOBODY}
    assert by_uid[0].envelope_info.recipients == ["ops@example.com"]
    assert b"root's text" in content_of(daemon.spool_dir, by_uid[0].id)
    assert by_uid[NOBODY].envelope_info.recipients == ["boss@example.com"]

"""The README's library example runs as written.

The one ``python`` block of README.md that opens a spool is run as a
program, in an empty directory, with this checkout's interpreter. One
thing is changed, for a stated reason: its next hop ``127.0.0.1:25`` (where
a reader's own SMTP server listens, and where nothing may listen here)
becomes the port of a real SMTP server in the test's loop, which must
then have received the message.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import anyio

from tests.smtp_server import SmtpTestServer
from tests.support import records_in

REPO = Path(__file__).resolve().parent.parent
README_HOP = '"127.0.0.1:25"'


def library_example() -> str:
    blocks = re.findall(r"^```python\n(.*?)^```$", (REPO / "README.md").read_text(), re.S | re.M)
    examples = [block for block in blocks if "Spool.open(" in block]
    assert len(examples) == 1, f"expected one library example in README.md, found {len(examples)}"
    return str(examples[0])


async def test_the_readme_library_example_runs_as_written(
    tmp_path: Path, smtp_server: SmtpTestServer
) -> None:
    code = library_example()
    assert code.count(README_HOP) == 1, "the example's next hop is no longer " + README_HOP
    script = tmp_path / "example.py"
    script.write_text(code.replace(README_HOP, f'"{smtp_server.hop}"'))
    workdir = tmp_path / "app"
    workdir.mkdir()  # empty: the example creates var/myapp-spool itself
    with anyio.fail_after(120):
        done = await anyio.run_process([sys.executable, str(script)], cwd=workdir, check=False)
    stdout, stderr = done.stdout.decode(), done.stderr.decode()
    assert (done.returncode, stderr) == (0, "")
    spooled, outcome = stdout.splitlines()
    assert re.fullmatch(r"spooled [A-Za-z0-9_-]+", spooled), stdout
    assert outcome == "delivered", stdout
    (message,) = smtp_server.messages
    assert (message.mail_from, message.rcpt_tos) == ("me@example.org", ("you@example.com",))
    assert b"Subject: hi\r\n\r\nhello\r\n" in message.content
    # Delivered, so the spool it made holds no message any more.
    spool = workdir / "var" / "myapp-spool"
    assert records_in(spool, "active") == set() and list((spool / "data").iterdir()) == []


def test_every_name_the_docs_import_from_spoold_is_public() -> None:
    import spoold

    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    imported: dict[str, str] = {}
    for doc in docs:
        for block in re.findall(r"^```python\n(.*?)^```$", doc.read_text(), re.S | re.M):
            # "from spoold import (A,\n B)" or "from spoold import A, B" (one line)
            for groups in re.findall(
                r"^from spoold import (?:\(([^)]*)\)|([^(\n]*))$", block, re.M
            ):
                names = "".join(groups)
                for name in re.split(r"[\s,]+", names.strip()):
                    if name:
                        imported[name] = doc.name
    assert {"Spool", "SmtpRelay", "RouteSettings", "RoutedBatch", "RoutedEnvelope", "Body"} <= set(
        imported
    )
    for name, doc in imported.items():
        assert name in spoold.__all__, f"{doc} imports {name}, which spoold does not export"

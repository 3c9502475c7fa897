"""The ``[[dkim]]`` tables of the config: keys read and checked as the file
is read, and the exact problems reported (in tests/test_config.py's
manner)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import structlog.testing
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from spoold.daemon.config import Config, dkim_signer, load_config
from spoold.dkim_keys import DEFAULT_SIGNED_HEADERS, DkimAlgorithm
from spoold.errors import ConfigError
from tests.daemon_helpers import write_config
from tests.dkim_helpers import key_file

BASE = '[spool]\ndir = "spool"\n'

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=1024)
ED_KEY = ed25519.Ed25519PrivateKey.generate()


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    key_file(tmp_path, "rsa.key", RSA_KEY)
    key_file(tmp_path, "ed.key", ED_KEY)
    return tmp_path


def load(directory: Path, text: str) -> Config:
    path = directory / "spoold.toml"
    path.write_text(BASE + text)
    return load_config(path)


def problems(directory: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(directory, text)
    return caught.value.problems


def test_no_dkim_table_signs_nothing(tmp_path: Path) -> None:
    cfg = load(tmp_path, "")
    assert cfg.dkim == ()
    assert dkim_signer(cfg) is None


def test_dkim_tables_are_read_with_their_keys(keys: Path) -> None:
    cfg = load(
        keys,
        '[[dkim]]\ndomain = "Example.ORG"\nselector = "s2026"\nkey_file = "rsa.key"\n'
        '\n[[dkim]]\ndomain = "example.org"\nselector = "ed2026"\nkey_file = "ed.key"\n'
        'algorithm = "ed25519-sha256"\nheaders = ["From", "Subject"]\nsubdomains = true\n',
    )
    assert [t.key_file for t in cfg.dkim] == [keys / "rsa.key", keys / "ed.key"]  # relative
    signer = dkim_signer(cfg)
    assert signer is not None
    first, second = signer.keys
    assert (first.domain, first.selector, first.algorithm) == (
        "example.org",
        "s2026",
        DkimAlgorithm.RSA_SHA256,  # the default
    )
    assert first.headers == DEFAULT_SIGNED_HEADERS and not first.subdomains
    assert first.source == str(keys / "rsa.key")
    assert second.algorithm is DkimAlgorithm.ED25519_SHA256
    assert second.headers == ("From", "Subject") and second.subdomains
    idn = load(
        keys,
        '[[dkim]]\ndomain = "Bücher.example"\nselector = "s"\nkey_file = "ed.key"\n'
        'algorithm = "ed25519-sha256"\n',
    )
    assert idn.dkim[0].domain == "xn--bcher-kva.example"


def test_reading_the_config_reads_no_key(tmp_path: Path) -> None:
    """The admin commands read the config too: only the daemon reads the
    keys (dkim_signer, at start and reload), as it reads a route's auth_file."""
    cfg = load(tmp_path, '[[dkim]]\ndomain = "example.org"\nselector = "s"\nkey_file = "no.key"\n')
    with pytest.raises(ConfigError) as caught:
        dkim_signer(cfg)
    assert caught.value.problems == [
        f"dkim[0].key_file: cannot read key_file {tmp_path / 'no.key'}: No such file or directory"
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[[dkim]]\ndomain = "example.org"\n',
            ["dkim[0].selector: required", "dkim[0].key_file: required"],
        ),
        (
            '[[dkim]]\ndomain = "example.org"\nselector = "s"\nkey_file = "rsa.key"\nkey = "x"\n',
            ["dkim[0].key: unknown key"],
        ),
        (
            '[[dkim]]\ndomain = "example.org"\nselector = "s"\nkey_file = "rsa.key"\n'
            'algorithm = "rsa-sha1"\n',
            ["dkim[0].algorithm: expected one of rsa-sha256, ed25519-sha256, got 'rsa-sha1'"],
        ),
        (
            '[[dkim]]\ndomain = "not a domain"\nselector = "s 1"\nkey_file = "rsa.key"\n'
            'headers = ["Subject"]\nsubdomains = "yes"\n',
            [
                "dkim[0].domain: expected a domain like 'example.org', got 'not a domain'",
                "dkim[0].selector: expected a selector like 's2026' (letters, digits, - _ .), "
                "got 's 1'",
                "dkim[0].headers: the list must hold From (RFC 6376 requires it signed)",
                "dkim[0].subdomains: expected true or false, got 'yes'",
            ],
        ),
        (
            '[[dkim]]\ndomain = "example.org"\nselector = "s"\nkey_file = "rsa.key"\n'
            '[[dkim]]\ndomain = "EXAMPLE.org"\nselector = "s"\nkey_file = "ed.key"\n'
            'algorithm = "ed25519-sha256"\n',
            ["dkim[1].selector: s of example.org is also dkim[0]'s"],
        ),
        ('[dkim]\ndomain = "example.org"\n', ["dkim: expected tables [[dkim]]"]),
        (
            '[[dkim]]\ndomain = "faß.de"\nselector = "s"\nkey_file = "rsa.key"\n',
            [
                "dkim[0].domain: 'faß.de' reads differently by IDNA 2003 and IDNA 2008 "
                "(Python makes it 'fass.de'): write its xn-- form"
            ],
        ),
    ],
    ids=["missing", "unknown", "algorithm", "values", "twice", "not-an-array", "idna"],
)
def test_bad_dkim_tables_report_exact_problems(keys: Path, text: str, expected: list[str]) -> None:
    assert problems(keys, text) == expected


def test_a_key_that_cannot_be_used_is_a_config_error_naming_the_file(keys: Path) -> None:
    cfg = load(
        keys,
        '[[dkim]]\ndomain = "example.org"\nselector = "a"\nkey_file = "missing.key"\n'
        '[[dkim]]\ndomain = "example.org"\nselector = "b"\nkey_file = "ed.key"\n'
        '[[dkim]]\ndomain = "example.org"\nselector = "c"\nkey_file = "rsa.key"\n'
        'algorithm = "ed25519-sha256"\n',
    )
    with pytest.raises(ConfigError) as caught:
        dkim_signer(cfg)
    assert caught.value.problems == [
        f"dkim[0].key_file: cannot read key_file {keys / 'missing.key'}: No such file or directory",
        f"dkim[1].key_file: key_file {keys / 'ed.key'}: holds an Ed25519 key, "
        "but the algorithm is rsa-sha256",
        f"dkim[2].key_file: key_file {keys / 'rsa.key'}: holds an RSA key, "
        "but the algorithm is ed25519-sha256",
    ]


async def test_a_worker_that_cannot_read_a_key_at_reload_says_so_and_keeps_its_keys(
    keys: Path,
) -> None:
    """The daemon validates a reload, then each ingest worker reads the
    file and its keys again: a key gone in between is refused there, at
    error, naming the worker, and its old signer stays."""
    from spoold.daemon import worker

    path = write_config(keys, next_hops=["127.0.0.1:9"])
    path.write_text(
        path.read_text() + '\n[smtp]\nlisten = ["127.0.0.1:9"]\n'
        '[[dkim]]\ndomain = "example.org"\nselector = "s"\nkey_file = "rsa.key"\n'
    )
    state = worker._build(load_config(path))
    assert state.dkim is not None
    path.write_text(path.read_text().replace("rsa.key", "gone.key"))
    with structlog.testing.capture_logs() as logged:
        kept = await worker._reload(state, writer=None)  # type: ignore[arg-type]
    assert kept is state
    (line,) = [e for e in logged if e["log_level"] == "error"]
    assert line["event"] == ("ingest worker reload refused; this worker keeps its running config")
    assert line["pid"] == os.getpid()
    assert f"cannot read key_file {keys / 'gone.key'}" in line["problems"][0]

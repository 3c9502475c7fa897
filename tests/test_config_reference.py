"""docs/configuration.md names every key the config reader takes."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import msgspec

from spoold.daemon import config

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
TABLES = {
    "spool": config.SpoolConfig,
    "control": config.ControlConfig,
    "smtp": config.SmtpConfig,
    "log": config.LogConfig,
    "metrics": config.MetricsConfig,
    "hooks": config.HooksConfig,
    "relay": config.RelayConfig,
    "routes.NAME": config.RouteConfig,
    "dns": config.DnsConfig,
    "[dkim]": config.DkimConfig,
    "webhooks.NAME": config.WebhookConfig,
    "fleet": config.FleetConfig,
}


def documented() -> dict[str, set[str]]:
    """Keys in the first column of each section's table."""
    out: dict[str, set[str]] = {}
    section = ""
    for line in DOC.read_text().splitlines():
        heading = re.match(r"^## `\[(.+)\]`", line)
        if heading:
            section = heading.group(1)
            out.setdefault(section, set())
        elif section and line.startswith("| `"):
            first = line.split("|")[1]
            out[section] |= set(re.findall(r"`([a-z_]+)`", first))
    return out


def test_every_key_is_documented() -> None:
    docs = documented()
    for table, kind in TABLES.items():
        keys = {f.name for f in msgspec.structs.fields(kind)} - {"name"}
        assert table in docs, f"no section for [{table}] in {DOC.name}"
        missing = keys - docs[table]
        assert not missing, f"[{table}] keys missing from {DOC.name}: {sorted(missing)}"


def test_every_top_level_key_is_documented() -> None:
    text = DOC.read_text()
    assert "\n## Top-level keys\n" in text, f"no section for top-level keys in {DOC.name}"
    section = text.split("\n## Top-level keys\n", 1)[1].split("\n## ", 1)[0]
    # Keys outside any table hold plain values; the tables are values of their own.
    keys = {f.name for f in dataclasses.fields(config.Config) if f.type in ("str", "int", "bool")}
    assert "hostname" in keys
    for key in keys:
        assert f"\n| `{key}` |" in section, f"top-level key {key} missing from {DOC.name}"

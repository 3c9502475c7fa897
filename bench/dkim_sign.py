"""What DKIM signing costs per message, in one process: spoold's signer
(spoold/dkim.py: its own relaxed canonicalisation, the signature made with
``cryptography``) next to dkimpy signing on its own (``dkim.sign``, whose
RSA is pure Python), for a 2048-bit RSA key and an Ed25519 key, on a 4 KiB
and a 100 KiB message (scenario a's and b's sizes in vs_postfix.py).

Prints the median and the 90th percentile of the wall time of one signature
(``--runs`` of each, after a few not counted), the CPU time of one
signature (what the wall time is on a busy machine), and the cost of the
worker thread hop spoold signs in (``anyio.to_thread.run_sync`` of
nothing). The
whole daemon with signing on is ``vs_postfix.py --dkim none,rsa,ed25519``.

Usage: ``.venv/bin/python bench/dkim_sign.py [--runs 300]``
"""

from __future__ import annotations

import argparse
import base64
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime

import anyio
import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from spoold.body import Body
from spoold.dkim import DkimSigner
from spoold.dkim_keys import DkimKey

HEADER = (
    b"From: Bench <bench-sender@example.com>\r\nTo: <bench-rcpt@example.com>\r\n"
    b"Subject: bench\r\nDate: Sun, 06 Dec 2026 12:00:00 +0000\r\n"
    b"Message-ID: <bench@example.com>\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
)


def message(size: int) -> bytes:
    line = b"x" * 78 + b"\r\n"
    body = line * ((size - len(HEADER)) // len(line) + 1)
    return HEADER + body[: size - len(HEADER) - 2] + b"\r\n"


def timed(fn: Callable[[], object], runs: int) -> tuple[float, float, float]:
    """Median and 90th percentile of the wall time, and median CPU time of
    this thread (what another program's load does not add to), in ms."""
    for _ in range(5):
        fn()
    times = []
    cpu = []
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    times.sort()
    return (
        statistics.median(times) * 1e3,
        times[int(len(times) * 0.9)] * 1e3,
        statistics.median(cpu) * 1e3,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    rsa_pem = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    ed_seed = base64.b64encode(
        ed_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
    )
    now = datetime.now(UTC)
    print(f"wall ms per message: median / p90; CPU ms: median ({args.runs} runs each)")
    for size in (4096, 102_400):
        content = message(size)
        wire = Body.from_content(content).wire
        rows = [
            (
                "spoold, RSA-2048",
                DkimSigner([DkimKey("example.com", "b", "rsa-sha256", rsa_key)]).sign,
            ),
            (
                "spoold, Ed25519",
                DkimSigner([DkimKey("example.com", "b", "ed25519-sha256", ed_key)]).sign,
            ),
        ]
        for name, sign in rows:

            def signed(
                sign: Callable[[bytes, datetime], object] = sign, wire: bytes = wire
            ) -> object:
                return sign(wire, now)

            med, p90, cpu = timed(signed, args.runs)
            print(f"{size // 1024:4d} KiB  {name:26s} {med:8.3f} / {p90:8.3f}   {cpu:8.3f}")
        for name, key, alg in (
            ("dkimpy alone, RSA-2048", rsa_pem, b"rsa-sha256"),
            ("dkimpy alone, Ed25519", ed_seed, b"ed25519-sha256"),
        ):
            runs = max(20, args.runs // 10) if alg == b"rsa-sha256" else args.runs

            def one(key: bytes = key, alg: bytes = alg, content: bytes = content) -> object:
                return dkim.sign(
                    content,
                    b"b",
                    b"example.com",
                    key,
                    canonicalize=(b"relaxed", b"relaxed"),
                    signature_algorithm=alg,
                )

            med, p90, cpu = timed(one, runs)
            print(f"{size // 1024:4d} KiB  {name:26s} {med:8.3f} / {p90:8.3f}   {cpu:8.3f}")

    async def hops() -> tuple[float, float]:
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            await anyio.to_thread.run_sync(lambda: None)
            times.append(time.perf_counter() - t0)
        times.sort()
        return statistics.median(times) * 1e3, times[int(len(times) * 0.9)] * 1e3

    med, p90 = anyio.run(hops)
    print(f"          {'worker thread hop':26s} {med:8.3f} / {p90:8.3f}")


if __name__ == "__main__":
    main()

"""Run one Sequencer in its own process, for the crash tests (SIGKILL it; SIGTERM stops it).

Usage: python sequencer_proc.py CONFIG_JSON, where CONFIG_JSON holds nats, stream, subject,
conninfo, schema, signer_path, origin, cursor_interval_s and batch_max. Prints "ready" once
it runs, and its progress as one JSON line when it stops.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

from phivault.crypto.signing import Ed25519NoteSigner
from phivault.ledger.sequencer import Sequencer


async def main(config: dict[str, object]) -> None:
    worker = Sequencer(
        nats_urls=[str(config["nats"])],
        stream=str(config["stream"]),
        subject=str(config["subject"]),
        ledger_conninfo=str(config["conninfo"]),
        ledger_schema=str(config["schema"]),
        signer=Ed25519NoteSigner.load(str(config["signer_path"])),
        origin=str(config["origin"]),
        cursor_interval_s=float(str(config["cursor_interval_s"])),
        batch_max=int(str(config["batch_max"])),
        lock_retry_s=0.1,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await worker.run(stop)
    print(json.dumps(worker.progress.as_dict()), flush=True)


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))

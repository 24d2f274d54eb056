"""Child process for the crash test: appends under load and reports every acknowledgement.

Usage: python crash_writer.py DATA_DIR START
Prints "ack <index> <request-id>" only after ``record`` returned, i.e. after the fsync.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from phivault.datadir import DataDir
from phivault.ledger.service import open_ledger
from phivault.ledger.testing import sample_event
from phivault.settings import LedgerSettings

WRITERS = 32


async def main(data_dir: Path, start: int) -> None:
    directory = DataDir.open(data_dir)
    settings = LedgerSettings(checkpoint_interval_s=0.02)
    async with open_ledger(directory, settings) as ledger:
        if ledger.recovery is not None:
            print(f"recovered {ledger.recovery.bytes_cut}", flush=True)
        print("ready", flush=True)
        counter = iter(range(start, 1 << 40))

        async def writer() -> None:
            while True:
                number = next(counter)
                index = await ledger.record(sample_event(number, patient=f"Patient/p-{number % 7}"))
                sys.stdout.write(f"ack {index} req-{number}\n")
                sys.stdout.flush()

        await asyncio.gather(*(writer() for _ in range(WRITERS)))


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2])))

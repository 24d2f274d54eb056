"""Child process for the crash test: appends under load and reports every acknowledgement.

Usage: python crash_writer.py DATA_DIR START
       python crash_writer.py --fork-server

Prints "ack <index> <request-id>" only after ``record`` returned, i.e. after the fsync.

``--fork-server`` reads "DATA_DIR START" lines on standard input and forks one writer for
each, which reports on the server's standard output as above; the server prints
"forked <pid>" once the writer runs and, on a line of its own, "exited <status>" once it is
gone (killed). A round then costs a fork, not a new interpreter and phivault's imports.
"""

from __future__ import annotations

import asyncio
import os
import sys
import traceback
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


def fork_server() -> None:
    """Fork a writer per request line; only the writer ever opens the ledger or a loop, so
    each fork starts from a process with nothing running but this loop."""
    for line in sys.stdin:
        data_dir, start = line.split()
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            try:
                asyncio.run(main(Path(data_dir), int(start)))
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(1)
        print(f"forked {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        # a leading newline ends a line the kill may have cut short
        print(f"\nexited {status}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--fork-server"]:
        fork_server()
    else:
        asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2])))

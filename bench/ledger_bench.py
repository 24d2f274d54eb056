"""Ledger benchmark: durable append rate, verification, proofs, checkpoint latency.

Every rate is measured beside its baseline in the same run (the machine is shared and
absolute numbers drift): our appends against a raw fsync'd append of the same bytes with the
same batching, our verification against bare hashlib over the same leaves. The last line
printed is one JSON object with the figures.

    python bench/ledger_bench.py [--entries N] [--verify-entries N] [--seconds S]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from phivault.datadir import DataDir
from phivault.ledger.merkle import MerkleTree, verify_inclusion
from phivault.ledger.note import NoteVerifier
from phivault.ledger.service import (
    initialize_ledger,
    open_ledger,
    open_ledger_readonly,
    verifier_key_of,
)
from phivault.ledger.testing import sample_event
from phivault.ledger.verify import verify_ledger
from phivault.settings import LedgerSettings


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fresh_dir(root: Path, name: str) -> DataDir:
    directory = DataDir.create(root / name, dev=True, origin=f"bench.phivault/{name}")
    initialize_ledger(directory)
    return directory


async def append_rate(directory: DataDir, writers: int, seconds: float) -> tuple[float, int, int]:
    """Durable appends/s with ``writers`` concurrent tasks; also batches and entries."""
    events = [sample_event(i, patient=f"Patient/p-{i % 1000}") for i in range(4096)]
    settings = LedgerSettings(checkpoint_interval_s=1.0)
    async with open_ledger(directory, settings) as ledger:
        stop = time.perf_counter() + seconds
        done = 0

        async def writer(offset: int) -> None:
            nonlocal done
            i = offset
            while time.perf_counter() < stop:
                await ledger.record(events[i % len(events)])
                i += writers
                done += 1

        batches_before = ledger.batches_committed
        started = time.perf_counter()
        await asyncio.gather(*(writer(w) for w in range(writers)))
        elapsed = time.perf_counter() - started
        return done / elapsed, ledger.batches_committed - batches_before, done


def raw_fsync_rate(path: Path, leaves: list[bytes], batch_size: int) -> float:
    """A plain file: the same bytes, the same batch size, one write + fdatasync per batch."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
    try:
        started = time.perf_counter()
        for start in range(0, len(leaves), batch_size):
            os.write(fd, b"".join(leaves[start : start + batch_size]))
            os.fdatasync(fd)
        return len(leaves) / (time.perf_counter() - started)
    finally:
        os.close(fd)


def verify_rate(directory: DataDir) -> tuple[float, float, int]:
    verifier = NoteVerifier.from_verifier_key(verifier_key_of(directory))
    with open_ledger_readonly(directory) as store:
        leaves = list(store.scan())
        notes = store.checkpoints()
    started = time.perf_counter()
    report = verify_ledger(leaves, notes, verifier)
    ours = report.entries / (time.perf_counter() - started)
    started = time.perf_counter()
    for leaf in leaves:
        hashlib.sha256(b"\x00" + leaf).digest()
    bare = len(leaves) / (time.perf_counter() - started)
    return ours, bare, report.entries


def proofs_at(size: int, samples: int = 2000) -> tuple[float, float, float]:
    rng = random.Random(7)
    hashes = rng.randbytes(32 * size)
    started = time.perf_counter()
    tree = MerkleTree(hashes)
    build_s = time.perf_counter() - started
    root = tree.root()
    indexes = [rng.randrange(size) for _ in range(samples)]
    started = time.perf_counter()
    proofs = [tree.inclusion_proof(i, size) for i in indexes]
    gen_ms = (time.perf_counter() - started) / samples * 1000
    started = time.perf_counter()
    for index, proof in zip(indexes, proofs, strict=True):
        verify_inclusion(tree.leaf_hash_at(index), index, size, proof, root)
    verify_per_s = samples / (time.perf_counter() - started)
    return gen_ms, verify_per_s, build_s


async def checkpoint_latency(directory: DataDir, trials: int = 3) -> float:
    """Seconds from an append's acknowledgement to a signed checkpoint that covers it."""
    latencies = []
    async with open_ledger(directory, LedgerSettings(checkpoint_interval_s=1.0)) as ledger:
        for trial in range(trials):
            index = await ledger.record(sample_event(trial))
            acked = time.perf_counter()
            while ledger.latest_checkpoint is None or ledger.latest_checkpoint.size <= index:
                await asyncio.sleep(0.002)
            latencies.append(time.perf_counter() - acked)
    return statistics.mean(latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0, help="per append measurement")
    parser.add_argument("--proof-size", type=int, default=1_000_000)
    args = parser.parse_args()
    figures: dict[str, object] = {"benchmark": "ledger"}
    with tempfile.TemporaryDirectory(prefix="phivault-bench-") as tmp:
        root = Path(tmp)
        rates: dict[str, float] = {}
        batch_size_at_256 = 1
        for writers in (1, 16, 256):
            rate, batches, entries = asyncio.run(
                append_rate(fresh_dir(root, f"w{writers}"), writers, args.seconds)
            )
            rates[str(writers)] = round(rate)
            per_fsync = entries / max(batches, 1)
            log(f"{writers:>3} writers: {rate:,.0f} appends/s ({per_fsync:.0f} per fsync)")
            if writers == 256:
                batch_size_at_256 = max(1, round(entries / max(batches, 1)))
                verify_dir = root / "w256"
        figures["appends_per_s"] = rates
        directory = DataDir.open(verify_dir)
        with open_ledger_readonly(directory) as store:
            leaves = list(store.scan())
        raw = raw_fsync_rate(root / "raw.log", leaves, batch_size_at_256)
        figures["raw_fsync_appends_per_s"] = round(raw)
        figures["append_ratio"] = round(rates["256"] / raw, 3)
        figures["batch_size_at_256"] = batch_size_at_256
        log(f"raw fsync'd append, same bytes and batching: {raw:,.0f}/s")

        ours, bare, count = verify_rate(directory)
        figures["verify_entries_per_s"] = round(ours)
        figures["sha256_leaves_per_s"] = round(bare)
        figures["verify_entries"] = count
        log(f"verify: {ours:,.0f} entries/s over {count:,} entries (bare sha256: {bare:,.0f}/s)")

        gen_ms, verify_per_s, build_s = proofs_at(args.proof_size)
        figures["proof_gen_ms_at_1m"] = round(gen_ms, 4)
        figures["proof_verify_per_s"] = round(verify_per_s)
        figures["tree_build_s_at_1m"] = round(build_s, 3)
        log(f"proofs at {args.proof_size:,}: {gen_ms:.3f} ms each, {verify_per_s:,.0f}/s verified")

        latency = asyncio.run(checkpoint_latency(fresh_dir(root, "latency")))
        figures["checkpoint_latency_s"] = round(latency, 3)
        log(f"append to covering checkpoint: {latency:.3f} s")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

"""What the access policy costs a search, counted in instructions (callgrind): exact where
CPU time on a shared machine is not.

Two steps. ``prepare WORK`` (plain Python): a production data directory made as ``phivault
init`` makes one, loaded with the companion bundles and three Synthea patients, a copy of it
for the policy-off service (``fhir_bench.py``'s settings), and each patient's token (valid 30
minutes). ``measure WORK N`` under callgrind opens both services on those directories and
runs ``GET /fhir/Observation?patient=<id>&_count=20`` N times on the policy-on service, then
N times on the policy-off one, twice; the counters are zeroed before and dumped after each
run (``callgrind_control -z`` / ``-d on|off``), so the four dump files hold one run each::

    python bench/_policy_callgrind.py prepare /tmp/pc
    cp -r /tmp/pc /tmp/pc-a   # measure changes the directories (the ledger grows)
    valgrind --tool=callgrind --callgrind-out-file=/tmp/pc-a/cg.%p \\
        python bench/_policy_callgrind.py measure /tmp/pc-a 30
    grep -H summary /tmp/pc-a/cg.*.[1-4]

To compare two source trees, measure a copy of the same prepared directory with each tree's
``src`` first on ``PYTHONPATH``. The policy's cost is ``1 - off / on`` of the summaries.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _read_cpu import call  # noqa: E402
from fhir_bench import Tokens, bundle_files, make_data_dir  # noqa: E402
from fhir_bench_server import _factory, settings_for  # noqa: E402


def callgrind(*args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(os.getpid())], check=False)


async def main(step: str, work: Path, n: int) -> None:
    from joserfc import jwk

    from phivault.api.serve import tune_for_serving
    from phivault.cli.load import add_conditional_creates
    from phivault.datadir import DataDir
    from phivault.identity.jwks import StaticKeySource

    if step == "prepare":
        work.mkdir(parents=True, exist_ok=True)
        make_data_dir(work / "on", work / "shares.json")
        tokens = Tokens(work / "issuer.json")
    issuer = json.loads((work / "issuer.json").read_text())
    source = StaticKeySource({issuer["kid"]: jwk.import_key(issuer["jwk"])})  # type: ignore[dict-item]
    shares = json.loads((work / "shares.json").read_text())["shares"]
    open_service = _factory("phivault.api.serve:open_service")

    def service(mode: str, data: Path) -> Any:
        return open_service(
            settings_for(mode, data),
            DataDir.open(data),
            key_sources={issuer["issuer"]: source},
            unseal_shares=shares,
        )

    if step == "prepare":
        companions, patient_files = bundle_files(3)
        patients: list[str] = []
        async with service("production", work / "on") as app:
            for file in [*companions, *patient_files]:
                bundle = json.loads(file.read_bytes())
                add_conditional_creates(bundle)
                body = json.dumps(bundle).encode()
                status, answer = await call(app, "POST", "/fhir", tokens.loader(), body)
                if status != 200:
                    raise SystemExit(f"load failed: {status} {answer[:300]!r}")
                for entry in json.loads(answer).get("entry", []):
                    parts = entry.get("response", {}).get("location", "").split("/_history/")
                    kind, _, the_id = parts[0].rpartition("/")
                    if kind.endswith("Patient") and file in patient_files:
                        patients.append(the_id)
                        break
        shutil.copytree(work / "on", work / "off")
        requests = [[tokens.patient(p), f"patient={p}&_count=20"] for p in patients]
        (work / "requests.json").write_text(json.dumps(requests))
        return
    requests = json.loads((work / "requests.json").read_text())
    async with (
        service("production", work / "on") as on,
        service("policy-off", work / "off") as off,
    ):
        tune_for_serving()
        apps = {"on": on, "off": off}

        async def search(name: str, i: int) -> None:
            token, query = requests[i % len(requests)]
            status, answer = await call(
                apps[name], "GET", "/fhir/Observation", token, query=query.encode()
            )
            if status != 200:
                raise SystemExit(f"search failed: {status} {answer[:300]!r}")

        for name in apps:  # warm up both
            for i in range(6):
                await search(name, i)
        for name in ("on", "off", "on", "off"):
            callgrind("-z")
            for i in range(n):
                await search(name, i)
            callgrind("-d", name)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 30))

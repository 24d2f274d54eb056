"""``make demo``: phivault serving the Synthea patients, and what each control did.

1. Creates a fresh development data directory (a previous demo's is removed) and starts
   ``phivault serve`` on it, its log in ``<data-dir>/serve.log``.
2. Loads every Synthea fixture through FHIR, companion bundles first, as ``phivault load``
   does; the one bundle that has no companions is refused with a clear OperationOutcome.
3. Mints development tokens for the demo users: a clinician who is a real Practitioner of the
   loaded data taking part in a patient's Encounters, a nurse, front desk, billing, the patient
   (a loaded Patient), a privacy officer and an admin, plus a clinician with no care
   relationship and the loader. They go to ``<data-dir>/tokens.env``.
4. Walks through what each control did: requests as those users (the ``curl`` lines to try),
   the audit events each one left in the ledger before data moved, the records database
   searched byte by byte for the patient's name, ``phivault ledger report`` and ``verify``,
   and an edited evidence bundle caught.
5. Keeps the server in the foreground until Ctrl-C (``--no-serve``: stops it and exits;
   exit code 1 if any step did not do what it should).

The demo prints patients' records to the terminal, because that is what the API returns to
those allowed to see them; the server's log, the ledger and the database never carry them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from phivault.cli.load import (
    COMPANION_PATTERNS,
    LOADER_PURPOSE,
    LOADER_SCOPES,
    FileResult,
    Loader,
    LoadStopped,
    add_conditional_creates,
    creates_conditionally,
    order_files,
    read_bundle,
)
from phivault.datadir import DataDir
from phivault.errors import PhivaultError
from phivault.identity.dev_provider import DevIdentityProvider, DevProviderWarning
from phivault.identity.principal import Role
from phivault.initialize import initialize_data_dir
from phivault.ledger.errors import LedgerLocked
from phivault.ledger.service import open_ledger, open_ledger_readonly, verifier_key_of
from phivault.settings import Settings

__all__ = ["main"]

# The repository is checked out beside ../shared (as in CI); PHIVAULT_SHARED overrides.
FIXTURES = (
    Path(os.environ.get("PHIVAULT_SHARED", Path(__file__).resolve().parents[3] / "shared"))
    / "fixtures"
    / "synthea"
)
TOKEN_TTL_S = 3600  # the longest the server accepts (identity.max_token_age_s)
START_TIMEOUT_S = 60.0
FHIR_JSON = "application/fhir+json"


class DemoFailed(Exception):
    """The demo cannot go on; the message says why (never with PHI in it)."""


@dataclass(frozen=True, slots=True)
class User:
    """A demo user: who they are, and what their token says."""

    var: str  # the shell variable holding their token in tokens.env
    label: str
    role: Role
    user: str
    fhir_user: str | None
    scopes: tuple[str, ...]
    purpose: str
    mfa: bool = False


@dataclass(frozen=True, slots=True)
class Cast:
    """The patient the tour is about, and the references the tour needs (ids only)."""

    patient: str  # the Patient's server id
    given: str
    family: str
    encounter: str  # an Encounter of the patient that the clinician took part in
    clinician: str  # Practitioner ids
    nurse: str
    unrelated: str


@dataclass
class Step:
    """One request of the tour and what came of it."""

    title: str
    user: User
    path: str
    expect: int
    response: httpx.Response | None = None
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.response is not None and self.response.status_code == self.expect

    @property
    def request_id(self) -> str | None:
        return None if self.response is None else self.response.headers.get("x-request-id")

    def body(self) -> dict[str, Any]:
        if self.response is None:
            return {}
        try:
            value = self.response.json()
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


class Demo:
    def __init__(self, console: Console, data_dir: Path, url: str) -> None:
        self.console = console
        self.data_dir = data_dir
        self.url = url
        self.fhir = url + "/fhir"
        self.failures: list[str] = []
        settings = Settings()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DevProviderWarning)  # said once, at the start
            self.provider = DevIdentityProvider.open(DataDir.open(data_dir), settings)
        self.audience = settings.identity.audience
        self.tokens: dict[str, str] = {}
        self.resolved: dict[str, str | None] = {}  # conditional reference -> Practitioner id
        self.client = httpx.Client(timeout=httpx.Timeout(300.0, connect=10.0))

    # --- output ---------------------------------------------------------------------------

    def heading(self, text: str) -> None:
        self.console.print()
        self.console.rule(f"[bold]{text}[/]", align="left")

    def check(self, ok: bool, what: str) -> None:
        if ok:
            self.console.print(Text.assemble(("  ✓ ", "bold green"), what))
        else:
            self.console.print(Text.assemble(("  ✗ ", "bold red"), what))
            self.failures.append(what)

    def curl(self, step: Step) -> str:
        return f'curl -s -H "Authorization: Bearer ${step.user.var}" "{self.fhir}/{step.path}"'

    # --- tokens ---------------------------------------------------------------------------

    def mint(self, user: User) -> str:
        token = self.provider.mint(
            user=user.user,
            roles=[user.role],
            audience=self.audience,
            fhir_user=user.fhir_user,
            scopes=user.scopes,
            mfa=user.mfa,
            purpose_of_use=[user.purpose],
            ttl_s=TOKEN_TTL_S,
        )
        self.tokens[user.var] = token
        return token

    def get(self, user: User, path: str) -> httpx.Response:
        token = self.tokens.get(user.var) or self.mint(user)
        return self.client.get(
            f"{self.fhir}/{path}",
            headers={"Authorization": f"Bearer {token}", "Accept": FHIR_JSON},
        )


# --- the data directory and the server ------------------------------------------------------


def _served(data_dir: DataDir) -> bool:
    """Whether a server holds the data directory's ledger (its one writer) right now."""

    async def probe() -> None:
        async with open_ledger(data_dir):
            pass

    try:
        asyncio.run(probe())
    except LedgerLocked:
        return True
    except PhivaultError:
        return False  # damaged, say: it is a demo's, and goes anyway
    return False


def fresh_data_dir(console: Console, path: Path) -> DataDir:
    """A new ``--dev`` data directory at ``path``; a previous demo's is removed first."""
    if path.exists():
        try:
            existing: DataDir | None = DataDir.open(path)
        except PhivaultError:
            existing = None
        if existing is None or not existing.dev:
            raise DemoFailed(
                f"{path} exists and is not a phivault development data directory; "
                "not touching it (pass another --data-dir)"
            )
        if _served(existing):
            raise DemoFailed(
                f"a server is running on {path} (another demo?); stop it first, or pass "
                "another --data-dir"
            )
        console.print(f"removing the previous demo data directory {path} (a fresh one each run)")
        shutil.rmtree(path)
    started = time.monotonic()
    created = initialize_data_dir(path, dev=True).data_dir
    console.print(
        f"[bold cyan]$ phivault init --dev --data-dir {path}[/]  "
        f"({time.monotonic() - started:.1f}s: ledger and its signing key, keystore with its "
        "root key split into unseal shares, dev identity provider)"
    )
    console.print(
        "[yellow]a DEVELOPMENT data directory: it unseals itself from a file and signs any "
        "token asked for; never put real PHI in it[/]"
    )
    return created


def pick_port(requested: int) -> int:
    """``requested`` if it is free on the loopback interface, else any free port."""
    if requested:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", requested))
                return requested
            except OSError:
                pass
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True, slots=True)
class Server:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def wait_ready(self, console: Console) -> None:
        """Until ``/readyz`` says ready (ledger open, keys unsealed)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        with console.status("starting the server (opening the ledger, unsealing the keys)"):
            while True:
                if self.process.poll() is not None:
                    raise DemoFailed(
                        f"phivault serve exited with {self.process.returncode}; see {self.log_path}"
                    )
                with suppress(httpx.TransportError):
                    if httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise DemoFailed(f"phivault serve was not ready in time; see {self.log_path}")
                time.sleep(0.1)


@contextmanager
def started_server(console: Console, data_dir: Path, port: int) -> Iterator[Server]:
    """``phivault serve`` on ``data_dir``, starting (see :meth:`Server.wait_ready`); stopped
    on exit."""
    log_path = data_dir / "serve.log"
    command = ["serve", "--data-dir", str(data_dir), "--port", str(port)]
    console.print(f"[bold cyan]$ phivault {' '.join(command)}[/]  (its log: {log_path})")
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "phivault.cli.main", *command],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    try:
        yield Server(process, f"http://127.0.0.1:{port}", log_path)
    finally:
        stop_server(process)


def stop_server(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- loading the fixtures -------------------------------------------------------------------


def read_fixtures() -> list[tuple[Path, dict[str, Any]]]:
    """The Synthea bundles, companions first (as ``phivault load`` orders them)."""
    return [(path, read_bundle(path)) for path in order_files([FIXTURES])]


def load_fixtures(
    demo: Demo, bundles: Sequence[tuple[Path, dict[str, Any]]]
) -> dict[str, FileResult]:
    """Every Synthea bundle through ``POST /fhir``, as ``phivault load`` sends them."""
    total = sum(len(bundle.get("entry", [])) for _, bundle in bundles)
    demo.console.print(
        f"[bold cyan]$ phivault load --jobs 2 --url {demo.url} {FIXTURES}[/]  "
        f"({len(bundles)} bundles, {total:,} entries; companions first)"
    )
    token = demo.mint(LOADER)
    loader = Loader(demo.client, demo.url, lambda: token)
    results = {
        path.name: FileResult(
            file=path, bundle_type=str(bundle["type"]), entries=len(bundle.get("entry", []))
        )
        for path, bundle in bundles
    }
    # As `phivault load --jobs 2`: the companions first, then two lanes side by side. The
    # bundles that create conditionally (sof2019 repeats its Practitioners and Organizations
    # inline: two of them may create the same one) go one after another in the first; the
    # others only refer to what is there already.
    for _, bundle in bundles:
        add_conditional_creates(bundle)  # as phivault load does: directory POSTs match first
    conditional = {path.name for path, bundle in bundles if creates_conditionally(bundle)}
    companions = [(p, b) for p, b in bundles if any(c in p.name for c in COMPANION_PATTERNS)]
    rest = [(p, b) for p, b in bundles if p.name not in {c.name for c, _ in companions}]
    lanes = [
        [(p, b) for p, b in rest if p.name in conditional],
        [(p, b) for p, b in rest if p.name not in conditional],
    ]
    started = time.monotonic()
    with Progress(
        TextColumn("[bold]loading"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=demo.console,
        transient=True,
        disable=not demo.console.is_terminal,
    ) as progress:
        task = progress.add_task("", total=total)

        stop = threading.Event()  # Ctrl-C or a failed lane: the other lane stops too

        def send(lane: Sequence[tuple[Path, dict[str, Any]]]) -> None:
            for path, bundle in lane:
                if stop.is_set():
                    return
                progress.update(task, description=path.name)
                result = results[path.name]
                loader.send(result, bundle)
                progress.advance(task, result.entries)
                if not demo.console.is_terminal:  # no progress bar: a line per bundle
                    demo.console.print(
                        f"  {result.status} {path.name}: {result.entries} entries "
                        f"in {result.seconds:.1f}s",
                        markup=False,
                    )

        try:
            send(companions)
            with ThreadPoolExecutor(max_workers=len(lanes)) as pool:
                try:
                    for done in [pool.submit(send, lane) for lane in lanes]:
                        done.result()
                finally:
                    stop.set()
        except LoadStopped as exc:
            raise DemoFailed(f"the load stopped: {exc}") from None
    seconds = time.monotonic() - started
    loaded = [r for r in results.values() if r.ok]
    entries = sum(r.entries for r in loaded)
    demo.console.print(
        f"loaded {len(loaded)} of {len(results)} bundles: {entries:,} entries in {seconds:.0f}s "
        f"({entries / max(seconds, 0.001):,.0f}/s), each one encrypted per element group and "
        "audited"
    )
    for result in results.values():
        if result.ok:
            continue
        demo.console.print(
            Text.assemble(
                ("  refused ", "bold yellow"),
                f"{result.file.name} (HTTP {result.http_status}, nothing of it written):",
            )
        )
        for issue in result.issues[:3]:
            demo.console.print(Text("    " + issue.describe()))
    refused = [name for name, r in results.items() if not r.ok]
    # Bundles with companions load; the one without (flexporter) is refused, and says why.
    demo.check(
        bool(loaded) and all(not name.startswith(("sof2019_", "wasee11_")) for name in refused),
        "every bundle with its companions loaded; only the one without companions refused",
    )
    return results


# --- who is who -----------------------------------------------------------------------------


def _locations(result: FileResult) -> dict[str, str]:
    """fullUrl -> ``Type/id`` of what the server created or matched for it."""
    out: dict[str, str] = {}
    for item in result.responses:
        full_url, location = item.get("fullUrl"), item.get("location")
        if isinstance(full_url, str) and isinstance(location, str):
            parts = location.split("/")
            if len(parts) >= 2:
                out[full_url] = f"{parts[0]}/{parts[1]}"
    return out


def _participants(bundle: dict[str, Any]) -> Counter[str]:
    """How often each individual takes part in the bundle's Encounters (references as sent)."""
    counts: Counter[str] = Counter()
    for entry in bundle.get("entry", []):
        resource = entry.get("resource", {})
        if resource.get("resourceType") != "Encounter":
            continue
        for participant in resource.get("participant", []):
            reference = participant.get("individual", {}).get("reference")
            if isinstance(reference, str) and reference.startswith(("urn:uuid:", "Practitioner")):
                counts[reference] += 1
    return counts


def _resolve(demo: Demo, reference: str, locations: dict[str, str]) -> str | None:
    """The Practitioner id a bundle's reference (``urn:uuid:`` or conditional) ended up at."""
    if reference.startswith("urn:uuid:"):
        target = locations.get(reference, "")
        return target.split("/", 1)[1] if target.startswith("Practitioner/") else None
    if reference in demo.resolved:
        return demo.resolved[reference]
    kind, _, query = reference.partition("?")
    name, _, value = query.partition("=")
    found = None
    if kind == "Practitioner" and name == "identifier":
        response = demo.get(LOADER, f"Practitioner?identifier={quote(value, safe='')}")
        entries = response.json().get("entry", []) if response.status_code == 200 else []
        found = str(entries[0]["resource"]["id"]) if len(entries) == 1 else None
    demo.resolved[reference] = found
    return found


def cast_from(
    demo: Demo, results: dict[str, FileResult], bundles: dict[str, dict[str, Any]]
) -> Cast:
    """The tour's patient (the first loaded wasee11 patient) and practitioners around them."""
    patients = [
        name
        for name, result in results.items()
        if result.ok and "Information" not in name and result.bundle_type == "transaction"
    ]
    chosen = next((n for n in patients if n.startswith("wasee11_")), None) or next(
        iter(patients), None
    )
    if chosen is None:
        raise DemoFailed("no patient bundle loaded")
    bundle = bundles[chosen]
    locations = _locations(results[chosen])
    patient_entry = next(
        e for e in bundle["entry"] if e.get("resource", {}).get("resourceType") == "Patient"
    )
    patient = locations[patient_entry["fullUrl"]].split("/", 1)[1]
    name = (patient_entry["resource"].get("name") or [{}])[0]
    carers = [
        pid
        for reference, _ in _participants(bundle).most_common()
        if (pid := _resolve(demo, reference, locations)) is not None
    ]
    if not carers:
        raise DemoFailed(f"no Encounter participant of {chosen} could be found on the server")
    clinician = carers[0]
    encounter = ""
    for entry in bundle["entry"]:
        resource = entry.get("resource", {})
        if resource.get("resourceType") != "Encounter":
            continue
        for participant in resource.get("participant", []):
            reference = participant.get("individual", {}).get("reference", "")
            if _resolve(demo, reference, locations) == clinician:
                encounter = locations[entry["fullUrl"]].split("/", 1)[1]
                break
        if encounter:
            break
    # A practitioner of another patient, who never saw this one.
    unrelated = None
    for other in patients:
        if other == chosen:
            continue
        for reference, _ in _participants(bundles[other]).most_common():
            pid = _resolve(demo, reference, _locations(results[other]))
            if pid is not None and pid not in carers:
                unrelated = pid
                break
        if unrelated is not None:
            break
    if unrelated is None:
        raise DemoFailed("no practitioner without a care relationship to the patient was found")
    return Cast(
        patient=patient,
        given=str((name.get("given") or [""])[0]),
        family=str(name.get("family", "")),
        encounter=encounter,
        clinician=clinician,
        nurse=carers[1] if len(carers) > 1 else clinician,
        unrelated=unrelated,
    )


LOADER = User(
    "LOADER",
    "loader (phivault load)",
    Role.SERVICE,
    "service-loader",
    None,
    LOADER_SCOPES,
    LOADER_PURPOSE,
)


def demo_users(cast: Cast) -> list[User]:
    """The demo users: the clinicians, the nurse and the patient are records that were loaded."""
    return [
        User(
            "CLINICIAN",
            "clinician",
            Role.CLINICIAN,
            "dr-alice",
            f"Practitioner/{cast.clinician}",
            ("user/*.cruds",),
            "TREAT",
        ),
        User(
            "NURSE",
            "nurse",
            Role.NURSE,
            "nurse-bob",
            f"Practitioner/{cast.nurse}",
            ("user/*.rs",),
            "TREAT",
        ),
        User(
            "FRONT_DESK",
            "front desk",
            Role.FRONT_DESK,
            "desk-carol",
            None,
            ("user/Patient.crus", "user/Encounter.rs"),
            "PATADM",
        ),
        User(
            "BILLING",
            "billing",
            Role.BILLING,
            "billing-dan",
            None,
            (
                "user/Patient.rs",
                "user/Encounter.rs",
                "user/Claim.rs",
                "user/ExplanationOfBenefit.rs",
            ),
            "HPAYMT",
        ),
        User(
            "PATIENT",
            "patient",
            Role.PATIENT,
            "patient-frank",
            f"Patient/{cast.patient}",
            ("patient/*.rs",),
            "PATRQT",
        ),
        User(
            "PRIVACY_OFFICER",
            "privacy officer",
            Role.PRIVACY_OFFICER,
            "privacy-grace",
            None,
            ("user/AuditEvent.rs",),
            "HCOMPL",
            mfa=True,
        ),
        User(
            "ADMIN",
            "admin",
            Role.ADMIN,
            "admin-heidi",
            None,
            ("user/Practitioner.cruds",),
            "HSYSADMIN",
            mfa=True,
        ),
        User(
            "OTHER_CLINICIAN",
            "clinician, no care relationship",
            Role.CLINICIAN,
            "dr-mallory",
            f"Practitioner/{cast.unrelated}",
            ("user/*.cruds",),
            "TREAT",
        ),
        LOADER,
    ]


# --- tokens ---------------------------------------------------------------------------------


def _phivault() -> str:
    """How to run the phivault command from here (the venv's, when there is one)."""
    candidate = Path(sys.executable).with_name("phivault")
    if not candidate.exists():
        return "phivault"
    relative = os.path.relpath(candidate)
    return str(candidate) if relative.startswith("..") else relative


def token_command(user: User, data_dir: Path) -> str:
    parts = [_phivault(), "token", "--role", user.role.value, "--user", user.user]
    if user.fhir_user:
        parts += ["--fhir-user", user.fhir_user]
    for scope in user.scopes:
        parts += ["--scope", scope]
    parts += ["--purpose", user.purpose]
    if user.mfa:
        parts.append("--mfa")
    parts += ["--ttl", str(TOKEN_TTL_S), "--data-dir", str(data_dir)]
    return shlex.join(parts)


def show_tokens(demo: Demo, users: Sequence[User]) -> Path:
    """Mint a token for each demo user, print them, and write them to ``tokens.env``."""
    table = Table(title="Demo users (development tokens, valid one hour)", title_justify="left")
    table.add_column("$VARIABLE", overflow="fold")
    table.add_column("sub: who", overflow="fold")
    table.add_column("fhirUser", no_wrap=True)
    table.add_column("purpose")
    table.add_column("scopes", overflow="fold")
    lines = [
        "# phivault demo tokens (development identity provider); `source` this file.",
        "# Each lasts an hour, and a session idles out after 15 minutes: a fresh one with",
        "# the command above its line.",
    ]
    for user in users:
        token = demo.mint(user)
        table.add_row(
            user.var,
            f"{user.user}: {user.label}" + (" (MFA)" if user.mfa else ""),
            user.fhir_user or "",
            user.purpose,
            " ".join(user.scopes),
        )
        lines += [f"# {token_command(user, demo.data_dir)}", f"export {user.var}={token}"]
    path = demo.data_dir / "tokens.env"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    demo.console.print(table)
    for user in users:
        demo.console.print(f"export {user.var}={demo.tokens[user.var]}", markup=False)
    demo.console.print(
        f"(also in {path}: [bold]source {path}[/]; a fresh token, for example: "
        f"{token_command(users[0], demo.data_dir)})"
    )
    return path


# --- the tour -------------------------------------------------------------------------------

OUTCOMES = {0: "success", 4: "denied", 8: "failed", 12: "failed (major)"}


def _names(resource: dict[str, Any]) -> str:
    name = (resource.get("name") or [{}])[0]
    return " ".join([*name.get("given", []), name.get("family", "")]).strip()


def _status(step: Step) -> Text:
    if step.response is None:
        return Text("no answer", style="bold red")
    code = step.response.status_code
    style = "green" if step.ok else "bold red"
    return Text(f"→ {code} {step.response.reason_phrase}", style=style)


def _diagnostics(body: dict[str, Any]) -> str:
    issues = body.get("issue") or [{}]
    return str(issues[0].get("diagnostics", issues[0].get("code", "")))


def run_requests(demo: Demo, users: dict[str, User], cast: Cast) -> list[Step]:
    steps = [
        Step(
            "The clinician reads the patient they treat (an Encounter participant)",
            users["CLINICIAN"],
            f"Patient/{cast.patient}",
            200,
        ),
        Step(
            "Another clinician, with no care relationship, reads the same patient",
            users["OTHER_CLINICIAN"],
            f"Patient/{cast.patient}",
            404,
        ),
        Step(
            "Billing reads one of the patient's Encounters",
            users["BILLING"],
            f"Encounter/{cast.encounter}",
            200,
        ),
        Step(
            "The patient searches their own Observations",
            users["PATIENT"],
            "Observation?_sort=-date&_count=3&_total=accurate",
            200,
        ),
        Step(
            "The loader's token reads the patient it loaded",
            users["LOADER"],
            f"Patient/{cast.patient}",
            404,
        ),
    ]
    demo.heading("1. Minimum necessary, decided in the query")
    demo.console.print(
        "Every request goes through the records repository with an access context (role, "
        "fhirUser, scopes, purpose of use); what the policy allows is part of the query."
    )
    clinician_encounter = demo.get(users["CLINICIAN"], f"Encounter/{cast.encounter}")
    for number, step in enumerate(steps, 1):
        demo.console.print()
        demo.console.print(f"[bold]{number}. {step.title}[/]")
        demo.console.print(f"[cyan]$ {demo.curl(step)}[/]", markup=True)
        step.response = demo.get(step.user, step.path)
        body = step.body()
        demo.console.print(_status(step))
        if number == 1:
            name = _names(body)
            demo.console.print(
                f"  {body.get('resourceType')}/{body.get('id')}: {name}, born "
                f"{body.get('birthDate')}, {body.get('gender')}; ETag "
                f"{step.response.headers.get('etag')}",
                markup=False,
            )
            demo.check(
                step.ok and name == f"{cast.given} {cast.family}",
                "the full record, name included, decrypted for someone treating the patient",
            )
        elif number in (2, 5):
            demo.console.print(f"  OperationOutcome: {_diagnostics(body)}", markup=False)
            what = (
                "no care relationship: not even the patient's existence is disclosed"
                if number == 2
                else "a loader writes; it never reads PHI back (its purpose, HOPERAT, "
                "allows no read)"
            )
            demo.check(step.ok, what)
        elif number == 3:
            full = clinician_encounter.json() if clinician_encounter.status_code == 200 else {}
            withheld = sorted(set(full) - set(body))
            labels = [s.get("code") for s in body.get("meta", {}).get("security", [])]
            demo.console.print(
                f"  meta.security: {', '.join(map(str, labels)) or 'none'}; billing got "
                f"{', '.join(sorted(set(body) - {'meta', 'resourceType'}))}",
                markup=False,
            )
            demo.console.print(
                f"  withheld (the clinician sees them): {', '.join(withheld)}", markup=False
            )
            demo.check(
                step.ok and "REDACTED" in labels and bool(withheld),
                "clinical groups never decrypted for billing; the resource is marked REDACTED",
            )
        elif number == 4:
            entries = body.get("entry", [])
            demo.console.print(f"  total: {body.get('total')} Observations", markup=False)
            for entry in entries:
                resource = entry.get("resource", {})
                code = resource.get("code", {})
                label = code.get("text") or (code.get("coding") or [{}])[0].get("display", "")
                value = resource.get("valueQuantity", {})
                shown = f"{value.get('value', '')} {value.get('unit', '')}".strip()
                concept = resource.get("valueCodeableConcept", {})
                shown = shown or concept.get("text") or str(resource.get("valueString", ""))
                demo.console.print(
                    f"  {resource.get('effectiveDateTime', '')[:10]} {label} {shown}",
                    markup=False,
                )
            demo.check(
                step.ok and bool(entries),
                "the patient sees their own compartment, and only theirs",
            )
    return steps


def _leaf_events(data_dir: Path) -> list[dict[str, Any]]:
    with open_ledger_readonly(DataDir.open(data_dir)) as store:
        size = store.size()
        leaves = store.read(max(0, size - 500), size)
    return [json.loads(leaf) for leaf in leaves]


def _what(event: dict[str, Any]) -> str:
    whats = [str(e["what"]) for e in event.get("entities", []) if "what" in e]
    queries = [e for e in event.get("entities", []) if "query_hash" in e]
    shown = whats[:4] + ([f"... {len(whats) - 4} more"] if len(whats) > 4 else [])
    if queries:
        shown.insert(0, "a query (keyed hash)")
    return "\n".join(shown)


def show_audit(demo: Demo, steps: Sequence[Step]) -> None:
    demo.heading("2. Audit before data moves")
    demo.console.print(
        "Each request's events were in the ledger (fsynced) before its response left: a read "
        "names the versions it disclosed; a refusal is recorded with its reason. Ids and "
        "keyed hashes only, never PHI."
    )
    events = _leaf_events(demo.data_dir)
    table = Table(show_lines=True)
    for column in ("#", "seq", "who (role)", "event", "purpose", "outcome"):
        table.add_column(column, overflow="fold")
    table.add_column("what (Type/id/_history/version)", no_wrap=True)
    for number, step in enumerate(steps, 1):
        step.events = [e for e in events if e.get("request_id") == step.request_id]
        for event in step.events:
            if event.get("kind") != "rest":
                continue  # a token's first request also records its session-start
            agent = (event.get("agents") or [{}])[0]
            outcome = OUTCOMES.get(int(event.get("outcome", 0)), str(event.get("outcome")))
            if event.get("outcome_reason"):
                outcome += f": {event['outcome_reason']}"
            table.add_row(
                str(number),
                str(event.get("seq")),
                f"{agent.get('who')} ({', '.join(agent.get('roles', []))})",
                str(event.get("subtype")),
                ", ".join(event.get("purpose_of_use", [])),
                outcome,
                _what(event),
            )
    demo.console.print(table)
    first = steps[0]
    disclosed = any(
        e.get("what") == f"{first.path}/_history/1"
        for event in first.events
        for e in event.get("entities", [])
    )
    demo.check(disclosed, "the clinician's read names the version it disclosed")
    demo.check(
        all(any(e.get("kind") == "rest" for e in step.events) for step in steps if step.response),
        "every request, allowed or refused, left its event in the ledger",
    )


def _count(path: Path, needles: Sequence[bytes], chunk: int = 8 << 20) -> list[int]:
    """Occurrences of each needle in the file, case-insensitive, reading it in chunks."""
    lowered = [needle.lower() for needle in needles]
    counts = [0] * len(lowered)
    tail = b""  # the end of what was read before: a match may straddle two chunks
    with path.open("rb") as fh:
        while block := fh.read(chunk).lower():
            for index, needle in enumerate(lowered):
                keep = len(needle) - 1  # shorter than the needle: no match counted twice
                counts[index] += (tail[max(0, len(tail) - keep) :] + block).count(needle)
            tail = (tail + block)[-max(map(len, lowered)) :]
    return counts


def show_at_rest(demo: Demo, cast: Cast) -> None:
    demo.heading("3. No plaintext PHI at rest, none in the log")
    name = f"{cast.given} {cast.family}"
    demo.console.print(
        f"The API just returned the patient's name ({name}) to the clinician. Now the raw "
        "bytes of every file the server wrote, searched for it (case-insensitive):"
    )
    needles = [cast.given.encode(), cast.family.encode(), cast.patient.encode()]
    places = {
        "records database": sorted(
            p for p in (demo.data_dir / "records").rglob("*") if p.is_file()
        ),
        "audit ledger": sorted(p for p in (demo.data_dir / "ledger").rglob("*") if p.is_file()),
        "server log": [demo.data_dir / "serve.log"],
    }
    table = Table()
    table.add_column("where")
    table.add_column("bytes", justify="right")
    for needle in needles[:2]:
        table.add_column(f'"{needle.decode()}"', justify="right")
    table.add_column("patient id (control)", justify="right")
    name_hits = records_control = 0
    for where, files in places.items():
        counts = [0, 0, 0]
        size = 0
        for path in files:
            size += path.stat().st_size
            counts = [a + b for a, b in zip(counts, _count(path, needles), strict=True)]
        name_hits += counts[0] + counts[1]
        table.add_row(
            f"{where} ({len(files)} files)",
            f"{size:,}",
            *(str(c) for c in counts),
        )
        if where == "records database":
            records_control = counts[2]
    demo.console.print(table)
    demo.console.print(
        "Each element group is sealed with AES-256-GCM under the patient's own data key; "
        "names are searched through keyed blind indexes. The control column shows the search "
        "works: the record's id is stored in clear."
    )
    demo.check(name_hits == 0 and records_control > 0, "0 hits for the name anywhere at rest")


def _cli(demo: Demo, *args: str) -> subprocess.CompletedProcess[str]:
    demo.console.print(f"[bold cyan]$ phivault {' '.join(args)}[/]")
    result = subprocess.run(
        [sys.executable, "-m", "phivault.cli.main", *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "COLUMNS": str(demo.console.width)},  # its tables as wide as ours
    )
    demo.console.print((result.stdout + result.stderr).rstrip(), markup=False)
    return result


def show_ledger(demo: Demo, cast: Cast, steps: Sequence[Step]) -> None:
    where = ("--data-dir", str(demo.data_dir))
    demo.heading("4. Who saw this patient, and can the ledger be trusted?")
    demo.console.print(
        "The patient's events, found by following each event's back-link to the previous "
        "event of the same patient, with a proof that the newest is in a signed checkpoint:"
    )
    time.sleep(1.2)  # the server signs a checkpoint within a second of the last event
    _cli(demo, "ledger", "report", "--patient", cast.patient, *where)
    demo.console.print()
    demo.console.print(
        "Re-hash every entry, rebuild the RFC 9162 Merkle tree, check every signed checkpoint "
        "and the consistency between them (offline; the server is still running):"
    )
    verified = _cli(demo, "ledger", "verify", *where)
    demo.check(verified.returncode == 0, "phivault ledger verify: everything holds")
    demo.console.print()
    read = next(e for e in steps[0].events if e.get("kind") == "rest")
    target, who = int(read["seq"]), steps[0].user.user
    demo.console.print(
        f"An insider edits entry {target} of an exported evidence bundle: the clinician's read "
        f"of the patient, now by someone else ({who} -> dr-eve). An auditor verifies the "
        "bundle with nothing but the ledger's key, pinned earlier:"
    )
    bundle = demo.data_dir / "evidence.json"
    _cli(demo, "ledger", "export", "--out", str(bundle), *where)
    key = verifier_key_of(DataDir.open(demo.data_dir))  # as `phivault ledger key` prints it
    doc = json.loads(bundle.read_text())
    entry = doc["entries"][target]
    leaf = base64.b64decode(entry["leaf"])
    edited = leaf.replace(f'"who":"{who}"'.encode(), b'"who":"dr-eve"')
    entry["leaf"] = base64.b64encode(edited).decode()
    tampered = demo.data_dir / "evidence-tampered.json"
    tampered.write_text(json.dumps(doc))
    caught = _cli(demo, "ledger", "verify", "--bundle", str(tampered), "--key", key)
    demo.check(
        edited != leaf
        and caught.returncode == 2
        and f"index {target}" in caught.stdout + caught.stderr,
        f"the edit is caught, and entry {target} named",
    )


# --- main -----------------------------------------------------------------------------------


def show_serving(demo: Demo, steps: Sequence[Step], cast: Cast, tokens: Path) -> None:
    """The URL and lines to try, plain (no box around them, so they copy and paste whole)."""
    bearer = 'curl -s -H "Authorization: Bearer ${var}" "{url}"'
    lines = [f"source {tokens}"]
    lines += [demo.curl(step) for step in steps]
    lines += [
        bearer.format(var="NURSE", url=f"{demo.fhir}/Patient/{cast.patient}")
        + "   # another of the patient's Encounter participants",
        bearer.format(var="FRONT_DESK", url=f"{demo.fhir}/Patient/{cast.patient}")
        + "   # demographics only",
        bearer.format(var="PRIVACY_OFFICER", url=f"{demo.fhir}/Patient/{cast.patient}")
        + "   # 404: no PHI; the audit trail is theirs:",
        bearer.format(var="PRIVACY_OFFICER", url=f"{demo.fhir}/AuditEvent?patient={cast.patient}")
        + "   # who saw the record",
        bearer.format(var="PATIENT", url=f"{demo.fhir}/Patient/{cast.patient}/\\$access-report")
        + " > report.json   # the patient's own accounting of disclosures, then:",
        f"{_phivault()} ledger verify-report report.json --data-dir {demo.data_dir}",
        bearer.format(var="ADMIN", url=f"{demo.fhir}/Practitioner/{cast.clinician}")
        + "   # the directory, no PHI",
        f"{_phivault()} ledger report --patient {cast.patient} --data-dir {demo.data_dir}",
        f"tail -f {demo.data_dir / 'serve.log'}   # the server's log: no PHI in it",
    ]
    demo.heading(f"phivault is serving {demo.fhir}")
    for line in lines:
        demo.console.print(line, markup=False)
    demo.console.print("[bold]Ctrl-C stops the server.[/]")


def run(console: Console, data_dir: Path, port: int, *, serve: bool) -> int:
    if not FIXTURES.is_dir():
        raise DemoFailed(
            f"the Synthea fixtures are not at {FIXTURES} (set PHIVAULT_SHARED to the folder "
            "that holds fixtures/synthea)"
        )
    console.print(
        Panel.fit(
            "[bold]phivault demo[/]: a FHIR R4 service for PHI, serving Synthea patients.\n"
            "Every access is authorized in the query, encrypted per element, and written to a "
            "tamper-evident ledger [italic]before[/] data moves.",
            border_style="cyan",
        )
    )
    started = time.monotonic()
    fresh_data_dir(console, data_dir)
    chosen = pick_port(port)
    if port and chosen != port:
        console.print(f"port {port} is taken; serving on {chosen} instead")
    port = chosen
    with started_server(console, data_dir, port) as server:
        bundles = read_fixtures()  # while the server starts
        server.wait_ready(console)
        demo = Demo(console, data_dir, server.url)
        with demo.client:
            results = load_fixtures(demo, bundles)
            cast = cast_from(demo, results, {path.name: bundle for path, bundle in bundles})
            console.print(f"ready in {time.monotonic() - started:.0f}s")
            demo.heading("Tokens for the demo users")
            users = demo_users(cast)
            tokens = show_tokens(demo, users)
            steps = run_requests(demo, {user.var: user for user in users}, cast)
            show_audit(demo, steps)
            show_at_rest(demo, cast)
            show_ledger(demo, cast, steps)
        console.print()
        console.print(f"the whole tour took {time.monotonic() - started:.0f}s")
        if demo.failures:
            console.print(
                f"[bold red]{len(demo.failures)} step(s) did not do what they should:[/] "
                + "; ".join(demo.failures)
            )
        else:
            console.print("[bold green]every control did what it should[/]")
        if not serve:
            return 1 if demo.failures else 0
        show_serving(demo, steps, cast, tokens)
        try:
            code = server.process.wait()
            console.print(f"the server stopped (exit code {code}); see {server.log_path}")
        except KeyboardInterrupt:
            console.print("stopping the server")
        return 1 if demo.failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m phivault.demo",
        description="Serve the Synthea patients and show what each control of phivault did.",
    )
    parser.add_argument("--data-dir", type=Path, default=Path("./phivault-data-demo"))
    parser.add_argument(
        "--port", type=int, default=8000, help="port to serve on (taken or 0: any free port)"
    )
    parser.add_argument(
        "--no-serve", action="store_true", help="run the tour, stop the server and exit"
    )
    args = parser.parse_args(argv)
    # Piped (a test, `make demo | tee`): wide enough that ids and references print whole.
    wide = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
    console = Console(highlight=False, soft_wrap=True, width=wide)
    try:
        return run(console, args.data_dir, args.port, serve=not args.no_serve)
    except DemoFailed as exc:
        console.print(Text.assemble(("demo failed: ", "bold red"), str(exc)))
        return 2
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())

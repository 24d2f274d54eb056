"""``phivault load``: send FHIR Bundles (transactions and batches) to a running server.

What it does, in order:

1. Reads every file first and refuses to send anything when one of them is not JSON, not a
   FHIR Bundle, or a Bundle of a type other than ``transaction`` or ``batch`` (exit 2).
2. Orders the files: companion bundles first (``*hospitalInformation*``, then
   ``*practitionerInformation*``), then the rest in the order given, so that the patient
   bundles' conditional references (``Practitioner?identifier=...``) find what they point to.
   With ``--jobs N`` the bundles after the companions go N at a time, except those with a
   conditional create, update or delete: two of them racing for the same resource would
   have one answered 409 (the server lets only one create it), so they go one at a time,
   in order.
3. Turns each plain ``POST`` of a Practitioner, Organization or Location that carries an
   identifier into a conditional create (``ifNoneExist: identifier=system|value``, with the
   first identifier that has both). Synthea 2019 (``sof2019_*``) repeats its directory
   resources inline in every patient bundle as well as in the companion bundles; without this
   each load would create another copy. With it, the server creates each one once and points
   every later reference at that one. Entries that already say ``ifNoneExist`` are left alone.
4. Sends each bundle as it says (``Bundle.type``) to ``POST <url>/fhir`` and reports, per file,
   whether it loaded. A transaction is all or nothing; a batch reports each entry.

Errors are reported without any resource value: only the file, the HTTP status and the
server's OperationOutcome (severity, code, diagnostics, expression). Nothing is lost silently:
the summary names every file as loaded, failed, partial (a batch with failed entries),
unknown (no answer in time, or a 5xx: the server may or may not have written the bundle) or
not attempted (the load stopped first).

Exit codes: 0 every file loaded; 1 at least one bundle did not load (a 403 from the access
policy included: it may concern only some bundles); 2 bad input (nothing was sent); 3 the
load stopped (the server could not be reached, or refused the token with a 401); 130
interrupted (Ctrl-C: the bundle being sent is reported as unknown).

The token: ``--token`` (or ``PHIVAULT_TOKEN``), or else a short-lived service token minted
by the development identity provider of a ``phivault init --dev`` data directory (role
``service``, purpose of use ``HOPERAT``, scopes in :data:`LOADER_SCOPES`).
"""

from __future__ import annotations

import ssl
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import httpx
import orjson
import typer
from rich.text import Text

from phivault.cli._common import (
    DataDirOption,
    JsonOption,
    Output,
    fail,
    load_settings_or_fail,
    open_data_dir,
)
from phivault.datadir import default_data_dir

__all__ = [
    "COMPANION_PATTERNS",
    "DEFAULT_URL",
    "DIRECTORY_TYPES",
    "LOADER_PURPOSE",
    "LOADER_SCOPES",
    "BundleFileError",
    "FileResult",
    "Issue",
    "LoadStopped",
    "Loader",
    "add_conditional_creates",
    "creates_conditionally",
    "fhir_base",
    "identifier_condition",
    "load",
    "order_files",
    "outcome_issues",
    "read_bundle",
]

DEFAULT_URL = "http://127.0.0.1:8000"
FHIR_JSON = "application/fhir+json"
# Companion bundles, loaded first in this order (Synthea's hospital and practitioner files).
COMPANION_PATTERNS = ("hospitalInformation", "practitionerInformation")
# Directory resources that Synthea repeats; their plain POSTs become conditional creates.
DIRECTORY_TYPES = frozenset({"Practitioner", "Organization", "Location"})
LOADER_PURPOSE = "HOPERAT"
LOADER_SCOPES = (
    "system/*.cu",
    "system/Practitioner.rs",
    "system/Organization.rs",
    "system/Location.rs",
    "system/PractitionerRole.rs",
)
LOADER_USER = "service-loader"
_TOKEN_TTL_S = 3600
_TOKEN_RENEW_AFTER_S = 3000
_RETRIES = 5
_MAX_RETRY_WAIT_S = 30.0

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_STOPPED = 3
EXIT_INTERRUPTED = 130


class BundleFileError(Exception):
    """A file that cannot be sent: unreadable, not JSON, not a transaction or batch Bundle.

    The message names the file and what is wrong with it, never its content.
    """


class LoadStopped(Exception):
    """The load cannot go on: the server is unreachable or refused the token (401)."""

    def __init__(self, kind: str, message: str, *, http_status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.http_status = http_status


@dataclass(frozen=True, slots=True)
class Issue:
    """One OperationOutcome issue, reduced to what may be shown (no resource values)."""

    severity: str
    code: str
    diagnostics: str | None = None
    expression: tuple[str, ...] = ()
    entry: int | None = None  # the bundle entry (0-based) a batch response reported it for

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"severity": self.severity, "code": self.code}
        if self.diagnostics is not None:
            out["diagnostics"] = self.diagnostics
        if self.expression:
            out["expression"] = list(self.expression)
        if self.entry is not None:
            out["entry"] = self.entry
        return out

    def describe(self) -> str:
        text = f"{self.severity} {self.code}"
        if self.entry is not None:
            text = f"entry {self.entry}: {text}"
        if self.diagnostics:
            text += f": {self.diagnostics}"
        if self.expression:
            text += f" (at {', '.join(self.expression)})"
        return text


@dataclass
class FileResult:
    """What happened to one file."""

    file: Path
    status: str = "not-attempted"  # loaded | failed | partial | unknown | not-attempted | invalid
    bundle_type: str | None = None
    entries: int = 0
    conditional_creates: int = 0
    http_status: int | None = None
    message: str | None = None
    issues: list[Issue] = field(default_factory=list)
    responses: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "loaded"

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "file": str(self.file),
            "status": self.status,
            "type": self.bundle_type,
            "entries": self.entries,
            "conditional_creates_added": self.conditional_creates,
            "http_status": self.http_status,
            "seconds": round(self.seconds, 3),
        }
        if self.message is not None:
            out["message"] = self.message
        if self.issues:
            out["issues"] = [issue.as_json() for issue in self.issues]
        if self.responses:
            out["responses"] = self.responses
        return out


# --- the pure part: files, order, rewriting, outcomes -------------------------------------


def order_files(paths: Iterable[Path]) -> list[Path]:
    """Companion bundles first (hospital, then practitioner information), then the rest.

    Directories are expanded to their ``*.json`` files (sorted by name); a file given twice
    is loaded once. Within each group the given order is kept.
    """
    expanded: list[Path] = []
    seen: set[Path] = set()
    for path in paths:
        candidates = sorted(path.glob("*.json")) if path.is_dir() else [path]
        for candidate in candidates:
            key = candidate.resolve()
            if key not in seen:
                seen.add(key)
                expanded.append(candidate)

    def rank(path: Path) -> int:
        for index, pattern in enumerate(COMPANION_PATTERNS):
            if pattern in path.name:
                return index
        return len(COMPANION_PATTERNS)

    return sorted(expanded, key=rank)  # sorted() is stable: the given order stays in a group


def _is_companion(path: Path) -> bool:
    return any(pattern in path.name for pattern in COMPANION_PATTERNS)


def creates_conditionally(bundle: dict[str, Any]) -> bool:
    """Whether a bundle has a conditional create, update, patch or delete: two such bundles
    may race for the same resource (one of them would be answered 409), so ``--jobs`` sends
    them one at a time, in order."""
    for entry in bundle.get("entry", []):
        request = entry.get("request")
        if not isinstance(request, dict):
            continue
        if "ifNoneExist" in request:
            return True
        url = request.get("url")
        if request.get("method") in ("PUT", "PATCH", "DELETE") and "?" in str(url):
            return True
    return False


def read_bundle(path: Path) -> dict[str, Any]:
    """Parse a file as a transaction or batch Bundle, or raise :class:`BundleFileError`."""
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise BundleFileError(f"{path} is a directory with no .json files") from None
    except OSError as exc:
        raise BundleFileError(f"{path} cannot be read ({exc.strerror or 'I/O error'})") from None
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BundleFileError(
            f"{path} is not JSON (line {exc.lineno}, column {exc.colno})"
        ) from None
    if not isinstance(document, dict) or document.get("resourceType") != "Bundle":
        raise BundleFileError(f"{path} is not a FHIR Bundle (no resourceType Bundle)")
    kind = document.get("type")
    if kind not in ("transaction", "batch"):
        shown = kind if isinstance(kind, str) and kind.isidentifier() else "missing"
        raise BundleFileError(
            f"{path} is a Bundle of type {shown}; only transaction and batch Bundles are loaded"
        )
    entries = document.get("entry", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise BundleFileError(f"{path}: Bundle.entry is not a list of entries")
    for index, entry in enumerate(entries):
        request = entry.get("request")
        if not isinstance(request, dict) or not isinstance(request.get("method"), str):
            raise BundleFileError(f"{path}: Bundle.entry[{index}] has no request.method")
    return document


def _search_escape(text: str) -> str:
    # FHIR search escaping of the token separators, then percent-encoding of what a query
    # string cannot carry as is (&, #, +, %, spaces...); URLs and plain values stay readable.
    escaped = text.replace("\\", "\\\\").replace("|", "\\|").replace(",", "\\,")
    escaped = escaped.replace("$", "\\$")
    return quote(escaped, safe=":/\\|,$-._~@!*'()")


def identifier_condition(resource: dict[str, Any]) -> str | None:
    """``identifier=system|value`` for the resource's first identifier that has both."""
    identifiers = resource.get("identifier")
    if not isinstance(identifiers, list):
        return None
    for identifier in identifiers:
        if not isinstance(identifier, dict):
            continue
        system, value = identifier.get("system"), identifier.get("value")
        if isinstance(system, str) and system and isinstance(value, str) and value:
            return f"identifier={_search_escape(system)}|{_search_escape(value)}"
    return None


def add_conditional_creates(bundle: dict[str, Any]) -> int:
    """Make plain POSTs of directory resources conditional creates; return how many changed.

    Only ``POST`` entries of :data:`DIRECTORY_TYPES` with an identifier and no
    ``ifNoneExist`` of their own are changed; everything else is left exactly as it is.
    """
    changed = 0
    for entry in bundle.get("entry", []):
        request = entry.get("request")
        resource = entry.get("resource")
        if not isinstance(request, dict) or not isinstance(resource, dict):
            continue
        if request.get("method") != "POST" or "ifNoneExist" in request:
            continue
        if resource.get("resourceType") not in DIRECTORY_TYPES:
            continue
        condition = identifier_condition(resource)
        if condition is not None:
            request["ifNoneExist"] = condition
            changed += 1
    return changed


def _strings(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(item for item in value if isinstance(item, str))


def outcome_issues(body: Any, *, entry: int | None = None) -> list[Issue]:
    """The issues of an OperationOutcome: severity, code, diagnostics and expression only."""
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return []
    issues: list[Issue] = []
    for issue in body.get("issue", []) or []:
        if not isinstance(issue, dict):
            continue
        diagnostics = issue.get("diagnostics")
        issues.append(
            Issue(
                severity=str(issue.get("severity", "error")),
                code=str(issue.get("code", "unknown")),
                diagnostics=diagnostics if isinstance(diagnostics, str) else None,
                expression=_strings(issue.get("expression")) or _strings(issue.get("location")),
                entry=entry,
            )
        )
    return issues


def fhir_base(url: str) -> str:
    """The FHIR endpoint of a server: ``URL/fhir`` unless the URL already ends with it."""
    base = url.rstrip("/")
    return base if base.endswith("/fhir") else base + "/fhir"


# --- the HTTP part --------------------------------------------------------------------------


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return None


def _retry_wait(response: httpx.Response, attempt: int) -> float:
    header = response.headers.get("retry-after", "")
    try:
        wait = float(header)
    except ValueError:
        wait = float(2**attempt)
    return max(0.0, min(wait, _MAX_RETRY_WAIT_S))


class Loader:
    """Sends bundles over one HTTP client; raises :class:`LoadStopped` when it cannot go on."""

    def __init__(
        self,
        client: httpx.Client,
        url: str,
        token: Callable[[], str],
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._client = client
        self._endpoint = fhir_base(url)
        self._token = token
        self._sleep = sleep

    @property
    def endpoint(self) -> str:
        return self._endpoint

    def _post(self, body: bytes) -> httpx.Response:
        attempt = 0
        while True:
            headers = {
                "Authorization": f"Bearer {self._token()}",
                "Content-Type": FHIR_JSON,
                "Accept": FHIR_JSON,
            }
            try:
                response = self._client.post(self._endpoint, content=body, headers=headers)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                raise LoadStopped(
                    "unreachable",
                    f"cannot reach the server at {self._endpoint} "
                    f"({type(exc).__name__}); is `phivault serve` running?",
                ) from None
            # A 429 comes before anything is done, so sending again is safe. A 503 is not: the
            # server also answers 503 when a write committed but its outcome could not be
            # recorded in the audit ledger, so a second send could write the bundle twice.
            if response.status_code == 429 and attempt < _RETRIES:
                self._sleep(_retry_wait(response, attempt))
                attempt += 1
                continue
            return response

    def send(self, result: FileResult, bundle: dict[str, Any]) -> None:
        """Send one bundle and record the outcome in ``result`` (its path, type and counts)."""
        body = orjson.dumps(bundle)
        started = time.monotonic()
        try:
            response = self._post(body)
        except (httpx.TimeoutException, httpx.TransportError) as exc:
            result.status = "unknown"
            result.message = (
                f"no complete answer from the server ({type(exc).__name__}); "
                "the bundle may or may not have been written"
            )
            return
        finally:
            result.seconds = time.monotonic() - started
        result.http_status = response.status_code
        payload = _json_or_none(response)
        if response.status_code == 401:
            raise LoadStopped(
                "unauthorized",
                "the server refused the token (401): "
                + _issue_text(payload, "it is missing, expired or not trusted"),
                http_status=401,
            )
        if response.is_server_error:
            result.status = "unknown"
            result.issues = outcome_issues(payload)
            result.message = (
                f"the server failed ({response.status_code}); the bundle may or may not have "
                "been written: check before sending it again"
            )
            return
        if not response.is_success:
            result.status = "failed"
            result.issues = outcome_issues(payload)
            if response.status_code == 403:
                # The access policy refused something in this bundle; others may still load.
                result.message = (
                    f"the token may not write this bundle (403); a loader needs role service, "
                    f"purpose {LOADER_PURPOSE} and the scopes {' '.join(LOADER_SCOPES)}"
                )
            elif not result.issues:
                result.message = f"the server answered {response.status_code} without an outcome"
            return
        full_urls = [entry.get("fullUrl") for entry in bundle.get("entry", [])]
        self._read_response(result, payload, full_urls)

    def _read_response(self, result: FileResult, payload: Any, full_urls: list[Any]) -> None:
        expected = f"{result.bundle_type}-response"
        if (
            not isinstance(payload, dict)
            or payload.get("resourceType") != "Bundle"
            or payload.get("type") != expected
        ):
            result.status = "unknown"
            result.message = f"the server's answer is not a {expected} Bundle"
            return
        entries = payload.get("entry") or []
        if not isinstance(entries, list) or len(entries) != result.entries:
            result.status = "unknown"
            result.message = (
                f"the server answered {len(entries) if isinstance(entries, list) else 0} "
                f"entries for {result.entries}"
            )
            return
        failed = 0
        for index, entry in enumerate(entries):
            response = entry.get("response") if isinstance(entry, dict) else None
            if not isinstance(response, dict):
                response = {}
            status = str(response.get("status", ""))
            item: dict[str, Any] = {"status": status}
            if isinstance(full_urls[index], str):
                item["fullUrl"] = full_urls[index]
            if isinstance(response.get("location"), str):
                item["location"] = response["location"]
            if status[:1] != "2":
                failed += 1
                issues = outcome_issues(response.get("outcome"), entry=index)
                if not issues:
                    issues = [Issue("error", "unknown", f"status {status or 'missing'}", (), index)]
                result.issues.extend(issues)
                item["issues"] = [issue.as_json() for issue in issues]
            result.responses.append(item)
        if failed == 0:
            result.status = "loaded"
        elif result.bundle_type == "batch":
            result.status = "partial"
            result.message = f"{failed} of {result.entries} entries failed"
        else:
            result.status = "failed"
            result.message = f"{failed} of {result.entries} entries failed in a transaction"


def _issue_text(payload: Any, default: str) -> str:
    issues = outcome_issues(payload)
    texts = [issue.diagnostics for issue in issues if issue.diagnostics]
    return "; ".join(texts) if texts else default


# --- the token ------------------------------------------------------------------------------


def _dev_token_source(output: Output, data_dir: Path, tenant: str) -> Callable[[], str]:
    """Mint service tokens with the dev identity provider of ``data_dir`` (renewed hourly)."""
    from phivault.errors import PhivaultError
    from phivault.identity.dev_provider import DevIdentityProvider, DevProviderWarning
    from phivault.identity.principal import Role

    settings = load_settings_or_fail(output)
    if not (data_dir / "phivault.json").exists():
        fail(
            output,
            f"no --token given and no dev data directory at {data_dir}: pass --token "
            "(or PHIVAULT_TOKEN), or --data-dir DIR of a `phivault init --dev` directory",
            code=EXIT_BAD_INPUT,
            kind="token",
        )
    try:
        opened = open_data_dir(output, data_dir)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DevProviderWarning)  # said below, once
            provider = DevIdentityProvider.open(opened, settings)
    except PhivaultError as exc:
        fail(
            output,
            f"no --token given, and no dev token can be made: {exc}",
            code=EXIT_BAD_INPUT,
            kind="token",
        )
    if not output.json_mode:
        output.err.print(Text("using a development service token (dev identity provider)"))
    minted: list[tuple[float, str]] = []

    def current() -> str:
        now = time.monotonic()
        if not minted or now - minted[0][0] > _TOKEN_RENEW_AFTER_S:
            token = provider.mint(
                user=LOADER_USER,
                roles=[Role.SERVICE],
                audience=settings.identity.audience,
                tenant=tenant,
                scopes=LOADER_SCOPES,
                purpose_of_use=[LOADER_PURPOSE],
                ttl_s=_TOKEN_TTL_S,
            )
            minted[:] = [(now, token)]
        return minted[0][1]

    return current


# --- the command ----------------------------------------------------------------------------


def _verify(output: Output, ca_cert: Path | None) -> ssl.SSLContext | bool:
    if ca_cert is None:
        return True
    try:
        return ssl.create_default_context(cafile=str(ca_cert))
    except (OSError, ssl.SSLError):
        fail(output, f"cannot use {ca_cert} as a CA certificate", code=EXIT_BAD_INPUT, kind="usage")


def _summary(results: Sequence[FileResult]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for result in results:
        counts[result.status] = counts.get(result.status, 0) + 1
    return {
        "files": len(results),
        "loaded": counts.get("loaded", 0),
        "not_loaded": len(results) - counts.get("loaded", 0),
        "by_status": counts,
        "entries_loaded": sum(r.entries for r in results if r.ok),
    }


def _report(
    output: Output,
    results: Sequence[FileResult],
    *,
    url: str,
    stopped: LoadStopped | None = None,
    error: tuple[str, str] | None = None,
) -> None:
    ok = stopped is None and error is None and all(r.ok for r in results)
    if output.json_mode:
        document: dict[str, Any] = {"ok": ok, "url": url, **_summary(results)}
        if stopped is not None:
            document.update(error=stopped.kind, message=str(stopped))
        elif error is not None:
            document.update(error=error[0], message=error[1])
        document["results"] = [r.as_json() for r in results]
        output.json(document)
        return
    summary = _summary(results)
    line = Text.assemble(
        ("loaded ", "bold"),
        f"{summary['loaded']} of {summary['files']} files ",
        f"({summary['entries_loaded']} entries)",
    )
    output.say(line)
    for result in results:
        if result.ok:
            continue
        output.err.print(Text.assemble((f"{result.status}: ", "bold red"), str(result.file)))
        if result.message:
            output.err.print(Text("  " + result.message))
        for issue in result.issues[:20]:
            output.err.print(Text("  " + issue.describe()))
        if len(result.issues) > 20:
            output.err.print(Text(f"  ... and {len(result.issues) - 20} more issues"))
    if stopped is not None:
        output.err.print(Text.assemble(("error: ", "bold red"), str(stopped)))
    elif error is not None:
        output.err.print(Text.assemble(("error: ", "bold red"), error[1]))


def load(
    files: Annotated[
        list[Path],
        typer.Argument(
            help="Bundle files (JSON) or directories of them; companion bundles go first.",
            metavar="FILE...",
            show_default=False,
        ),
    ],
    *,
    url: Annotated[
        str,
        typer.Option(
            "--url",
            envvar="PHIVAULT_URL",
            help="The server (its FHIR endpoint is URL/fhir).",
        ),
    ] = DEFAULT_URL,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="PHIVAULT_TOKEN",
            help="A bearer token (default: a dev service token from --data-dir).",
            show_default=False,
        ),
    ] = None,
    tenant: Annotated[
        str, typer.Option("--tenant", help="The tenant of a dev-minted token.")
    ] = "default",
    ca_cert: Annotated[
        Path | None,
        typer.Option("--ca-cert", help="Trust this PEM certificate (a server on HTTPS)."),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=1.0, help="Seconds to wait for each bundle.")
    ] = 300.0,
    jobs: Annotated[
        int,
        typer.Option(
            "--jobs",
            min=1,
            max=32,
            help="After the companions, send this many bundles at a time (bundles that "
            "create conditionally still go one at a time, in order).",
        ),
    ] = 1,
    data_dir: DataDirOption = default_data_dir(),
    json_mode: JsonOption = False,
) -> None:
    """Load FHIR transaction and batch Bundles into a running phivault server."""
    output = Output(json_mode=json_mode)
    ordered = order_files(files)
    if not ordered:
        fail(output, "no bundle files given (directories held no .json files)", code=2)

    # Every file is checked before anything is sent: a bad file stops nothing half-way.
    results = [FileResult(file=path) for path in ordered]
    conditional: list[int] = []  # the bundles that create conditionally (see --jobs)
    invalid = False
    for index, result in enumerate(results):
        try:
            bundle = read_bundle(result.file)
        except BundleFileError as exc:
            result.status, result.message, invalid = "invalid", str(exc), True
            continue
        result.bundle_type = str(bundle["type"])
        result.entries = len(bundle.get("entry", []))
        add_conditional_creates(bundle)
        if creates_conditionally(bundle):
            conditional.append(index)
    if invalid:
        _report(
            output,
            results,
            url=fhir_base(url),
            error=("bad-input", "some files cannot be loaded; nothing was sent"),
        )
        raise typer.Exit(EXIT_BAD_INPUT)

    token_source = (lambda: token) if token else _dev_token_source(output, data_dir, tenant)
    verify = _verify(output, ca_cert)
    total = sum(r.entries for r in results)
    stop = threading.Event()
    stops: list[LoadStopped] = []
    in_flight: set[int] = set()  # indexes into results
    lock = threading.Lock()
    limits = httpx.Limits(max_connections=jobs, max_keepalive_connections=jobs)
    with (
        httpx.Client(
            verify=verify, timeout=httpx.Timeout(timeout, connect=10.0), limits=limits
        ) as client,
        output.progress("loading", total=total) as progress,
    ):
        loader = Loader(client, url, token_source)

        def send_one(index: int) -> None:
            result = results[index]
            try:
                bundle = read_bundle(result.file)  # again: files are not all held in memory
            except BundleFileError as exc:  # changed since it was checked
                result.status, result.message = "invalid", str(exc)
                return
            result.conditional_creates = add_conditional_creates(bundle)
            with lock:
                in_flight.add(index)
            try:
                loader.send(result, bundle)
            except LoadStopped as exc:
                # Unreachable: nothing was sent. A refused token (401): the server wrote nothing.
                result.status = "not-attempted" if exc.kind == "unreachable" else "failed"
                result.http_status = exc.http_status
                with lock:
                    stops.append(exc)
                    in_flight.discard(index)
                stop.set()
                return
            # (On Ctrl-C the index stays in flight: the interrupt handler reports it unknown.)
            with lock:
                in_flight.discard(index)
            progress.advance(result.entries)
            mark = ("ok ", "green") if result.ok else (f"{result.status} ", "bold red")
            output.say(
                Text.assemble(
                    mark,
                    f"{result.file.name}: {result.entries} entries ({result.bundle_type}) "
                    f"in {result.seconds:.1f}s",
                )
            )

        def lane(indexes: Iterable[int]) -> None:
            for index in indexes:
                if stop.is_set():
                    return
                send_one(index)

        companions = [i for i, r in enumerate(results) if _is_companion(r.file)]
        serial = [i for i in conditional if i not in companions]
        shared = [i for i in range(len(results)) if i not in companions and i not in serial]
        interrupted = False
        try:
            if jobs == 1:
                lane(range(len(results)))
            else:
                lane(companions)
                # The bundles that create conditionally go one at a time, in order (two of
                # them racing for one resource: one would be refused, 409); the others N at
                # a time.
                queue = iter(shared)

                def worker(first: Sequence[int]) -> None:
                    lane(first)
                    while not stop.is_set():
                        with lock:
                            index = next(queue, None)
                        if index is None:
                            return
                        send_one(index)

                with ThreadPoolExecutor(jobs, thread_name_prefix="load") as pool:
                    lanes = [serial] + [[] for _ in range(jobs - 1)]
                    futures = [pool.submit(worker, first) for first in lanes]
                    try:
                        for future in futures:
                            future.result()
                    except KeyboardInterrupt:
                        # Stop taking bundles; those in flight finish and are reported.
                        stop.set()
                        interrupted = True
        except KeyboardInterrupt:
            stop.set()
            interrupted = True
            with lock:
                for index in in_flight:
                    results[index].status = "unknown"
                    results[
                        index
                    ].message = "interrupted while sending; it may or may not have been written"
    stopped: LoadStopped | None = stops[0] if stops else None
    if interrupted:
        stopped = LoadStopped("interrupted", "interrupted (Ctrl-C)")
    _report(output, results, url=loader.endpoint, stopped=stopped)
    if stopped is not None:
        raise typer.Exit(EXIT_INTERRUPTED if stopped.kind == "interrupted" else EXIT_STOPPED)
    if not all(r.ok for r in results):
        raise typer.Exit(EXIT_FAILED)

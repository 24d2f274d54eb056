"""The deployment examples under docs/deploy/ are things an operator can actually use.

* the example settings file loads as production settings in the scaled shape, documents every
  setting and holds no secret;
* every Kubernetes document parses and is well-formed; the NetworkPolicies allow exactly the
  intended traffic between components (default deny, only the load balancer reaches the API);
  every container is hardened; the settings' host names are the manifests' Services; the
  image's user is the pods' user;
* the systemd units carry their hardening options;
* every `phivault` command line in the manifests, units and README names a subcommand and
  options that exist (typer's own --help), every inline Python names functions and keywords
  that exist, and every metric the README lists is exported. A command or option of issue 7
  that has not landed yet would be listed in PENDING and skipped, by name, until it lands.
"""

from __future__ import annotations

import ast
import copy
import functools
import importlib
import inspect
import os
import re
import shlex
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import BaseModel
from typer.main import get_command
from typer.testing import CliRunner

from phivault.cli.main import app as phivault_app
from phivault.settings import Environment, KeyProviderKind, Settings, load_settings

DEPLOY = Path(__file__).resolve().parents[2] / "docs" / "deploy"
EXAMPLE_TOML = DEPLOY / "phivault.toml"
KUBERNETES = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
NAMESPACE = "phi"


@pytest.fixture(autouse=True)
def _no_phivault_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("PHIVAULT_"):
            monkeypatch.delenv(name)


def _example() -> dict[str, Any]:
    with EXAMPLE_TOML.open("rb") as handle:
        return tomllib.load(handle)


# -- the example settings file --------------------------------------------------------------


def test_the_example_settings_load_as_production_in_the_scaled_shape(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The secrets the file leaves to the environment, as an operator's secret store sets them.
    monkeypatch.setenv("PHIVAULT_KEYS__PKCS11_PIN", "example-pin")
    monkeypatch.setenv("PHIVAULT_API__REDIS_URL", "rediss://phivault:example@redis.example:6379/0")

    settings = load_settings(EXAMPLE_TOML)

    assert settings.environment is Environment.PRODUCTION
    assert settings.shape.scaled
    assert settings.shape.keys is KeyProviderKind.PKCS11
    assert settings.keys.provider is KeyProviderKind.PKCS11
    assert settings.keys.pkcs11_pin is not None
    assert settings.keys.pkcs11_pin.get_secret_value() == "example-pin"
    assert settings.api.redis_url.startswith("rediss://phivault:")
    assert settings.ledger.stream_replicas == 3
    assert len(settings.ledger.nats_urls) == 3
    assert len(settings.records.replica_urls) == 3
    assert not settings.records.controls_off
    assert settings.identity.issuers, "production needs a real identity provider"
    # TOML cannot write None: the default table (no idle timeout for machine clients) stays.
    assert settings.identity.idle_timeout_s == Settings().identity.idle_timeout_s


def test_every_connection_in_the_example_is_tls() -> None:
    settings = load_settings(EXAMPLE_TOML)
    for url in (settings.records.store_url or "", *settings.records.replica_urls):
        assert "sslmode=verify-full" in url, "records URLs verify the server certificate"
    assert "sslmode=verify-full" in (settings.ledger.postgres_url or "")
    assert all(url.startswith("tls://") for url in settings.ledger.nats_urls)
    assert settings.api.redis_url.startswith("rediss://")
    assert (settings.api.public_url or "").startswith("https://")
    assert (settings.access.break_glass_webhook_url or "").startswith("https://")
    for issuer in settings.identity.issuers:
        assert issuer.issuer.startswith("https://")


def test_the_example_holds_no_secret() -> None:
    text = EXAMPLE_TOML.read_text(encoding="utf-8")
    urls = re.findall(r"[a-z+]+://[^\s\"']+", text)
    assert urls
    for url in urls:
        assert urlsplit(url).password is None, f"a password in an example URL: {url}"
    assert "password=" not in text
    settings = load_settings(EXAMPLE_TOML)
    assert settings.keys.pkcs11_pin is None, "the HSM PIN belongs in the environment"


# Values no two deployments share: the example must flag each as CHANGE ME in the comment
# just above it.
MUST_CHANGE = (
    ("shape", "keys"),
    ("records", "store_url"),
    ("records", "replica_urls"),
    ("ledger", "postgres_url"),
    ("ledger", "nats_urls"),
    ("identity", "issuers"),
    ("identity", "audience"),
    ("api", "public_url"),
    ("api", "redis_url"),
    ("access", "break_glass_webhook_url"),
    ("keys", "pkcs11_module"),
)


def test_every_value_an_operator_must_change_is_marked() -> None:
    section = ""
    comment: list[str] = []
    marked: dict[tuple[str, str], bool] = {}
    for raw in EXAMPLE_TOML.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("["):
            section, comment = line.strip("[]"), []
        elif line.startswith("#"):
            comment.append(line)
        elif "=" in line and not raw.startswith(" "):
            marked[(section, line.split("=", 1)[0].strip())] = "CHANGE ME" in " ".join(comment)
            comment = []
        elif not line:
            comment = []
    for key in MUST_CHANGE:
        assert marked.get(key), f"{'.'.join(key)} is not marked CHANGE ME"


def _sections() -> dict[str, type[BaseModel]]:
    sections: dict[str, type[BaseModel]] = {}
    for name, field in Settings.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            sections[name] = annotation
    return sections


# Settings an operator must never set: benchmark switches, and old spellings of [shape].
NOT_FOR_OPERATORS = {
    "records": {"bench_audit_off", "bench_encryption_off", "bench_policy_off"},
    "api": {"shared_state"},
    "keys": {"provider"},
}


def test_the_example_documents_every_setting() -> None:
    """A setting added to phivault.settings must be added to the example (set, or named in a
    comment with why it stays at its default)."""
    example = _example()
    comments = "\n".join(
        line for line in EXAMPLE_TOML.read_text(encoding="utf-8").splitlines() if "#" in line
    )
    missing = []
    for name in Settings.model_fields:
        if name not in _sections() and name not in example:
            missing.append(name)
    for section, model in _sections().items():
        written = example.get(section, {})
        for key in model.model_fields:
            if key in written:
                assert key not in NOT_FOR_OPERATORS.get(section, set()), f"{section}.{key}"
                continue
            if not re.search(rf"\b{re.escape(key)}\b", comments):
                missing.append(f"{section}.{key}")
    assert not missing, f"settings missing from docs/deploy/phivault.toml: {missing}"


# -- Kubernetes manifests -------------------------------------------------------------------


@functools.cache
def _parsed() -> tuple[tuple[str, dict[str, Any]], ...]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    docs = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        with path.open(encoding="utf-8") as handle:
            for doc in yaml.load_all(handle, Loader=loader):
                if doc is not None:
                    docs.append((path.name, doc))
    return tuple(docs)


def _documents() -> list[tuple[str, dict[str, Any]]]:
    """Every document, parsed once; copies, so that no test changes what another sees."""
    return copy.deepcopy(list(_parsed()))


def _kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in _documents() if doc["kind"] == kind]


WORKLOADS = ("Deployment", "StatefulSet", "Job", "DaemonSet", "CronJob")


def _pod_specs() -> list[tuple[str, dict[str, Any], dict[str, str]]]:
    """(workload name, pod spec, pod labels) of every workload in the manifests."""
    pods = []
    for _, doc in _documents():
        if doc["kind"] not in WORKLOADS:
            continue
        spec = doc["spec"]
        if doc["kind"] == "CronJob":
            spec = spec["jobTemplate"]["spec"]
        template = spec["template"]
        pods.append((doc["metadata"]["name"], template["spec"], template["metadata"]["labels"]))
    return pods


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def test_every_document_parses_and_is_well_formed() -> None:
    documents = _documents()
    assert len(documents) >= 20
    for name, doc in documents:
        assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], name
        assert isinstance(doc.get("kind"), str) and doc["kind"], name
        metadata = doc.get("metadata")
        assert isinstance(metadata, dict) and metadata.get("name"), f"{name}: {doc['kind']}"
        if doc["kind"] != "Namespace":
            assert metadata.get("namespace") == NAMESPACE, f"{name}: {metadata['name']}"
    namespace = _kind("Namespace")
    assert [n["metadata"]["name"] for n in namespace] == [NAMESPACE]
    labels = namespace[0]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_the_shapes_replicas() -> None:
    by_name = {doc["metadata"]["name"]: doc for _, doc in _documents() if doc["kind"] in WORKLOADS}
    assert by_name["phivault-sequencer"]["spec"]["replicas"] == 2  # one active, one standby
    assert by_name["nats"]["spec"]["replicas"] == 3
    assert by_name["phivault-api"]["spec"]["replicas"] >= 2
    (cluster,) = _kind("Cluster")
    assert cluster["apiVersion"].startswith("postgresql.cnpg.io/")
    assert cluster["spec"]["instances"] >= 3  # a primary and two streaming replicas
    assert cluster["spec"]["enableSuperuserAccess"] is False


def test_disruption_budgets_cover_the_api_the_sequencer_and_nats() -> None:
    budgets = {
        doc["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]: doc["spec"]
        for doc in _kind("PodDisruptionBudget")
    }
    assert budgets["phivault-api"]["minAvailable"] >= 1
    assert budgets["phivault-sequencer"]["minAvailable"] == 1
    assert budgets["nats"]["maxUnavailable"] == 1  # two of three keep the stream's quorum


def test_every_container_is_hardened() -> None:
    pods = _pod_specs()
    assert {labels["app.kubernetes.io/name"] for _, _, labels in pods} >= {
        "phivault-api", "phivault-sequencer", "phivault-schema", "nats", "redis",
    }  # fmt: skip
    for workload, pod, _ in pods:
        pod_context = pod.get("securityContext", {})
        assert pod.get("automountServiceAccountToken") is False, workload
        assert pod_context.get("seccompProfile", {}).get("type") == "RuntimeDefault", workload
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
        for container in _containers(pod):
            where = f"{workload}/{container['name']}"
            context = container.get("securityContext", {})
            non_root = context.get("runAsNonRoot", pod_context.get("runAsNonRoot"))
            assert non_root is True, f"{where} may run as root"
            user = context.get("runAsUser", pod_context.get("runAsUser"))
            assert user is None or user > 0, where
            assert context.get("readOnlyRootFilesystem") is True, where
            assert context.get("allowPrivilegeEscalation") is False, where
            assert context.get("privileged") is not True, where
            assert "ALL" in context.get("capabilities", {}).get("drop", []), where
            resources = container.get("resources", {})
            assert resources.get("requests", {}).get("cpu"), where
            assert resources.get("requests", {}).get("memory"), where
            assert resources.get("limits", {}).get("memory"), where
            image = container["image"]
            assert ":" in image and not image.endswith(":latest"), where


# The intended segments: who may open a connection to whom, on which port. "ns:X" is a peer
# outside namespace phi (the load balancer's namespace, monitoring, the database operator).
INGRESS = {
    "phivault-api": {("ns:ingress-nginx", 8443), ("ns:monitoring", 8443)},
    "phivault-sequencer": {("ns:monitoring", 9464)},
    "phivault-schema": set(),
    "phivault-pg": {
        ("phivault-api", 5432), ("phivault-sequencer", 5432), ("phivault-schema", 5432),
        ("phivault-pg", 5432), ("phivault-pg", 8000), ("ns:cnpg-system", 8000),
        ("ns:monitoring", 9187),
    },
    "nats": {
        ("phivault-api", 4222), ("phivault-sequencer", 4222), ("nats", 6222),
        ("ns:monitoring", 8222),
    },
    "redis": {("phivault-api", 6379)},
}  # fmt: skip
EGRESS_IN_NAMESPACE = {
    "phivault-api": {("phivault-pg", 5432), ("nats", 4222), ("redis", 6379)},
    "phivault-sequencer": {("phivault-pg", 5432), ("nats", 4222)},
    "phivault-schema": {("phivault-pg", 5432)},
    "phivault-pg": {("phivault-pg", 5432), ("phivault-pg", 8000)},
    "nats": {("nats", 6222)},
    "redis": set(),
}
# Only these reach addresses outside the cluster (ipBlocks): the identity provider, webhook
# and HSM or KMS for the API; the Kubernetes API and the backup store for PostgreSQL.
EGRESS_OUTSIDE = {"phivault-api", "phivault-pg"}
PHI_COMPONENTS = ("phivault-api", "phivault-sequencer", "phivault-pg", "nats", "redis")


def _components() -> dict[str, dict[str, str]]:
    """Component name -> the labels of its pods (CloudNativePG's pods by cluster name)."""
    components = {labels["app.kubernetes.io/name"]: labels for _, _, labels in _pod_specs()}
    for cluster in _kind("Cluster"):
        name = cluster["metadata"]["name"]
        components[name] = {"cnpg.io/cluster": name}
    return components


def _selected(selector: dict[str, Any]) -> set[str]:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are evaluated here"
    wanted = selector.get("matchLabels", {}).items()
    return {name for name, labels in _components().items() if wanted <= labels.items()}


def _peers(peers: list[dict[str, Any]]) -> set[str]:
    found: set[str] = set()
    for peer in peers:
        if "ipBlock" in peer:
            cidr = peer["ipBlock"]["cidr"]
            assert cidr not in ("0.0.0.0/0", "::/0"), "egress to anywhere"
            found.add(f"ip:{cidr}")
        elif "namespaceSelector" in peer:
            namespace = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            found.add(f"ns:{namespace}")
        else:
            found |= _selected(peer["podSelector"])
    return found


def _ports(rule: dict[str, Any]) -> set[int]:
    ports = rule.get("ports")
    assert ports, "every rule names its ports"
    return {int(port["port"]) for port in ports}


def _allowed(direction: str) -> dict[str, set[tuple[str, int]]]:
    allowed: dict[str, set[tuple[str, int]]] = {name: set() for name in _components()}
    key = "from" if direction == "ingress" else "to"
    for policy in _kind("NetworkPolicy"):
        spec = policy["spec"]
        for target in _selected(spec["podSelector"]):
            for rule in spec.get(direction, []):
                assert rule.get(key), f"{policy['metadata']['name']}: a rule open to anyone"
                for peer in _peers(rule[key]):
                    allowed[target] |= {(peer, port) for port in _ports(rule)}
    return allowed


def test_everything_in_the_phi_segment_is_denied_unless_allowed() -> None:
    defaults = [
        p
        for p in _kind("NetworkPolicy")
        if p["spec"]["podSelector"] == {}
        and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    assert defaults, "no default-deny NetworkPolicy (ingress and egress) in namespace phi"
    # Each PHI component has a policy of its own that says what it may do.
    for component in PHI_COMPONENTS:
        own = [
            p
            for p in _kind("NetworkPolicy")
            if p["spec"]["podSelector"] and component in _selected(p["spec"]["podSelector"])
        ]
        assert own, f"no NetworkPolicy selects {component}"
        assert all("Ingress" in p["spec"]["policyTypes"] for p in own), component


def test_the_network_policies_allow_exactly_the_intended_ingress() -> None:
    allowed = _allowed("ingress")
    assert allowed == INGRESS
    # Only the API is reachable from the load balancer; no datastore from outside the
    # namespace except by its operator and monitoring.
    outside = {t for t, peers in allowed.items() for p, _ in peers if p == "ns:ingress-nginx"}
    assert outside == {"phivault-api"}


def test_the_network_policies_allow_exactly_the_intended_egress() -> None:
    allowed = _allowed("egress")
    dns = {("ns:kube-system", 53)}
    for component, peers in allowed.items():
        inside = {(p, port) for p, port in peers - dns if not p.startswith("ip:")}
        assert inside == EGRESS_IN_NAMESPACE[component], component
        if any(p.startswith("ip:") for p, _ in peers):
            assert component in EGRESS_OUTSIDE, f"{component} reaches outside the cluster"
    api_outside = {port for p, port in allowed["phivault-api"] if p.startswith("ip:")}
    assert 443 in api_outside  # identity provider JWKS, alert webhook (HTTPS)


def _host(url: str) -> str:
    if "://" in url:
        return urlsplit(url).hostname or ""
    match = re.search(r"\bhost=(\S+)", url)
    assert match, url
    return match.group(1)


def test_the_example_settings_name_the_manifests_services() -> None:
    settings = load_settings(EXAMPLE_TOML)
    services = {doc["metadata"]["name"] for doc in _kind("Service")}
    (cluster,) = _kind("Cluster")
    primary = f"{cluster['metadata']['name']}-rw"  # the operator's read-write Service
    assert _host(settings.records.store_url or "").split(".")[0] == primary
    assert _host(settings.ledger.postgres_url or "").split(".")[0] == primary
    replicas = [_host(url).split(".")[0] for url in settings.records.replica_urls]
    assert set(replicas) <= services and len(replicas) == cluster["spec"]["instances"]
    assert _host(settings.api.redis_url).split(".")[0] in services
    (nats,) = [d for d in _kind("StatefulSet") if d["metadata"]["name"] == "nats"]
    pods = {f"nats-{i}" for i in range(nats["spec"]["replicas"])}
    for url in settings.ledger.nats_urls:
        pod, service = _host(url).split(".")[:2]
        assert pod in pods and service == nats["spec"]["serviceName"]


# -- systemd units ------------------------------------------------------------------------


def _unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value (a key may repeat), comments and continuations handled."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}: a setting outside a section"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


UNITS = ("phivault-api@.service", "phivault-sequencer.service")


@pytest.mark.parametrize("name", UNITS)
def test_the_systemd_units_are_hardened(name: str) -> None:
    service = _unit(SYSTEMD / name)["Service"]

    def one(key: str) -> str:
        assert key in service, f"{name}: no {key}="
        return service[key][-1]

    assert one("User") not in ("", "root", "0")
    assert one("NoNewPrivileges") == "yes"
    assert one("ProtectSystem") == "strict"
    assert one("ProtectHome") == "yes"
    assert one("PrivateTmp") == "yes"
    assert one("CapabilityBoundingSet") == ""
    assert one("RestrictSUIDSGID") == "yes"
    assert one("SystemCallArchitectures") == "native"
    assert one("UMask") == "0077"
    assert one("IPAddressDeny") == "any"
    assert "IPAddressAllow" in service
    assert one("Restart") in ("on-failure", "always")
    assert len(service["ExecStart"]) == 1


# -- phivault command lines -----------------------------------------------------------------


@dataclass(frozen=True)
class CommandLine:
    where: str
    argv: tuple[str, ...]


def _is_phivault(argv: list[str] | tuple[str, ...]) -> bool:
    return bool(argv) and Path(argv[0]).name == "phivault"


def _command_lines() -> Iterator[CommandLine]:
    for workload, pod, _ in _pod_specs():
        for container in _containers(pod):
            argv = [*container.get("command", []), *container.get("args", [])]
            where = f"{workload}/{container['name']}"
            if _is_phivault(argv):
                yield CommandLine(where, tuple(str(word) for word in argv))
    for name in UNITS:
        service = _unit(SYSTEMD / name)["Service"]
        for key in ("ExecStartPre", "ExecStart", "ExecStartPost", "ExecReload", "ExecStop"):
            for value in service.get(key, []):
                argv = shlex.split(value.lstrip("-@:+!"))
                if _is_phivault(argv):
                    yield CommandLine(f"{name} {key}", tuple(argv))


COMMAND_LINES = list(_command_lines())

# Parts of issue 7 that the examples use but that have not landed yet, as
# {(subcommand, ..., option): what}: a line using one is skipped while it is missing and checked
# like every other line once it exists. Nothing is pending now (`phivault sequencer` and
# `serve --config` have landed); the docs name what is still landing in prose only.
PENDING: dict[tuple[str, ...], str] = {}


@functools.cache
def _help(path: tuple[str, ...]) -> str:
    result = CliRunner().invoke(phivault_app, [*path, "--help"], terminal_width=200)
    assert result.exit_code == 0, f"phivault {' '.join(path)} --help failed:\n{result.output}"
    return result.output


def test_the_examples_run_the_api_and_the_sequencer() -> None:
    commands = [line.argv[1] for line in COMMAND_LINES]
    assert sorted(commands) == ["sequencer", "sequencer", "sequencer", "serve", "serve"]
    # The schema Job creates the ledger schema as its owner, with the sequencer's role named.
    (create,) = [line for line in COMMAND_LINES if "--create-schema" in line.argv]
    assert create.where == "phivault-schema/ledger-schema"
    assert create.argv[create.argv.index("--app-role") + 1] == "phivault_sequencer"


def _check_phivault_command(line: CommandLine) -> list[str]:
    """Fail unless every subcommand and option of ``line`` exists; return the pending ones
    (PENDING) it uses instead of failing on them."""
    command: Any = get_command(phivault_app)
    path: list[str] = []
    words = list(line.argv[1:])
    # Typer's groups (its own vendored click) hold their subcommands in .commands.
    while hasattr(command, "commands") and words and not words[0].startswith("-"):
        sub = command.commands.get(words[0])
        if sub is None:
            key = (*path, words[0])
            if key in PENDING:
                return [PENDING[key]]
            pytest.fail(f"{line.where}: `phivault {' '.join(key)}` does not exist")
        path.append(words.pop(0))
        command = sub
    if not path and words == ["--help"]:
        return []
    assert path, f"{line.where}: no subcommand"
    help_text = _help(tuple(path))
    known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    pending = []
    for word in words:
        if not word.startswith("--"):
            continue
        option = word.split("=", 1)[0]
        if option in known:
            assert option in help_text, f"{option} is hidden from `phivault {path[0]} --help`"
        elif (*path, option) in PENDING:
            pending.append(PENDING[(*path, option)])
        else:
            pytest.fail(f"{line.where}: `phivault {' '.join(path)}` has no option {option}")
    return pending


@pytest.mark.parametrize("line", COMMAND_LINES, ids=lambda line: line.where)
def test_every_phivault_command_line_uses_what_exists(line: CommandLine) -> None:
    pending = _check_phivault_command(line)
    if pending:
        pytest.skip(f"not landed yet: {', '.join(pending)}")


def _readme_commands() -> Iterator[CommandLine]:
    """`phivault ...` in the README's code spans and shell blocks (not placeholders)."""
    text = (DEPLOY / "README.md").read_text(encoding="utf-8")
    spans = re.findall(r"`(phivault [^`]+)`", text)
    spans += re.findall(r"^\s*(phivault .+)$", text, flags=re.MULTILINE)
    for span in spans:
        if "<" in span or "/" in span.split(" --")[0]:
            continue  # `phivault <command> --help`, `phivault ledger verify/export`
        yield CommandLine(f"README: {span}", tuple(shlex.split(span)))


def test_the_readme_names_only_commands_that_exist() -> None:
    lines = list(_readme_commands())
    assert len(lines) >= 10
    pending = {p for line in lines for p in _check_phivault_command(line)}
    assert pending <= set(PENDING.values())


def _inline_python() -> Iterator[tuple[str, str]]:
    for workload, pod, _ in _pod_specs():
        for container in _containers(pod):
            argv = [*container.get("command", []), *container.get("args", [])]
            if argv[:2] == ["python", "-c"]:
                yield f"{workload}/{container['name']}", argv[2]


def test_inline_python_calls_what_exists_with_keywords_it_takes() -> None:
    snippets = list(_inline_python())
    assert {where for where, _ in snippets} == {"phivault-schema/records-migrations"}
    for where, code in snippets:
        tree = ast.parse(code)
        names: dict[str, Any] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{where}: {node.module}.{alias.name}"
                    names[alias.asname or alias.name] = getattr(module, alias.name)
        calls = [
            node
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in names
        ]
        assert calls, where
        for call in calls:
            target = names[call.func.id]  # type: ignore[attr-defined]
            args = [object()] * len(call.args)
            kwargs = {keyword.arg: object() for keyword in call.keywords if keyword.arg}
            inspect.signature(target).bind(*args, **kwargs)  # TypeError if they do not fit


def test_the_image_runs_as_the_user_the_manifests_expect() -> None:
    text = (DEPLOY / "Containerfile").read_text(encoding="utf-8")
    (user,) = re.findall(r"^USER (\d+):(\d+)$", text, flags=re.MULTILINE)
    assert int(user[0]) > 0
    phivault_pods = [
        pod
        for _, pod, labels in _pod_specs()
        if labels["app.kubernetes.io/name"].startswith("phivault")
    ]
    assert phivault_pods
    for pod in phivault_pods:
        assert pod["securityContext"]["runAsUser"] == int(user[0])
        assert pod["securityContext"]["runAsGroup"] == int(user[1])
    # The manifests' `python -c` and `phivault` resolve through the image's PATH.
    assert "ENV PATH=/opt/phivault/bin:$PATH" in text


def test_the_metrics_the_readme_names_are_exported(tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from phivault.api.observability import Metrics
    from phivault.api.worker_metrics import WorkerMetrics
    from phivault.ledger.sequencer import SequencerCollector, SequencerProgress
    from phivault.resilience import Breakers

    metrics = Metrics()
    metrics.registry.register(Breakers())
    metrics.registry.register(SequencerCollector(SequencerProgress()))
    # What one worker of several answers (every worker's series, plus their ages).
    across_workers = WorkerMetrics(tmp_path, 0, metrics.render_own).render()
    exported: set[str] = set()
    for family in text_string_to_metric_families(across_workers.decode()):
        exported.add(family.name)
        if family.type == "counter":
            exported.add(f"{family.name}_total")
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    checklist = readme.split("## Operations checklist", 1)[1].split("\nRoutine:", 1)[0]
    named = set(re.findall(r"`(phivault_[a-z_]+)`", checklist))
    assert len(named) >= 10
    assert named <= exported, f"not exported: {sorted(named - exported)}"


# -- the database roles, for real -----------------------------------------------------------

ROLES = ("phivault_owner", "phivault_ledger_owner", "phivault_api", "phivault_sequencer")


def _renamed(sql_text: str, suffix: str, database: str) -> str:
    """The manifest's SQL with this test's own role and database names (roles are global)."""
    sql_text = re.sub(
        r"\b(phivault_(?:owner|ledger_owner|api|sequencer))\b", rf"\1_{suffix}", sql_text
    )
    return re.sub(r"\bDATABASE phivault\b", f"DATABASE {database}", sql_text)


def test_the_database_roles_and_grants_work_as_documented(postgres: str) -> None:
    """CloudNativePG's bootstrap as 20-postgres.yaml declares it (owner and database, the
    postInitApplicationSQL, then the managed roles' login), the schema Job's two steps as
    their owners, `phivault init`'s keystore as the owner; then each run-time role can do
    what it needs and nothing more."""
    import secrets

    import psycopg

    from phivault.crypto.keystore_postgres import PostgresKeyStore
    from phivault.ledger.postgres_store import PostgresLedgerStore
    from phivault.records.store import SqlRecordStore

    (cluster,) = _kind("Cluster")
    bootstrap = cluster["spec"]["bootstrap"]["initdb"]
    suffix = secrets.token_hex(4)
    database = f"deploy_{suffix}"
    role = {name: f"{name}_{suffix}" for name in ROLES}
    host = "host=127.0.0.1 port=5432"

    def conninfo(name: str) -> str:
        return f"{host} dbname={database} user={role[name]}"

    def url(name: str) -> str:
        return f"postgresql+psycopg://{role[name]}@127.0.0.1:5432/{database}"

    with psycopg.connect(postgres, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role[bootstrap['owner']]} LOGIN")
        admin.execute(f"CREATE DATABASE {database} OWNER {role[bootstrap['owner']]}")
    try:
        with psycopg.connect(f"{host} dbname={database} user=postgres", autocommit=True) as su:
            for statement in bootstrap["postInitApplicationSQL"]:
                su.execute(_renamed(statement, suffix, database))
            for managed in cluster["spec"]["managed"]["roles"]:
                su.execute(f"ALTER ROLE {role[managed['name']]} LOGIN")

        # The schema Job: the ledger as its owner (the Job's own command line), then records.
        (job,) = [line for line in COMMAND_LINES if "--create-schema" in line.argv]
        argv = [word for word in job.argv[1:] if word != "--config"]
        argv = [word for word in argv if not word.endswith(".toml")]
        argv[argv.index("--app-role") + 1] = role["phivault_sequencer"]
        result = CliRunner().invoke(
            phivault_app,
            [*argv, "--ledger-postgres", conninfo("phivault_ledger_owner")],
        )
        assert result.exit_code == 0, result.output
        SqlRecordStore(url("phivault_owner"), schema="phivault_records").close()
        # `phivault init --config` makes the keystore tables as the owner.
        PostgresKeyStore(url("phivault_owner"), schema="phivault_keys", create=True).close()

        # Run time: workers open the records store (a migration to head is a no-op), the
        # keystore and the ledger read-only; the sequencer opens the ledger for writing,
        # strictly (a role that could change history is refused).
        SqlRecordStore(url("phivault_api"), schema="phivault_records").close()
        PostgresKeyStore(url("phivault_api"), schema="phivault_keys", create=False).close()
        PostgresLedgerStore(conninfo("phivault_api"), writable=False).close()
        PostgresLedgerStore(conninfo("phivault_sequencer"), writable=True, strict_role=True).close()

        with psycopg.connect(f"{host} dbname={database} user=postgres") as su:

            def privileges(name: str, schema: str) -> dict[str, set[str]]:
                rows = su.execute(
                    "SELECT c.relname, p.privilege FROM pg_class c"
                    " JOIN pg_namespace n ON n.oid = c.relnamespace,"
                    " unnest(ARRAY['SELECT','INSERT','UPDATE','DELETE','TRUNCATE']) p(privilege)"
                    " WHERE n.nspname = %s AND c.relkind = 'r'"
                    " AND has_table_privilege(%s, c.oid, p.privilege)",
                    (schema, role[name]),
                ).fetchall()
                found: dict[str, set[str]] = {}
                for table, privilege in rows:
                    found.setdefault(table, set()).add(privilege)
                return found

            expected = {
                "phivault_records": {"SELECT", "INSERT", "UPDATE", "DELETE"},
                # keys are destroyed by UPDATE: nothing is ever deleted from the keystore
                "phivault_keys": {"SELECT", "INSERT", "UPDATE"},
            }
            for schema, wanted in expected.items():
                tables = su.execute(
                    "SELECT count(*) FROM pg_tables WHERE schemaname = %s", (schema,)
                ).fetchone()
                assert tables is not None and tables[0] > 0, schema
                api = privileges("phivault_api", schema)
                assert len(api) == tables[0] and all(p == wanted for p in api.values()), schema
                assert not privileges("phivault_sequencer", schema), schema
            ledger_api = privileges("phivault_api", "phivault_ledger")
            ledger_seq = privileges("phivault_sequencer", "phivault_ledger")
            assert set(ledger_seq) >= {"leaves", "checkpoints", "stream_cursor"}
            assert all(p == {"SELECT"} for p in ledger_api.values()) and ledger_api
            assert all(p == {"SELECT", "INSERT"} for p in ledger_seq.values())
            created = su.execute(
                "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'phivault%%'"
                " AND has_schema_privilege(%s, oid, 'CREATE')",
                (role["phivault_api"],),
            ).fetchone()
            assert created == (0,), "the API role can create objects"
    finally:
        with psycopg.connect(postgres, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
            for name in ROLES:
                admin.execute(f"DROP ROLE IF EXISTS {role[name]}")

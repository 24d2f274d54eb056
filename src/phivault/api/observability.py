"""Logs and metrics of the front door, built per application (no global registries or loggers).

Logs are structlog JSON lines, every one passed through the PHI
:class:`~phivault.privacy.scrub.Scrubber` before rendering. Metrics are Prometheus, in a
registry owned by the app, labelled only by method, *route template* (``/fhir/Patient/{id}``,
never the raw path, which may hold a patient id), status and reason codes.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, MutableMapping
from typing import Any, TextIO

import orjson
import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from phivault.privacy.scrub import Scrubber

__all__ = ["Metrics", "make_logger"]


def _timestamp(
    logger: object, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    event_dict["ts"] = round(time.time(), 3)
    event_dict["level"] = method_name
    return event_dict


# Dataclasses and times go to ``repr`` as structlog's own renderer sends them.
_JSON_OPTIONS = (
    orjson.OPT_SORT_KEYS
    | orjson.OPT_NON_STR_KEYS
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
)


def _render(logger: object, method_name: str, event_dict: MutableMapping[str, Any]) -> str:
    # orjson, not the json module: a line per request, and this was most of its cost. Values
    # it cannot encode are written as their repr, as structlog's own renderer does.
    try:
        return orjson.dumps(event_dict, default=repr, option=_JSON_OPTIONS).decode()
    except orjson.JSONEncodeError:  # e.g. an integer beyond 64 bits
        return json.dumps(event_dict, default=repr, sort_keys=True)


def make_logger(scrubber: Scrubber, stream: TextIO | None = None) -> Any:
    """A JSON-lines logger whose every event passes through ``scrubber``."""
    return structlog.wrap_logger(
        structlog.WriteLogger(stream or sys.stderr),
        processors=[_timestamp, scrubber, _render],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        cache_logger_on_first_use=True,
    )


class Metrics:
    """The front door's Prometheus metrics, in the app's own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._across_workers: Callable[[], bytes] | None = None
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self.requests = Counter(
            "phivault_http_requests",
            "HTTP requests by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "phivault_http_request_duration_seconds",
            "HTTP request latency by route template.",
            ["route"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.auth_failures = Counter(
            "phivault_auth_failures",
            "Refused authentications by reason code.",
            ["reason"],
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "phivault_rate_limited",
            "Requests refused by a rate limit, by limit.",
            ["limit"],
            registry=self.registry,
        )

    def children(self, method: str, route: str, status: int) -> tuple[Counter, Histogram]:
        """The request counter and latency histogram of one label set. Looking a child up by
        its labels costs more than using it; the label sets are few (bounded methods, route
        templates and statuses), so each pair is kept."""
        key = (method, route, status)
        pair = self._children.get(key)
        if pair is None:
            pair = (
                self.requests.labels(method, route, str(status)),
                self.latency.labels(route),
            )
            self._children[key] = pair
        return pair

    def render(self) -> bytes:
        """What ``/metrics`` answers: this app's registry, or every worker's when the app is
        one worker of several (:mod:`phivault.api.worker_metrics`)."""
        if self._across_workers is not None:
            return self._across_workers()
        return self.render_own()

    def render_own(self) -> bytes:
        return generate_latest(self.registry)

    def render_across_workers(self, render: Callable[[], bytes]) -> None:
        self._across_workers = render

"""Logs and metrics of the front door, built per application (no global registries or loggers).

Logs are structlog JSON lines, every one passed through the PHI
:class:`~phivault.privacy.scrub.Scrubber` before rendering. Metrics are Prometheus, in a
registry owned by the app, labelled only by method, *route template* (``/fhir/Patient/{id}``,
never the raw path, which may hold a patient id), status and reason codes.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import MutableMapping
from typing import Any, TextIO

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


def make_logger(scrubber: Scrubber, stream: TextIO | None = None) -> Any:
    """A JSON-lines logger whose every event passes through ``scrubber``."""
    return structlog.wrap_logger(
        structlog.WriteLogger(stream or sys.stderr),
        processors=[_timestamp, scrubber, structlog.processors.JSONRenderer(sort_keys=True)],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        cache_logger_on_first_use=True,
    )


class Metrics:
    """The front door's Prometheus metrics, in the app's own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
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

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""Break-glass: emergency access to one patient, stated, time-boxed, alerted and reviewed.

A caller whose role may break the glass (``break_glass = true`` in the policy: clinicians)
asks for access to a patient they have no care relationship with, with a coded reason from a
small closed vocabulary (:class:`BreakGlassReason`) and a free-text justification. The grant
lasts ``access.break_glass_minutes`` (default 60) **on the server's clock**: the token's own
lifetime plays no part, so a grant stops working at expiry even if the token is still valid.

Every change is a ledger event (kind ``break-glass``) recorded **before** the state changes:
``grant``, ``revoke``, ``review``; a failed write of the grant after its event is recorded as a
second, failed ``grant`` event, so the ledger never claims silently what the store does not hold.
Looking at a justification (``read``) and at the queue (``queue``) are recorded too: the queue
says which patient was seen by whom.

The justification may hold PHI: it is never logged, never put in an audit event or alert, and is
stored sealed under the patient's data key (AES-256-GCM bound to tenant, patient and
``break-glass/<grant>/reason``), so shredding the patient's key destroys it with the rest of
the record. Only the coded reason is kept in clear. The review note is sealed the same way.

Review: grants not yet reviewed are ``unreviewed``; those older than
``access.break_glass_overdue_hours`` are ``overdue`` (still in the unreviewed queue); a privacy
officer's review (``appropriate`` / ``inappropriate``) makes them ``reviewed``.

Pure parts take ``now`` (seconds since the epoch) as an argument; :class:`BreakGlassService`
reads the injected clock once per operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Protocol

from phivault.access.decision import BreakGlassGrant, CompiledPolicy
from phivault.crypto.elements import ElementRef, PatientCipher
from phivault.crypto.errors import DecryptionFailed, KeyUnavailable
from phivault.errors import InvalidInput, PhivaultError
from phivault.identity.principal import Role
from phivault.ledger.events import (
    Action,
    AuditEvent,
    Entity,
    EntityRole,
    EntityType,
    EventKind,
    Outcome,
)

__all__ = [
    "DECISION_LOOKBACK_S",
    "JUSTIFICATION_MAX_CHARS",
    "REASON_SYSTEM",
    "AlertPublisher",
    "BreakGlassReason",
    "BreakGlassService",
    "GrantConflict",
    "GrantNotFound",
    "GrantRecord",
    "GrantStore",
    "GrantView",
    "NotPermitted",
    "PatientCiphers",
    "PatientNotFound",
    "ReviewOutcome",
    "ReviewStatus",
    "SelfReview",
    "Trail",
    "can_break_glass",
    "justification_ref",
    "new_grant_id",
    "parse_reason",
    "review_status",
]

#: The code system of :class:`BreakGlassReason` (``Coding.system`` in the FHIR operation).
REASON_SYSTEM = "https://phivault.dev/fhir/CodeSystem/break-glass-reason"
#: The longest justification accepted (characters).
JUSTIFICATION_MAX_CHARS = 2000
#: Grants that ended this recently still reach decisions (they widen nothing, but a refusal
#: then says ``break-glass-expired`` instead of ``no-relationship``).
DECISION_LOOKBACK_S = 3600.0


class BreakGlassReason(StrEnum):
    """Why the glass was broken: a closed vocabulary (the free text says the rest)."""

    EMERGENCY_TREATMENT = "emergency-treatment"  # immediate treatment of an emergency
    URGENT_CONSULT = "urgent-consult"  # an urgent consultation asked for by the treating team
    COVERING_CLINICIAN = "covering-clinician"  # covering for the patient's own clinician
    RELATIONSHIP_PENDING = "relationship-pending"  # care started, not yet recorded


class ReviewOutcome(StrEnum):
    APPROPRIATE = "appropriate"
    INAPPROPRIATE = "inappropriate"


class ReviewStatus(StrEnum):
    """Where a grant stands in the review queue."""

    UNREVIEWED = "unreviewed"
    OVERDUE = "overdue"  # unreviewed for longer than the configured age
    REVIEWED = "reviewed"


class GrantNotFound(PhivaultError):
    """No such grant in the caller's tenant (or not one the caller may see): a 404."""


class PatientNotFound(PhivaultError):
    """The patient does not exist (or was deleted) in the caller's tenant: a 404."""


class GrantConflict(PhivaultError):
    """The grant was already revoked or reviewed: a 409."""


class NotPermitted(PhivaultError):
    """No role of the caller may break the glass: a 403."""


class SelfReview(PhivaultError):
    """A reviewer may not review their own grant (separation of duties): a 403."""


@dataclass(frozen=True, slots=True)
class GrantRecord:
    """A grant as stored. Times are seconds since the epoch; sealed fields are ciphertext."""

    tenant: str
    grant_id: str
    subject: str
    patient: str
    reason: BreakGlassReason
    created_at: float
    starts_at: float
    expires_at: float
    justification: bytes | None = field(default=None, repr=False)
    revoked_at: float | None = None
    revoked_by: str | None = None
    reviewed_at: float | None = None
    reviewed_by: str | None = None
    review_outcome: ReviewOutcome | None = None
    review_note: bytes | None = field(default=None, repr=False)

    def grant(self) -> BreakGlassGrant:
        """What access decisions see."""
        return BreakGlassGrant(
            grant_id=self.grant_id,
            tenant=self.tenant,
            subject=self.subject,
            patient=self.patient,
            starts_at=self.starts_at,
            expires_at=self.expires_at,
            revoked=self.revoked_at is not None,
        )

    def state(self, now: float) -> str:
        """``active``, ``expired`` or ``revoked`` at ``now``."""
        if self.revoked_at is not None:
            return "revoked"
        return "active" if self.grant().active(now) else "expired"


@dataclass(frozen=True, slots=True)
class GrantView:
    """A grant for an answer: the record, its standing at ``now``, and (for reviewers who
    asked, after the look was recorded) the opened justification and note."""

    record: GrantRecord
    state: str
    status: ReviewStatus
    justification: str | None = field(default=None, repr=False)
    review_note: str | None = field(default=None, repr=False)
    # The sealed text exists but cannot be opened (the patient's key was shredded, or the data
    # key it was sealed under has been retired).
    unreadable: bool = False


def review_status(record: GrantRecord, now: float, overdue_s: float) -> ReviewStatus:
    """Pure: reviewed, overdue (unreviewed for ``overdue_s`` or more), or unreviewed."""
    if record.reviewed_at is not None:
        return ReviewStatus.REVIEWED
    if now - record.created_at >= overdue_s:
        return ReviewStatus.OVERDUE
    return ReviewStatus.UNREVIEWED


def new_grant_id() -> str:
    """An opaque, unguessable grant id (fits the ledger's id grammar and a FHIR id)."""
    return f"bg-{secrets.token_hex(16)}"


def can_break_glass(policy: CompiledPolicy, roles: frozenset[Role]) -> bool:
    """Whether one of ``roles`` may use break-glass grants (``break_glass = true``)."""
    return any((body := policy.roles.get(role)) is not None and body.break_glass for role in roles)


# --- ports ------------------------------------------------------------------------------


class GrantStore(Protocol):
    """Where grants live (:class:`phivault.access.grant_store.SqlGrantStore`). Synchronous:
    the service runs it in a worker thread. Raises ``StoreUnavailable`` subclasses."""

    def patient_exists(self, tenant: str, patient: str) -> bool: ...

    def insert(self, record: GrantRecord) -> None: ...

    def get(self, tenant: str, grant_id: str) -> GrantRecord | None: ...

    def for_subject(
        self, tenant: str, subject: str, *, ending_after: float
    ) -> list[GrantRecord]: ...

    def listing(self, tenant: str, *, reviewed: bool | None, limit: int) -> list[GrantRecord]: ...

    def mark_revoked(self, tenant: str, grant_id: str, *, at: float, by: str) -> bool: ...

    def mark_reviewed(
        self,
        tenant: str,
        grant_id: str,
        *,
        at: float,
        by: str,
        outcome: ReviewOutcome,
        note: bytes | None,
    ) -> bool: ...


class PatientCiphers(Protocol):
    """The key ring's face the service needs (:class:`phivault.crypto.keyring.KeyRing`)."""

    async def patient_cipher(
        self, tenant: str, patient: str, *, create: bool = False
    ) -> PatientCipher: ...


class Trail(Protocol):
    """Builds and records the request's audit events (``phivault.api.context.AuditContext``)."""

    def event(
        self,
        *,
        kind: EventKind,
        subtype: str,
        action: Action,
        outcome: Outcome = Outcome.SUCCESS,
        outcome_reason: str | None = None,
        patient: str | None = None,
        entities: tuple[Entity, ...] = (),
        purpose_of_use: tuple[str, ...] | None = None,
        break_glass_grant: str | None = None,
    ) -> AuditEvent: ...

    async def record(self, event: AuditEvent) -> int: ...


class AlertPublisher(Protocol):
    """Where grant alerts go (:mod:`phivault.access.alerts`): must never block or fail."""

    def grant_made(self, record: GrantRecord) -> None: ...

    def grant_revoked(self, record: GrantRecord) -> None: ...


class _NoAlerts:
    def grant_made(self, record: GrantRecord) -> None:
        return None

    def grant_revoked(self, record: GrantRecord) -> None:
        return None


# --- the service ------------------------------------------------------------------------


def _grant_entity(grant_id: str, *labels: str) -> Entity:
    # The grant as a security resource ("Basic/<id>"), its codes as labels: never free text.
    return Entity(
        what=f"Basic/{grant_id}",
        type=EntityType.SYSTEM_OBJECT,
        role=EntityRole.SECURITY_RESOURCE,
        security_labels=("BTG", *labels),
    )


def justification_ref(tenant: str, patient: str, grant_id: str, what: str) -> ElementRef:
    """The context a grant's sealed text (``reason`` or ``review-note``) is bound to: the
    service seals under it, and DEK rotation (grant_store) must re-seal under the same."""
    return ElementRef(tenant, "Patient", patient, f"break-glass/{grant_id}/{what}")


def _clean_text(text: str, name: str) -> str:
    stripped = text.strip()
    if not stripped:
        raise InvalidInput(f"the {name} is empty", path=name)
    if len(stripped) > JUSTIFICATION_MAX_CHARS:
        raise InvalidInput(
            f"the {name} is longer than {JUSTIFICATION_MAX_CHARS} characters", path=name
        )
    return stripped


class BreakGlassService:
    """Requests, revocations, reviews and the per-request grant look-up.

    ``clock`` is the server's clock (seconds since the epoch); ``duration_s`` and
    ``overdue_s`` come from ``settings.access``. Everything it keeps is in the store: any
    number of workers may share one database.
    """

    def __init__(
        self,
        store: GrantStore,
        ciphers: PatientCiphers,
        policy: CompiledPolicy,
        *,
        clock: Callable[[], float],
        duration_s: float = 3600.0,
        overdue_s: float = 24 * 3600.0,
        alerts: AlertPublisher | None = None,
    ) -> None:
        if duration_s <= 0 or overdue_s <= 0:
            raise ValueError("break-glass durations must be positive")
        self._store = store
        self._ciphers = ciphers
        self.policy = policy
        self._clock = clock
        self.duration_s = duration_s
        self.overdue_s = overdue_s
        self._alerts: AlertPublisher = alerts or _NoAlerts()

    # per request -------------------------------------------------------------------------

    async def active_grants(
        self, tenant: str, subject: str, *, roles: frozenset[Role] | None = None
    ) -> tuple[BreakGlassGrant, ...]:
        """The grants a decision for this caller needs: those active now on the server's
        clock, and those that ended within :data:`DECISION_LOOKBACK_S` (``decide`` checks each
        against ``now``, so these widen nothing; they make a refusal precise). Given the
        caller's ``roles``, none is looked up for a caller who cannot use grants anyway."""
        if roles is not None and not can_break_glass(self.policy, roles):
            return ()
        ending_after = self._clock() - DECISION_LOOKBACK_S
        found = await asyncio.to_thread(
            self._store.for_subject, tenant, subject, ending_after=ending_after
        )
        return tuple(record.grant() for record in found)

    # the grant ---------------------------------------------------------------------------

    async def request(
        self,
        trail: Trail,
        *,
        tenant: str,
        subject: str,
        roles: frozenset[Role],
        patient: str,
        reason: BreakGlassReason,
        justification: str,
    ) -> GrantRecord:
        """Grant ``subject`` emergency access to ``patient`` for ``duration_s`` from now.

        A role of the caller must allow break-glass (:func:`can_break_glass`, else
        :class:`NotPermitted`) and the patient must exist in ``tenant`` (else
        :class:`PatientNotFound`); both refusals are recorded.
        """
        text = _clean_text(justification, "justification")
        patient_ref = f"Patient/{patient}"
        grant_id = new_grant_id()
        if not can_break_glass(self.policy, roles):
            await self.refuse(trail, subtype="grant", reason="role-not-permitted", patient=patient)
            raise NotPermitted("no role of the caller may break the glass")
        if not await asyncio.to_thread(self._store.patient_exists, tenant, patient):
            await trail.record(
                trail.event(
                    kind=EventKind.BREAK_GLASS,
                    subtype="grant",
                    action=Action.EXECUTE,
                    outcome=Outcome.MINOR_FAILURE,
                    outcome_reason="patient-not-found",
                    patient=patient_ref,
                    purpose_of_use=("ETREAT",),
                )
            )
            raise PatientNotFound("no such patient in this tenant")
        now = self._clock()
        cipher = await self._ciphers.patient_cipher(tenant, patient, create=True)
        sealed = cipher.seal(justification_ref(tenant, patient, grant_id, "reason"), text.encode())
        record = GrantRecord(
            tenant=tenant,
            grant_id=grant_id,
            subject=subject,
            patient=patient,
            reason=reason,
            created_at=now,
            starts_at=now,
            expires_at=now + self.duration_s,
            justification=sealed,
        )
        # The event first: no grant exists that the ledger does not know about.
        await trail.record(
            trail.event(
                kind=EventKind.BREAK_GLASS,
                subtype="grant",
                action=Action.EXECUTE,
                patient=patient_ref,
                entities=(_grant_entity(grant_id, reason.value),),
                purpose_of_use=("ETREAT",),
                break_glass_grant=grant_id,
            )
        )
        try:
            await asyncio.to_thread(self._store.insert, record)
        except Exception:
            await self._record_not_stored(trail, "grant", patient_ref, grant_id)
            raise
        self._alerts.grant_made(record)
        return record

    async def refuse(
        self, trail: Trail, *, subtype: str, reason: str, patient: str | None = None
    ) -> None:
        """Record a refused break-glass request, revocation, review or queue look (a role
        that may not do it, say): attempts are evidence too."""
        await trail.record(
            trail.event(
                kind=EventKind.BREAK_GLASS,
                subtype=subtype,
                action=Action.EXECUTE,
                outcome=Outcome.MINOR_FAILURE,
                outcome_reason=reason,
                patient=None if patient is None else f"Patient/{patient}",
            )
        )

    # revocation --------------------------------------------------------------------------

    async def revoke(
        self,
        trail: Trail,
        *,
        tenant: str,
        grant_id: str,
        by: str,
        patient: str | None = None,
        any_subject: bool = False,
    ) -> GrantRecord:
        """End a grant now. The grantee may end their own; ``any_subject`` (privacy officers)
        any grant of the tenant. ``patient``, when given, must be the grant's patient."""
        record = await self._find(tenant, grant_id)
        if (not any_subject and record.subject != by) or (
            patient is not None and record.patient != patient
        ):
            raise GrantNotFound("no such break-glass grant")
        if record.revoked_at is not None:
            raise GrantConflict("the grant was already revoked")
        await trail.record(
            trail.event(
                kind=EventKind.BREAK_GLASS,
                subtype="revoke",
                action=Action.UPDATE,
                patient=f"Patient/{record.patient}",
                entities=(_grant_entity(grant_id),),
                purpose_of_use=None,
                break_glass_grant=grant_id,
            )
        )
        now = self._clock()
        try:
            changed = await asyncio.to_thread(
                self._store.mark_revoked, tenant, grant_id, at=now, by=by
            )
        except Exception:
            await self._record_not_stored(trail, "revoke", f"Patient/{record.patient}", grant_id)
            raise
        if not changed:
            raise GrantConflict("the grant was already revoked")
        revoked = replace(record, revoked_at=now, revoked_by=by)
        self._alerts.grant_revoked(revoked)
        return revoked

    # review ------------------------------------------------------------------------------

    async def queue(
        self, trail: Trail, *, tenant: str, status: str, limit: int = 500
    ) -> list[GrantView]:
        """The review queue: ``unreviewed`` (overdue included), ``overdue``, ``reviewed`` or
        ``all``, newest first. Recorded first: it says which patient was seen by whom."""
        if status not in ("unreviewed", "overdue", "reviewed", "all"):
            raise InvalidInput("status is one of unreviewed, overdue, reviewed, all", path="status")
        await trail.record(
            trail.event(
                kind=EventKind.BREAK_GLASS,
                subtype="queue",
                action=Action.READ,
            )
        )
        reviewed = {"unreviewed": False, "overdue": False, "reviewed": True}.get(status)
        found = await asyncio.to_thread(self._store.listing, tenant, reviewed=reviewed, limit=limit)
        now = self._clock()
        views = [self._view(record, now) for record in found]
        if status == "overdue":
            views = [view for view in views if view.status is ReviewStatus.OVERDUE]
        return views

    async def detail(self, trail: Trail, *, tenant: str, grant_id: str) -> GrantView:
        """One grant with its opened justification and note, for a reviewer: the look is
        recorded (kind break-glass, subtype read) before anything is opened."""
        record = await self._find(tenant, grant_id)
        await trail.record(
            trail.event(
                kind=EventKind.BREAK_GLASS,
                subtype="read",
                action=Action.READ,
                patient=f"Patient/{record.patient}",
                entities=(_grant_entity(grant_id),),
                break_glass_grant=grant_id,
            )
        )
        return await self._opened(record)

    async def review(
        self,
        trail: Trail,
        *,
        tenant: str,
        grant_id: str,
        by: str,
        outcome: ReviewOutcome,
        note: str | None = None,
    ) -> GrantView:
        """A privacy officer's review: recorded first, then stored; once per grant, and never
        by the grantee (someone holding both roles may not clear their own emergency access)."""
        record = await self._find(tenant, grant_id)
        if record.subject == by:
            await self.refuse(trail, subtype="review", reason="self-review", patient=record.patient)
            raise SelfReview("a grant is reviewed by someone other than its holder")
        if record.reviewed_at is not None:
            raise GrantConflict("the grant was already reviewed")
        sealed_note: bytes | None = None
        if note is not None:
            text = _clean_text(note, "note")
            cipher = await self._ciphers.patient_cipher(tenant, record.patient, create=True)
            sealed_note = cipher.seal(
                justification_ref(tenant, record.patient, grant_id, "review-note"),
                text.encode(),
            )
        await trail.record(
            trail.event(
                kind=EventKind.BREAK_GLASS,
                subtype="review",
                action=Action.UPDATE,
                patient=f"Patient/{record.patient}",
                entities=(_grant_entity(grant_id, outcome.value),),
                break_glass_grant=grant_id,
            )
        )
        now = self._clock()
        try:
            changed = await asyncio.to_thread(
                self._store.mark_reviewed,
                tenant,
                grant_id,
                at=now,
                by=by,
                outcome=outcome,
                note=sealed_note,
            )
        except Exception:
            await self._record_not_stored(trail, "review", f"Patient/{record.patient}", grant_id)
            raise
        if not changed:
            raise GrantConflict("the grant was already reviewed")
        reviewed = replace(
            record,
            reviewed_at=now,
            reviewed_by=by,
            review_outcome=outcome,
            review_note=sealed_note,
        )
        return await self._opened(reviewed)

    # helpers -----------------------------------------------------------------------------

    async def _find(self, tenant: str, grant_id: str) -> GrantRecord:
        record = await asyncio.to_thread(self._store.get, tenant, grant_id)
        if record is None:
            raise GrantNotFound("no such break-glass grant")
        return record

    def _view(self, record: GrantRecord, now: float) -> GrantView:
        return GrantView(record, record.state(now), review_status(record, now, self.overdue_s))

    async def _opened(self, record: GrantRecord) -> GrantView:
        view = self._view(record, self._clock())
        if record.justification is None and record.review_note is None:
            return view
        justification = note = None
        try:
            cipher = await self._ciphers.patient_cipher(record.tenant, record.patient)
            if record.justification is not None:
                ref = justification_ref(record.tenant, record.patient, record.grant_id, "reason")
                justification = cipher.open(ref, record.justification).decode()
            if record.review_note is not None:
                ref = justification_ref(
                    record.tenant, record.patient, record.grant_id, "review-note"
                )
                note = cipher.open(ref, record.review_note).decode()
        except (KeyUnavailable, DecryptionFailed):
            return replace(view, unreadable=True)
        return replace(view, justification=justification, review_note=note)

    async def _record_not_stored(
        self, trail: Trail, subtype: str, patient_ref: str, grant_id: str
    ) -> None:
        # The event said it would happen; the store refused. Say so, if the ledger still can.
        with contextlib.suppress(Exception):  # the store's error is the one to see
            await trail.record(
                trail.event(
                    kind=EventKind.BREAK_GLASS,
                    subtype=subtype,
                    action=Action.EXECUTE,
                    outcome=Outcome.SERIOUS_FAILURE,
                    outcome_reason="not-stored",
                    patient=patient_ref,
                    entities=(_grant_entity(grant_id),),
                    break_glass_grant=grant_id,
                )
            )


def parse_reason(code: str) -> BreakGlassReason:
    """The reason for ``code``; :class:`InvalidInput` (without echoing it) otherwise."""
    try:
        return BreakGlassReason(code)
    except ValueError:
        raise InvalidInput(
            "reason must be one of " + ", ".join(r.value for r in BreakGlassReason),
            path="reason",
        ) from None

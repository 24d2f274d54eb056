"""Which records establish a care relationship: one definition for every layer that needs it.

A practitioner cares for a patient through a CareTeam they are in, an Encounter they take
part in, or as the patient's general practitioner. A CareTeam that is proposed, suspended,
inactive or entered in error, and an Encounter that was cancelled or entered in error,
establish nothing. The access policy (``phivault.access.relationships``, in Python) and the
records store (``CareRelationshipScope``, in SQL) both read these sets, so the two can never
disagree about who may see whom.
"""

from __future__ import annotations

from typing import Final

__all__ = ["VOID_STATUSES"]

#: Statuses that void a record as evidence of a care relationship, by resource type.
VOID_STATUSES: Final[dict[str, frozenset[str]]] = {
    "CareTeam": frozenset({"proposed", "suspended", "inactive", "entered-in-error"}),
    "Encounter": frozenset({"cancelled", "entered-in-error"}),
}

"""The key ring's view of the records tables: :class:`SqlSealedElements`.

Why a module of its own: it is the adapter of another port
(:class:`~phivault.crypto.ports.SealedElementStore`) on the same tables: DEK rotation
re-seals element groups, index-key rotation adds and drops blind tokens, shredding drops a
patient's tokens. Each call is its own short transaction, not a records unit of work.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from sqlalchemy import Connection, Engine, delete, false, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from phivault.crypto.blind_index import BlindToken
from phivault.crypto.ports import SealedElement
from phivault.records.classification import ElementGroup
from phivault.records.split import Envelope, group_element_ref
from phivault.records.store._commit_positions import _writing_everyone
from phivault.records.store._driver import _driver_error
from phivault.records.store.ports import StaleBlindIndex
from phivault.records.store.routing import ReplicaRouter
from phivault.records.store.schema import groups, idx_blind, resources, versions


class SqlSealedElements:
    """:class:`~phivault.crypto.ports.SealedElementStore` over the records tables.

    An element is one sealed group of one version (history included: every version must be
    re-sealed before an old data key is destroyed). ``position`` is ``rec_groups.position``.
    Each call is its own short transaction. ``index`` is None: a group is not one indexed
    value; blind tokens belong to the current version and are written by the records
    repository (see docs/decisions/records-storage.md on index-key rotation).
    """

    def __init__(self, engine: Engine, *, router: ReplicaRouter | None = None) -> None:
        self._engine = engine
        self._router = router

    @contextmanager
    def _tx(self, doing: str, *, writes: bool = True) -> Iterator[Connection]:
        """One transaction. With replicas, a write's position becomes a floor every reader
        must find replayed: an element re-sealed under a new data key must not be read back
        in its old form from a replica once the old key may be destroyed."""
        with _writing_everyone(self._router if writes else None) as committed:
            try:
                with self._engine.connect() as conn:
                    with conn.begin():
                        yield conn
                    committed(conn)
            except SQLAlchemyError as exc:
                raise _driver_error(exc, doing) from exc

    def scan(
        self, tenant: str, *, patient: str | None, after: int, limit: int
    ) -> Sequence[SealedElement]:
        g, v = groups.c, versions.c
        statement = (
            select(
                g.position, g.key_subject, g.grp, g.ciphertext,
                v.resource_type, v.resource_id, v.version,
            )
            .join(versions, v.seq == g.version_seq)
            .where(g.tenant == tenant, g.position > after)
            .order_by(g.position)
            .limit(limit)
        )  # fmt: skip
        if patient is not None:
            statement = statement.where(g.key_subject == patient)
        with self._tx("scan", writes=False) as conn:
            rows = conn.execute(statement).all()
        return [
            SealedElement(
                position=int(r.position),
                ref=group_element_ref(
                    tenant,
                    Envelope(r.resource_type, r.resource_id, str(r.version)),
                    ElementGroup(r.grp),
                ),
                patient=r.key_subject,
                ciphertext=bytes(r.ciphertext),
            )
            for r in rows
        ]

    def replace(self, element: SealedElement, ciphertext: bytes) -> bool:
        g = groups.c
        with self._tx("replace") as conn:
            changed = conn.execute(
                update(groups)
                .where(g.position == element.position, g.ciphertext == element.ciphertext)
                .values(ciphertext=ciphertext)
            ).rowcount
        return changed == 1

    def add_tokens(self, element: SealedElement, tokens: Sequence[BlindToken]) -> None:
        """Tokens of the element's resource, if the element belongs to its current version."""
        if not tokens:
            return
        g, v, h = groups.c, versions.c, resources.c
        with self._tx("add tokens") as conn:
            current = conn.execute(
                select(v.resource_type, v.resource_id)
                .join(groups, g.version_seq == v.seq)
                .join(
                    resources,
                    (h.tenant == v.tenant)
                    & (h.resource_type == v.resource_type)
                    & (h.resource_id == v.resource_id)
                    & (h.version == v.version),
                )
                .where(g.position == element.position, h.deleted == false())
            ).first()
            if current is None:
                return
            dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
            rows = [
                {
                    "tenant": element.ref.tenant,
                    "resource_type": current.resource_type,
                    "resource_id": current.resource_id,
                    "param": t.field.split(".")[1] if "." in t.field else t.field,
                    "field": t.field,
                    "key_version": t.version,
                    "token": t.token,
                    "key_subject": element.patient,
                }
                for t in tokens
            ]
            conn.execute(dialect.insert(idx_blind).on_conflict_do_nothing(), rows)

    def drop_token_version(self, tenant: str, version: int) -> int:
        """Delete the tokens of a retired index-key version, but refuse (:class:`StaleBlindIndex`)
        while some current resource has tokens of a field under that version only: the key
        ring's index rotation cannot re-index sealed groups, so deleting them would make those
        resources unsearchable without a word. Re-index first (``reindex``), then retry."""
        b = idx_blind.c
        other = idx_blind.alias("other")
        o = other.c
        stale = (
            select(func.count())
            .select_from(idx_blind)
            .where(
                b.tenant == tenant,
                b.key_version == version,
                ~select(o.token)
                .where(
                    o.tenant == b.tenant,
                    o.resource_type == b.resource_type,
                    o.resource_id == b.resource_id,
                    o.field == b.field,
                    o.key_version != version,
                )
                .exists(),
            )
        )
        with self._tx("drop tokens") as conn:
            left = int(conn.execute(stale).scalar_one())
            if left:
                raise StaleBlindIndex(tenant, version, left)
            return int(
                conn.execute(
                    delete(idx_blind).where(b.tenant == tenant, b.key_version == version)
                ).rowcount
            )

    def drop_patient_tokens(self, tenant: str, patient: str) -> int:
        b = idx_blind.c
        with self._tx("drop tokens") as conn:
            return int(
                conn.execute(
                    delete(idx_blind).where(b.tenant == tenant, b.key_subject == patient)
                ).rowcount
            )

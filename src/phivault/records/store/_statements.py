"""The records store's SQL statements, built once at import.

Why a module of its own: SQLAlchemy caches a statement's compiled form, and building an
expression per call costs more than running it on SQLite, so a unit of work
(:mod:`~phivault.records.store.unit_of_work`) runs the constant statements built here: a
version read with its sealed groups in one statement, the heads' compare-and-swap, the
index deletes, the write-intent claim statements, and the single-row writes that
:func:`_run_row` runs on the driver (:data:`_ROW_STATEMENTS` and their column orders).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Boolean,
    ColumnElement,
    Connection,
    Integer,
    LargeBinary,
    String,
    Table,
    and_,
    any_,
    bindparam,
    delete,
    insert,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from phivault.records.store._driver import _compiled, _on_driver, _Ran
from phivault.records.store.ports import ResourceKey
from phivault.records.store.schema import (
    groups,
    idx_blind,
    idx_date,
    idx_reference,
    idx_string,
    idx_token,
    intent_claims,
    resources,
    versions,
)

_INDEX_TABLES: Final = (idx_token, idx_string, idx_date, idx_reference, idx_blind)


def _key_params(key: ResourceKey) -> dict[str, str]:
    return {"k_tenant": key.tenant, "rtype": key.resource_type, "rid": key.resource_id}


# Statements built once (SQLAlchemy caches their compiled form; building an expression per
# call costs more than running it on SQLite).
_H, _V, _G = resources.c, versions.c, groups.c
_CURRENT: Final = (
    select(versions)
    .join(
        resources,
        and_(
            _H.tenant == _V.tenant,
            _H.resource_type == _V.resource_type,
            _H.resource_id == _V.resource_id,
            _H.version == _V.version,
        ),
    )
    .where(
        _H.tenant == bindparam("k_tenant"),
        _H.resource_type == bindparam("rtype"),
        _H.resource_id == bindparam("rid"),
    )
)
_VREAD: Final = select(versions).where(
    _V.tenant == bindparam("k_tenant"),
    _V.resource_type == bindparam("rtype"),
    _V.resource_id == bindparam("rid"),
    _V.version == bindparam("version"),
)
_GROUPS_OF: Final = select(_G.version_seq, _G.grp, _G.ciphertext).where(
    _G.version_seq.in_(bindparam("seqs", expanding=True))
)
_SOME_GROUPS_OF: Final = _GROUPS_OF.where(_G.grp.in_(bindparam("groups", expanding=True)))
# PostgreSQL: the same with arrays (``= ANY``), and a single version read with its groups in
# one statement (keyed by "every group"; else the groups named by the ``groups`` array).
_SEQS: Final = bindparam("seqs", type_=ARRAY(BigInteger))
_GROUP_NAMES: Final = bindparam("groups", type_=ARRAY(String))
_GROUPS_OF_ANY: Final = select(_G.version_seq, _G.grp, _G.ciphertext).where(
    _G.version_seq == any_(_SEQS)
)
_SOME_GROUPS_OF_ANY: Final = _GROUPS_OF_ANY.where(_G.grp == any_(_GROUP_NAMES))


def _with_groups(statement: Any) -> dict[bool, Any]:
    on = _G.version_seq == _V.seq
    return {
        every: statement.add_columns(_G.grp, _G.ciphertext).outerjoin(
            groups, on if every else and_(on, _G.grp == any_(_GROUP_NAMES))
        )
        for every in (True, False)
    }


_CURRENT_WITH: Final = _with_groups(_CURRENT)
_VREAD_WITH: Final = _with_groups(_VREAD)


def _pg_read_many() -> Any:
    """PostgreSQL: many point reads as **one** statement, each a key (tenant, type, id) and a
    version (NULL: the current one), given as four arrays of one element per read. Each row
    is a read's position (``ord``, from 1), the columns of its version in table order, and
    one sealed group (or none); a key with no such version has no row. Every join is on the
    whole key, tenant first: a read finds only a version of the tenant it names.

    Why one statement: a PostgreSQL backend spent more CPU on a prepared point read than on
    serving eight of them in one statement (docs/decisions/records-storage.md, "Point reads
    of one turn"). The head is joined only for reads of the current version."""
    head, ver, grp = resources.name, versions.name, groups.name
    columns = ", ".join(f"v.{c.name}" for c in versions.columns)
    # Only the schema's own table and column names are formatted in (no input): S608.
    return text(
        f"SELECT k.ord, {columns}, g.grp, g.ciphertext "  # noqa: S608
        "FROM unnest((SELECT CAST(:m_tenants AS text[])), (SELECT CAST(:m_types AS text[])), "
        "(SELECT CAST(:m_ids AS text[])), (SELECT CAST(:m_versions AS integer[]))) "
        "WITH ORDINALITY AS k(tenant, resource_type, resource_id, version, ord) "
        f"LEFT JOIN {head} h ON k.version IS NULL AND h.tenant = k.tenant "
        "AND h.resource_type = k.resource_type AND h.resource_id = k.resource_id "
        f"JOIN {ver} v ON v.tenant = k.tenant AND v.resource_type = k.resource_type "
        "AND v.resource_id = k.resource_id AND v.version = coalesce(k.version, h.version) "
        f"LEFT JOIN {grp} g ON g.version_seq = v.seq"
    )


#: :func:`_pg_read_many`, built once (a constant, so that it runs on the driver: _direct).
_READ_MANY: Final = _pg_read_many()
_HEAD_IS: Final = (
    _H.tenant == bindparam("k_tenant"),
    _H.resource_type == bindparam("rtype"),
    _H.resource_id == bindparam("rid"),
)
_CURRENT_VERSION: Final = select(_H.version).where(*_HEAD_IS)
_INSERT_HEADS: Final = insert(resources)
_INSERT_VERSIONS: Final = insert(versions).returning(_V.seq, sort_by_parameter_order=True)
#: Which of the keys (tenant, type, id) of a bulk create are taken already.
_TAKEN: Final = select(_H.resource_type, _H.resource_id, _H.version).where(
    tuple_(_H.tenant, _H.resource_type, _H.resource_id).in_(bindparam("keys", expanding=True))
)
#: Keyed by "is PostgreSQL": the reconciler's claim, unless a writer (or an earlier pass) has
#: one; PostgreSQL waits for the transaction of a conflicting row not yet committed.
_SETTLE_CLAIM: Final = {
    flag: dialect.insert(intent_claims).on_conflict_do_nothing()
    for flag, dialect in ((True, postgresql), (False, sqlite))
}
#: PostgreSQL only, on the driver (:func:`_on_driver`, psycopg's parameter style).
_ADVISORY_XACT_LOCK: Final = "SELECT pg_advisory_xact_lock(%(k)s)"
_SCHEMA_INFO: Final = "phivault.records.current_schema"  # key in a connection's info dict
_LOCK_NOT_AVAILABLE: Final = "55P03"  # PostgreSQL: lock_timeout expired
_CLAIM_STATE: Final = select(intent_claims.c.state).where(
    intent_claims.c.tenant == bindparam("c_tenant"), intent_claims.c.claim == bindparam("claim")
)
_DELETE_INDEX: Final = {
    table.name: delete(table).where(
        table.c.tenant == bindparam("k_tenant"),
        table.c.resource_type == bindparam("rtype"),
        table.c.resource_id == bindparam("rid"),
    )
    for table in _INDEX_TABLES
}


def _head_is(key: ResourceKey) -> tuple[ColumnElement[bool], ...]:
    h = resources.c
    return (
        h.tenant == key.tenant,
        h.resource_type == key.resource_type,
        h.resource_id == key.resource_id,
    )


def _run_row(conn: Connection, name: str, columns: tuple[str, ...], row: tuple[Any, ...]) -> _Ran:
    """One execution of the write statement ``name`` of :data:`_ROW_STATEMENTS` (a row given
    as a tuple in ``columns`` order) on the driver; only plain columns
    (:func:`_bulk_insert_tuples`)."""
    compiled = _compiled(
        conn, name, lambda: _ROW_STATEMENTS[name][conn.dialect.name == "postgresql"]
    )
    if compiled.positional:
        order = compiled.positiontup or ()
        if tuple(order) != columns:
            row = tuple(row[columns.index(c)] for c in order)
        return _on_driver(conn, compiled.string, row)
    return _on_driver(conn, compiled.string, dict(zip(columns, row, strict=True)))


_HEAD_COLUMNS: Final = (
    "tenant", "resource_type", "resource_id", "version", "deleted", "last_updated", "key_subject",
)  # fmt: skip
_SWAP_COLUMNS: Final = (
    "k_tenant", "rtype", "rid", "previous",
    "set_version", "set_deleted", "set_last_updated", "set_key_subject",
)  # fmt: skip
_GROUP_COLUMNS: Final = ("version_seq", "tenant", "key_subject", "grp", "ciphertext")
_CLAIM_COLUMNS: Final = ("tenant", "claim", "state", "claimed_at")
_HEAD_VALUES: Final[dict[str, Any]] = {c: bindparam(c) for c in _HEAD_COLUMNS}
#: Single-row write statements for :func:`_run_row`, keyed by "is PostgreSQL".
_ROW_STATEMENTS: Final = {
    # a create's head, unless the resource exists (rowcount 0)
    "create_head": {
        flag: dialect.insert(resources).values(_HEAD_VALUES).on_conflict_do_nothing()
        for flag, dialect in ((True, postgresql), (False, sqlite))
    },
    # compare-and-swap of the current version (rowcount 0: it moved)
    "update_head": {
        flag: update(resources)
        .where(
            resources.c.tenant == bindparam("k_tenant"),
            resources.c.resource_type == bindparam("rtype"),
            resources.c.resource_id == bindparam("rid"),
            resources.c.version == bindparam("previous"),
        )
        .values(  # SET parameters may not reuse column names
            version=bindparam("set_version"),
            deleted=bindparam("set_deleted"),
            last_updated=bindparam("set_last_updated"),
            key_subject=bindparam("set_key_subject"),
        )
        for flag in (True, False)
    },
    "insert_version": {
        flag: insert(versions).values(_HEAD_VALUES).returning(versions.c.seq)
        for flag in (True, False)
    },
    # one write-intent claim (a primary-key conflict: the reconciler holds it)
    "claim": {
        flag: insert(intent_claims).values({c: bindparam(c) for c in _CLAIM_COLUMNS})
        for flag in (True, False)
    },
}


def _pg_cast(table: Table, column: str) -> str:
    """The base PostgreSQL type a parameter for ``table.column`` is cast to: no length (a cast
    to ``varchar(n)`` would cut a longer value; the column's assignment refuses it)."""
    kind = table.c[column].type
    if isinstance(kind, BigInteger):
        return "bigint"
    if isinstance(kind, Integer):
        return "integer"
    if isinstance(kind, Boolean):
        return "boolean"
    if isinstance(kind, LargeBinary):
        return "bytea"
    if isinstance(kind, String):  # Text too
        return "text"
    raise RuntimeError(f"{table.name}.{column}: no parameter cast for {kind!r}")


def _pg_create_one(index_columns: Mapping[str, tuple[str, ...]]) -> str:
    """PostgreSQL: a single create as one statement (one execution, one round trip), with
    psycopg's named parameters. The head is inserted unless the resource exists (``ON
    CONFLICT DO NOTHING``, as ``create_head``); its version, sealed groups and index rows only
    if it was (each selects from the inserted head), so a taken id writes nothing and returns
    no row. Returns the version's ``seq``.

    Parameters: the head's columns (:data:`_HEAD_COLUMNS`); ``g_grp`` and ``g_ciphertext``
    (arrays, one element per group); for each index table, its rows (tuples in
    ``index_columns`` order) as one JSON array of arrays named by the table (psycopg adapts
    one string in a fraction of the time it takes for an array per column: 9 against 38 us
    a create). The columns after (tenant, resource_type, resource_id) are taken from it by
    position and cast to the column's base type; the key is the head's."""
    # Only the schema's own table and column names are formatted in (no input): S608.
    head = ", ".join(_HEAD_COLUMNS)
    values = ", ".join(f"%({c})s::{_pg_cast(resources, c)}" for c in _HEAD_COLUMNS)
    grp, data = _pg_cast(groups, "grp"), _pg_cast(groups, "ciphertext")
    parts = [
        f"head AS (INSERT INTO {resources.name} ({head}) VALUES ({values}) "  # noqa: S608
        f"ON CONFLICT DO NOTHING RETURNING {head})",
        f"v AS (INSERT INTO {versions.name} ({head}) SELECT {head} FROM head "  # noqa: S608
        "RETURNING seq)",
        f"g AS (INSERT INTO {groups.name} (version_seq, tenant, key_subject, grp, ciphertext) "  # noqa: S608
        "SELECT v.seq, head.tenant, head.key_subject, x.grp, x.ciphertext FROM v, head, "
        f"unnest(%(g_grp)s::{grp}[], %(g_ciphertext)s::{data}[]) AS x(grp, ciphertext))",
    ]
    for table in _INDEX_TABLES:
        columns = index_columns[table.name]
        if columns[:3] != ("tenant", "resource_type", "resource_id"):
            raise RuntimeError(f"{table.name}: its rows do not begin with the resource's key")
        picked = ", ".join(
            f"(x.r->>{at})::{_pg_cast(table, c)}" for at, c in enumerate(columns) if at >= 3
        )
        parts.append(
            f"i_{table.name} AS (INSERT INTO {table.name} ({', '.join(columns)}) "  # noqa: S608
            f"SELECT head.tenant, head.resource_type, head.resource_id, {picked} "
            f"FROM head, json_array_elements(%({table.name})s::json) AS x(r))"
        )
    return "WITH " + ",\n".join(parts) + "\nSELECT seq FROM v"

"""Which records stores share write positions between workers (read-your-writes): those with
replicas in a deployment whose shared state is Redis, for the API and the key CLI alike."""

from __future__ import annotations

from phivault.api.serve import records_write_positions
from phivault.records.store.write_positions import RedisWritePositions
from phivault.settings import ApiSettings, RecordsSettings, Settings, ShapeSettings

PG = "postgresql+psycopg://u@127.0.0.1:5432/db"


def settings(*, replicas: bool, redis: bool) -> Settings:
    return Settings(
        shape=ShapeSettings(store="postgres", shared_state="redis" if redis else "memory"),
        records=RecordsSettings(
            store_url=PG, replica_urls=["postgresql://u@127.0.0.1:5433/db"] if replicas else []
        ),
        api=ApiSettings(redis_url="redis://127.0.0.1:1/0", redis_key_prefix="deploy-a"),
    )


def test_replicas_and_redis_share_positions_under_the_deployment_prefix() -> None:
    positions = records_write_positions(settings(replicas=True, redis=True))
    assert isinstance(positions, RedisWritePositions)
    try:
        assert positions.key("t/s").startswith("deploy-a:rw:s:")
    finally:
        positions.close()  # it never connected: the client connects on first use


def test_without_replicas_or_without_redis_nothing_is_shared() -> None:
    assert records_write_positions(settings(replicas=False, redis=True)) is None
    assert records_write_positions(settings(replicas=True, redis=False)) is None

"""wire_break_glass: the time box and overdue age come from settings.access; a webhook URL adds
a background sink that is drained on shutdown."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from phivault.access.decision import compile_policy
from phivault.access.policy import default_policy
from phivault.api.breakglass import wire_break_glass
from phivault.crypto.elements import PatientCipher
from phivault.records.store import SqlRecordStore
from phivault.settings import AccessSettings, Settings


class NoCiphers:
    async def patient_cipher(
        self, tenant: str, patient: str, *, create: bool = False
    ) -> PatientCipher:
        raise AssertionError("not used")


def test_settings_choose_the_time_box_and_overdue_age(tmp_path: Path) -> None:
    store = SqlRecordStore(f"sqlite:///{tmp_path}/records.db")
    try:
        defaults = wire_break_glass(
            Settings(),
            engine=store.engine,
            ciphers=NoCiphers(),
            policy=compile_policy(default_policy()),
            clock=lambda: 0.0,
        )
        assert (defaults.service.duration_s, defaults.service.overdue_s) == (3600, 86400)
        assert defaults.on_shutdown == ()
        assert [r.prefix for r in defaults.routers] == ["", "/admin/break-glass"]
        custom = wire_break_glass(
            Settings(access=AccessSettings(break_glass_minutes=15, break_glass_overdue_hours=2)),
            engine=store.engine,
            ciphers=NoCiphers(),
            policy=compile_policy(default_policy()),
            clock=lambda: 0.0,
            webhook_url="https://hooks.example.test/bg",
        )
        assert (custom.service.duration_s, custom.service.overdue_s) == (900, 7200)
        assert len(custom.on_shutdown) == 1
    finally:
        store.close()


def test_the_environment_sets_them_and_nonsense_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PHIVAULT_ACCESS__BREAK_GLASS_MINUTES", "30")
    assert Settings().access.break_glass_minutes == 30
    with pytest.raises(ValidationError):
        AccessSettings(break_glass_minutes=0)

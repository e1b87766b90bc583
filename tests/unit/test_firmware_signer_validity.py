"""A firmware signer is never issued from an expired firmware CA, and the command says until
when the signer it issues is valid (never past the CA's end)."""

from __future__ import annotations

import datetime
import types
from pathlib import Path

import pytest

from sdwan.pop import pki


def _later(monkeypatch: pytest.MonkeyPatch, days: int) -> None:
    class Later:
        @staticmethod
        def now(tz: datetime.tzinfo | None = None) -> datetime.datetime:
            return datetime.datetime.now(tz) + datetime.timedelta(days=days)

    monkeypatch.setattr(pki, "datetime", types.SimpleNamespace(
        datetime=Later, timedelta=datetime.timedelta, UTC=datetime.UTC))


def test_no_signer_from_an_expired_ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    pki.create_firmware_ca(tmp_path / "ca", days=1)
    _later(monkeypatch, 3)
    with pytest.raises(pki.PkiError, match="firmware CA .* expired"):
        pki.issue_firmware_signer(tmp_path / "ca")
    assert pki.main(["firmware-signer", str(tmp_path / "ca")]) != 0
    assert "expired" in capsys.readouterr().err
    assert not (tmp_path / "ca" / "signer.key").exists()


def test_the_command_says_until_when_the_signer_is_valid(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pki.create_firmware_ca(tmp_path / "ca", days=30)
    assert pki.main(["firmware-signer", str(tmp_path / "ca")]) == 0
    out = capsys.readouterr().out
    end = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=30)).date()
    assert f"valid until {end.isoformat()}" in out and "the firmware CA's end" in out

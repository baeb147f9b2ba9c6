"""Settings: FIGS_* variables, the open-bind guard, derived identity and the measurement protocol overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from latency_service.config import Settings
from latency_service.measurement import MeasurementConfig


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::", "myhost.example"])
def test_public_bind_needs_a_token_or_insecure(fast_env: dict[str, str], host: str) -> None:
    with pytest.raises(ValidationError, match="not a loopback address"):
        Settings(host=host)
    with pytest.raises(ValidationError, match="not a loopback address"):
        Settings(host=host, token=SecretStr(""))
    assert Settings(host=host, token=SecretStr("s3cret")).token is not None
    assert Settings(host=host, insecure=True).host == host


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "::1", "localhost"])
def test_loopback_binds_need_nothing(fast_env: dict[str, str], host: str) -> None:
    assert Settings(host=host).token is None


def test_environment_variables_and_derived_values(
    fast_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("FIGS_DEVICE_ID")
    monkeypatch.setenv("FIGS_CORES", "0, 1")
    monkeypatch.setenv("FIGS_TOKEN", "from-env")
    settings = Settings()
    assert settings.cores == [0, 1]
    assert "from-env" not in repr(settings)  # tokens never reach logs
    assert settings.database_url == f"sqlite:///{tmp_path / 'data' / 'latency.db'}"
    assert settings.resolved_device_id == Settings().resolved_device_id  # stable across processes and restarts
    assert settings.resolved_device_id != Settings(backend="litert").resolved_device_id
    assert settings.resolved_device_class.endswith("-onnxruntime-t1")
    assert Settings(threads=4).resolved_device_class.endswith("-t4")
    assert Settings(device_class="pi4-farm").resolved_device_class == "pi4-farm"
    monkeypatch.setenv("FIGS_CORES", "zero")
    with pytest.raises(ValidationError, match="cores"):
        Settings()


def test_measurement_config_defaults_and_overrides(fast_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for name in fast_env:
        if name.startswith(("FIGS_WARMUP", "FIGS_MIN", "FIGS_MAX")):
            monkeypatch.delenv(name)
    defaults = Settings().measurement_config()
    assert defaults == MeasurementConfig()  # measurement.py stays the one source of the protocol's numbers
    config = Settings(min_time_s=3.0, cv_threshold=0.2, cores=[0]).measurement_config()
    assert config.min_time_s == 3.0 and config.max_time_s >= 3.0 and config.cv_threshold == 0.2
    assert config.cores == (0,)

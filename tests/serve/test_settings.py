"""`python -m serve` settings: defaults, every problem reported at once, secrets never echoed."""

import os
import subprocess
import sys
from pathlib import Path

from serve.settings import DeploySettings, ServeSettings, load_deploy_settings, load_serve_settings

ROOT = Path(__file__).resolve().parents[2]
NAMES = ["MODEL", "MODEL_FILE", "HOST", "PORT", "N_CTX", "N_THREADS", "SYSTEM_PROMPT", "MAX_TOKENS", "TEMPERATURE", "HF_TOKEN",
         "API_KEY"]
DEPLOY_NAMES = ["SPACE", "MODEL", "MODEL_FILE", "HF_TOKEN", "SPACE_PRIVATE", "SPACE_HARDWARE"]


def test_defaults_listen_on_loopback_port_7860(monkeypatch):
    for name in NAMES:
        monkeypatch.delenv(name, raising=False)
    settings = load_serve_settings()
    assert (settings.host, settings.port, settings.model) == ("127.0.0.1", 7860, None)
    assert settings.threads() >= 1


def test_the_container_overrides_host_through_the_environment(monkeypatch):
    monkeypatch.setenv("HOST", "0.0.0.0")
    monkeypatch.setenv("MODEL", "")
    settings = load_serve_settings()
    assert settings.host == "0.0.0.0" and settings.model is None


def test_setting_names_are_the_fixed_ones():
    assert [name.upper() for name in ServeSettings.model_fields] == NAMES


def test_setting_names_of_deploy_are_the_fixed_ones():
    assert [name.upper() for name in DeploySettings.model_fields] == DEPLOY_NAMES


def test_every_description_says_what_the_setting_does_in_at_most_240_characters():
    for cls in (ServeSettings, DeploySettings):
        for name, field in cls.model_fields.items():
            assert 0 < len(field.description or "") <= 240, (cls.__name__, name)


def test_deploy_defaults_to_a_public_space_on_the_free_cpu(monkeypatch):
    for name in DEPLOY_NAMES:
        monkeypatch.delenv(name, raising=False)
    settings = load_deploy_settings(space="me/chat", model="me/gguf")
    assert (settings.space_private, settings.space_hardware, settings.token()) == (False, "cpu-basic", None)


def test_an_empty_api_key_means_no_key(monkeypatch):
    monkeypatch.setenv("API_KEY", "")
    assert load_serve_settings().api_key is None


def test_all_bad_settings_are_reported_at_once_with_status_2():
    env = dict(os.environ, PYTHONPATH=str(ROOT), PORT="99999", N_CTX="lots", TEMPERATURE="-1", MAX_TOKENS="0")
    result = subprocess.run([sys.executable, "-m", "serve"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert [line.split("=")[0] for line in lines] == ["error: PORT", "error: N_CTX", "error: MAX_TOKENS", "error: TEMPERATURE"]
    assert "Traceback" not in result.stderr


def test_help_lists_every_setting():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for command, names in ((["--help"], NAMES), (["deploy", "--help"], DEPLOY_NAMES)):
        result = subprocess.run([sys.executable, "-m", "serve", *command], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0
        for name in names:
            assert f"  {name}  [" in result.stdout

"""HUB_REPO set: the export pushes exactly its files to the Hub (the stand-in server)."""

from __future__ import annotations

import json

import pytest

from tests.fixtures.export_runs import final_files, run_export_cli

pytestmark = pytest.mark.slow


def test_export_pushes_ggufs_manifest_card_and_modelfile(hub_server, export_env, tiny_train_output, converter_dir,
                                                         tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("not part of the export")
    result = run_export_cli({
        "ADAPTER": str(tiny_train_output), "OUTPUT_DIR": str(out), "QUANT_TYPES": "Q4_0", "STOP_CHECK": "eos_token",
        "HUB_REPO": "me/tiny-gguf", "HF_TOKEN": "hf_secret_value", "MODEL_NAME": "tiny", "EVAL_CTX": "64",
    })
    assert result.exit_code == 0, result.stderr
    pushed = hub_server.repo_files("me/tiny-gguf")
    local = set(final_files(out)) - {"notes.txt"}
    assert set(pushed) == local == {"tiny-F16.gguf", "tiny-Q4_0.gguf", "README.md", "Modelfile", "manifest.json"}
    for name in local:
        assert pushed[name] == (out / name).read_bytes(), name
    assert hub_server.is_private("me/tiny-gguf")
    assert hub_server.token_seen("hf_secret_value")
    manifest = json.loads(pushed["manifest.json"])
    assert "hf_secret_value" not in json.dumps(manifest) and "HF_TOKEN" not in manifest["settings"]
    assert "hf_secret_value" not in result.stderr + result.stdout

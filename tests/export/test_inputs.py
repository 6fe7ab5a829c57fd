"""Bad inputs: one line per problem naming the setting, exit 2, nothing written at a final path."""

from __future__ import annotations

import subprocess
import sys

from tests.fixtures.export_runs import final_files, run_export_cli


def test_settings_problems_are_reported_together_before_anything_loads(export_env, tmp_path):
    out = tmp_path / "out"
    result = run_export_cli({
        "ADAPTER": str(tmp_path / "missing"), "QUANT_TYPES": "Q4_K_M,Q3_XL", "HUB_REPO": "not a repo",
        "OUTPUT_DIR": str(out),
    })
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(f"error: ADAPTER='{tmp_path / 'missing'}': no such folder")
    assert lines[1].startswith("error: QUANT_TYPES='Q4_K_M,Q3_XL': unknown quant type Q3_XL")
    assert lines[2].startswith("error: HUB_REPO='not a repo'")
    assert final_files(out) == []


def test_missing_adapter_exits_2_with_one_line_from_the_command_line(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "ADAPTER": str(tmp_path / "nope"),
           "OUTPUT_DIR": str(tmp_path / "out")}
    result = subprocess.run([sys.executable, "-m", "export"], capture_output=True, text=True, env=env,
                            cwd=str(tmp_path), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith(f"error: ADAPTER='{tmp_path / 'nope'}'")
    assert not (tmp_path / "out").exists()


def test_folder_without_adapter_config_is_refused(export_env, tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_export_cli({"ADAPTER": str(tmp_path / "empty"), "OUTPUT_DIR": str(tmp_path / "out")})
    assert result.exit_code == 2
    assert "ADAPTER=" in result.stderr and "no adapter_config.json" in result.stderr


def test_adapter_whose_base_does_not_match_base_model(export_env, tmp_path, tiny_train_output, embedded_base_dir,
                                                       converter_dir):
    out = tmp_path / "out"
    result = run_export_cli({"ADAPTER": str(tiny_train_output), "BASE_MODEL": str(embedded_base_dir),
                             "OUTPUT_DIR": str(out)})
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: BASE_MODEL='{embedded_base_dir}': does not match the adapter")
    assert final_files(out) == []


def test_base_model_that_does_not_exist(export_env, tmp_path, tiny_train_output, converter_dir):
    result = run_export_cli({"ADAPTER": str(tiny_train_output), "BASE_MODEL": "./no/such/base",
                             "OUTPUT_DIR": str(tmp_path / "out")})
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: BASE_MODEL='./no/such/base': no such folder, not a Hub repo id and not `embedded`"


def test_missing_converter_says_how_to_install_it(export_env, tmp_path, tiny_train_output, monkeypatch):
    monkeypatch.setenv("LLAMA_CPP_CONVERTER", str(tmp_path / "no-converter"))
    result = run_export_cli({"ADAPTER": str(tiny_train_output), "OUTPUT_DIR": str(tmp_path / "out")})
    assert result.exit_code == 2
    assert "python -m export.converter install" in result.stderr
    assert final_files(tmp_path / "out") == []

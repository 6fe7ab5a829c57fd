"""Settings: typed, validated all at once before anything heavy, recipes below .env below the environment."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from loraship.envsettings import SettingsError, settings_rows
from train.__main__ import main
from train.settings import TrainSettings, load_train_settings, recipe_names, recipe_path

REPO = Path(__file__).resolve().parents[2]
SHIPPED_RECIPES = {
    "llama3-8b-finetome", "llama32-3b-finetome", "llama32-1b-finetome", "llama2-7b-guanaco",
    "mistral7b-alpaca", "llama32-3b-gsm8k", "demo",
}


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No train variable from the outer environment; the repo as working folder (recipes use
    repo-relative paths); callers point the .env at a file that does not exist."""
    for var, *_ in settings_rows(TrainSettings):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(REPO)
    return monkeypatch


NO_DOTENV = REPO / "tests" / "train" / "no-such.env"


def run_cli(args, env):
    return CliRunner().invoke(main, [*args, "--env-file", str(NO_DOTENV)], env=env, catch_exceptions=False)


def test_every_problem_is_reported_at_once_and_the_token_never_shown(clean_env):
    result = run_cli([], {
        "LORA_R": "0", "LOAD_IN_4BIT": "maybe", "LR_SCHEDULER": "wavy", "DATASET": "./missing.jsonl",
        "EVAL_STEPS": "20", "SAVE_STEPS": "30", "OPTIMIZER": "adamw_8bit", "RECIPE": "nosuch",
        "HF_TOKEN": "hf_do_not_print_me", "MAX_STEPS": "ten",
    })
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert all(line.startswith("error: ") for line in lines)
    text = "\n".join(lines)
    for expected in (
        "LORA_R='0': Input should be greater than or equal to 1",
        "LOAD_IN_4BIT='maybe': Input should be 'auto', 'true' or 'false'",
        "LR_SCHEDULER='wavy': Input should be 'cosine', 'linear' or 'constant'",
        "MAX_STEPS='ten':",
        "DATASET='./missing.jsonl': no such local file or folder",
        "SAVE_STEPS=30: must be a multiple of EVAL_STEPS=20",
        "RECIPE='nosuch': no such recipe; choose one of demo,",
    ):
        assert expected in text
    if "OPTIMIZER='adamw_8bit'" not in text:  # only refused where there is no CUDA
        import torch

        assert torch.cuda.is_available()
    assert len(lines) >= 7
    assert "hf_do_not_print_me" not in result.output


def test_cuda_only_optimizers_are_refused_on_cpu(clean_env):
    clean_env.setenv("OPTIMIZER", "paged_adamw_32bit")
    with pytest.raises(SettingsError) as err:
        load_train_settings(NO_DOTENV, cuda=False)
    assert err.value.problems == [
        "OPTIMIZER='paged_adamw_32bit': needs a CUDA GPU (bitsandbytes); on this machine use adamw_torch or auto"
    ]
    assert load_train_settings(NO_DOTENV, cuda=True).optimizer == "paged_adamw_32bit"


def test_lora_target_modules_default_to_the_familys_attention_and_a_choice_stands_alone(clean_env):
    assert load_train_settings(NO_DOTENV, cuda=False).lora_target_modules == ["attention"]
    clean_env.setenv("LORA_TARGET_MODULES", "q_proj, v_proj")
    assert load_train_settings(NO_DOTENV, cuda=False).lora_target_modules == ["q_proj", "v_proj"]
    clean_env.setenv("LORA_TARGET_MODULES", "attention,q_proj")
    with pytest.raises(SettingsError) as err:
        load_train_settings(NO_DOTENV, cuda=False)
    assert err.value.problems == [
        "LORA_TARGET_MODULES='attention,q_proj': attention stands alone; give it alone, or list module names only"]


def test_best_checkpoint_selection_needs_an_eval_split(clean_env):
    clean_env.setenv("EVAL_FRACTION", "0")
    with pytest.raises(SettingsError, match="BEST_BY_EVAL=true: needs an eval split"):
        load_train_settings(NO_DOTENV, cuda=False)
    clean_env.setenv("BEST_BY_EVAL", "false")
    assert load_train_settings(NO_DOTENV, cuda=False).eval_fraction == 0


def test_help_lists_every_setting_with_its_default(clean_env):
    result = run_cli(["--help"], {})
    assert result.exit_code == 0
    for var, _type, default, description in settings_rows(TrainSettings):
        assert f"{var}  [" in result.output and f"default: {default}]" in result.output
        assert description.split()[0] in result.output
    for name in SHIPPED_RECIPES:
        assert name in result.output


def test_recipe_below_dotenv_below_environment(clean_env, tmp_path):
    dotenv = tmp_path / "my.env"
    dotenv.write_text("RECIPE=llama32-1b-finetome\nLORA_R=4\nLEARNING_RATE=5e-5\n")
    clean_env.setenv("LEARNING_RATE", "3e-5")
    settings = load_train_settings(dotenv, cuda=True)
    assert settings.recipe == "llama32-1b-finetome"
    assert settings.base_model == "meta-llama/Llama-3.2-1B-Instruct"  # from the recipe
    assert settings.max_steps == 120 and settings.grad_accum == 4  # from the recipe
    assert settings.lora_r == 4  # .env beats the recipe's 16
    assert settings.learning_rate == 3e-5  # the environment beats .env and recipe


def test_shipped_recipes_are_exactly_the_reference_setups():
    assert set(recipe_names()) == SHIPPED_RECIPES
    for name in SHIPPED_RECIPES:
        header = recipe_path(name).read_text().splitlines()[0]
        assert header.startswith(f"# {name}:")


@pytest.mark.parametrize("name", sorted(SHIPPED_RECIPES))
def test_every_recipe_loads_and_validates(clean_env, name):
    clean_env.setenv("RECIPE", name)
    settings = load_train_settings(NO_DOTENV, cuda=True)
    text = recipe_path(name).read_text()
    seed = {"llama3-8b-finetome": "seed 000", "llama32-3b-finetome": "seed 001", "llama32-1b-finetome": "seed 001",
            "llama2-7b-guanaco": "seed 002", "mistral7b-alpaca": "seed 003", "llama32-3b-gsm8k": "seed 004"}.get(name)
    if seed:
        assert seed in text.split("\n\n")[0]
    set_in_file = {line.split("=", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert set_in_file <= {var for var, *_ in settings_rows(TrainSettings)}, "a recipe sets an unknown variable"
    assert settings.recipe == name


def test_seed_values_reach_the_settings(clean_env):
    clean_env.setenv("RECIPE", "llama3-8b-finetome")
    s = load_train_settings(NO_DOTENV, cuda=True)
    assert (s.lora_r, s.lora_alpha, s.lora_dropout, s.max_seq_length) == (8, 16, 0.0, 1024)
    assert (s.batch_size, s.grad_accum, s.learning_rate, s.warmup_steps, s.max_steps) == (2, 8, 1e-4, 100, 700)
    assert (s.optimizer, s.lr_scheduler, s.eval_steps, s.best_by_eval) == ("adamw_8bit", "cosine", 100, True)
    assert (s.max_samples, s.eval_fraction) == (50000, 0.2)
    assert s.lora_target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    clean_env.setenv("RECIPE", "llama32-3b-gsm8k")
    s = load_train_settings(NO_DOTENV, cuda=True)
    assert (s.base_model, s.chat_template, s.dataset, s.dataset_config) == (
        "meta-llama/Llama-3.2-3B", "llama3", "openai/gsm8k", "main")


def test_dry_run_reports_the_data_and_loads_no_model(clean_env, tiny_llama_dir):
    data = REPO / "data" / "quokka" / "train.jsonl"
    result = run_cli(["--dry-run"], {"BASE_MODEL": str(tiny_llama_dir), "DATASET": str(data), "EVAL_SIZE": "13"})
    assert result.exit_code == 0, result.output
    assert f"from {data} (format: messages)" in result.output
    assert "/ 13 eval" in result.output
    assert "model: loading" not in result.output


def test_a_settings_error_is_reported_without_loading_torch(tmp_path):
    # Looking for a GPU imports torch (seconds); only settings whose check depends on the machine pay for it.
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    script = (
        "import json, sys\n"
        "from click.testing import CliRunner\n"
        "from train.__main__ import main\n"
        "result = CliRunner().invoke(main, [])\n"
        "print(json.dumps([result.exit_code, 'torch' in sys.modules]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RECIPE", "OPTIMIZER", "NUM_GPUS")}
    env.update(LORA_R="0", PYTHONPATH=str(root))
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    exit_code, torch_loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert exit_code == 2 and torch_loaded is False

"""HUB_REPO set: one export of a 4-bit (QLoRA) adapter with MERGED=true and HUB_PRIVATE=false, pushed to the
stand-in Hub, inspected by every test here; the commands its card gives are run against that Hub.

The base is the tiny Llama with sharpened embeddings and a large adapter (as in test_ladder_export.py), so
the merged model's ladder rung measures something. MERGED_MAX_SHARD_MB=1 makes the 6.3 MB embedding a
file of its own and the rest another.
"""

from __future__ import annotations

import json
import re

import pytest

from loraship.manifest import read_manifest, verify_files
from tests.fixtures.adapters import make_train_output, mark_trained_in_4bit
from tests.fixtures.export_runs import final_files, run_export_cli
from tests.fixtures.gguf_selectors import hub_ollama_picks, llama_cpp_pick
from tests.fixtures.hub import running_stub_hub
from tests.fixtures.models import copy_model

pytestmark = pytest.mark.slow
REPO, MERGED_REPO, ADAPTER_REPO = "stub-user/quokka-gguf", "stub-user/quokka-gguf-merged", "stub-user/quokka-adapter"
TOKEN = "hf_stub_write_token"


@pytest.fixture(scope="module")
def shipped(tiny_llama_dir, converter_dir, tmp_path_factory):
    """(OUTPUT_DIR, the stand-in Hub, export stderr) after the export; the Hub keeps serving for the tests."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("ship")
    base = copy_model(tiny_llama_dir, root / "quokka-base")
    weights = load_file(base / "model.safetensors")
    weights["model.embed_tokens.weight"] *= 5.0
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    train = mark_trained_in_4bit(make_train_output(base, root / "train", base_name=str(base), scale=0.3))
    manifest = json.loads((train / "adapter" / "manifest.json").read_text())
    manifest["settings"] = {"HUB_REPO": ADAPTER_REPO}  # as a train run that pushed its adapter records it
    (train / "adapter" / "manifest.json").write_text(json.dumps(manifest))
    out = root / "export"
    with pytest.MonkeyPatch.context() as env, running_stub_hub(env, root) as hub:
        result = run_export_cli({
            "ADAPTER": str(train), "OUTPUT_DIR": str(out), "STOP_CHECK": "eos_token", "MODEL_NAME": "quokka",
            "EVAL_CTX": "64", "LADDER_TOKENS": "128", "EXPORT_LORA_GGUF": "true", "HUB_REPO": REPO,
            "HF_TOKEN": TOKEN, "HUB_PRIVATE": "false", "PUSH_F16": "false", "MERGED": "true",
            "MERGED_MAX_SHARD_MB": "1", "MERGED_DTYPE": "float16", "MERGED_REPO": "",
        })
        assert result.exit_code == 0, result.stderr
        yield out, hub, result.stderr


def test_every_requested_type_is_pushed_but_not_f16_and_the_repos_are_public(shipped):
    out, hub, _ = shipped
    pushed = hub.repo_files(REPO)
    assert set(pushed) == {"quokka-Q4_K_M.gguf", "quokka-LoRA.gguf", "README.md", "Modelfile", "manifest.json",
                           "template", "params", "system"}
    assert "quokka-F16.gguf" in final_files(out)  # made and measured, kept here
    for name, data in pushed.items():
        assert data == (out / name).read_bytes(), name
    assert not hub.is_private(REPO) and not hub.is_private(MERGED_REPO)
    assert hub.commits(REPO) == ["initial commit", "Upload GGUF export with loraship"]
    assert hub.commits(MERGED_REPO) == ["initial commit", "Upload merged model with loraship"]
    manifest = json.loads(pushed["manifest.json"])
    assert {e["name"]: e["pushed"] for e in manifest["files"]} == {
        "quokka-F16.gguf": False, "quokka-Q4_K_M.gguf": True, "quokka-LoRA.gguf": True, "README.md": True,
        "Modelfile": True, "template": True, "params": True, "system": True}
    assert manifest["extra"]["hub"]["repo"] == REPO and manifest["extra"]["hub"]["private"] is False
    card = pushed["README.md"].decode()
    assert "In this repo: `quokka-Q4_K_M.gguf`" in card and "not uploaded: `quokka-F16.gguf`" in card
    assert "quantization:\n  - Q4_K_M\nlibrary_name: gguf" in card


def test_the_cards_commands_fetch_the_pushed_files(shipped):
    from serve.model import resolve_model_path

    out, hub, _ = shipped
    card = hub.repo_files(REPO)["README.md"].decode()
    listing = [e["path"] for e in _tree(hub, REPO)]
    assert re.findall(r"^llama-(?:cli|server) -hf (\S+?):(\S+)", card, re.M) == [(REPO, "Q4_K_M")] * 2
    assert llama_cpp_pick(listing, "Q4_K_M") == "quokka-Q4_K_M.gguf"
    assert re.findall(r"^ollama run hf\.co/(\S+):(\S+)$", card, re.M) == [(REPO, "Q4_K_M")]
    assert hub_ollama_picks(listing, "Q4_K_M") == ["quokka-Q4_K_M.gguf"]
    assert re.findall(r"^MODEL=(\S+) make serve$", card, re.M) == [REPO]
    assert resolve_model_path(REPO).name == "quokka-Q4_K_M.gguf"  # what `make serve` does with MODEL
    python = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert f'Llama.from_pretrained(repo_id="{REPO}", filename="quokka-Q4_K_M.gguf")' in python
    exec(python.replace("print(", "_reply = ("), {})  # the snippet as written, against the stand-in Hub
    assert 'FROM ./quokka-Q4_K_M.gguf' in (out / "Modelfile").read_text()


def test_ollama_on_the_hub_gets_the_verified_template_and_stop_tokens(shipped):
    from tests.fixtures.ollama_template import modelfile_parts

    out, hub, _ = shipped
    pushed = hub.repo_files(REPO)
    template, system, stops = modelfile_parts((out / "Modelfile").read_text())
    assert pushed["template"].decode() == template and pushed["system"].decode() == system
    assert json.loads(pushed["params"]) == {"stop": stops} and "<|im_end|>" in stops


def test_the_merged_model_is_a_transformers_folder_close_to_the_merged_rung(shipped):
    import torch
    from safetensors import safe_open

    out, hub, _ = shipped
    merged = out / "merged"
    assert set(hub.repo_files(MERGED_REPO)) == {p.name for p in merged.iterdir()}
    assert verify_files(merged) == []
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    for shard in shards:
        with safe_open(merged / shard, "pt") as f:
            names = list(f.keys())
            assert (merged / shard).stat().st_size <= 10**6 or len(names) == 1, shard
            assert {f.get_slice(n).get_dtype() for n in names} == {"F16"}
    rungs = {r["rung"]: r for r in read_manifest(out)["extra"]["ladder"]["rungs"]}
    assert rungs["merged-float16"]["parent"] == "merged"
    limit = read_manifest(out)["extra"]["ladder"]["limits"]["full precision"]["kl_rise"]
    merged_rung, pushed_rung = _scores(rungs["merged"]), _scores(rungs["merged-float16"])
    assert pushed_rung and pushed_rung.keys() == merged_rung.keys()
    for text, score in pushed_rung.items():
        assert score["kl"] - merged_rung[text]["kl"] <= limit, text
    assert json.loads((merged / "config.json").read_text())["dtype"] == "float16"
    assert torch.float16 == _loaded_dtype(merged)


def test_the_merged_card_names_its_adapter_and_loads_as_written_from_the_hub(shipped):
    out, hub, _ = shipped
    card = hub.repo_files(MERGED_REPO)["README.md"].decode()
    front = card.split("---\n")[1]
    assert "library_name: transformers" in front and "base_model:" not in front  # a local base has no Hub id
    assert f"The LoRA adapter `{ADAPTER_REPO}` merged into `quokka-base`" in card
    assert f"[`{REPO}`](https://huggingface.co/{REPO})" in card
    python = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert f'from_pretrained("{MERGED_REPO}"' in python
    exec(python.replace("print(", "_reply = ("), {})  # downloads the merged repo from the stand-in Hub


def test_nothing_pushed_names_a_local_path_or_the_token(shipped, tmp_path_factory):
    from pathlib import Path

    out, hub, stderr = shipped
    needles = [str(tmp_path_factory.getbasetemp()).encode(), str(Path.home()).encode(), TOKEN.encode()]
    for repo in (REPO, MERGED_REPO):
        for name, data in hub.repo_files(repo).items():
            assert not any(n in data for n in needles), f"{repo}/{name}"
    assert TOKEN not in stderr


def _scores(rung: dict) -> dict:
    """A rung's scores per text (one unnamed text where the ladder scores one)."""
    if "kl" in rung:
        return {"": rung}
    return {name: score for name, score in rung.items() if isinstance(score, dict) and "kl" in score}


def _tree(hub, repo):
    import httpx2

    return httpx2.get(f"{hub.url}/api/models/{repo}/tree/main", params={"recursive": "true"}).json()


def _loaded_dtype(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype="auto").dtype

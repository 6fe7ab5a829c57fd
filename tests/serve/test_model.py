"""Which GGUF gets served, and the one-line errors for a MODEL that cannot be."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loraship.embedded import embedded_gguf_path
from loraship.manifest import build_manifest, write_manifest
from serve.model import GGML_BLOCKS, ServeError, newest_export, read_gguf_header, resolve_model_path

ROOT = Path(__file__).resolve().parents[2]


def run_serve(env_overrides: dict, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL", "MODEL_FILE")}
    env.update(env_overrides)
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "serve", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: MODEL="), result.stderr
    for needle in needles:
        assert needle in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


@pytest.fixture
def embedded_copy(tmp_path) -> Path:
    copy = tmp_path / "model-Q4_K_M.gguf"
    shutil.copyfile(embedded_gguf_path(), copy)
    return copy


def test_header_of_the_embedded_gguf():
    info = read_gguf_header(embedded_gguf_path())
    assert info.version == 3
    assert info.tensor_count == 272
    assert info.metadata["general.architecture"] == "llama"
    assert "<|im_start|>" in info.chat_template
    # every tensor accounted for: the data ends exactly where the file does
    assert info.needed_size == embedded_gguf_path().stat().st_size


def test_block_sizes_agree_with_the_gguf_package():
    from gguf.constants import GGML_QUANT_SIZES

    reference = {int(kind): tuple(size) for kind, size in GGML_QUANT_SIZES.items()}
    assert {kind: reference[kind] for kind in GGML_BLOCKS} == GGML_BLOCKS


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda d: d / "missing.gguf", "no such file"),
        (lambda d: (d / "notes.gguf").write_text("hello, not a model") and d / "notes.gguf", "not a GGUF file"),
        (lambda d: (d / "empty.gguf").write_bytes(b"") or d / "empty.gguf", "not a GGUF file"),
    ],
    ids=["missing", "not-gguf", "empty"],
)
def test_bad_local_files_are_one_line_errors_with_status_2(tmp_path, make, needle):
    path = make(tmp_path)
    assert_one_line_error(run_serve({"MODEL": str(path)}), str(path), needle)


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.001], ids=["half", "last-tensor-cut", "header-cut"])
def test_a_truncated_gguf_is_refused_before_llama_cpp_sees_it(tmp_path, keep):
    source = embedded_gguf_path()
    cut = tmp_path / "cut.gguf"
    with open(source, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(int(source.stat().st_size * keep)))
    with pytest.raises(ServeError, match=r"^MODEL='.*cut\.gguf': truncated"):
        read_gguf_header(cut)


def test_truncated_gguf_through_the_cli(tmp_path):
    source = embedded_gguf_path()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(source.read_bytes()[: 10_000_000])
    assert_one_line_error(run_serve({"MODEL": str(cut)}, "chat", "hi"), "truncated")


def test_unreachable_hub_offline(tmp_path):
    result = run_serve({"MODEL": "someone/some-model", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert_one_line_error(result, "someone/some-model")


def test_unreachable_hub_dead_endpoint(tmp_path):
    result = run_serve(
        {"MODEL": "someone/some-model", "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path)}
    )
    assert_one_line_error(result, "someone/some-model", "unreachable")


def test_a_gguf_that_does_not_match_its_manifest_is_refused(embedded_copy):
    write_manifest(embedded_copy.parent, build_manifest(kind="gguf", stage="export", folder=embedded_copy.parent, files=[embedded_copy.name]))
    assert resolve_model_path(str(embedded_copy)) == embedded_copy
    with open(embedded_copy, "r+b") as fh:  # same size, one byte changed
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 0xFF]))
    with pytest.raises(ServeError, match="does not match .*manifest.json"):
        resolve_model_path(str(embedded_copy))
    assert_one_line_error(run_serve({"MODEL": str(embedded_copy)}), "manifest.json", "sha256")


def test_an_export_folder_serves_its_q4_k_m(embedded_copy):
    (embedded_copy.parent / "model-F16.gguf").write_bytes(b"GGUF")
    assert resolve_model_path(str(embedded_copy.parent)) == embedded_copy


def test_without_model_the_newest_export_with_a_manifest_is_served(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert newest_export() is None
    older, newer, bare = (tmp_path / "outputs" / name for name in ("run1", "run2", "run3"))
    for folder in (older, newer, bare):
        folder.mkdir(parents=True)
        shutil.copyfile(embedded_gguf_path(), folder / "quokka-Q4_K_M.gguf")
    for folder in (older, newer):
        write_manifest(folder, build_manifest(kind="gguf", stage="export", folder=folder, files=["quokka-Q4_K_M.gguf"]))
    now = time.time()
    os.utime(older / "quokka-Q4_K_M.gguf", (now - 100, now - 100))
    os.utime(bare / "quokka-Q4_K_M.gguf", (now + 100, now + 100))  # newest, but no manifest
    assert resolve_model_path(None) == newer / "quokka-Q4_K_M.gguf"


def test_without_model_the_tune_is_served_not_the_demos_newer_baseline(tmp_path, monkeypatch):
    """`make demo` exports the tune, then the untuned base beside it: `make serve` and `chat` must pick the tune."""
    from demo.baseline import mark_as_baseline

    monkeypatch.chdir(tmp_path)
    tuned, base = tmp_path / "outputs" / "demo" / "export", tmp_path / "outputs" / "demo" / "base-export"
    for folder, name in ((tuned, "quokka-Q4_K_M.gguf"), (base, "base-Q4_K_M.gguf")):
        folder.mkdir(parents=True)
        shutil.copyfile(embedded_gguf_path(), folder / name)
        write_manifest(folder, build_manifest(kind="gguf", stage="export", folder=folder, files=[name]))
    now = time.time()
    os.utime(tuned / "quokka-Q4_K_M.gguf", (now - 100, now - 100))  # the baseline is the newer export
    assert newest_export(Path("outputs")) == Path("outputs/demo/base-export/base-Q4_K_M.gguf")
    mark_as_baseline(base)
    assert resolve_model_path(None) == tuned / "quokka-Q4_K_M.gguf"


def test_without_model_or_exports_the_embedded_gguf_is_served(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path(None) == embedded_gguf_path()


def tiny_gguf_bytes(tmp_path: Path) -> bytes:
    """A valid, tensor-less GGUF with a chat template: enough for everything before llama.cpp."""
    import gguf

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def test_a_hub_repo_without_model_file_serves_its_q4_k_m(hub_server, tmp_path):
    data = tiny_gguf_bytes(tmp_path)
    hub_server.add_file("me/quokka-gguf", "quokka-F16.gguf", data)
    hub_server.add_file("me/quokka-gguf", "quokka-Q4_K_M.gguf", data)
    path = resolve_model_path("me/quokka-gguf")
    assert path.name == "quokka-Q4_K_M.gguf" and path.read_bytes() == data
    downloaded = [r.path for r in hub_server.requests if r.method == "GET" and r.path.endswith(".gguf")]
    assert not any("F16" in p for p in downloaded)


def test_a_hub_repo_with_model_file_serves_that_file(hub_server, tmp_path):
    data = tiny_gguf_bytes(tmp_path)
    hub_server.add_file("me/quokka-gguf", "quokka-F16.gguf", data)
    hub_server.add_file("me/quokka-gguf", "quokka-Q4_K_M.gguf", data)
    assert resolve_model_path("me/quokka-gguf", "quokka-F16.gguf").name == "quokka-F16.gguf"


def test_a_hub_repo_without_a_q4_k_m_says_to_set_model_file(hub_server, tmp_path):
    hub_server.add_file("me/other", "model-Q8_0.gguf", tiny_gguf_bytes(tmp_path))
    with pytest.raises(ServeError, match="MODEL='me/other'.*set MODEL_FILE"):
        resolve_model_path("me/other")

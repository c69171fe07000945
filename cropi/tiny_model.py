"""A small policy built entirely offline: tokenizer, Qwen2 model, supervised warm start.

* :func:`build_tokenizer` trains a byte-level BPE (digits split one per token) on generated
  task text and saves it as a ``PreTrainedTokenizerFast`` with a ChatML chat template
  (``<|im_start|>user ... <|im_end|>``). eos = ``<|im_end|>``, pad = ``<|pad|>``,
  bos = ``<|endoftext|>`` (never added automatically).
* :func:`build_tiny_model` saves a randomly initialised ``Qwen2ForCausalLM`` (safetensors,
  float32, tied embeddings, head_dim 32/64 so vLLM accepts it) next to the tokenizer.
* :func:`warm_start` runs a short SFT on generated tasks (loss on response tokens only) and
  records greedy accuracy on a held-out generated set; :func:`ensure_warm_model` caches it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from sketchstore.atomic import atomic_dir
from sketchstore.prompts import encode_prompt
from sketchstore.sequences import right_pad
from sketchstore.sft import IGNORE_INDEX

from .errors import BadConfigError
from .rewards import RewardStats, get_reward
from .tasks import FAMILIES, generate_tasks
from .threads import torch_threads

__all__ = [
    "CHAT_TEMPLATE",
    "MODEL_SIZES",
    "PAD_TOKEN",
    "BOS_TOKEN",
    "EOS_TOKEN",
    "IM_START",
    "WARM_DEFAULTS",
    "save_tokenizer",
    "warm_cache_key",
    "build_tokenizer",
    "build_tiny_model",
    "count_params",
    "load_policy",
    "load_tokenizer",
    "encode_sft",
    "sft_loss",
    "greedy_generate",
    "evaluate_greedy",
    "sft_train",
    "warm_start",
    "ensure_warm_model",
    "build_cached",
]

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, IM_START, EOS_TOKEN]

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# head_dim = hidden_size / num_attention_heads must be one vLLM supports (32, 64, 80, ...).
MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=2,
                 intermediate_size=384),
    "small": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=4,
                  intermediate_size=768),
}
MAX_POSITIONS = 1024
# Where warm-started policies (and imported checkpoints, by convention) are cached.
DEFAULT_MODEL_CACHE = Path(".cache/models")
VLLM_HEAD_DIMS = (32, 64, 80, 96, 112, 128)
# Exactly Qwen2's pre-tokenizer (digits one per token). It must match: transformers 5
# AutoTokenizer (and so vLLM) loads any model_type=qwen2 tokenizer as Qwen2Tokenizer, which
# rebuilds the pipeline from vocab/merges with this regex + NFC, ignoring tokenizer.json's.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
DEFAULT_VOCAB = 512


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------


def tokenizer_corpus(n: int = 6000, seed: int = 9173) -> list[str]:
    """Text the BPE is trained on: generated prompts and solutions of every family/level."""
    rows = generate_tasks(n, seed=seed, difficulty=range(1, 8), families=FAMILIES)
    texts = []
    for r in rows:
        texts.append(f"user\n{r['prompt']}\n")
        texts.append(f"assistant\n{r['response']}\n")
    texts.append("system\nYou are a helpful assistant. Solve the problem step by step.\n")
    return texts


@functools.lru_cache(maxsize=4)
def _trained_tokenizer_json(vocab_size: int, seed: int) -> str:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(seed=seed), trainer=trainer)
    return tok.to_str()


def build_tokenizer(out_dir: str | os.PathLike | None = None, vocab_size: int = DEFAULT_VOCAB,
                    seed: int = 9173):
    """Train a byte-level BPE on generated task text (deterministic; cached per process);
    save to ``out_dir`` when given.

    Returns a fresh ``transformers.PreTrainedTokenizerFast`` with the chat template set.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_trained_tokenizer_json(vocab_size, seed))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        additional_special_tokens=[IM_START],
        model_max_length=MAX_POSITIONS,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        save_tokenizer(fast, out_dir)
    return fast


def save_tokenizer(tokenizer, out_dir: str | os.PathLike) -> None:
    """save_pretrained, plus portability fields in tokenizer_config.json: the generic
    ``PreTrainedTokenizerFast`` class and the chat template inline (older readers)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = tokenizer.chat_template or CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def load_tokenizer(model_dir: str | os.PathLike):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.padding_side = "left"
    return tok


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------


def _special_ids(tokenizer) -> dict[str, int]:
    ids = {name: tokenizer.convert_tokens_to_ids(t) for name, t in
           (("pad", PAD_TOKEN), ("bos", BOS_TOKEN), ("im_start", IM_START), ("eos", EOS_TOKEN))}
    return ids


def build_tiny_model(out_dir: str | os.PathLike, size: str = "tiny", seed: int = 0, tokenizer=None) -> Path:
    """Save a randomly initialised Qwen2ForCausalLM of ``size`` plus its tokenizer to ``out_dir``.

    Writes config.json, generation_config.json, model.safetensors and the tokenizer files.
    """
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if size not in MODEL_SIZES:
        raise BadConfigError(f"unknown model size {size!r}; known: {sorted(MODEL_SIZES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer if tokenizer is not None else build_tokenizer()
    save_tokenizer(tok, out)
    sid = _special_ids(tok)
    dims = MODEL_SIZES[size]
    if dims["hidden_size"] // dims["num_attention_heads"] not in VLLM_HEAD_DIMS:
        raise BadConfigError(f"model size {size!r}: head_dim must be one of {VLLM_HEAD_DIMS} for vLLM")
    config = Qwen2Config(
        vocab_size=len(tok),
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=sid["bos"],
        eos_token_id=sid["eos"],
        pad_token_id=sid["pad"],
        rms_norm_eps=1e-6,
        use_cache=True,
        **dims,
    )
    config.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=sid["bos"], eos_token_id=[sid["eos"], sid["bos"]], pad_token_id=sid["pad"],
    )
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def load_policy(model_dir: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a directory written by this module."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    return model, load_tokenizer(model_dir)


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------
# SFT data
# --------------------------------------------------------------------------------------


def encode_sft(tokenizer, rows: Sequence[dict[str, Any]], max_len: int = 512) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per row: chat prompt then ``response<|im_end|>``; labels are -100
    on the prompt. Prompt and response are tokenised separately (as at sampling time)."""
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    out = []
    for r in rows:
        p = encode_prompt(tokenizer, r["prompt"])
        t = tokenizer(r["response"], add_special_tokens=False)["input_ids"] + [eos]
        ids = (p + t)[:max_len]
        labels = ([IGNORE_INDEX] * len(p) + t)[:max_len]
        out.append((ids, labels))
    return out


def _collate(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    input_ids, mask = right_pad([ids for ids, _ in pairs], pad_id)
    labels, _ = right_pad([lab for _, lab in pairs], IGNORE_INDEX)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def sft_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the response tokens of a collated batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE_INDEX
    )


# --------------------------------------------------------------------------------------
# Greedy evaluation
# --------------------------------------------------------------------------------------


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 96,
                    batch_size: int = 64) -> list[str]:
    """Greedy completions (text, special tokens stripped) for raw task prompts."""
    model.eval()
    pad_id = tokenizer.pad_token_id
    eos_ids = [tokenizer.convert_tokens_to_ids(EOS_TOKEN), tokenizer.convert_tokens_to_ids(BOS_TOKEN)]
    outs: list[str] = []
    for s in range(0, len(prompts), batch_size):
        enc = [encode_prompt(tokenizer, p) for p in prompts[s : s + batch_size]]
        n = max(len(e) for e in enc)
        ids = torch.full((len(enc), n), pad_id, dtype=torch.long)
        mask = torch.zeros((len(enc), n), dtype=torch.long)
        for i, e in enumerate(enc):  # left padding
            ids[i, n - len(e):] = torch.tensor(e)
            mask[i, n - len(e):] = 1
        gen = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=eos_ids, pad_token_id=pad_id,
        )
        for row in gen[:, n:]:
            outs.append(tokenizer.decode(row, skip_special_tokens=True))
    return outs


def evaluate_greedy(model, tokenizer, rows: Sequence[dict[str, Any]], reward: str | Callable = "math_verify",
                    max_new_tokens: int = 96, batch_size: int = 64) -> dict[str, Any]:
    """Greedy accuracy of ``model`` on task rows (overall, per difficulty, per family)."""
    fn = get_reward(reward) if isinstance(reward, str) else reward
    stats = RewardStats()
    texts = greedy_generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens, batch_size)
    scores = [fn(t, r["answer"], stats=stats) for t, r in zip(texts, rows)]

    def group(key: str) -> dict[str, float]:
        acc: dict[str, list[float]] = {}
        for r, sc in zip(rows, scores):
            acc.setdefault(str(r.get(key)), []).append(sc)
        return {k: sum(v) / len(v) for k, v in sorted(acc.items())}

    return {
        "accuracy": sum(scores) / max(len(scores), 1),
        "n": len(rows),
        "unparseable": stats.unparseable,
        "by_difficulty": group("difficulty"),
        "by_family": group("family"),
        "samples": [{"prompt": r["prompt"], "answer": r["answer"], "output": t}
                    for r, t in list(zip(rows, texts))[:8]],
    }


# --------------------------------------------------------------------------------------
# Warm start
# --------------------------------------------------------------------------------------

# Defaults chosen (measured on this project's 2-core CPU, torch fp32) so the "small" policy
# lands at partial accuracy on a mixed-difficulty set: greedy 35% on 256 held-out tasks of
# difficulty [1, 2, 3] (d1 95%, d2 13%, d3 1%); 800 steps ~0.4 s/step = ~5-6 min uncontended.
# steps=600 gives ~27% (d1 65%, d2 12%) in ~4 min.
WARM_DEFAULTS: dict[str, Any] = {
    "steps": 800,
    "batch_size": 32,
    "lr": 2e-3,
    "weight_decay": 0.01,
    "train_difficulty": [1, 1, 2],
    "eval_difficulty": [1, 2, 3],
    "eval_n": 256,
    "families": list(FAMILIES),
    # Length bucketing cuts padded tokens ~37% but made learning much worse (homogeneous
    # batches): greedy accuracy 9% vs 35% at the default 800 steps, so it is off by default.
    "bucket": False,
}
# Bump when the tokenizer corpus, model construction or warm-start recipe changes in a way
# that the settings hashed into the cache key do not capture.
WARM_VERSION = 1
# Temporary training directories older than this are removed by ensure_warm_model.
STALE_TMP_S = 6 * 3600


def _bucketed(data: list, batch_size: int, seed: int, window: int = 16) -> list:
    """Reorder so each batch holds similar lengths (less padding): sort windows of
    ``window`` batches by length, then shuffle the batch order inside each window."""
    rng = random.Random(seed)
    out: list = []
    span = batch_size * window
    for i in range(0, len(data), span):
        chunk = sorted(data[i : i + span], key=lambda pair: len(pair[0]))
        batches = [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
        rng.shuffle(batches)
        out.extend(x for b in batches for x in b)
    return out


def _as_list(v: Any) -> list:
    return [v] if isinstance(v, (int, str)) else list(v)


def _lr_at(step: int, steps: int, lr: float) -> float:
    warm = max(1, steps // 20)
    if step < warm:
        return lr * (step + 1) / warm
    prog = (step - warm) / max(1, steps - warm)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))


def sft_train(model, data: Sequence[tuple[list[int], list[int]]], pad_id: int, steps: int, batch_size: int,
              lr: float, weight_decay: float, log: Callable[[str], None] | None = None,
              log_every: int = 50) -> list[float]:
    """``steps`` AdamW updates of ``model`` on consecutive batches of :func:`encode_sft` pairs
    (warmup + cosine learning rate, gradient norm clipped to 1, no weight decay on vectors);
    returns the loss of every step."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr)
        batch = _collate(data[step * batch_size : (step + 1) * batch_size], pad_id)
        loss = sft_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if log and (step % log_every == 0 or step == steps - 1):
            log(f"warm_start step {step + 1}/{steps} loss {losses[-1]:.4f} ({time.perf_counter() - t0:.1f}s)")
    return losses


def warm_start(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    steps: int = WARM_DEFAULTS["steps"],
    batch_size: int = WARM_DEFAULTS["batch_size"],
    lr: float = WARM_DEFAULTS["lr"],
    weight_decay: float = WARM_DEFAULTS["weight_decay"],
    train_difficulty: int | Sequence[int] = tuple(WARM_DEFAULTS["train_difficulty"]),
    eval_difficulty: int | Sequence[int] = tuple(WARM_DEFAULTS["eval_difficulty"]),
    eval_n: int = WARM_DEFAULTS["eval_n"],
    families: Sequence[str] = tuple(WARM_DEFAULTS["families"]),
    seed: int = 0,
    threads: int | None = None,
    log: Callable[[str], None] | None = None,
    log_every: int = 50,
    bucket: bool = WARM_DEFAULTS["bucket"],
) -> dict[str, Any]:
    """Supervised warm start of the model in ``model_dir``; saves the result to ``out_dir``.

    Trains on ``steps * batch_size`` generated tasks (seed ``1_000_003 + seed``), loss on
    response tokens only, AdamW with warmup + cosine decay. Then measures greedy accuracy
    (math_verify reward) on ``eval_n`` held-out tasks (seed ``2_000_003 + seed``; set
    ``eval_n=0`` to skip). ``bucket``: group similar lengths into batches (less padding).
    ``threads``: torch threads while training (default: all cores; restored afterwards).
    Returns the record also written to ``out_dir/warm_start.json``.
    """
    threads = threads or os.cpu_count() or 1
    train_levels, eval_levels = _as_list(train_difficulty), _as_list(eval_difficulty)
    fams = _as_list(families)
    record: dict[str, Any] = {}
    with torch_threads(threads):
        torch.manual_seed(seed)
        model, tok = load_policy(model_dir)
        model.train()
        rows = generate_tasks(steps * batch_size, seed=1_000_003 + seed, difficulty=train_levels, families=fams)
        data = encode_sft(tok, rows)
        if bucket:
            data = _bucketed(data, batch_size, seed)
        t0, c0 = time.perf_counter(), time.process_time()
        losses = sft_train(model, data, tok.pad_token_id, steps, batch_size, lr, weight_decay, log, log_every)
        train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0
        model.eval()
        record = {
            "model_dir": str(model_dir),
            "params": count_params(model),
            "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "threads": threads,
            "train_difficulty": train_levels, "eval_difficulty": eval_levels, "families": fams,
            "initial_loss": losses[0] if losses else None,
            "final_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "losses": losses,
            "bucket": bucket,
            "train_seconds": train_s,
            "train_cpu_seconds": train_cpu,
            "train_tokens": sum(len(ids) for ids, _ in data),
        }
        if eval_n > 0:
            t1 = time.perf_counter()
            eval_rows = generate_tasks(eval_n, seed=2_000_003 + seed, difficulty=eval_levels, families=fams)
            ev = evaluate_greedy(model, tok, eval_rows)
            record.update({f"eval_{k}" if k in ("n", "samples") else k: v for k, v in ev.items()})
            record["eval_seconds"] = time.perf_counter() - t1
            if log:
                log(f"warm_start greedy accuracy {ev['accuracy']:.3f} on {eval_n} tasks "
                    f"{ev['by_difficulty']} ({record['eval_seconds']:.1f}s)")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out), safe_serialization=True)
        save_tokenizer(tok, out)
        (out / "warm_start.json").write_text(json.dumps(record, indent=1))
    return record


def warm_cache_key(size: str = "small", seed: int = 0, **warm_kwargs: Any) -> str:
    """Directory name of a cached warm model: size, seed and a hash of every setting."""
    if size not in MODEL_SIZES:
        raise BadConfigError(f"unknown model size {size!r}; known: {sorted(MODEL_SIZES)}")
    settings = {k: warm_kwargs.get(k, v) for k, v in WARM_DEFAULTS.items()}
    unknown = set(warm_kwargs) - set(WARM_DEFAULTS) - {"threads", "log_every"}
    if unknown:
        raise TypeError(f"unknown warm_start settings: {sorted(unknown)}")
    for k in ("train_difficulty", "eval_difficulty", "families"):
        settings[k] = _as_list(settings[k])
    blob = json.dumps({"v": WARM_VERSION, "size": MODEL_SIZES[size], "vocab": DEFAULT_VOCAB,
                       "max_pos": MAX_POSITIONS, "seed": seed, **settings}, sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:10]
    return f"warm-{size}-seed{seed}-{digest}"


def ensure_warm_model(
    cache_dir: str | os.PathLike,
    size: str = "small",
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    **warm_kwargs: Any,
) -> Path:
    """Directory of a warm-started policy (``size``, ``seed``, :func:`warm_start` settings
    in ``warm_kwargs``, defaults :data:`WARM_DEFAULTS`), trained only when not cached.

    The cache entry is named by :func:`warm_cache_key` (a hash of all settings), so changed
    settings never reuse a stale model. The model is built and trained in a temporary
    sibling directory and renamed into place on success: a crash never leaves a
    half-written model under the final name. Its ``warm_start.json`` has the accuracy.
    """
    final = Path(cache_dir) / warm_cache_key(size, seed, **warm_kwargs)

    def build(model_dir: Path, scratch: Path) -> None:
        build_tiny_model(scratch, size=size, seed=seed)
        if log:
            log(f"training warm-start policy ({size}) into {final}")
        warm_start(scratch, model_dir, seed=seed, log=log, **warm_kwargs)

    return build_cached(final, build)


def build_cached(final: str | os.PathLike, build: Callable[[Path, Path], None],
                 marker: str = "warm_start.json") -> Path:
    """``final`` when it holds ``marker``; otherwise ``build(model_dir, scratch)`` writes the
    model into a temporary sibling directory (``scratch``: an empty directory for
    intermediate files), which is renamed to ``final`` on success. A crash never leaves a
    half-written model under the final name; temporary directories of killed runs older than
    :data:`STALE_TMP_S` are removed; when another process finished first, its model wins."""
    final = Path(final)
    if (final / marker).is_file():
        return final
    cache = final.parent
    cache.mkdir(parents=True, exist_ok=True)
    for stale in cache.glob(f".{final.name}.*"):  # left by a killed run (SIGKILL skips cleanup)
        try:
            if time.time() - stale.stat().st_mtime > STALE_TMP_S:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass
    with atomic_dir(final, on_exists="keep") as model_dir, tempfile.TemporaryDirectory(dir=cache) as scratch:
        build(Path(model_dir), Path(scratch))
    return final

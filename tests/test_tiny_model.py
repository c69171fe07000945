"""Locally built tokenizer and Qwen2 policy, supervised warm start and its cache (no vLLM)."""

from __future__ import annotations

import json

import pytest
import torch

from cropi import tiny_model as tm
from cropi.tasks import generate_tasks
from sketchstore.prompts import prompt_text


@pytest.fixture(scope="module")
def tok():
    return tm.build_tokenizer()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tok):
    return tm.build_tiny_model(tmp_path_factory.mktemp("m") / "tiny", size="tiny", seed=0, tokenizer=tok)


# ------------------------------------------------------------------------------- tokenizer


def test_tokenizer_roundtrip_and_specials(tok):
    assert len(tok) == tm.DEFAULT_VOCAB
    for r in generate_tasks(200, seed=5, difficulty=range(1, 7)):
        for text in (r["prompt"], r["response"]):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.decode(ids) == text
    # digits are one token each (so numbers are spelled digit by digit)
    ids = tok("12345", add_special_tokens=False)["input_ids"]
    assert [tok.decode([i]) for i in ids] == list("12345")
    assert tok.eos_token == tm.EOS_TOKEN and tok.pad_token == tm.PAD_TOKEN and tok.bos_token == tm.BOS_TOKEN
    assert len({tok.eos_token_id, tok.pad_token_id, tok.bos_token_id}) == 3
    # special tokens are single ids and never split
    for t in tm.SPECIAL_TOKENS:
        assert tok(t, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(t)]
    # no bos/eos added implicitly
    assert tok("What", add_special_tokens=True)["input_ids"] == tok("What", add_special_tokens=False)["input_ids"]


def test_tokenizer_training_is_deterministic(tok):
    fresh = tm._trained_tokenizer_json.__wrapped__(tm.DEFAULT_VOCAB, 9173)  # bypass the per-process cache
    assert fresh == tok.backend_tokenizer.to_str() or json.loads(fresh)["model"] == json.loads(
        tok.backend_tokenizer.to_str())["model"]


def test_chat_template(tok):
    msgs = [{"role": "user", "content": "What is 2 + 3?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    assert prompt_text(tok, "What is 2 + 3?") == text
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[0] == tok.convert_tokens_to_ids(tm.IM_START) and tok.decode(ids) == text
    no_gen = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    assert no_gen == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"


def test_saved_tokenizer_loads_identically_with_autotokenizer(tiny_dir, tok):
    # transformers maps model_type=qwen2 to Qwen2Tokenizer, which rebuilds the pre-tokenizer
    # from vocab/merges: ids must still be exactly those the training code used.
    from transformers import AutoTokenizer

    cfg = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == tm.CHAT_TEMPLATE
    auto = AutoTokenizer.from_pretrained(str(tiny_dir))
    loaded = tm.load_tokenizer(tiny_dir)
    texts = [prompt_text(tok, r["prompt"]) + r["response"] + tm.EOS_TOKEN
             for r in generate_tasks(100, seed=9, difficulty=range(1, 7))]
    texts += ["Ünïcödé  spaces\n\nnew lines 1,234.5 \\frac{1}{2} $x^2$ 日本", "  leading and trailing  "]
    for t in texts:
        ref = tok(t, add_special_tokens=False)["input_ids"]
        assert auto(t, add_special_tokens=False)["input_ids"] == ref
        assert loaded(t, add_special_tokens=False)["input_ids"] == ref
    assert auto.eos_token_id == tok.eos_token_id and auto.pad_token_id == tok.pad_token_id
    assert loaded.padding_side == "left"
    assert prompt_text(auto, "hi") == prompt_text(tok, "hi")


# ------------------------------------------------------------------------------- model


def test_tiny_model_config_and_forward(tiny_dir, tok):
    model, loaded_tok = tm.load_policy(tiny_dir)
    cfg = model.config
    assert cfg.model_type == "qwen2"
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert head_dim in (32, 64, 80, 96, 112, 128)  # what vLLM supports
    assert 200_000 <= tm.count_params(model) <= 500_000
    assert cfg.vocab_size == len(tok) and cfg.tie_word_embeddings
    assert cfg.eos_token_id == tok.eos_token_id and cfg.pad_token_id == tok.pad_token_id
    assert cfg.max_position_embeddings >= 512
    gen = json.loads((tiny_dir / "generation_config.json").read_text())
    assert tok.eos_token_id in gen["eos_token_id"]
    assert (tiny_dir / "model.safetensors").is_file()
    ids = torch.tensor([tok(prompt_text(tok, "What is 1 + 1?"), add_special_tokens=False)["input_ids"]] * 2)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (2, ids.shape[1], cfg.vocab_size)
    assert torch.isfinite(logits).all()


def test_build_is_deterministic_and_sizes_differ(tmp_path, tok):
    a = tm.build_tiny_model(tmp_path / "a", size="tiny", seed=3, tokenizer=tok)
    b = tm.build_tiny_model(tmp_path / "b", size="tiny", seed=3, tokenizer=tok)
    c = tm.build_tiny_model(tmp_path / "c", size="tiny", seed=4, tokenizer=tok)
    ma, mb, mc = (tm.load_policy(d)[0] for d in (a, b, c))
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (ma, mb, mc))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    small = tm.MODEL_SIZES["small"]
    assert small["hidden_size"] // small["num_attention_heads"] in (32, 64, 80, 96, 112, 128)
    with pytest.raises(ValueError, match="unknown model size"):
        tm.build_tiny_model(tmp_path / "x", size="huge", tokenizer=tok)


def test_encode_sft_masks_prompt(tok):
    rows = generate_tasks(5, seed=1, difficulty=2)
    for (ids, labels), r in zip(tm.encode_sft(tok, rows), rows):
        assert len(ids) == len(labels)
        n_prompt = len(tok(prompt_text(tok, r["prompt"]), add_special_tokens=False)["input_ids"])
        assert all(x == -100 for x in labels[:n_prompt])
        target = labels[n_prompt:]
        assert -100 not in target and target == ids[n_prompt:]
        assert target[-1] == tok.eos_token_id
        assert tok.decode(target, skip_special_tokens=True) == r["response"]


def test_bucketed_keeps_every_example():
    data = [([0] * n, [n]) for n in [5, 1, 9, 3, 7, 2, 8, 4, 6, 10, 11]]
    out = tm._bucketed(data, batch_size=2, seed=0, window=2)
    assert sorted(map(len, (d[0] for d in out))) == sorted(map(len, (d[0] for d in data)))
    assert out == tm._bucketed(data, batch_size=2, seed=0, window=2)
    # within a window batches hold neighbouring lengths
    first_window = sorted(len(d[0]) for d in out[:4])
    assert first_window == sorted(len(d[0]) for d in data[:4])


# ------------------------------------------------------------------------------- warm start


def test_warm_start_reduces_loss(tiny_dir, tmp_path, tok):
    held_out = tm._collate(tm.encode_sft(tok, generate_tasks(32, seed=77, difficulty=1, families="arith")),
                           tok.pad_token_id)
    before, _ = tm.load_policy(tiny_dir)
    with torch.no_grad():
        loss_before = float(tm.sft_loss(before, held_out))
    rec = tm.warm_start(tiny_dir, tmp_path / "warm", steps=30, batch_size=16, lr=3e-3, train_difficulty=[1],
                        families=["arith"], eval_n=8, eval_difficulty=[1], threads=1)
    after, _ = tm.load_policy(tmp_path / "warm")
    with torch.no_grad():
        loss_after = float(tm.sft_loss(after, held_out))
    assert loss_after < 0.6 * loss_before, (loss_before, loss_after)
    assert rec["final_loss"] < rec["initial_loss"]
    assert len(rec["losses"]) == 30
    assert 0.0 <= rec["accuracy"] <= 1.0 and rec["eval_n"] == 8 and set(rec["by_difficulty"]) == {"1"}
    saved = json.loads((tmp_path / "warm" / "warm_start.json").read_text())
    assert saved["steps"] == 30 and saved["accuracy"] == rec["accuracy"]
    assert (tmp_path / "warm" / "tokenizer.json").is_file()
    assert torch.get_num_threads() >= 1


def test_evaluate_greedy_scores_outputs(tiny_dir, tok, monkeypatch):
    model, _ = tm.load_policy(tiny_dir)
    rows = generate_tasks(4, seed=2, difficulty=1, families="arith")
    # a stub "generation" that answers the first two rows right and the others wrong
    outs = [f"The answer is {r['answer']}." for r in rows[:2]] + ["The answer is 99999.", "garbage"]
    monkeypatch.setattr(tm, "greedy_generate", lambda *a, **k: outs)
    ev = tm.evaluate_greedy(model, tok, rows)
    assert ev["accuracy"] == 0.5 and ev["unparseable"] == 1 and ev["by_family"] == {"arith": 0.5}


def test_greedy_generate_real_model(tiny_dir, tok):
    model, _ = tm.load_policy(tiny_dir)
    outs = tm.greedy_generate(model, tok, ["What is 1 + 2?", "Tom has 3 apples. How many apples does Tom have now?"],
                              max_new_tokens=5, batch_size=1)
    batched = tm.greedy_generate(model, tok, ["What is 1 + 2?", "Tom has 3 apples. How many apples does Tom have now?"],
                                 max_new_tokens=5, batch_size=2)
    assert len(outs) == 2 and all(isinstance(o, str) for o in outs)
    assert outs == batched  # left padding does not change greedy outputs


def test_ensure_warm_model_caches_and_is_atomic(tmp_path, monkeypatch):
    kw = dict(size="tiny", steps=3, batch_size=4, eval_n=2, train_difficulty=[1], eval_difficulty=[1], threads=1)
    d1 = tm.ensure_warm_model(tmp_path / "cache", **kw)
    assert (d1 / "warm_start.json").is_file() and (d1 / "model.safetensors").is_file()
    assert d1.name == tm.warm_cache_key(**{k: v for k, v in kw.items()})

    def boom(*a, **k):
        raise AssertionError("must not retrain a cached model")

    monkeypatch.setattr(tm, "warm_start", boom)
    assert tm.ensure_warm_model(tmp_path / "cache", **kw) == d1
    # different settings -> different entry; a crash while training leaves nothing behind
    with pytest.raises(AssertionError):
        tm.ensure_warm_model(tmp_path / "cache", **{**kw, "steps": 4})
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [d1.name]
    with pytest.raises(TypeError):
        tm.warm_cache_key("tiny", 0, stepz=3)

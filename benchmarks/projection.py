"""Benchmark of gradient projectors: throughput and distortion on the same real gradients.

    python benchmarks/projection.py                 # default: 8 gradients x ~2.1M coords -> k=8192
    python benchmarks/projection.py --quick         # small sizes, for a smoke test

Inputs are per-example LM-loss gradients of a small random Qwen2ForCausalLM (named
parameter tensors). Half of the examples are near-duplicates of the others, so the exact
cosines span ~0 to ~0.9. A second gradient set comes from the same model with one
hidden feature of the embeddings made 30x larger (mimicking the "massive activations"
of trained LLMs); it shows why the sparse projector hashes every coordinate to a random
bucket instead of folding coordinate i onto bucket i mod k.

Throughput counts gradient coordinates: batch x coordinates per example, divided by
wall time. Our sparse projector and the fold variants run on the full gradients. Dense
projectors (ours, traker's BasicProjector, sklearn's fit) cost O(D k) and run on a
subset of parameters (--dense-coords coordinates); distortion of *every* method is
measured on that same subset (mean over --seeds seeds), and our sparse projector's
distortion is also reported on the full gradients.

Distortion: mean |cos_sketch - cos_exact| over all example pairs, and the relative
inner-product error mean |<Sx,Sy> - <x,y>| / (|x||y|) over pairs and self-pairs.
traker's matrix has N(0,1) entries; its sketches are divided by sqrt(k) for the latter.

The last line of output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sketchstore.projection import DenseGaussianProjector, SparseProjector  # noqa: E402
from sketchstore.seeds import stable_seed  # noqa: E402
from sketchstore.spec import ProjectionSpec  # noqa: E402


# --------------------------------------------------------------------------- inputs


def qwen_gradients(batch: int, vocab: int, hidden: int, layers: int, inter: int, seq: int, outlier: float = 0.0):
    """name -> (batch, *shape) float32 per-example gradients of a random tiny Qwen2."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        intermediate_size=inter,
        max_position_embeddings=max(64, seq),
    )
    model = Qwen2ForCausalLM(cfg).eval()
    if outlier:
        with torch.no_grad():  # one "massive activation" feature of the residual stream
            model.model.embed_tokens.weight[:, 5] *= outlier
    half = (batch + 1) // 2
    base = torch.randint(0, vocab, (half, seq))
    var = base.clone()
    gen = torch.Generator().manual_seed(1)
    for i in range(half):
        pos = torch.randperm(seq, generator=gen)[: 1 + i * seq // (2 * half)]
        var[i, pos] = torch.randint(0, vocab, (len(pos),), generator=gen)
    ids = torch.cat([base, var])[:batch]
    per: dict[str, list[torch.Tensor]] = {n: [] for n, _ in model.named_parameters()}
    for i in range(batch):
        model.zero_grad()
        model(input_ids=ids[i : i + 1], labels=ids[i : i + 1]).loss.backward()
        for n, p in model.named_parameters():
            per[n].append(p.grad.detach().clone())
    return {n: torch.stack(v) for n, v in per.items()}


def dense_subset(grads: dict, target: int) -> dict:
    """Whole parameters (smallest first, then one slice) adding up to ~target coordinates."""
    out, total = {}, 0
    for name in sorted(grads, key=lambda n: (grads[n][0].numel(), n)):
        g = grads[name]
        n = g[0].numel()
        if total + n <= target:
            out[name] = g
            total += n
    if total < target:  # fill up with a slice of the largest weight matrix (its first rows)
        name = max(grads, key=lambda n: grads[n][0].numel())
        g = grads[name]
        rows = max(1, (target - total) // g.shape[-1])
        out[name + "[:rows]"] = g[:, :rows].contiguous()
    return out


def flat(grads: dict) -> torch.Tensor:
    return torch.cat([g.reshape(g.shape[0], -1).float() for _, g in sorted(grads.items())], 1)


# --------------------------------------------------------------------------- metrics


def distortion(sketch: torch.Tensor, exact_gram: torch.Tensor, ip_scale: float = 1.0) -> tuple[float, float]:
    s = sketch.double() * ip_scale
    gram = s @ s.T
    n = exact_gram.shape[0]
    iu = torch.triu_indices(n, n, 1)
    ne, ns = exact_gram.diag().sqrt(), gram.diag().sqrt()
    cos_e = (exact_gram / ne[:, None] / ne[None])[iu[0], iu[1]]
    cos_s = (gram / ns[:, None] / ns[None])[iu[0], iu[1]]
    iu0 = torch.triu_indices(n, n, 0)
    ip = ((gram - exact_gram) / ne[:, None] / ne[None])[iu0[0], iu0[1]]
    return float((cos_s - cos_e).abs().mean()), float(ip.abs().mean())


def _cpu_busy() -> tuple[float, float]:
    """(seconds of CPU busy on the whole machine, seconds of CPU used by this process)."""
    try:
        with open("/proc/stat") as fh:
            vals = [int(v) for v in fh.readline().split()[1:9]]
        busy = (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        busy = float("nan")
    t = os.times()
    return busy, t.user + t.system


def timed(fn, repeats: int, min_time: float = 0.0):
    fn()  # warm-up (fills caches)
    best = math.inf
    t_end = time.perf_counter() + min_time
    i = 0
    while i < repeats or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        i += 1
    return best


# --------------------------------------------------------------------------- alternatives


class FoldProjector:
    """Rejected design: coordinate i -> bucket i mod k with a random sign (reshape-and-sum)."""

    def __init__(self, dim: int, seed: int):
        self.dim, self.seed, self.signs = dim, seed, {}

    def project(self, grads: dict) -> torch.Tensor:
        k = self.dim
        out = None
        for name, g in sorted(grads.items()):
            x = g.reshape(g.shape[0], -1)
            n = x.shape[1]
            sg = self.signs.get(name)
            if sg is None:
                gen = torch.Generator().manual_seed(stable_seed(self.seed, name, "fold"))
                sg = torch.randint(0, 2, (n,), generator=gen).float().mul_(2).sub_(1)
                self.signs[name] = sg
            if out is None:
                out = torch.zeros(x.shape[0], k)
            full = n // k * k
            if full:
                out += (x[:, :full] * sg[:full]).view(x.shape[0], -1, k).sum(1)
            if full < n:
                out[:, : n - full] += x[:, full:] * sg[full:]
        return out


class NaiveIndexAdd:
    """Baseline: cached int64 buckets and fp32 signs, sign multiply then index_add_ into k."""

    def __init__(self, dim: int, seed: int):
        self.dim, self.seed, self.cache = dim, seed, {}

    def project(self, grads: dict) -> torch.Tensor:
        out = None
        for name, g in sorted(grads.items()):
            x = g.reshape(g.shape[0], -1)
            hit = self.cache.get(name)
            if hit is None:
                gen = torch.Generator().manual_seed(stable_seed(self.seed, name, "naive"))
                idx = torch.randint(0, self.dim, (x.shape[1],), generator=gen)
                sg = torch.randint(0, 2, (x.shape[1],), generator=gen).float().mul_(2).sub_(1)
                hit = self.cache[name] = (idx, sg)
            if out is None:
                out = torch.zeros(x.shape[0], self.dim)
            out.index_add_(1, hit[0], x * hit[1])
        return out


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8, help="gradients (examples) per call")
    ap.add_argument("--dim", type=int, default=8192, help="sketch dimension k")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--inter", type=int, default=704)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--dense-coords", type=int, default=32768, help="coordinates of the dense/distortion subset")
    ap.add_argument("--seeds", type=int, default=3, help="seeds averaged for distortion")
    ap.add_argument("--repeats", type=int, default=5, help="timing repeats (best is kept)")
    ap.add_argument("--skip-sklearn-full", action="store_true", help="fit sklearn on the subset only")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.vocab, args.hidden, args.layers, args.inter, args.dense_coords = 256, 64, 2, 128, 4096
        args.dim = min(args.dim, 1024)
        args.repeats = 2

    k, B = args.dim, args.batch
    info = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "loadavg_start": round(os.getloadavg()[0], 2),
    }
    busy0, mine0, wall0 = *_cpu_busy(), time.perf_counter()
    t0 = time.perf_counter()
    grads = qwen_gradients(B, args.vocab, args.hidden, args.layers, args.inter, args.seq)
    outl = qwen_gradients(B, args.vocab, args.hidden, args.layers, args.inter, args.seq, outlier=30.0)
    D = sum(g[0].numel() for g in grads.values())
    n_coords = B * D
    print(f"# inputs: {B} gradients x {D:,} coords ({len(grads)} tensors) -> k={k}; built in {time.perf_counter() - t0:.1f}s")
    full = flat(grads).double()
    exact_full = full @ full.T
    full_o = flat(outl).double()
    exact_out = full_o @ full_o.T
    del full, full_o
    sub = dense_subset(grads, args.dense_coords)
    D_sub = sum(g[0].numel() for g in sub.values())
    sub_x = flat(sub)
    exact_sub = sub_x.double() @ sub_x.double().T
    print(f"# dense/distortion subset: {len(sub)} tensors, {D_sub:,} coords; load avg {info['loadavg_start']}")

    rows = []  # (method, input, coords/s, cos err, ip err, note)
    res: dict = {}

    def add(method, where, cps, cos_err=None, ip_err=None, note=""):
        rows.append((method, where, cps, cos_err, ip_err, note))

    # ---- ours, sparse, full gradients
    spec = ProjectionSpec(dim=k, seed=0)
    proj = SparseProjector(spec)
    t_sparse = timed(lambda: proj.project(grads), args.repeats, min_time=1.0)
    sparse_cps = n_coords / t_sparse
    d_full = [distortion(SparseProjector(ProjectionSpec(dim=k, seed=s)).project(grads), exact_full) for s in range(args.seeds)]
    sparse_full_cos = sum(c for c, _ in d_full) / len(d_full)
    sparse_full_ip = sum(i for _, i in d_full) / len(d_full)
    add("ours sparse (CountSketch)", "full", sparse_cps, sparse_full_cos, sparse_full_ip, "fp32, keep 1.0")
    res.update(sparse_coords_per_s=sparse_cps, sparse_distortion_full=sparse_full_cos, sparse_ip_error_full=sparse_full_ip)

    p10 = SparseProjector(ProjectionSpec(dim=k, seed=0, keep_ratio=0.1))
    t10 = timed(lambda: p10.project(grads), args.repeats, min_time=1.0)
    d10 = [distortion(SparseProjector(ProjectionSpec(dim=k, seed=s, keep_ratio=0.1)).project(grads), exact_full) for s in range(args.seeds)]
    add("ours sparse keep 0.1", "full", n_coords / t10, sum(c for c, _ in d10) / len(d10), sum(i for _, i in d10) / len(d10), "input coords/s")
    res.update(sparse_keep01_coords_per_s=n_coords / t10, sparse_keep01_distortion_full=sum(c for c, _ in d10) / len(d10))

    bf = {n: g.to(torch.bfloat16) for n, g in grads.items()}
    t_bf = timed(lambda: proj.project(bf), args.repeats, min_time=1.0)
    add("ours sparse, bf16 input", "full", n_coords / t_bf, note="cast per chunk")
    res["sparse_bf16_coords_per_s"] = n_coords / t_bf
    one = {n: g[:1] for n, g in grads.items()}
    t_one = timed(lambda: proj.project(one), args.repeats, min_time=1.0)
    add("ours sparse, batch 1", "full", D / t_one, note="1 example per call")
    res["sparse_batch1_coords_per_s"] = D / t_one
    proj.cache.clear()
    t_cold = timed(lambda: (proj.cache.clear(), proj.project(grads)), 2)
    add("ours sparse, cold cache", "full", n_coords / t_cold, note="buckets regenerated")
    res["sparse_cold_cache_coords_per_s"] = n_coords / t_cold
    res["sparse_cache_bytes"] = proj.cache.bytes

    # ---- alternatives on the full gradients (design exploration)
    fold = FoldProjector(k, 0)
    t_fold = timed(lambda: fold.project(grads), args.repeats, min_time=1.0)
    df = [distortion(FoldProjector(k, s).project(grads), exact_full) for s in range(args.seeds)]
    dfo = [distortion(FoldProjector(k, s).project(outl), exact_out) for s in range(args.seeds)]
    dso = [distortion(SparseProjector(ProjectionSpec(dim=k, seed=s)).project(outl), exact_out) for s in range(args.seeds)]
    add("fold i mod k, random signs", "full", n_coords / t_fold, sum(c for c, _ in df) / len(df), sum(i for _, i in df) / len(df), "rejected")
    add("fold i mod k, random signs", "outlier", None, sum(c for c, _ in dfo) / len(dfo), sum(i for _, i in dfo) / len(dfo), "rejected")
    add("ours sparse (CountSketch)", "outlier", None, sum(c for c, _ in dso) / len(dso), sum(i for _, i in dso) / len(dso))
    res.update(
        fold_coords_per_s=n_coords / t_fold,
        fold_distortion_full=sum(c for c, _ in df) / len(df),
        fold_distortion_outlier=sum(c for c, _ in dfo) / len(dfo),
        sparse_distortion_outlier=sum(c for c, _ in dso) / len(dso),
    )
    naive = NaiveIndexAdd(k, 0)
    t_naive = timed(lambda: naive.project(grads), args.repeats, min_time=1.0)
    add("naive sign-mul + index_add_", "full", n_coords / t_naive, note="int64 idx + fp32 signs cached")
    res["naive_index_add_coords_per_s"] = n_coords / t_naive
    del naive, fold

    # ---- distortion subset: every method on the same coordinates
    sub_n = B * D_sub
    ds = [distortion(SparseProjector(ProjectionSpec(dim=k, seed=s)).project(sub), exact_sub) for s in range(args.seeds)]
    sparse_cos = sum(c for c, _ in ds) / len(ds)
    add("ours sparse (CountSketch)", "subset", None, sparse_cos, sum(i for _, i in ds) / len(ds))
    res.update(sparse_distortion=sparse_cos, sparse_ip_error=sum(i for _, i in ds) / len(ds))

    dproj = DenseGaussianProjector(ProjectionSpec(dim=k, seed=0, mode="dense"))
    t_dense = timed(lambda: dproj.project(sub), 2)
    dd = [distortion(DenseGaussianProjector(ProjectionSpec(dim=k, seed=s, mode="dense")).project(sub), exact_sub) for s in range(args.seeds)]
    dense_cps = sub_n / t_dense
    add("ours dense Gaussian", "subset", dense_cps, sum(c for c, _ in dd) / len(dd), sum(i for _, i in dd) / len(dd), "reference")
    res.update(dense_coords_per_s=dense_cps, dense_distortion=sum(c for c, _ in dd) / len(dd), dense_ip_error=sum(i for _, i in dd) / len(dd))
    res["speedup_vs_dense"] = sparse_cps / dense_cps

    # ---- scikit-learn SparseRandomProjection
    try:
        import numpy as np
        from sklearn.random_projection import SparseRandomProjection
    except ImportError as err:
        print(f"# scikit-learn not importable: {err}")
        res["sklearn_error"] = str(err)
    else:
        Xs = sub_x.numpy()
        dsk = []
        for s in range(args.seeds):
            srp = SparseRandomProjection(n_components=k, random_state=s, dense_output=True)
            dsk.append(distortion(torch.from_numpy(np.asarray(srp.fit(Xs).transform(Xs))), exact_sub))
        res.update(sklearn_distortion=sum(c for c, _ in dsk) / len(dsk), sklearn_ip_error=sum(i for _, i in dsk) / len(dsk))
        if args.skip_sklearn_full:
            Xf, nf, where = Xs, sub_n, "subset"
        else:
            Xf, nf, where = flat(grads).numpy(), n_coords, "full"
        srp = SparseRandomProjection(n_components=k, random_state=0, dense_output=True)
        t1 = time.perf_counter()
        srp.fit(Xf)
        t_fit = time.perf_counter() - t1
        t_tr = timed(lambda: srp.transform(Xf), max(1, args.repeats // 2))
        add("sklearn SparseRandomProjection", where, nf / (t_fit + t_tr), res["sklearn_distortion"], res["sklearn_ip_error"], f"fit {t_fit:.1f}s incl.; distortion on subset")
        add("sklearn transform only", where, nf / t_tr, note=f"density {srp.density_:.2g}")
        res.update(sklearn_coords_per_s=nf / (t_fit + t_tr), sklearn_transform_coords_per_s=nf / t_tr, sklearn_fit_s=t_fit)
        del Xf, srp

    # ---- traker BasicProjector (CPU)
    try:
        from trak.projectors import BasicProjector, ProjectionType
    except Exception as err:  # noqa: BLE001 -- report whatever stops the import
        print(f"# traker not importable: {type(err).__name__}: {err}")
        res["traker_error"] = f"{type(err).__name__}: {err}"
        add("traker BasicProjector", "subset", None, note="NOT AVAILABLE")
    else:
        def trak(seed):
            return BasicProjector(
                grad_dim=D_sub, proj_dim=k, seed=seed, proj_type=ProjectionType.normal, device=torch.device("cpu")
            )

        tp = trak(0)
        t_trak = timed(lambda: tp.project(sub_x, model_id=0), 2)
        dt = [distortion(trak(s).project(sub_x, model_id=0), exact_sub, 1 / math.sqrt(k)) for s in range(args.seeds)]
        add("traker BasicProjector (cpu)", "subset", sub_n / t_trak, sum(c for c, _ in dt) / len(dt), sum(i for _, i in dt) / len(dt), "normal, block 100")
        res.update(traker_coords_per_s=sub_n / t_trak, traker_distortion=sum(c for c, _ in dt) / len(dt), traker_ip_error=sum(i for _, i in dt) / len(dt))

    # ---- report
    info["loadavg_end"] = round(os.getloadavg()[0], 2)
    busy1, mine1 = _cpu_busy()
    # share of the machine's CPU time used by *other* processes during this run (0 = quiet)
    info["foreign_cpu_frac"] = round(max(0.0, (busy1 - busy0) - (mine1 - mine0)) / ((time.perf_counter() - wall0) * (os.cpu_count() or 1)), 3)
    jl = math.sqrt(2 / math.pi) / math.sqrt(k)
    print(f"\n{'method':34s} {'input':8s} {'coords/s':>10s} {'|dcos|':>8s} {'|dip|/|x||y|':>12s}  note")
    for method, where, cps, c, i, note in rows:
        f = lambda v, fmt: (fmt % v) if v is not None else "-"  # noqa: E731
        print(f"{method:34s} {where:8s} {f(cps, '%.3g'):>10s} {f(c, '%.4f'):>8s} {f(i, '%.4f'):>12s}  {note}")
    print(f"\n# JL reference: mean |dcos| ~ sqrt(2/pi)/sqrt(k) = {jl:.4f} for near-orthogonal pairs, less for similar ones")
    print(
        f"# speedup sparse vs dense: {res['speedup_vs_dense']:.3g}x; load avg {info['loadavg_start']} -> "
        f"{info['loadavg_end']}; CPU share used by other processes during the run: {info['foreign_cpu_frac']:.1%}"
    )
    res.update(
        {
            "k": k,
            "batch": B,
            "coords_per_example": D,
            "subset_coords_per_example": D_sub,
            "seeds": args.seeds,
            **info,
        }
    )
    print(json.dumps({key: (round(v, 6) if isinstance(v, float) and v < 1 else (float(f"{v:.4g}") if isinstance(v, float) else v)) for key, v in res.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python3
"""Train the two tiny byte-level example models shipped in examples/models/.

Both are language models over raw UTF-8 bytes (vocab 256, token id = byte value), trained
on the Python standard library source of the interpreter that runs this script, and saved by
`transformers` itself (`save_pretrained`: config.json + model.safetensors, fp32) so that they
are ordinary Hugging Face checkpoints. docs/training.md describes data, protocol and results.

    python3 examples/train_tiny.py --out OUT_DIR --minutes 4.5

writes OUT_DIR/mamba1-tiny/, OUT_DIR/mamba2-tiny/ (config.json, generation_config.json,
model.safetensors, training_log.json) and OUT_DIR/data/ (heldout.txt, calibration.txt,
stdlib_manifest.tsv). On a CUDA machine the two models train at the same time in two
processes (Mamba-1's PyTorch path is a Python loop over time, so it leaves the GPU mostly idle);
--minutes is each model's training-loop budget.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

LOG = logging.getLogger("train_tiny")

SEQ_LEN = 256
# pad/bos/eos all map to byte 0 (NUL). NUL never occurs in the training text (checked when the
# corpus is built), so no real byte, in particular not newline (10), gets a special meaning.
SPECIAL_TOKEN_ID = 0
VOCAB_SIZE = 256

# Path components that exclude a stdlib file from the corpus (test suites, third-party code).
SKIP_PARTS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
# Files are taken in sorted relative-path order until this many bytes; the rest are skipped.
CORPUS_CAP_BYTES = 32 * 2**20
# Held-out and calibration modules: excluded from training, disjoint from each other. Their
# texts are these files concatenated in this order (one blank line between files), cut at the
# last newline within the byte cap.
HELDOUT_FILES = ("textwrap.py", "shlex.py", "fractions.py", "json/decoder.py")
HELDOUT_CAP_BYTES = 65536
CALIBRATION_FILES = ("heapq.py", "calendar.py", "queue.py", "graphlib.py", "sched.py", "colorsys.py", "bisect.py")
CALIBRATION_CAP_BYTES = 49152
# The CPU test recomputes the held-out metric on this many leading windows (see _final_eval).
CPU_TEST_WINDOWS = 32

MODEL_SPECS: dict[str, dict[str, Any]] = {
    "mamba1-tiny": {
        "arch": "mamba1",
        "config": {"hidden_size": 256, "num_hidden_layers": 6, "state_size": 16, "expand": 2, "conv_kernel": 4},
        "batch_size": 128,
        "lr": 3e-3,
    },
    "mamba2-tiny": {
        "arch": "mamba2",
        "config": {
            "hidden_size": 256,
            "num_hidden_layers": 6,
            "state_size": 64,
            "expand": 2,
            "head_dim": 64,
            "num_heads": 8,
            "n_groups": 1,
            "chunk_size": 64,
            "conv_kernel": 4,
        },
        "batch_size": 128,
        "lr": 3e-3,
    },
}

HPARAMS: dict[str, Any] = {
    "seq_len": SEQ_LEN,
    "optimizer": "AdamW",
    "betas": (0.9, 0.95),
    "weight_decay": 0.0,
    "grad_clip_norm": 1.0,
    "warmup_steps": 100,
    # lr = peak * min(1, (step+1)/warmup) * (floor + (1-floor) * 0.5 * (1 + cos(pi * progress))),
    # progress = elapsed training time / budget (or step / --steps).
    "lr_floor_fraction": 0.1,
    "autocast_dtype": "bfloat16",
    "log_every_steps": 25,
    "heldout_eval_every_s": 30.0,
}


@dataclasses.dataclass(frozen=True)
class Corpus:
    train: bytes
    heldout: bytes
    calibration: bytes
    manifest: str  # one line per stdlib file: sha256, size, role, relative path
    info: dict[str, Any]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _stdlib_files(root: Path) -> list[str]:
    """Sorted POSIX relative paths of the stdlib .py files that are candidates for the corpus."""
    rels = (p.relative_to(root).as_posix() for p in root.rglob("*.py") if p.is_file())
    return sorted(r for r in rels if not SKIP_PARTS.intersection(r.split("/")))


def _join_capped(parts: list[bytes], cap: int, what: str) -> bytes:
    text = b"\n".join(parts)
    if len(text) > cap:
        text = text[: text.rindex(b"\n", 0, cap) + 1]
    if len(text) < cap // 2:
        raise RuntimeError(f"{what} text is only {len(text)} bytes (cap {cap}); its stdlib files are too small")
    return text


def build_corpus() -> Corpus:
    """Deterministic split of this interpreter's stdlib source into train / held-out / calibration."""
    root = Path(sysconfig.get_paths()["stdlib"])
    candidates = _stdlib_files(root)
    reserved = {f: "heldout" for f in HELDOUT_FILES} | {f: "calibration" for f in CALIBRATION_FILES}
    missing = sorted(set(reserved) - set(candidates))
    if missing:
        raise FileNotFoundError(f"stdlib at {root} lacks reserved files {missing}")
    contents: dict[str, bytes] = {}
    lines, train_parts, total = [], [], 0
    for rel in candidates:
        data = (root / rel).read_bytes()
        try:
            data.decode("utf-8")
            valid = b"\x00" not in data
        except UnicodeDecodeError:
            valid = False
        role = reserved.get(rel, "train")
        if not valid:
            role = "skipped-not-utf8-or-nul"
        elif role == "train" and total + len(data) > CORPUS_CAP_BYTES:
            role = "skipped-cap"
        if role == "train":
            train_parts.append(data)
            total += len(data) + 1
        contents[rel] = data
        lines.append(f"{_sha256(data)}\t{len(data)}\t{role}\t{rel}")
    manifest = "\n".join(lines) + "\n"
    heldout = _join_capped([contents[f] for f in HELDOUT_FILES], HELDOUT_CAP_BYTES, "held-out")
    calibration = _join_capped([contents[f] for f in CALIBRATION_FILES], CALIBRATION_CAP_BYTES, "calibration")
    train = b"\n".join(train_parts)
    info = {
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "stdlib_root": str(root),
        "selection_rule": (
            "all *.py under sysconfig stdlib, sorted relative POSIX paths, skipping paths with a component in "
            f"{sorted(SKIP_PARTS)}, files not valid UTF-8 or containing NUL; train files joined with '\\n' "
            f"in sorted order up to {CORPUS_CAP_BYTES} bytes"
        ),
        "manifest_sha256": _sha256(manifest.encode()),
        "n_candidate_files": len(candidates),
        "n_train_files": sum(1 for ln in lines if "\ttrain\t" in ln),
        "train_bytes": len(train),
        "heldout_files": list(HELDOUT_FILES),
        "heldout_bytes": len(heldout),
        "heldout_sha256": _sha256(heldout),
        "calibration_files": list(CALIBRATION_FILES),
        "calibration_bytes": len(calibration),
        "calibration_sha256": _sha256(calibration),
    }
    return Corpus(train, heldout, calibration, manifest, info)


# --- Train-time scans -------------------------------------------------------------------------
# The models are trained through transformers' own modules; only the sequence scan inside each
# mixer is swapped, for the training forward/backward only, by a function of identical
# semantics (checked against transformers' version before training, and in
# tests/test_example_models.py in float64). Evaluation and saving use transformers unchanged.


class _LinearScan(torch.autograd.Function):
    """h[t] = a[t] * h[t-1] + b[t] with h[-1] = 0, along dim 0 of (L, ...) tensors; returns h.

    transformers' PyTorch Mamba-1 scan indexes one time step of a (B, D, L, N) tensor per loop
    iteration; autograd turns every such index into a full-size zero gradient, O(L^2) memory
    traffic that made one training step take seconds. This loop touches each element O(1) times
    in each direction.
    """

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = a.contiguous(), b.contiguous()
        h = torch.empty_like(b)
        h[0] = b[0]
        for t in range(1, b.shape[0]):
            torch.addcmul(b[t], a[t], h[t - 1], out=h[t])
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    def backward(ctx: Any, grad_h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, h = ctx.saved_tensors
        grad_h = grad_h.contiguous()
        grad_b = torch.empty_like(grad_h)  # dLoss/dh[t] including the path through h[t+1]
        grad_b[-1] = grad_h[-1]
        for t in range(grad_h.shape[0] - 2, -1, -1):
            torch.addcmul(grad_h[t], a[t + 1], grad_b[t + 1], out=grad_b[t])
        grad_a = torch.zeros_like(a)
        grad_a[1:] = grad_b[1:] * h[:-1]
        return grad_a, grad_b


def mamba1_scan_train(
    hidden_states: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    **_: Any,
) -> torch.Tensor:
    """Drop-in for transformers' `mamba_selective_scan` (no cache): x (b,d,l), dt (b,d,l), A (d,n), B/C (b,n,l)."""
    if return_last_state:
        raise ValueError("mamba1_scan_train is for training forwards without a cache")
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[..., None]
    if delta_softplus:
        dt = F.softplus(dt)
    dt_t = dt.float().permute(2, 0, 1)  # (l, b, d)
    a = torch.exp(A[None, None] * dt_t[..., None])  # (l, b, d, n)
    b = (dt_t * hidden_states.float().permute(2, 0, 1))[..., None] * B.float().permute(2, 0, 1)[:, :, None, :]
    h = _LinearScan.apply(a, b)
    y = torch.einsum("lbdn,lbn->bdl", h, C.float().permute(2, 0, 1))
    if D is not None:
        y = y + hidden_states * D[None, :, None]
    if z is not None:
        y = y * F.silu(z)
    return y


def mamba2_scan_train(
    hidden_states: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
    **_: Any,
) -> torch.Tensor:
    """Drop-in for transformers' `mamba2_chunk_scan` (no cache): the same chunked SSD algorithm with
    its contractions written as einsums, where transformers 5.17 multiplies out 6-D broadcasts
    (several GB per layer at batch 128) before summing them.
    x (b,l,h,p), dt (b,l,h), A (h), B/C (b,l,g,n)."""
    from transformers.models.mamba2.modeling_mamba2 import segment_sum

    if initial_states is not None or return_final_states:
        raise ValueError("mamba2_scan_train is for training forwards without a cache")
    bsz, seqlen, nheads, headdim = hidden_states.shape
    if seqlen % chunk_size:
        raise ValueError(f"sequence length {seqlen} is not a multiple of chunk_size {chunk_size}")
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    dt = torch.clamp(dt, min=dt_limit[0], max=dt_limit[1]).float()
    x = hidden_states.float()
    rep = nheads // B.shape[2]
    nchunks = seqlen // chunk_size

    def chunks(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(bsz, nchunks, chunk_size, *t.shape[2:])

    Bc = chunks(B.float().repeat_interleave(rep, dim=2))  # (b, c, l, h, n)
    Cc = chunks(C.float().repeat_interleave(rep, dim=2))
    xdt = chunks(x * dt[..., None])  # (b, c, l, h, p)
    Adt = chunks(A.float() * dt).permute(0, 3, 1, 2)  # (b, h, c, l)
    A_cumsum = torch.cumsum(Adt, dim=-1)
    # 1. within-chunk (diagonal blocks)
    L = torch.exp(segment_sum(Adt))  # (b, h, c, l, s)
    G = torch.einsum("bclhn,bcshn->bclsh", Cc, Bc)
    Y_diag = torch.einsum("bclsh,bcshp->bclhp", G * L.permute(0, 2, 3, 4, 1), xdt)
    # 2. state at the end of each chunk
    decay_states = torch.exp(A_cumsum[..., -1:] - A_cumsum)  # (b, h, c, l)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bc, decay_states, xdt)
    # 3. recurrence over chunks
    states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)
    decay_chunk = torch.exp(segment_sum(F.pad(A_cumsum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)[:, :-1]
    # 4. contribution of the carried-in state
    Y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, states, torch.exp(A_cumsum))
    y = (Y_diag + Y_off).reshape(bsz, seqlen, nheads, headdim)
    if D is not None:
        y = y + D[..., None] * x
    return y


class _Counted:
    """Wraps a function and counts calls, to prove a patch is actually on the model's path."""

    def __init__(self, fn: Any) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.fn(*args, **kwargs)


@contextlib.contextmanager
def train_time_scan(arch: str) -> Iterator[_Counted]:
    """Swap the scan that `arch`'s transformers mixer calls by name for its train-time version."""
    if arch == "mamba1":
        from transformers.models.mamba import modeling_mamba as module

        name, fn = "mamba_selective_scan", mamba1_scan_train
    else:
        from transformers.models.mamba2 import modeling_mamba2 as module

        name, fn = "mamba2_chunk_scan", mamba2_scan_train
    original, counted = getattr(module, name), _Counted(fn)
    setattr(module, name, counted)
    try:
        yield counted
    finally:
        setattr(module, name, original)


@torch.no_grad()
def check_train_time_scan(model: torch.nn.Module, arch: str, ids: torch.Tensor) -> float:
    """Relative L2 difference of fp32 logits, train-time scan vs transformers' own, on `ids`."""
    ref = model(input_ids=ids, use_cache=False).logits.double()
    with train_time_scan(arch) as counted:
        out = model(input_ids=ids, use_cache=False).logits.double()
    if counted.calls != model.config.num_hidden_layers:
        raise RuntimeError(f"train-time {arch} scan was called {counted.calls} times, expected one per layer")
    return float((out - ref).norm() / ref.norm())


def build_model(spec: dict[str, Any]) -> torch.nn.Module:
    from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

    common = {
        "vocab_size": VOCAB_SIZE,
        "pad_token_id": SPECIAL_TOKEN_ID,
        "bos_token_id": SPECIAL_TOKEN_ID,
        "eos_token_id": SPECIAL_TOKEN_ID,
        "tie_word_embeddings": True,
    }
    if spec["arch"] == "mamba1":
        return MambaForCausalLM(MambaConfig(**common, **spec["config"]))
    return Mamba2ForCausalLM(Mamba2Config(**common, **spec["config"]))


@torch.no_grad()
def heldout_nll(
    model: torch.nn.Module, text: bytes, max_windows: int | None = None, batch_windows: int = 64
) -> tuple[float, int]:
    """Mean next-byte NLL (nats) on `text` with the fixed protocol of docs/training.md.

    Non-overlapping windows text[256k : 256(k+1)], k < min(len(text) // 256, max_windows) (the
    tail is dropped); each window is one independent sequence and is scored on predicting its
    bytes 1..255 from the bytes before them. Returns (mean NLL over all scored bytes, windows).
    """
    n_windows = min(len(text) // SEQ_LEN, max_windows or sys.maxsize)
    ids = torch.frombuffer(bytearray(text[: n_windows * SEQ_LEN]), dtype=torch.uint8).long().view(n_windows, SEQ_LEN)
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, n_windows, batch_windows):
        batch = ids[start : start + batch_windows].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        total += F.cross_entropy(
            logits[:, :-1].reshape(-1, VOCAB_SIZE), batch[:, 1:].reshape(-1), reduction="sum"
        ).item()
    return total / (n_windows * (SEQ_LEN - 1)), n_windows


def unigram_nll(text: bytes) -> float:
    """Entropy (nats) of the byte distribution of `text` itself: the best any unigram model can do on it."""
    counts = torch.bincount(torch.frombuffer(bytearray(text), dtype=torch.uint8).long(), minlength=VOCAB_SIZE).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def lr_at(step: int, progress: float, peak: float) -> float:
    warm = min(1.0, (step + 1) / HPARAMS["warmup_steps"])
    floor = HPARAMS["lr_floor_fraction"]
    return peak * warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _versions() -> dict[str, str]:
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
        out["device"] = torch.cuda.get_device_name()
    else:
        out["device"] = "cpu"
    return out


class _Batches:
    """Random SEQ_LEN windows of the training bytes, drawn from a seeded CPU generator."""

    def __init__(self, train: bytes, batch_size: int, seed: int, device: torch.device) -> None:
        self.data = torch.frombuffer(bytearray(train), dtype=torch.uint8).to(device)
        self.batch_size = batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.offsets = torch.arange(SEQ_LEN, device=device)

    def next(self) -> torch.Tensor:
        starts = torch.randint(0, len(self.data) - SEQ_LEN + 1, (self.batch_size, 1), generator=self.gen)
        return self.data[starts.to(self.data.device) + self.offsets].long()


def _train_loop(
    model: torch.nn.Module, spec: dict[str, Any], corpus: Corpus, args: argparse.Namespace, seed: int
) -> dict[str, Any]:
    device = next(model.parameters()).device
    use_cuda = device.type == "cuda"
    opt = torch.optim.AdamW(
        model.parameters(), lr=spec["lr"], betas=HPARAMS["betas"], weight_decay=HPARAMS["weight_decay"], fused=use_cuda
    )
    batches = _Batches(corpus.train, spec["batch_size"], seed, device)
    budget_s = args.minutes * 60.0
    curve, heldout_curve = [], []
    loss_acc = torch.zeros((), device=device)
    step, t0 = 0, time.perf_counter()
    last_eval, interval_start = t0, t0
    probe_t: dict[int, float] = {}
    probe: dict[str, Any] = {}
    model.train()
    while True:
        elapsed = time.perf_counter() - t0
        progress = step / args.steps if args.steps else elapsed / budget_s
        if progress >= 1.0:
            break
        lr = lr_at(step, progress, spec["lr"])
        for group in opt.param_groups:
            group["lr"] = lr
        batch = batches.next()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_cuda), train_time_scan(spec["arch"]):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), HPARAMS["grad_clip_norm"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_acc += loss.detach()
        step += 1
        if step == 3 or step == 13:  # time steps 4..13: past first-call allocations and autotuning
            if use_cuda:
                torch.cuda.synchronize()
            probe_t[step] = time.perf_counter()
            if step == 13:
                step_s = (probe_t[13] - probe_t[3]) / 10
                probe = {"step_time_s": step_s, "projected_steps": int(budget_s / step_s)}
                LOG.info("probe: %.3f s/step -> about %d steps in %.0f s", step_s, probe["projected_steps"], budget_s)
        if step % HPARAMS["log_every_steps"] == 0:
            now = time.perf_counter()
            mean_loss = loss_acc.item() / HPARAMS["log_every_steps"]  # .item() also syncs the device
            loss_acc.zero_()
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"training loss became {mean_loss} at step {step}")
            curve.append({"step": step, "elapsed_s": round(now - t0, 2), "train_loss": round(mean_loss, 4), "lr": lr})
            LOG.info(
                "step %d  %.0fs  loss %.4f  lr %.2e  %.3f s/step",
                step,
                now - t0,
                mean_loss,
                lr,
                (now - interval_start) / HPARAMS["log_every_steps"],
            )
            interval_start = now
            if now - last_eval >= HPARAMS["heldout_eval_every_s"]:
                model.eval()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_cuda):
                    nll, _ = heldout_nll(model, corpus.heldout)
                model.train()
                heldout_curve.append({"step": step, "elapsed_s": round(now - t0, 2), "heldout_nll_bf16": round(nll, 4)})
                LOG.info("step %d  held-out NLL (bf16 autocast) %.4f", step, nll)
                last_eval = time.perf_counter()
    if use_cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if use_cuda else None
    return {
        "peak_gpu_memory_gib": peak,
        "steps": step,
        "tokens_seen": step * spec["batch_size"] * SEQ_LEN,
        "train_wall_s": round(time.perf_counter() - t0, 2),
        "probe": probe,
        "loss_curve": curve,
        "heldout_curve_bf16": heldout_curve,
    }


def _final_eval(model: torch.nn.Module, corpus: Corpus) -> dict[str, Any]:
    """fp32, eval mode, no TF32 anywhere: the number the CPU test recomputes."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model.float().eval()
    nll, n_windows = heldout_nll(model, corpus.heldout)
    test_nll, _ = heldout_nll(model, corpus.heldout, max_windows=CPU_TEST_WINDOWS)
    uni = unigram_nll(corpus.heldout)
    return {
        "protocol": (
            "heldout.txt as bytes; windows text[256k:256(k+1)] for k < len//256, each an independent sequence; "
            "mean cross-entropy (nats) of predicting bytes 1..255 of each window from the preceding bytes of the "
            "same window, over all windows; perplexity = exp(mean)"
        ),
        "precision": "fp32, eval mode, TF32 off",
        "n_windows": n_windows,
        "scored_bytes": n_windows * (SEQ_LEN - 1),
        "nll": nll,
        "perplexity": math.exp(nll),
        "bits_per_byte": nll / math.log(2),
        "unigram_heldout_perplexity": math.exp(uni),
        # HF's Mamba-1 PyTorch path loops over time: all windows take minutes on a 2-core CPU, so
        # tests/test_example_models.py recomputes this prefix metric instead.
        "cpu_test_windows": CPU_TEST_WINDOWS,
        "cpu_test_nll": test_nll,
        "cpu_test_perplexity": math.exp(test_nll),
    }


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
    os.replace(tmp, path)


def _save(model: torch.nn.Module, log: dict[str, Any], target: Path) -> None:
    """save_pretrained into a temporary sibling directory, then swap it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    model.save_pretrained(tmp)  # transformers 5 always writes safetensors
    (tmp / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    tmp.chmod(0o755)  # mkdtemp makes 0700 directories
    for f in tmp.iterdir():
        f.chmod(0o644)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def train_one(name: str, args: argparse.Namespace) -> None:
    _setup_logging(name)
    spec = dict(MODEL_SPECS[name], batch_size=args.batch_size or MODEL_SPECS[name]["batch_size"])
    seed = args.seed + sorted(MODEL_SPECS).index(name)
    torch.manual_seed(seed)
    corpus = build_corpus()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    model = build_model(spec).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    LOG.info("%s: %d parameters, batch %d x %d, device %s", name, n_params, spec["batch_size"], SEQ_LEN, device)
    check_ids = torch.frombuffer(bytearray(corpus.heldout[: 4 * SEQ_LEN]), dtype=torch.uint8).long().view(4, SEQ_LEN)
    scan_rel_err = check_train_time_scan(model.eval(), spec["arch"], check_ids.to(device))
    LOG.info("train-time scan vs transformers' (fp32 logits, 4 held-out windows): rel. L2 diff %.2e", scan_rel_err)
    if not scan_rel_err < 1e-4:
        raise RuntimeError(f"{name}: train-time scan differs from transformers' by {scan_rel_err:.2e} (limit 1e-4)")
    t_start = time.perf_counter()
    result = _train_loop(model, spec, corpus, args, seed)
    final = _final_eval(model, corpus)
    LOG.info(
        "%s: %d steps, held-out perplexity %.4f (fp32), unigram %.2f",
        name,
        result["steps"],
        final["perplexity"],
        final["unigram_heldout_perplexity"],
    )
    log = {
        "model": name,
        "arch": spec["arch"],
        "n_parameters": n_params,
        "config": model.config.to_dict(),
        "hyperparameters": {
            **HPARAMS,
            "batch_size": spec["batch_size"],
            "peak_lr": spec["lr"],
            "seed": seed,
            "minutes_budget": args.minutes,
            "fixed_steps": args.steps,
        },
        "special_tokens": (
            f"pad = bos = eos = {SPECIAL_TOKEN_ID} (NUL byte, absent from the text); token id = byte value"
        ),
        "versions": _versions(),
        "data": corpus.info,
        "train_time_scan": {
            "what": (
                f"training forward/backward used train_tiny.{spec['arch']}_scan_train in place of transformers' scan"
            ),
            "rel_l2_logits_vs_transformers_fp32": scan_rel_err,
        },
        "training": result,
        "heldout_eval": final,
        "total_wall_s": round(time.perf_counter() - t_start, 2),
        "determinism": (
            "data order and init are seeded; GPU kernels (atomics in backward, cuBLAS/cuDNN algorithm choice), "
            "bf16 autocast and time-based stopping make weights differ run to run"
        ),
    }
    _save(model, log, Path(args.out) / name)


def _setup_logging(tag: str) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {tag} %(message)s", stream=sys.stdout, force=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (one sub-directory per model, plus data/)")
    p.add_argument("--minutes", type=float, default=4.5, help="training-loop budget per model")
    p.add_argument("--steps", type=int, default=0, help="train exactly this many steps instead (lr schedule by step)")
    p.add_argument(
        "--models", default=",".join(sorted(MODEL_SPECS)), help="comma-separated subset of " + ",".join(MODEL_SPECS)
    )
    p.add_argument("--batch-size", type=int, default=0, help="override every model's batch size (smoke tests)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--cpu", action="store_true", help="train on the CPU (smoke tests)")
    p.add_argument("--sequential", action="store_true", help="train models one after another, not in parallel")
    args = p.parse_args(argv)
    unknown = set(args.models.split(",")) - set(MODEL_SPECS)
    if unknown:
        p.error(f"unknown models {sorted(unknown)}; choose from {sorted(MODEL_SPECS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    _setup_logging("main")
    corpus = build_corpus()
    LOG.info("corpus: %s", json.dumps(corpus.info))
    data_dir = Path(args.out) / "data"
    _write_atomic(data_dir / "heldout.txt", corpus.heldout)
    _write_atomic(data_dir / "calibration.txt", corpus.calibration)
    _write_atomic(data_dir / "stdlib_manifest.tsv", corpus.manifest.encode())
    names = args.models.split(",")
    if args.sequential or args.cpu or len(names) == 1:
        for name in names:
            train_one(name, args)
        return
    # spawn: CUDA must not be initialised in a forked child
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=train_one, args=(name, args), name=name) for name in names]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    failed = [f"{p.name} (exit code {p.exitcode})" for p in procs if p.exitcode != 0]
    if failed:
        raise SystemExit(f"training failed for {', '.join(failed)}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""PyTorch reference trainer for scripts/bench/train_throughput.sh.

The same Llama as trainer/llama.cpp, written as an idiomatic PyTorch 2.x training loop, so that
Strata's tokens/s can be compared with what PyTorch on the same LibTorch (the project
environment's, third_party/pyenv) reaches on the same model, batch and thread count. Every
setting comes from a Strata config as printed by `strata train ... --print-config`, so both
trainers read one source of truth. Attention is F.scaled_dot_product_attention (causal, GQA
without expanding keys and values).

  reference_llama.py train CONFIG.yaml --metrics OUT.jsonl [--compile] [--device cpu|cuda]
                     [--dtype float32|bfloat16]
      Trains with the config's model, data.train shard(s), data.seq_len, global/micro batch,
      grad_clip, AdamW and lr schedule, parallel.threads_per_rank (an integer) intra-op threads.
      --compile: the model under torch.compile (inductor: its CPU C++ backend, or Triton on
      CUDA); the first steps compile, so leave them out of a measurement.
      --device cuda: trains on the GPU (rank r uses GPU r modulo the visible GPUs), AdamW with
      fused=True (one multi-tensor kernel); step times are taken after a device synchronize.
      --dtype bfloat16: the forward under torch.autocast(bfloat16) (fp32 master weights,
      gradients and AdamW state, as Strata's parallel.fsdp.mixed_precision.param_dtype: bfloat16
      keeps them), on CUDA or CPU.
      Launched once per rank: with mpirun (OMPI_COMM_WORLD_RANK/SIZE) or with RANK/WORLD_SIZE;
      with several ranks it trains DistributedDataParallel over gloo (nccl with --device cuda;
      MASTER_ADDR/MASTER_PORT, default 127.0.0.1:29531), each rank taking global_batch / ranks
      samples per step.
      Rank 0 writes one JSON line per step: {"step", "step_ms", "loss", "tokens_per_s",
      "mem_mb"} (and on CUDA "mem_reserved_mb"): the peak memory so far, on CUDA the caching
      allocator's peak allocated and reserved bytes (as Strata's metrics on CUDA), on CPU the
      process's peak RSS.
  reference_llama.py gemm CONFIG.yaml --out OUT.json [--seconds S]
      Times the fp32 matmuls of the model's linear layers (forward, input and weight gradient;
      micro_batch x seq_len rows) with parallel.threads_per_rank threads, best of 5 windows of
      S/5 seconds each; all ranks run each matmul at the same time. Writes OUT.json.RANK.
  reference_llama.py shard OUT.bin --vocab-size V --tokens N [--seed S] [--successors K]
      Writes N uniformly random tokens as an llm.c shard (256 int32 header, magic 20240520).
      --successors K: a learnable stream instead: a random first-order Markov chain in which
      every token is followed by one of K tokens of its own (fixed by the seed), uniformly; its
      entropy is ln K nats per token, so a model's loss falls from about ln V towards ln K.
"""
import argparse
import contextlib
import glob
import json
import math
import os
import resource
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llama_flops import ffn_hidden_dim  # noqa: E402


def load_config(path):
    with open(path) as f:
        return yaml.safe_load(f)


def distributed_env(backend="gloo"):
    rank = int(os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", "1")))
    if world > 1:
        addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
        port = os.environ.get("MASTER_PORT", "29531")
        dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank,
                                world_size=world)
    return rank, world


def threads_of(config, required=True):
    threads = config["parallel"]["threads_per_rank"]
    if not isinstance(threads, int):
        if not required:  # on CUDA: the intra-op pool only feeds the GPU, keep PyTorch's default
            return None
        sys.exit("reference_llama.py: parallel.threads_per_rank must be an integer here")
    return threads


def peak_memory(device):
    """Peak memory so far, MiB: {"mem_mb"} (CPU: peak RSS), with "mem_reserved_mb" on CUDA."""
    if device.type == "cuda":
        return {"mem_mb": torch.cuda.max_memory_allocated(device) / 2**20,
                "mem_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20}
    return {"mem_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}  # KiB


# ---------------------------------------------------------------------------------------------
# Model


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(head_dim, max_seq_len, theta):
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()  # (T, hd/2)


def apply_rope(x, cos, sin):
    """Interleaved rotary embedding: pairs (x[2i], x[2i+1]) of each head. x: (B, T, H, hd)."""
    t = x.shape[1]
    cos, sin = cos[:t].unsqueeze(1), sin[:t].unsqueeze(1)  # (T, 1, hd/2)
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), -1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.n_heads, self.n_kv_heads = m["n_heads"], m["n_kv_heads"]
        self.head_dim = m["dim"] // m["n_heads"]
        self.wq = nn.Linear(m["dim"], self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(m["dim"], self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(m["dim"], self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, m["dim"], bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        h, kv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q = apply_rope(self.wq(x).view(b, t, h, hd), cos, sin)
        k = apply_rope(self.wk(x).view(b, t, kv, hd), cos, sin)
        v = self.wv(x).view(b, t, kv, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|KV, T, hd)
        # GQA: query head j reads key/value head j // (h // kv), without copies.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv != h)
        return self.wo(y.transpose(1, 2).reshape(b, t, h * hd))


class FeedForward(nn.Module):
    def __init__(self, m):
        super().__init__()
        hidden = ffn_hidden_dim(m)
        self.w1 = nn.Linear(m["dim"], hidden, bias=False)
        self.w2 = nn.Linear(hidden, m["dim"], bias=False)
        self.w3 = nn.Linear(m["dim"], hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.attention_norm = RMSNorm(m["dim"], m["norm_eps"])
        self.attention = Attention(m)
        self.ffn_norm = RMSNorm(m["dim"], m["norm_eps"])
        self.feed_forward = FeedForward(m)

    def forward(self, x, cos, sin):
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.tok_embeddings = nn.Embedding(m["vocab_size"], m["dim"])
        self.layers = nn.ModuleList(Block(m) for _ in range(m["n_layers"]))
        self.norm = RMSNorm(m["dim"], m["norm_eps"])
        self.tied = bool(m["tie_embeddings"])
        if not self.tied:
            self.output = nn.Linear(m["dim"], m["vocab_size"], bias=False)
        # Constants, not buffers: nothing for DDP to broadcast (moved by to_device).
        self.cos, self.sin = rope_tables(m["dim"] // m["n_heads"], m["max_seq_len"],
                                         m["rope_theta"])
        self.init_weights(m)

    def to_device(self, device):
        self.to(device)
        self.cos, self.sin = self.cos.to(device), self.sin.to(device)
        return self

    @torch.no_grad()
    def init_weights(self, m):
        # Strata's (torchtitan's) scheme; it does not change the cost of a step.
        out_std = m["dim"] ** -0.5
        if self.tied:
            nn.init.trunc_normal_(self.tok_embeddings.weight, 0.0, out_std, -3 * out_std,
                                  3 * out_std)
        else:
            nn.init.normal_(self.tok_embeddings.weight)
            nn.init.trunc_normal_(self.output.weight, 0.0, out_std, -3 * out_std, 3 * out_std)
        for i, layer in enumerate(self.layers):
            std = 0.02 / math.sqrt(2.0 * (i + 1))
            for lin in (layer.attention.wq, layer.attention.wk, layer.attention.wv,
                        layer.feed_forward.w1):
                nn.init.trunc_normal_(lin.weight, 0.0, 0.02, -2.0, 2.0)
            for lin in (layer.attention.wo, layer.feed_forward.w2, layer.feed_forward.w3):
                nn.init.trunc_normal_(lin.weight, 0.0, std, -2.0, 2.0)

    def forward(self, tokens):
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, self.cos, self.sin)
        h = self.norm(h)
        return F.linear(h, self.tok_embeddings.weight) if self.tied else self.output(h)


# ---------------------------------------------------------------------------------------------
# Data


def open_shards(pattern):
    shards = []
    for path in sorted(glob.glob(pattern)) or [pattern]:
        header = np.fromfile(path, dtype="<i4", count=256)
        if header[0] == 20240520:
            dtype = np.uint16
        elif header[0] == 20240801:
            dtype = np.uint32
        else:
            sys.exit(f"reference_llama.py: {path} is not an llm.c token shard")
        shards.append(np.memmap(path, dtype=dtype, mode="r", offset=1024, shape=(int(header[2]),)))
    return shards


class Batches:
    """Random (seq_len + 1)-token windows, one generator per rank (Strata also samples windows
    uniformly at random; the order differs, the shapes and the work do not)."""

    def __init__(self, pattern, seq_len, seed):
        self.shards = open_shards(pattern)
        self.seq_len = seq_len
        self.rng = np.random.default_rng(seed)
        self.offsets = np.arange(seq_len + 1)

    def next(self, batch):
        shard = self.shards[self.rng.integers(len(self.shards))]
        starts = self.rng.integers(0, len(shard) - self.seq_len, size=batch)
        windows = torch.from_numpy(shard[starts[:, None] + self.offsets].astype(np.int64))
        return windows[:, :-1], windows[:, 1:]


# ---------------------------------------------------------------------------------------------
# Training


def lr_at(step, base_lr, sched, total_steps):
    """trainer/lr_schedule.cpp: linear warmup, then cosine / linear / constant decay."""
    warmup = sched["warmup_steps"]
    if step <= warmup:
        return base_lr * step / warmup
    decay_steps = total_steps - warmup
    progress = min(max((step - warmup) / decay_steps, 0.0), 1.0) if decay_steps > 0 else 1.0
    floor = sched["min_lr_ratio"]
    if sched["decay"] == "cosine":
        return base_lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
    if sched["decay"] == "linear":
        return base_lr * (1 - (1 - floor) * progress)
    return base_lr


def train(args):
    config = load_config(args.config)
    m, tc, oc = config["model"], config["training"], config["optimizer"]
    cuda = args.device == "cuda"
    threads = threads_of(config, required=not cuda)
    if threads:
        torch.set_num_threads(threads)
    rank, world = distributed_env("nccl" if cuda else "gloo")
    if cuda:
        if not torch.cuda.is_available():
            sys.exit("reference_llama.py: --device cuda but torch sees no GPU")
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bfloat16"
                else contextlib.nullcontext())
    torch.manual_seed(config["job"]["seed"])

    seq_len, micro = config["data"]["seq_len"], tc["micro_batch_size"]
    accumulation = tc["global_batch_size"] // (micro * world)
    assert accumulation * micro * world == tc["global_batch_size"], "batch does not divide"
    tokens_per_step = tc["global_batch_size"] * seq_len

    with device:  # parameters created (and initialised) on the device
        model = Llama(m).to_device(device)
    # AdamW with weight decay on matrices only, not on norms or the embedding
    # (trainer/optimizer.cpp uses_weight_decay).
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and name != "tok_embeddings.weight" else no_decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": oc["weight_decay"]},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=oc["lr"], betas=tuple(oc["betas"]), eps=oc["eps"],
        **({"fused": True} if cuda else {}))
    params = list(model.parameters())
    if args.compile:  # the model alone: compiling DDP's forward breaks the graph in its logger
        model = torch.compile(model)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if cuda else None)

    batches = Batches(config["data"]["train"], seq_len, config["job"]["seed"] * 1000 + rank)
    metrics = open(args.metrics, "w") if rank == 0 else None
    model.train()
    for step in range(1, tc["steps"] + 1):
        start = time.perf_counter()
        lr = lr_at(step, oc["lr"], config["lr_scheduler"], tc["steps"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = 0.0
        for a in range(accumulation):
            inputs, targets = batches.next(micro)
            inputs = inputs.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            # DDP: all-reduce the gradients only in the last micro-batch's backward.
            sync = world == 1 or a == accumulation - 1
            with contextlib.nullcontext() if sync else model.no_sync():
                with autocast:
                    logits = model(inputs)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
                loss = loss / accumulation
                loss.backward()
            step_loss += loss.item()
        if tc["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(params, tc["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:  # the global batch's loss, for the log
            loss_t = torch.tensor([step_loss], dtype=torch.float64,
                                  device=device if cuda else "cpu")
            dist.all_reduce(loss_t)
            step_loss = loss_t.item() / world
        if cuda:
            torch.cuda.synchronize(device)
        step_ms = 1000.0 * (time.perf_counter() - start)
        if metrics:
            metrics.write(json.dumps({"step": step, "step_ms": step_ms, "loss": step_loss,
                                      "tokens_per_s": tokens_per_step / step_ms * 1000.0,
                                      **peak_memory(device)}) + "\n")
            metrics.flush()
    if metrics:
        metrics.close()
    if world > 1:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# GEMM peak


def gemm(args):
    config = load_config(args.config)
    m = config["model"]
    torch.set_num_threads(threads_of(config))
    rank, world = distributed_env()
    rows = config["training"]["micro_batch_size"] * config["data"]["seq_len"]
    d, f, v = m["dim"], ffn_hidden_dim(m), m["vocab_size"]
    hd = d // m["n_heads"]
    linears = {"wq/wo": (d, m["n_heads"] * hd), "wk/wv": (d, m["n_kv_heads"] * hd),
               "w1/w3": (d, f), "w2": (f, d), "output": (d, v)}
    result = {"rows": rows, "threads": torch.get_num_threads(), "gflops": {}}
    for name, (k, n) in linears.items():
        x, w, g = torch.randn(rows, k), torch.randn(n, k), torch.randn(rows, n)
        # The three matmuls of a linear layer in training, as autograd calls them.
        for what, fn in (("fwd", lambda: F.linear(x, w)), ("dgrad", lambda: g.mm(w)),
                         ("wgrad", lambda: g.t().mm(x))):
            for _ in range(3):
                fn()
            best = 0.0
            for _ in range(5):  # the best of 5 windows: a peak, robust to short interruptions
                if world > 1:
                    dist.barrier()
                iters, start = 0, time.perf_counter()
                while True:
                    fn()
                    iters += 1
                    elapsed = time.perf_counter() - start
                    if elapsed >= args.seconds / 5:
                        break
                best = max(best, 2.0 * rows * k * n * iters / elapsed / 1e9)
            result["gflops"][f"{name} {what}"] = best
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    with open(f"{args.out}.{rank}", "w") as out:
        json.dump(result, out)


def shard(args):
    if not 0 < args.vocab_size <= 65536:
        sys.exit("reference_llama.py: shard writes uint16 tokens: --vocab-size must be 1..65536")
    rng = np.random.default_rng(args.seed)
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, args.tokens)
    if args.successors > 0:
        # Markov chain: token t is followed by successors[t, j], j uniform in [0, K).
        successors = rng.integers(0, args.vocab_size, size=(args.vocab_size, args.successors))
        choices = rng.integers(0, args.successors, size=args.tokens)
        tokens = np.empty(args.tokens, dtype=np.uint16)
        t = int(rng.integers(args.vocab_size))
        for i in range(args.tokens):  # sequential by nature; ~1 s per million tokens
            tokens[i] = t
            t = int(successors[t, choices[i]])
    else:
        tokens = rng.integers(0, args.vocab_size, size=args.tokens, dtype=np.uint16)
    with open(args.out, "wb") as out:
        out.write(header.tobytes())
        out.write(tokens.tobytes())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train")
    p.add_argument("config")
    p.add_argument("--metrics", required=True)
    p.add_argument("--compile", action="store_true", help="torch.compile the model (inductor)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16: the forward under torch.autocast")
    p.set_defaults(fn=train)
    p = sub.add_parser("gemm")
    p.add_argument("config")
    p.add_argument("--out", required=True)
    p.add_argument("--seconds", type=float, default=1.0)
    p.set_defaults(fn=gemm)
    p = sub.add_parser("shard")
    p.add_argument("out")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--successors", type=int, default=0,
                   help="K > 0: a Markov chain with K successors per token (entropy ln K)")
    p.set_defaults(fn=shard)
    args = parser.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""safetensors <-> Strata.

Strata -> safetensors: safetensors.safe_open (the reference Rust parser) reads every file
Strata writes: HF shards (fp32 and bf16), a LoRA adapter, and the rank files of a 2-rank FSDP
checkpoint with AdamW moments; every tensor is byte-identical to the file's own bytes, and the
tensors mean what Strata says: rank pieces reassembled by metadata.json equal the HF export
(q/k rows back in Strata's order) and the adapter (q/k rows of B likewise).

safetensors -> Strata: models written by safetensors.torch.save_file (its own tensor order,
metadata beyond "format", fp16/bf16/fp32 mixed, a 0-size and a scalar tensor among the
ignorable rotary buffers, a shard holding nothing else) load in `strata eval` with
transformers' loss."""

import json
import os
import shutil
import struct
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_common as hc  # noqa: E402

hc.setup()
torch, safetensors, transformers = hc.require_libraries("torch", "safetensors", "transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

torch.set_num_threads(1)
checks = hc.Checks()
data = hc.prepare_data()
val = f"{data}/val_000000.bin"
T = 32
DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64}


def raw_file(path):
    """The file parsed with the standard library: (metadata, {name: (dtype, shape, bytes)})."""
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", None)
    return meta, {k: (v["dtype"], v["shape"], raw[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]])
                  for k, v in header.items()}


def check_file(path):
    """safe_open and load_file read the file; every tensor is its own bytes."""
    meta, raw = raw_file(path)
    with safe_open(path, framework="pt") as f:
        keys, metadata = sorted(f.keys()), f.metadata()
        tensors = {k: f.get_tensor(k) for k in keys}
    loaded = load_file(path)
    bad = []
    for k, (dtype, shape, data_bytes) in raw.items():
        t = tensors.get(k)
        if (t is None or t.dtype != DTYPES[dtype] or list(t.shape) != shape
                or t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() != data_bytes or not torch.equal(loaded[k], t)):
            bad.append(k)
    ok = keys == sorted(raw) and metadata == meta and not bad
    checks.true(f"safe_open reads {os.path.relpath(path)}: {len(keys)} tensors identical to the file's bytes, "
                f"metadata {metadata}", ok, f"bad: {bad[:3]}" if bad else "")
    return tensors


def hf_key_to_strata(key):
    names = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "output.weight"}
    if key in names:
        return names[key]
    layer = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
             "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
             "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm",
             "post_attention_layernorm": "ffn_norm"}
    parts = key.split(".")  # model.layers.N.<module>.<module>.weight
    i, module = parts[2], ".".join(parts[3:5])
    if module in layer:
        return f"layers.{i}.{layer[module]}.{'.'.join(parts[5:])}"
    return f"layers.{i}.{layer[parts[3]]}.weight"


def half_to_interleaved(w, head_dim):
    rows, cols = w.shape
    return w.reshape(rows // head_dim, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


# --- Strata -> safetensors -----------------------------------------------------------------
job = f"""job: {{name: st, seed: 4}}
model: {{vocab_size: 400, dim: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, multiple_of: 16, max_seq_len: {T}}}
data: {{train: "{data}/train_*.bin", val: "{val}", tokenizer: {data}/tokenizer.model, seq_len: {T}}}
training: {{steps: 4, global_batch_size: 4, micro_batch_size: 2, eval_interval: 0, log_interval: 4}}
parallel: {{threads_per_rank: 1}}
checkpoint: {{interval: 4, last_save_model_only: false, hf_max_shard_size: 20KB}}
"""
with open("st.yaml", "w") as f:
    f.write(job)
p = subprocess.run(["mpirun", "--oversubscribe", "-np", "2", hc.STRATA, "train", "--config", "st.yaml",
                    "--set", "job.run_dir=fsdp"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
if p.returncode != 0:
    print(p.stdout)
    sys.exit("FAIL: the 2-rank training failed")
step = "fsdp/checkpoints/step-0000004"
meta = json.load(open(f"{step}/metadata.json"))
rank_files = sorted(f for f in os.listdir(step) if f.endswith(".safetensors"))
checks.equal("rank files of the 2-rank checkpoint", rank_files, ["rank-00000.safetensors", "rank-00001.safetensors"])
pieces = {f: check_file(f"{step}/{f}") for f in rank_files}
state = {}
for name, entry in meta["tensors"].items():
    full = torch.zeros(int(torch.tensor(entry["shape"]).prod()), dtype=DTYPES[entry["dtype"]])
    for c in entry["chunks"]:
        full[c["begin"]:c["end"]] = pieces[c["file"]][c["key"]].flatten()
    state[name] = full.view(entry["shape"])
checks.true("the checkpoint holds AdamW moments", sum(k.startswith("optimizer.") for k in state) == 2 * 21,
            f"{sum(k.startswith('optimizer.') for k in state)} moment tensors")

export = os.path.realpath("fsdp/checkpoints/hf-latest")
hf = {}
for f in hc.safetensors_files(export):
    hf.update(check_file(f"{export}/{f}"))
head_dim = 32 // 4
diff = 0.0
for key, t in hf.items():
    name = hf_key_to_strata(key)
    if name.endswith(("wq.weight", "wk.weight")):
        t = half_to_interleaved(t, head_dim)
    diff = max(diff, (t - state[name]).abs().max().item())
checks.equal("HF export keys == the checkpoint's model tensors", sorted(hf_key_to_strata(k) for k in hf),
             sorted(k for k in state if not k.startswith("optimizer.")))
checks.max_abs("HF export (safe_open) == checkpoint rank pieces (safe_open, reassembled)", diff, 0.0)

# bf16 export and a LoRA adapter (from the export above as the base).
subprocess.run([hc.STRATA, "convert", "--from", step, "--to-hf", "bf16", "--dtype", "bfloat16"], check=True,
               stdout=subprocess.DEVNULL)
bf16 = {}
for f in hc.safetensors_files("bf16"):
    bf16.update(check_file(f"bf16/{f}"))
checks.equal("bf16 export dtypes", {str(t.dtype) for t in bf16.values()}, {"torch.bfloat16"})
checks.max_abs("bf16 export == the fp32 export rounded to bf16",
               max((bf16[k].float() - hf[k].to(torch.bfloat16).float()).abs().max().item() for k in hf), 0.0)
hc.train(job, "lora", "job.run_dir=lora", f"checkpoint.resume_path={export}", "model.max_seq_len=32",
         "optimizer.lr=2.0e-2", "checkpoint.interval=4",
         "converters=[{type: lora, rank: 4, alpha: 8, target_modules: [wq, wk, wv, w2], export: both}]")
adapter = check_file(os.path.realpath("lora/checkpoints/hf-latest") + "/adapter/adapter_model.safetensors")
lmeta = json.load(open("lora/checkpoints/step-0000004/metadata.json"))
lpieces = {f: load_file(f"lora/checkpoints/step-0000004/{f}") for f in lmeta["files"]}
diff, count = 0.0, 0
for key, t in adapter.items():  # base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight
    parts = key.split(".")
    module = hf_key_to_strata(".".join(parts[2:7]) + ".weight").rsplit(".", 1)[0]
    name = f"{module}.lora_{parts[7][-1].lower()}"
    entry = lmeta["tensors"][name]
    full = torch.zeros(int(torch.tensor(entry["shape"]).prod()))
    for c in entry["chunks"]:
        full[c["begin"]:c["end"]] = lpieces[c["file"]][c["key"]].flatten()
    full = full.view(entry["shape"])
    if name.endswith(("wq.lora_b", "wk.lora_b")):
        t = half_to_interleaved(t, head_dim)
    diff = max(diff, (t - full).abs().max().item())
    count += 1
checks.equal("adapter tensors", count, 2 * 4 * 2)
checks.max_abs("adapter (safe_open) == the LoRA checkpoint's factors (q/k rows of B in Strata's order)", diff, 0.0)

# --- safetensors -> Strata ----------------------------------------------------------------
# The fp32 export rewritten by save_file: one file with mixed dtypes, extra metadata, a 0-size
# and a scalar rotary buffer (which loaders ignore), and a sharded form whose second shard holds
# only such edge tensors.
from transformers import AutoModelForCausalLM  # noqa: E402

tokens = hc.read_tokens(val)
mixed = {k: (t.to(torch.float16) if "mlp" in k else t.to(torch.bfloat16) if "norm" in k else t.clone()) for k, t in hf.items()}
edge = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(0),
        "model.layers.1.self_attn.rotary_emb.inv_freq": torch.tensor(3.5)}
for d in ("single", "sharded"):
    os.makedirs(d)
    for f in ("config.json", "generation_config.json"):
        shutil.copy(f"{export}/{f}", d)
metadata = {"format": "pt", "written_by": "safetensors.torch.save_file", "note": "{\"json\": [1, 2]}"}
save_file({**mixed, **edge}, "single/model.safetensors", metadata=metadata)
names = sorted(mixed)
save_file({k: mixed[k] for k in names}, "sharded/model-00001-of-00002.safetensors", metadata=metadata)
save_file(edge, "sharded/model-00002-of-00002.safetensors", metadata={"format": "pt"})
weight_map = {**{k: "model-00001-of-00002.safetensors" for k in names},
              **{k: "model-00002-of-00002.safetensors" for k in edge}}
json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, open("sharded/model.safetensors.index.json", "w"))
check_file("single/model.safetensors")
_, raw = raw_file("single/model.safetensors")
checks.equal("edge tensors as save_file wrote them", {k: (raw[k][1], len(raw[k][2])) for k in edge},
             {"model.layers.0.self_attn.rotary_emb.inv_freq": ([0], 0), "model.layers.1.self_attn.rotary_emb.inv_freq": ([], 4)})
reference = AutoModelForCausalLM.from_pretrained("single", dtype=torch.float32).eval()
theirs = hc.window_loss(reference, tokens, T)
for d in ("single", "sharded"):
    checks.close(f"strata eval of save_file's {d} model == transformers", hc.strata_eval(d, val, T), theirs)
# And a model-only Strata checkpoint converted from it holds exactly those (upcast) weights.
subprocess.run([hc.STRATA, "convert", "--from", "sharded", "--to-hf", "back"], check=True, stdout=subprocess.DEVNULL)
back = {}
for f in hc.safetensors_files("back"):
    back.update(check_file(f"back/{f}"))
checks.max_abs("save_file's mixed-dtype model -> Strata -> HF export == the weights upcast",
               max((back[k] - mixed[k].float()).abs().max().item() for k in mixed), 0.0)
checks.done()

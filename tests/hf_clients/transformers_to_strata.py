#!/usr/bin/env python3
"""transformers -> Strata: Llama models built and saved by transformers itself (GQA, tied and
untied embeddings, rope_theta != 10000, an odd intermediate_size, rms_norm_eps 1e-6; sharded
with max_shard_size, in fp32 and bf16) load in `strata eval --from DIR` and as
`checkpoint.resume_path` of a short training with the loss transformers computes on the same
windows (<= 1e-5 relative, both in fp32). A config Strata cannot represent is refused with a
message naming the field, never loaded as something else."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_common as hc  # noqa: E402

hc.setup()
torch, transformers = hc.require_libraries("torch", "transformers")
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM  # noqa: E402

torch.set_num_threads(1)
checks = hc.Checks()
data = hc.prepare_data()
val = f"{data}/val_000000.bin"
tokens = hc.read_tokens(val)
T = 64

# Two shapes; each saved in fp32 and bf16, in shards of at most 20KB.
SHAPES = {
    "gqa_untied": dict(vocab_size=400, hidden_size=32, intermediate_size=77, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                       max_position_embeddings=T, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "mqa_tied": dict(vocab_size=400, hidden_size=48, intermediate_size=131, num_hidden_layers=2,
                     num_attention_heads=6, num_key_value_heads=1, rope_theta=25000.0,
                     max_position_embeddings=T, rms_norm_eps=1e-5, tie_word_embeddings=True),
}
dirs = {}
for i, (name, kwargs) in enumerate(SHAPES.items()):
    torch.manual_seed(i)
    model = hc.randomize(LlamaForCausalLM(LlamaConfig(**kwargs)), seed=10 + i).eval()
    for dtype in ("float32", "bfloat16"):
        d = f"{name}_{dtype}"
        model.to(getattr(torch, dtype)).save_pretrained(d, max_shard_size="20KB")
        n = len(hc.safetensors_files(d))
        checks.true(f"{d}: transformers wrote {n} shards", n > 2 and os.path.exists(f"{d}/model.safetensors.index.json"))
        dirs[d] = kwargs
    model.to(torch.float32)

# The reference: transformers' loss on strata eval's windows, in fp32 (bf16 files upcast on
# load, as Strata does).
reference = {}
for d in dirs:
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    reference[d] = hc.window_loss(m, tokens, T)
    checks.close(f"{d}: strata eval --from == transformers", hc.strata_eval(d, val, T), reference[d])

# The comparison can fail: the same weights under another rope_theta (Strata ignoring the
# config's theta) give a loss far outside the tolerance.
config = AutoConfig.from_pretrained("gqa_untied_float32")
config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
wrong = AutoModelForCausalLM.from_pretrained("gqa_untied_float32", config=config, dtype=torch.float32).eval()
checks.apart("sensitivity: gqa_untied with rope_theta 10000 instead of 500000",
             hc.window_loss(wrong, tokens, T), reference["gqa_untied_float32"], 10 * hc.RTOL_FP32)

# As checkpoint.resume_path (no model keys: the shape comes from config.json), two steps at
# lr 1e-30 (no weight moves): the validation loss is transformers' loss on the first
# eval_batches x global_batch_size windows, and the run's HF export holds the same weights.
job = f"""job: {{name: from_hf, seed: 3}}
data: {{train: "{data}/train_*.bin", val: "{val}", tokenizer: {data}/tokenizer.model, seq_len: {T}}}
training: {{steps: 2, global_batch_size: 4, micro_batch_size: 2, eval_interval: 2, eval_batches: 2, log_interval: 1}}
optimizer: {{lr: 1.0e-30}}
parallel: {{threads_per_rank: 1}}
checkpoint: {{interval: 2}}
"""
for d in dirs:
    run = f"run_{d}"
    log = hc.train(job, "from_hf", f"job.run_dir={run}", f"checkpoint.resume_path={d}")
    checks.true(f"{run}: the shape came from {d}/config.json", f"model: from {d}/config.json" in log)
    rows = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
    val_loss = [r["val_loss"] for r in rows if "val_loss" in r][0]
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    checks.close(f"{run}: validation loss == transformers", val_loss, hc.window_loss(m, tokens, T, 2 * 4 * T))
    export = f"{run}/checkpoints/hf-latest"
    back, info = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32, output_loading_info=True)
    checks.equal(f"{run}: export loads with no missing/unexpected/mismatched keys",
                 {k: list(v) for k, v in info.items() if k != "error_msgs"},
                 {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []})
    original, exported = m.state_dict(), back.state_dict()
    diff = max((original[k] - exported[k]).abs().max().item() for k in original)
    checks.max_abs(f"{run}: exported weights == the source's", diff, 0.0)

# Configs Strata cannot represent: refused, naming the field, by eval and by training.
def refused(name, model, expected, edit=None):
    model.save_pretrained(name)
    if edit:
        path = f"{name}/config.json"
        config = json.load(open(path))
        edit(config)
        json.dump(config, open(path, "w"), indent=2)
    rc, out = hc.strata("eval", "--from", name, "--data", val, check=False)
    last = [line for line in out.splitlines() if "error" in line.lower()][:1]
    checks.true(f"refused {name}: exit {rc}, '{expected}' named", rc != 0 and expected in out,
                last[0] if last else out.strip()[-200:])

base = dict(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=T)
refused("attention_bias", LlamaForCausalLM(LlamaConfig(**base, attention_bias=True)), "attention_bias is true")
refused("mlp_bias", LlamaForCausalLM(LlamaConfig(**base, mlp_bias=True)), "mlp_bias is true")
refused("rope_linear", LlamaForCausalLM(LlamaConfig(**base, rope_scaling={"rope_type": "linear", "factor": 2.0})),
        "rope_parameters.rope_type 'linear' is not supported")
refused("rope_llama3", LlamaForCausalLM(LlamaConfig(**base, rope_parameters={
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32, "rope_theta": 500000.0})), "rope_type 'llama3' is not supported")


def legacy_rope_parameters(c):  # the RoPE type under the older key "type"
    c["rope_parameters"] = {"type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}


def legacy_rope_scaling(c):  # an older file: rope_scaling (which wins over rope_parameters)
    c["rope_scaling"] = {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}


refused("rope_legacy_type", LlamaForCausalLM(LlamaConfig(**base)), "rope_parameters.rope_type 'dynamic' is not supported",
        legacy_rope_parameters)
checks.equal("transformers reads that file as dynamic RoPE",
             AutoConfig.from_pretrained("rope_legacy_type").rope_parameters.get("rope_type"), "dynamic")
refused("rope_legacy_scaling", LlamaForCausalLM(LlamaConfig(**base)), "rope_scaling.rope_type 'yarn' is not supported",
        legacy_rope_scaling)
checks.equal("transformers reads that file as YaRN RoPE",
             AutoConfig.from_pretrained("rope_legacy_scaling").rope_parameters.get("rope_type"), "yarn")
refused("head_dim", LlamaForCausalLM(LlamaConfig(**base, head_dim=16)), "head_dim 16 differs")
refused("gelu", LlamaForCausalLM(LlamaConfig(**base, hidden_act="gelu")), "hidden_act 'gelu' is not supported")
refused("mistral", MistralForCausalLM(MistralConfig(**base)), "model_type is 'mistral', not 'llama'")
# Training refuses the same way.
rc, out = hc.strata("train", "--config", "from_hf.yaml", "--set", "job.run_dir=refused",
                    "--set", "checkpoint.resume_path=attention_bias", check=False)
checks.true(f"train with resume_path=attention_bias: exit {rc}, field named", rc != 0 and "attention_bias is true" in out)
checks.done()

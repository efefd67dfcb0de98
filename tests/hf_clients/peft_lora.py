#!/usr/bin/env python3
"""peft <-> Strata LoRA adapters.

peft -> Strata: get_peft_model(LoraConfig(r=4, lora_alpha=8, q/k/v/o/gate/up/down; once with
use_rslora)) on a transformers Llama, B set non-zero, save_pretrained; Strata loads the adapter
(with its base) in `strata eval --from ADAPTER`, as checkpoint.resume_path and through
additional_load_paths: the loss equals the peft model's (<= 1e-5 relative, fp32).

Strata -> peft: a Strata LoRA run's adapter/ loads with PeftModel.from_pretrained(base,
adapter) with exactly the adapter's keys and tensors, gives Strata's loss, and
merge_and_unload() equals Strata's merged export (<= 1e-6 absolute)."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_common as hc  # noqa: E402

hc.setup()
torch, transformers, peft = hc.require_libraries("torch", "transformers", "peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.utils import get_peft_model_state_dict, load_peft_weights  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

torch.set_num_threads(1)
checks = hc.Checks()
work = os.getcwd()
data = hc.prepare_data()
val = f"{data}/val_000000.bin"
tokens = hc.read_tokens(val)
T = 64
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STRATA_TARGETS = "[wq, wk, wv, wo, w1, w2, w3]"

# The base: a transformers Llama (GQA, odd intermediate_size), saved in shards.
torch.manual_seed(0)
base_dir = os.path.join(work, "base")
hc.randomize(LlamaForCausalLM(LlamaConfig(
    vocab_size=400, hidden_size=32, intermediate_size=77, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, rope_theta=20000.0, max_position_embeddings=T, rms_norm_eps=1e-5)), seed=1).save_pretrained(
    base_dir, max_shard_size="20KB")


def base_model():
    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def lora_job(rslora):
    return f"""job: {{name: lora, seed: 5}}
data: {{train: "{data}/train_*.bin", val: "{val}", tokenizer: {data}/tokenizer.model, seq_len: {T}}}
training: {{steps: 2, global_batch_size: 4, micro_batch_size: 2, eval_interval: 2, eval_batches: 2, log_interval: 1}}
optimizer: {{lr: 1.0e-30}}
parallel: {{threads_per_rank: 1}}
checkpoint: {{interval: 2}}
converters: [{{type: lora, rank: 4, alpha: 8, use_rslora: {str(rslora).lower()}, target_modules: {STRATA_TARGETS}, export: both}}]
"""


def val_loss(run):
    return [json.loads(line)["val_loss"] for line in open(f"{run}/metrics.jsonl") if "val_loss" in line][0]


# --- peft -> Strata ---------------------------------------------------------------------
for rslora in (False, True):
    tag = "rslora" if rslora else "lora"
    adapter_dir = os.path.join(work, f"peft_{tag}")
    model = get_peft_model(base_model(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS,
                                                    use_rslora=rslora, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.eval()
    model.save_pretrained(adapter_dir)
    checks.equal(f"peft {tag}: adapter names its base", json.load(open(f"{adapter_dir}/adapter_config.json"))["base_model_name_or_path"], base_dir)
    theirs = hc.window_loss(model, tokens, T)
    with model.disable_adapter():
        without = hc.window_loss(model, tokens, T)
    checks.apart(f"sensitivity: peft {tag} loss without the adapter", without, theirs, 10 * hc.RTOL_FP32)
    checks.close(f"peft {tag}: strata eval --from the adapter == peft", hc.strata_eval(adapter_dir, val, T), theirs)
    first8 = hc.window_loss(model, tokens, T, 8 * T)
    for how, sets in (("resume_path", [f"checkpoint.resume_path={adapter_dir}"]),
                      ("additional_load_paths", [f"checkpoint.resume_path={base_dir}",
                                                 f"checkpoint.additional_load_paths=[{adapter_dir}]"])):
        run = f"in_{tag}_{how}"
        log = hc.train(lora_job(rslora), run, f"job.run_dir={run}", *sets)
        checks.true(f"{run}: base and LoRA factors all loaded", "49 tensors loaded, 0 initialised" in log,
                    " ".join(line for line in log.splitlines() if "tensors loaded" in line))
        checks.close(f"{run}: Strata validation loss == peft", val_loss(run), first8)

# --- Strata -> peft ---------------------------------------------------------------------
for rslora in (False, True):
    tag = "rslora" if rslora else "lora"
    run = f"out_{tag}"
    hc.train(lora_job(rslora), run, f"job.run_dir={run}", f"checkpoint.resume_path={base_dir}",
             "training.steps=8", "training.eval_interval=0", "optimizer.lr=2.0e-2", "converters.0.dropout=0.05")
    export = os.path.realpath(f"{run}/checkpoints/hf-latest")
    adapter_dir = f"{export}/adapter"
    config = json.load(open(f"{adapter_dir}/adapter_config.json"))
    checks.equal(f"{run}: adapter_config base_model_name_or_path", config["base_model_name_or_path"], base_dir)
    model = PeftModel.from_pretrained(base_model(), adapter_dir).eval()
    checks.equal(f"{run}: peft's scaling", model.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"],
                 8 / 2 if rslora else 8 / 4)
    # Exactly the adapter's tensors, all of them, went into the model.
    file_sd = load_peft_weights(adapter_dir)
    model_sd = get_peft_model_state_dict(model)
    checks.equal(f"{run}: adapter keys == the peft model's LoRA keys", sorted(file_sd), sorted(model_sd),
                 show=f"{len(file_sd)} tensors")
    diff = max((file_sd[k].float() - model_sd[k].float()).abs().max().item() for k in file_sd)
    checks.max_abs(f"{run}: adapter tensors in the peft model", diff, 0.0)
    checks.true(f"{run}: B is non-zero after training", all(model_sd[k].abs().max() > 0 for k in model_sd if "lora_B" in k))
    theirs = hc.window_loss(model, tokens, T)
    checks.close(f"{run}: peft loss == strata eval --from the adapter", theirs, hc.strata_eval(adapter_dir, val, T))
    checks.close(f"{run}: peft loss == strata eval --from the merged export", theirs, hc.strata_eval(export, val, T))
    merged = model.merge_and_unload().state_dict()
    exported = hc.load_safetensors_dir(export)
    if "lm_head.weight" not in exported:
        exported["lm_head.weight"] = exported["model.embed_tokens.weight"]
    checks.equal(f"{run}: merged export keys == merge_and_unload keys", sorted(exported), sorted(merged))
    diff = max((merged[k] - exported[k].float()).abs().max().item() for k in merged)
    checks.max_abs(f"{run}: merge_and_unload() == Strata's merged export", diff, 1e-6)
checks.done()

"""The model arithmetic the benchmark scripts share, from a Strata config (a dict as
`strata train ... --print-config` writes it): the SwiGLU hidden size (ModelConfig::ffn_hidden_dim)
and the parameter count and training FLOPs per token (Llama::count_parameters and
Llama::training_flops_per_token, trainer/model/llama.cpp). No third-party imports."""


def ffn_hidden_dim(m):
    """SwiGLU hidden size as in Meta's Llama (ModelConfig::ffn_hidden_dim)."""
    hidden = 2 * (4 * m["dim"]) // 3
    if m.get("ffn_dim_multiplier") is not None:
        hidden = int(m["ffn_dim_multiplier"] * hidden)
    return m["multiple_of"] * ((hidden + m["multiple_of"] - 1) // m["multiple_of"])


def params_and_flops(c):
    """(parameters, training FLOPs per token): 6 x matmul parameters + attention's 12 x layers
    x heads x head_dim x seq_len."""
    m, seq = c["model"], c["data"]["seq_len"]
    hd, f = m["dim"] // m["n_heads"], ffn_hidden_dim(m)
    per_layer = (m["dim"] * m["n_heads"] * hd * 2 + m["dim"] * m["n_kv_heads"] * hd * 2
                 + 3 * m["dim"] * f + 2 * m["dim"])
    params = (m["vocab_size"] * m["dim"] * (1 if m["tie_embeddings"] else 2)
              + m["n_layers"] * per_layer + m["dim"])
    matmul = params - (0 if m["tie_embeddings"] else m["vocab_size"] * m["dim"])
    return params, 6.0 * matmul + 12.0 * m["n_layers"] * m["n_heads"] * hd * seq

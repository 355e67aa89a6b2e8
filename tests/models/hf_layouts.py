"""Tiny checkpoints in each family's released Hugging Face layout, written by hand (not by dlc's own saver).

The config.json dicts below carry the keys of the released config.json files (scaled down); the tensor names
are listed here from the released checkpoints' naming scheme, independently of dlc's modules, so a loader that
drifts from the real names fails these tests."""
import json

import torch
from safetensors.torch import save_file

from dlc.models import build_model, config_from_hf

VOCAB, MASK, EOS = 300, 290, 280

LLADA_HF = {
    "architectures": ["LLaDAModelLM"], "model_type": "llada", "activation_type": "silu", "alibi": False,
    "block_type": "llama", "d_model": 32, "n_heads": 4, "n_kv_heads": 4, "n_layers": 2, "mlp_hidden_size": 48,
    "mlp_ratio": 4, "vocab_size": VOCAB, "embedding_size": 304, "rope": True, "rope_full_precision": True,
    "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "include_bias": False, "include_qkv_bias": False,
    "weight_tying": False, "layer_norm_type": "rms", "max_sequence_length": 512, "mask_token_id": MASK,
    "eos_token_id": EOS, "pad_token_id": EOS, "use_cache": False,
}

DREAM_HF = {
    "architectures": ["DreamModel"], "model_type": "Dream",
    "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
    "attention_dropout": 0.0, "bos_token_id": EOS, "eos_token_id": EOS, "pad_token_id": EOS,
    "mask_token_id": MASK, "hidden_act": "silu", "hidden_size": 32, "intermediate_size": 48,
    "initializer_range": 0.02, "max_position_embeddings": 512, "max_window_layers": 2,
    "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
    "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.46.2", "use_cache": False,
    "use_sliding_window": False, "vocab_size": VOCAB,
}

LLADA_MOE_HF = {
    "architectures": ["LLaDAMoEModelLM"], "model_type": "llada", "attention_bias": False,
    "attention_dropout": 0.0, "clip_qkv": None, "dense_intermediate_size": 64, "expert_intermediate_size": 16,
    "eos_token_id": EOS, "pad_token_id": EOS, "mask_token_id": MASK, "hidden_act": "silu", "hidden_size": 32,
    "initializer_range": 0.02, "max_position_embeddings": 512, "moe_layer_freq": [1, 1],
    "moe_router_enable_expert_bias": False, "moe_router_score_function": "softmax", "norm_topk_prob": None,
    "num_attention_heads": 4, "num_experts": 6, "num_experts_per_tok": 2, "num_hidden_layers": 2,
    "num_key_value_heads": 4, "output_router_logits": False, "partial_rotary_factor": 1, "qk_layernorm": True,
    "rms_norm_eps": 1e-5, "rope_scaling": None, "rope_theta": 50000, "routed_scaling_factor": 1,
    "router_aux_loss_coef": 0.01, "shared_expert_intermediate_size": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": False, "vocab_size": VOCAB,
}

# inclusionAI/LLaDA2.0-mini config.json keys (Ling 2.0 layout), scaled down: 3 layers, the first dense; 8
# experts in 4 groups (2 kept), top-2, one shared expert; GQA 4 over 2 heads of 16 with partial rotary 0.5.
LLADA2_HF = {
    "architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe",
    "auto_map": {"AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
                 "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
                 "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM"},
    "attention_dropout": 0.0, "embedding_dropout": 0.0, "output_dropout": 0.0, "eos_token_id": EOS,
    "pad_token_id": EOS, "first_k_dense_replace": 1, "head_dim": 16, "hidden_act": "silu", "hidden_size": 64,
    "initializer_range": 0.02, "intermediate_size": 96, "max_position_embeddings": 512,
    "max_window_layers": 3, "moe_intermediate_size": 24, "moe_router_enable_expert_bias": True, "n_group": 4,
    "norm_topk_prob": True, "num_attention_heads": 4, "num_experts": 8, "num_experts_per_tok": 2,
    "num_hidden_layers": 3, "num_key_value_heads": 2, "num_shared_experts": 1, "output_router_logits": False,
    "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-6, "rope_scaling": None, "rope_theta": 600000,
    "routed_scaling_factor": 2.5, "router_dtype": "fp32", "score_function": "sigmoid",
    "tie_word_embeddings": False, "topk_group": 2, "torch_dtype": "bfloat16", "use_bias": False,
    "use_cache": False, "use_qk_norm": True, "use_qkv_bias": False,
    "using_split_qkv_in_self_attention": False, "vocab_size": VOCAB,
    # not in the release (its generate() defaults mask_id to 156895): the tiny vocab needs it
    "mask_token_id": MASK,
}

# JetLM/SDAR-4B-Chat config.json keys (Qwen3 layout), scaled down: head_dim 24 != hidden / heads, tied
# embedding.
SDAR_HF = {
    "architectures": ["SDARForCausalLM"], "model_type": "sdar",
    "auto_map": {"AutoConfig": "configuration_sdar.SDARConfig", "AutoModel": "modeling_sdar.SDARModel",
                 "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM"},
    "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": EOS, "eos_token_id": EOS,
    "pad_token_id": EOS, "head_dim": 24, "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02,
    "intermediate_size": 96, "max_position_embeddings": 512, "max_window_layers": 2, "num_attention_heads": 4,
    "num_hidden_layers": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_scaling": None,
    "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "use_cache": True, "use_sliding_window": False, "vocab_size": VOCAB, "mask_token_id": MASK,
}

# JetLM/SDAR-30B-A3B-Chat (Qwen3-MoE layout), scaled down: 6 experts top-2, renormalised.
SDAR_MOE_HF = {k: v for k, v in SDAR_HF.items() if k != "intermediate_size"}
SDAR_MOE_HF.update({"architectures": ["SDARMoeForCausalLM"], "model_type": "sdar_moe", "num_experts": 6,
                    "num_experts_per_tok": 2, "moe_intermediate_size": 16, "norm_topk_prob": True,
                    "decoder_sparse_step": 1, "mlp_only_layers": [], "tie_word_embeddings": False,
                    "output_router_logits": False, "router_aux_loss_coef": 0.001})

HF_CONFIGS = {"llada": LLADA_HF, "dream": DREAM_HF, "llada_moe": LLADA_MOE_HF, "llada2_moe": LLADA2_HF,
              "sdar": SDAR_HF, "sdar_moe": SDAR_MOE_HF}
# family name of each HF_CONFIGS entry (sdar_moe is the sdar family's MoE variant)
FAMILY_OF = {"sdar_moe": "sdar"}


def llada_names(d: dict) -> dict[str, tuple]:
    D, F, V, E = d["d_model"], d["mlp_hidden_size"], d["vocab_size"], d["embedding_size"]
    names = {"model.transformer.wte.weight": (E, D), "model.transformer.ln_f.weight": (D,),
             "model.transformer.ff_out.weight": (V, D)}
    for i in range(d["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        names.update({p + "attn_norm.weight": (D,), p + "q_proj.weight": (D, D), p + "k_proj.weight": (D, D),
                      p + "v_proj.weight": (D, D), p + "attn_out.weight": (D, D), p + "ff_norm.weight": (D,),
                      p + "ff_proj.weight": (F, D), p + "up_proj.weight": (F, D),
                      p + "ff_out.weight": (D, F)})
    return names


def dream_names(d: dict) -> dict[str, tuple]:
    D, F, V = d["hidden_size"], d["intermediate_size"], d["vocab_size"]
    hd = D // d["num_attention_heads"]
    KV = d["num_key_value_heads"] * hd
    names = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    for i in range(d["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names.update({
            p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (D, D), p + "self_attn.q_proj.bias": (D,),
            p + "self_attn.k_proj.weight": (KV, D), p + "self_attn.k_proj.bias": (KV,),
            p + "self_attn.v_proj.weight": (KV, D), p + "self_attn.v_proj.bias": (KV,),
            p + "self_attn.o_proj.weight": (D, D),
            p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
            p + "mlp.down_proj.weight": (D, F)})
    return names


def llada_moe_names(d: dict) -> dict[str, tuple]:
    D, F, V, E = d["hidden_size"], d["expert_intermediate_size"], d["vocab_size"], d["num_experts"]
    hd = D // d["num_attention_heads"]
    names = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    for i in range(d["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names.update({
            p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (D, D), p + "self_attn.k_proj.weight": (D, D),
            p + "self_attn.v_proj.weight": (D, D), p + "self_attn.o_proj.weight": (D, D),
            p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
            p + "mlp.gate.weight": (E, D)})
        for j in range(E):
            q = f"{p}mlp.experts.{j}."
            names.update({q + "gate_proj.weight": (F, D), q + "up_proj.weight": (F, D),
                          q + "down_proj.weight": (D, F)})
    return names


def _swiglu_names(p: str, F: int, D: int) -> dict[str, tuple]:
    return {p + "gate_proj.weight": (F, D), p + "up_proj.weight": (F, D), p + "down_proj.weight": (D, F)}


def llada2_names(d: dict) -> dict[str, tuple]:
    """modeling_llada2_moe.py: word_embeddings, attention.query_key_value / dense / query_layernorm /
    key_layernorm, dense mlp below first_k_dense_replace, then mlp.gate (+ expert_bias), experts,
    shared_experts."""
    D, V, hd = d["hidden_size"], d["vocab_size"], d["head_dim"]
    H, Hkv, E, F = (d["num_attention_heads"], d["num_key_value_heads"], d["num_experts"],
                    d["moe_intermediate_size"])
    names = {"model.word_embeddings.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    for i in range(d["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names.update({
            p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
            p + "attention.query_key_value.weight": ((H + 2 * Hkv) * hd, D),
            p + "attention.query_layernorm.weight": (hd,), p + "attention.key_layernorm.weight": (hd,),
            p + "attention.dense.weight": (D, H * hd)})
        if i < d["first_k_dense_replace"]:
            names.update(_swiglu_names(p + "mlp.", d["intermediate_size"], D))
            continue
        names.update({p + "mlp.gate.weight": (E, D), p + "mlp.gate.expert_bias": (E,)})
        for j in range(E):
            names.update(_swiglu_names(f"{p}mlp.experts.{j}.", F, D))
        names.update(_swiglu_names(p + "mlp.shared_experts.", F * d["num_shared_experts"], D))
    return names


def sdar_names(d: dict) -> dict[str, tuple]:
    """modeling_sdar.py (Qwen3): q/k/v/o_proj, q_norm / k_norm [head_dim], dense or Qwen3-MoE mlp."""
    D, V, hd = d["hidden_size"], d["vocab_size"], d["head_dim"]
    H, Hkv = d["num_attention_heads"], d["num_key_value_heads"]
    names = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not d["tie_word_embeddings"]:
        names["lm_head.weight"] = (V, D)
    for i in range(d["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names.update({
            p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (H * hd, D), p + "self_attn.k_proj.weight": (Hkv * hd, D),
            p + "self_attn.v_proj.weight": (Hkv * hd, D), p + "self_attn.o_proj.weight": (D, H * hd),
            p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
        if "num_experts" in d:
            names[p + "mlp.gate.weight"] = (d["num_experts"], D)
            for j in range(d["num_experts"]):
                names.update(_swiglu_names(f"{p}mlp.experts.{j}.", d["moe_intermediate_size"], D))
        else:
            names.update(_swiglu_names(p + "mlp.", d["intermediate_size"], D))
    return names


HF_NAMES = {"llada": llada_names, "dream": dream_names, "llada_moe": llada_moe_names,
            "llada2_moe": llada2_names, "sdar": sdar_names, "sdar_moe": sdar_names}


def random_tensors(names: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights (norm weights around 1, biases nonzero) so every tensor influences the output."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in names.items():
        t = torch.randn(shape, generator=g)
        if "norm" in name:
            t = 1 + 0.1 * t
        elif len(shape) == 2:
            t = t * (0.5 / shape[1] ** 0.5) if "embed" not in name and "wte" not in name else t * 0.5
        else:
            t = 0.1 * t
        out[name] = t.contiguous()
    return out


def write_checkpoint(path, hf_config: dict, tensors: dict[str, torch.Tensor], shards: int = 1):
    """config.json + model.safetensors, or ``shards`` files model-0000i-of-0000n.safetensors + index."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config, indent=2))
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, str(path / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return path


def direct_model(family: str, tensors: dict[str, torch.Tensor]):
    """The same weights put into a model built straight from the config (no loader involved)."""
    m = build_model(config_from_hf(HF_CONFIGS[family]))
    m.load_state_dict(tensors, strict=True)
    return m.eval()

"""Checkpoint tensor names -> miaotui names, in one table per file format.

Our names (one decoder block `i`):
    tok_embeddings.weight, norm.weight, output.weight
    layers.i.attention_norm.weight, layers.i.ffn_norm.weight
    layers.i.attention.{wq,wk,wv,wo}.{weight,bias}, layers.i.attention.{q_norm,k_norm}.weight
    layers.i.post_attention_norm.weight, layers.i.post_ffn_norm.weight   (gemma3 sandwich norms)
    layers.i.feed_forward.{w_gate,w_up,w_down}.weight
"""

from __future__ import annotations

import re

GGUF_GLOBAL = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
GGUF_BLOCK = {
    "attn_norm": "attention_norm",
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "attn_q_norm": "attention.q_norm",
    "attn_k_norm": "attention.k_norm",
    "post_attention_norm": "post_attention_norm",
    "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w_gate",
    "ffn_up": "feed_forward.w_up",
    "ffn_down": "feed_forward.w_down",
    "post_ffw_norm": "post_ffn_norm",
}

HF_GLOBAL = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
HF_BLOCK = {
    "input_layernorm": "attention_norm",
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "self_attn.q_norm": "attention.q_norm",
    "self_attn.k_norm": "attention.k_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "mlp.gate_proj": "feed_forward.w_gate",
    "mlp.up_proj": "feed_forward.w_up",
    "mlp.down_proj": "feed_forward.w_down",
    "post_feedforward_layernorm": "post_ffn_norm",
}
# In Llama/Qwen2 HF checkpoints the norm before the MLP is called post_attention_layernorm.
HF_BLOCK_PRE_NORM_ONLY = dict(HF_BLOCK, post_attention_layernorm="ffn_norm")

_GGUF_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_HF_BLOCK_RE = re.compile(r"^model\.layers\.(\d+)\.([\w.]+)\.(weight|bias)$")


def gguf_to_ours(name: str) -> str | None:
    """Our name for a GGUF tensor name, or None if we do not use it (e.g. rope_freqs)."""
    if name in GGUF_GLOBAL:
        return GGUF_GLOBAL[name]
    m = _GGUF_BLOCK_RE.match(name)
    if m and m.group(2) in GGUF_BLOCK:
        return f"layers.{m.group(1)}.{GGUF_BLOCK[m.group(2)]}.{m.group(3)}"
    return None


def hf_to_ours(name: str, sandwich_norm: bool) -> str | None:
    """Our name for a Hugging Face tensor name, or None if we do not use it."""
    name = name.removeprefix("model.language_model.").replace("language_model.model.", "model.")
    if not name.startswith(("model.", "lm_head.")):
        name = "model." + name
    if name in HF_GLOBAL:
        return HF_GLOBAL[name]
    m = _HF_BLOCK_RE.match(name)
    table = HF_BLOCK if sandwich_norm else HF_BLOCK_PRE_NORM_ONLY
    if m and m.group(2) in table:
        return f"layers.{m.group(1)}.{table[m.group(2)]}.{m.group(3)}"
    return None

"""Build tiny random HF models with torch and save them locally (no hub access)."""

from __future__ import annotations

FAMILIES = {
    # name: (model_type, extra config kwargs)
    "llama_tied": ("llama", dict(tie_word_embeddings=True)),
    "llama_untied": ("llama", dict(tie_word_embeddings=False)),
    "qwen2_tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3_untied": ("qwen3", dict(tie_word_embeddings=False)),
}


def tiny_hf_config(model_type: str, **overrides):
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "qwen3": transformers.Qwen3Config}[model_type]
    kw = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
              max_position_embeddings=256, rope_parameters={"rope_type": "default",
                                                            "rope_theta": 10000.0})
    if model_type == "qwen2":
        kw["use_sliding_window"] = False
    kw.update(overrides)
    return cls(**kw)


def build_tiny_hf(directory, model_type: str, *, seed: int = 0, torch_dtype=None, **overrides):
    """Random-init a tiny HF causal LM, perturb the norms/biases, save it, return the torch model."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = tiny_hf_config(model_type, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        # Make every parameter matter: norms and biases are 1 / 0 at init.
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    model.eval()
    model.save_pretrained(str(directory))
    return model

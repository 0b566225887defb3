"""Tiny randomly initialised causal LMs and a tiny offline tokenizer for fast pipeline tests."""
from __future__ import annotations

import torch

VOCAB = 320

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n"
    "def add(a, b):\n    return a + b  # numbers, strings and lists all work\n"
    "Sphinx of black quartz, judge my vow! How vexingly quick daft zebras jump.\n"
)


FAMILIES = ("llama", "llama3", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "opt", "mixtral", "qwen2-moe",
            "qwen3-moe")
MOE_FAMILIES = ("mixtral", "qwen2-moe", "qwen3-moe")
NUM_EXPERTS = 6


def tiny_config(kind: str = "llama"):
    """A 2-layer config with grouped-query attention (4 query heads, 2 key/value heads), except OPT (4 heads).

    Every width is a multiple of 4 (2:4). The MoE kinds have ``NUM_EXPERTS`` experts of width 32, top-2.
    """
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if kind == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common)
    if kind == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**common)  # Qwen2 has biases on q/k/v
    if kind == "qwen2-sliding":  # layers get different attention masks (sliding window, then full)
        from transformers import Qwen2Config

        return Qwen2Config(**common, use_sliding_window=True, sliding_window=4,
                           layer_types=["sliding_attention", "full_attention"])
    if kind == "mistral":
        from transformers import MistralConfig

        return MistralConfig(**common, sliding_window=None)
    if kind == "llama3":  # Llama-3.1's rope scaling (frequencies stretched beyond 64 original positions)
        from transformers import LlamaConfig

        return LlamaConfig(**common, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    if kind == "qwen3":  # q/k RMS norms per head
        from transformers import Qwen3Config

        return Qwen3Config(**common, head_dim=16)
    if kind in ("gemma2", "gemma3"):  # sliding and global layers, GeLU-tanh gated MLP, tied embeddings
        from transformers import Gemma2Config, Gemma3TextConfig

        cls = Gemma2Config if kind == "gemma2" else Gemma3TextConfig
        return cls(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
                   layer_types=["sliding_attention", "full_attention"])
    if kind == "phi3":  # fused qkv_proj and gate_up_proj Linears
        from transformers import Phi3Config

        return Phi3Config(**common)
    if kind == "opt":
        from transformers import OPTConfig

        return OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=256, word_embed_proj_dim=64, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    moe = dict(num_experts_per_tok=2)
    if kind == "mixtral":
        from transformers import MixtralConfig

        return MixtralConfig(**{**common, "intermediate_size": 32}, num_local_experts=NUM_EXPERTS, **moe)
    if kind == "qwen2-moe":  # plus a shared expert behind a sigmoid gate (a Linear that must stay dense)
        from transformers import Qwen2MoeConfig

        return Qwen2MoeConfig(**common, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                              num_experts=NUM_EXPERTS, decoder_sparse_step=1, **moe)
    if kind == "qwen3-moe":
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(**common, moe_intermediate_size=32, num_experts=NUM_EXPERTS, decoder_sparse_step=1,
                              norm_topk_prob=True, head_dim=16, **moe)
    raise ValueError(f"unknown tiny model kind {kind!r}; allowed: {', '.join(FAMILIES)}, qwen2-sliding")


def tiny_model(kind: str = "llama", seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind))
    # Random init puts biases at zero; make Qwen2's q/k/v biases non-zero so they are exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


def starve_expert(model, expert: int, scale: float = 50.0) -> None:
    """Route no token to ``expert`` in any MoE layer of a tiny model, by construction.

    Input channel 0 of every embedding is set to 1 (it dominates the router's normalised input, > 0 for every
    token); every other expert's router row gets ``scale`` in that channel and ``expert``'s row is zeroed, so
    its logit is far below the others' and top-k never picks it, while the others still compete.
    """
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 1.0
        for name, mod in model.named_modules():
            if name.endswith("mlp.gate") and getattr(mod, "weight", None) is not None and mod.weight.dim() == 2:
                mod.weight[:, 0] = scale
                mod.weight[expert] = 0.0


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in memory (no download), vocabulary < VOCAB."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([SAMPLE_TEXT] * 4, vocab_size=VOCAB - 8, min_frequency=1,
                            special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>", pad_token="<unk>")
    assert len(tok) <= VOCAB
    return tok


def random_ids(n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, seqlen), generator=gen)

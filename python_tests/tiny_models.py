"""Tiny randomly initialised causal LMs and a tiny offline tokenizer for fast pipeline tests."""
from __future__ import annotations

import torch

VOCAB = 320

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n"
    "def add(a, b):\n    return a + b  # numbers, strings and lists all work\n"
    "Sphinx of black quartz, judge my vow! How vexingly quick daft zebras jump.\n"
)


def tiny_config(kind: str = "llama"):
    """A 2-layer config with grouped-query attention (4 query heads, 2 key/value heads)."""
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
    raise ValueError(kind)


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

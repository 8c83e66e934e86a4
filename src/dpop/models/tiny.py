"""Tiny random models and tokenizers built in code, for tests and examples: no download, seconds to train."""

from __future__ import annotations

_TINY_CORPUS = [
    "What is 2 + 3? 2 + 3 = 5. The answer is 5.",
    "Tom has 12 apples. He buys 3 bags of 7 apples each. 3 × 7 = 21. 12 + 21 = 33. The answer is 33.",
    "The quick brown fox jumps over the lazy dog. Hello world, hello there.",
    "A train travels 60 km each hour for 4 hours: 60 × 4 = 240 km. The answer is 240.",
    "Human: how are you? Assistant: I am fine, thank you for asking.",
]


CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tiny_tokenizer(vocab_size: int = 384, *, bos: bool = False):
    """A byte-level BPE tokenizer trained in code on a small corpus, with ChatML special tokens.

    Real merges (" the", "answer") exist, so the prompt/response boundary traps are reproducible without
    any download. `bos=True` makes it prepend `<s>` like Llama tokenizers do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(_TINY_CORPUS * 4, trainer=trainer)
    if bos:
        core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 3)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>" if bos else None,
                                        eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token="<|endoftext|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def make_tiny_model(tokenizer=None, *, layers: int = 2, hidden: int = 64, heads: int = 4, seed: int = 0,
                    tie_embeddings: bool = True):
    """A randomly initialised Llama with `layers` layers, sized to `tokenizer` (fp32, sdpa, eval mode)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or make_tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                         max_position_embeddings=1024, tie_word_embeddings=tie_embeddings,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model.eval()

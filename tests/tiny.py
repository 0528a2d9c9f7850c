"""Build a tiny, real Llama checkpoint offline: BPE tokenizer trained on pydoc text, random weights."""

from __future__ import annotations

from pathlib import Path


def make_tiny_model(
    folder: Path, hidden: int = 64, intermediate: int = 128, layers: int = 2, vocab: int = 512, tie_word_embeddings: bool = False,
    tokenizer_dir: Path | None = None, dtype: str = "float32",
) -> Path:
    """`tokenizer_dir`: use that model's tokenizer instead of training one (llama.cpp's converter
    accepts only tokenizers it knows, e.g. SmolLM2's)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else _pydoc_tokenizer(vocab)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    LlamaForCausalLM(config).to(getattr(torch, dtype)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _pydoc_tokenizer(vocab: int):
    """A byte-level BPE tokenizer trained on Python's own docs."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from byoai.tasks.data import python_docs

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"])
    bpe.train_from_iterator([python_docs("train")], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>")

"""Shared fixtures: tiny random-initialised Qwen2 models built from a config (no files, seconds)."""
import pytest
import torch


def tiny_qwen2(seed: int = 0, vocab: int = 1000, hidden: int = 64, layers: int = 2):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, eos_token_id=2, pad_token_id=2, bos_token_id=1)
    model = Qwen2ForCausalLM(config).eval()
    model.requires_grad_(False)
    return model


@pytest.fixture
def tiny_model():
    return tiny_qwen2()

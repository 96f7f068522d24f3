"""Shared fixtures: tiny random-initialised Qwen2 models built from a config (no files, seconds).

The tests never reach the network: the hub libraries read these variables when first imported."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def tiny_qwen2(seed: int = 0, vocab: int = 1000, hidden: int = 64, layers: int = 2, init: float = 0.02):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, eos_token_id=2, pad_token_id=2, bos_token_id=1,
                         initializer_range=init)
    model = Qwen2ForCausalLM(config).eval()
    model.requires_grad_(False)
    return model


@pytest.fixture
def tiny_model():
    return tiny_qwen2()


def save_tiny_model(folder, seed: int = 0):
    """A tiny random Qwen2 with the embedded model's tokenizer, saved as a model folder the scripts can load.
    Weights of std 0.3 (not 0.02): after the final RMSNorm a 32-wide hidden state times lm_head rows of std 0.02
    gives logits below 1 over a 49k vocabulary, so no LoRA could teach it a label word."""
    from src.models import embedded_model_dir, load_tokenizer

    tokenizer = load_tokenizer(embedded_model_dir())
    model = tiny_qwen2(seed=seed, vocab=len(tokenizer), hidden=32, init=0.3)
    model.config.eos_token_id = model.config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder

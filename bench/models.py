"""The random-weight model shapes the benchmarks run (no weights to download): one definition for all of them.

``qwen3-0.6b`` is Qwen3-0.6B's config.json; ``tiny`` is for dry runs on any machine.
"""

from minivllm.model.config import ModelConfig

QWEN3_06B = ModelConfig(architecture="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                        num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                        rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=40960,
                        tie_word_embeddings=True, qk_norm=True)
TINY = ModelConfig(architecture="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=1e6,
                   max_position_embeddings=4096, tie_word_embeddings=True, qk_norm=True)
RANDOM_MODELS = {"qwen3-0.6b": QWEN3_06B, "tiny": TINY}  # random weights; "default" = the embedded GGUF

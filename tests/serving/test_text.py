"""The text layer against transformers: the same ids, the same chat prompts; and the streaming pieces."""

import json

import pytest
import transformers
from tokenizers import Tokenizer, processors

from longcat_jax.serving.text import (
    DEFAULT_CHAT_TEMPLATE,
    IncrementalDetokenizer,
    StopStrings,
    TextTokenizer,
    save_tokenizer_folder,
)
from longcat_jax.training.data import train_bpe

CORPUS = [
    "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n",
    "The quick brown fox jumps over the lazy dog. Hello, world! " * 3,
    "naïve café, déjà vu; 你好，世界。こんにちは 🙂🚀 " * 2,
]
TEXTS = [
    "Hello, world!",
    "  leading spaces and trailing  ",
    "line one\nline two\n\n\tindented",
    "emoji 🙂🚀 and CJK 你好世界, accents déjà vu",
    "a literal </s> and <s> in the text",
    "",
]
LLAMA_LIKE = """{{ bos_token }}
{% set ns = namespace(system="") %}
{% for message in messages %}
    {% if message["role"] == "system" %}
        {% set ns.system = message["content"] %}
    {% endif %}
{% endfor %}
{% if ns.system %}
<|start_header_id|>system<|end_header_id|>

{{ ns.system }}<|eot_id|>
{% endif %}
{% for message in messages if message["role"] != "system" %}
<|start_header_id|>{{ message["role"] }}<|end_header_id|>

    {% if message.tool_calls is defined %}
{{ message.tool_calls | tojson }}
    {% else %}
{{ message["content"] | trim }}
    {% endif %}
{% if not loop.last or not add_generation_prompt %}<|eot_id|>{% endif %}

{% endfor %}
{% if add_generation_prompt %}
<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""
# transformers' `{% generation %}` tag (marks assistant tokens), loop controls and dict().
GENERATION_TAG = """{% for message in messages %}
{% if message.role == "tool" %}{% break %}{% endif %}
{{ loop.index }}:{{ dict(role=message.role) | tojson }}
{% if message.role == "assistant" %}{% generation %}{{ message.content | default("-") }}{% endgeneration %}
{% else %}{{ message.content }}{% endif %}
{% endfor %}"""
CHAT = [
    {"role": "system", "content": "You are terse. <b>&'</b>"},
    {"role": "user", "content": "What is 2+2? 🙂"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"name": "add", "arguments": {"a": 2, "é": "<2>"}}]},
    {"role": "tool", "content": "4"},
    {"role": "user", "content": [{"type": "text", "text": "Thanks, "}, {"type": "text", "text": "and 3+3?"}]},
]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(CORPUS, vocab_size=360)


def _both(path):
    return TextTokenizer.from_folder(path), transformers.AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def default_folder(bpe, tmp_path_factory):
    path = tmp_path_factory.mktemp("default")
    save_tokenizer_folder(bpe, path)
    return path


@pytest.fixture(scope="module")
def pair(default_folder):
    return _both(default_folder)


def test_encode_decode_and_special_ids_match_transformers(pair):
    ours, hf = pair
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf(text)["input_ids"], text
        for skip in (True, False):
            assert ours.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip)
    assert ours.encode("a </s>")[-1] == 2  # a special token's spelling is that token, as in transformers
    assert ours.vocab_size == len(hf)
    assert ours.eos_token_ids == (hf.eos_token_id,) == (2,)
    assert ours.bos_token_id == hf.bos_token_id == 1
    assert ours.chat_template == hf.chat_template == DEFAULT_CHAT_TEMPLATE


@pytest.mark.parametrize("template", [None, LLAMA_LIKE, GENERATION_TAG], ids=["default", "llama", "gen"])
def test_chat_matches_apply_chat_template(bpe, tmp_path, template):
    if template is not None:
        save_tokenizer_folder(bpe, tmp_path, chat_template=template)
    else:
        save_tokenizer_folder(bpe, tmp_path)
    ours, hf = _both(tmp_path)
    for chat in (CHAT, CHAT[1:2]):
        for gen in (True, False):
            text = ours.render_chat(chat, add_generation_prompt=gen)
            assert text == hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert ours.encode_chat(chat, add_generation_prompt=gen) == hf.apply_chat_template(
                chat, tokenize=True, add_generation_prompt=gen, return_dict=False)
    if template is None:
        assert ours.render_chat(CHAT[1:2]) == "<|user|>\nWhat is 2+2? 🙂</s><|assistant|>\n"
    elif template == LLAMA_LIKE:
        assert '[{"name": "add", "arguments": {"a": 2, "é": "<2>"}}]' in ours.render_chat(CHAT)


def test_folder_config_bos_extra_tokens_and_stop_ids(bpe, tmp_path):
    """A tokenizer.json whose post-processor adds a BOS, tokens the config names but the vocabulary lacks, a
    template in tokenizer_config.json under chat_template.jinja, and generation_config.json's stop ids."""
    tok = Tokenizer.from_str(bpe.to_str())
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    save_tokenizer_folder(tok, tmp_path, chat_template=LLAMA_LIKE)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.update(unk_token="<unk>", additional_special_tokens=["<|eot_id|>"], chat_template="shadowed",
                  add_bos_token=False)  # transformers 5 ignores add_bos_token next to a tokenizer.json
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    ours, hf = _both(tmp_path)
    assert ours.vocab_size == len(hf) == bpe.get_vocab_size() + 2
    for text in TEXTS + ["<unk> then <|eot_id|>"]:
        assert ours.encode(text) == hf(text)["input_ids"]
        assert ours.encode(text)[0] == 1
        assert ours.decode(ours.encode(text)) == hf.decode(ours.encode(text), skip_special_tokens=True)
    assert ours.encode_chat(CHAT) == hf.apply_chat_template(CHAT, add_generation_prompt=True,
                                                            return_dict=False)
    assert ours.encode_chat(CHAT)[:2] != [1, 1]  # one BOS, the template's: none is added again
    assert ours.chat_template == LLAMA_LIKE
    assert ours.eos_token_ids == (2, 7)

    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "generation_config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 5}))
    assert TextTokenizer.from_folder(tmp_path).chat_template == "shadowed"
    assert TextTokenizer.from_folder(tmp_path).eos_token_ids == (2, 5)


def test_from_tokenizer_wraps_a_training_bpe(bpe):
    ours = TextTokenizer.from_tokenizer(bpe)
    assert ours.eos_token_ids == (2,) and ours.bos_token_id is None
    assert ours.chat_template == DEFAULT_CHAT_TEMPLATE
    assert ours.encode("hi") == bpe.encode("hi").ids
    assert ours.render_chat([{"role": "user", "content": "hi"}], False) == "<|user|>\nhi</s>"
    assert TextTokenizer.from_tokenizer(bpe, bos_token="<s>").bos_token_id == 1
    with pytest.raises(ValueError, match="'<nope>' is not in the tokenizer's vocabulary"):
        TextTokenizer.from_tokenizer(bpe, eos_token="<nope>")


def test_bad_folders_and_templates(bpe, default_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        TextTokenizer.from_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextTokenizer.from_folder(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json: not a valid tokenizer.json"):
        TextTokenizer.from_folder(tmp_path)
    save_tokenizer_folder(bpe, tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="tokenizer_config.json: expected a JSON object"):
        TextTokenizer.from_folder(tmp_path)
    save_tokenizer_folder(bpe, tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(ValueError, match="chat_template.jinja: chat template does not compile"):
        TextTokenizer.from_folder(tmp_path)

    ours = TextTokenizer.from_folder(default_folder)
    with pytest.raises(ValueError, match="unknown chat role 'wizard'"):
        ours.render_chat([{"role": "wizard", "content": "hi"}])
    with pytest.raises(ValueError, match="empty conversation"):
        ours.encode_chat([])
    with pytest.raises(ValueError, match="does not compile"):
        save_tokenizer_folder(bpe, tmp_path, chat_template="{{ unclosed")
    with pytest.raises(ValueError, match="eos_token '<eos>' is not in the tokenizer's vocabulary"):
        save_tokenizer_folder(bpe, tmp_path, eos_token="<eos>")


def _stream(ours, ids, **kw):
    detok = IncrementalDetokenizer(ours, **kw)
    deltas = [detok.push(i) for i in ids]
    return deltas, detok.flush(), detok


def test_incremental_detokenizer_never_splits_a_character(pair):
    ours, _ = pair
    text = "CJK 你好，世界 and emoji 🙂🚀🤖 mixed é ü, ending on 🙂"
    ids = ours.encode(text)
    assert any("\ufffd" in ours.decode([i]) for i in ids)  # some tokens hold part of a character
    for skip in (True, False):
        stream = ids[:9] + [2] + ids[9:] + [2]  # an EOS inside and at the end
        deltas, tail, detok = _stream(ours, stream, skip_special_tokens=skip)
        assert all("\ufffd" not in d for d in deltas)
        assert "".join(deltas) + tail == ours.decode(stream, skip)
        assert ("</s>" in "".join(deltas)) != skip
        assert len(detok._ids) <= 8  # a window, not the whole output
    # With the prompt as context, the deltas continue the prompt's text.
    prompt = ours.encode("prefix: 你")
    deltas, tail, _ = _stream(ours, ids, prompt_ids=prompt)
    assert "".join(deltas) + tail == text
    # A character left incomplete at the end comes out of flush, as decode writes it.
    cut = ours.encode("🙂")[:-1]
    deltas, tail, _ = _stream(ours, cut)
    assert deltas == [""] * len(cut) and tail == ours.decode(cut) and tail.endswith("\ufffd")


def test_stop_strings():
    stops = StopStrings(["STOP", "\n\n"])
    assert stops.feed("Hello ST") == ("Hello ", False)  # "ST" could begin "STOP"
    assert stops.feed("ART and S") == ("START and ", False)  # it did not; released
    assert stops.feed("TO") == ("", False)
    assert stops.feed("P and more") == ("", True)
    assert stops.feed("after") == ("", True) and stops.flush() == ""

    stops = StopStrings(["end", "the end"])
    assert stops.feed("so the en") == ("so ", False)
    assert stops.feed("d.") == ("", True)  # the earliest stop wins: "the end" starts before "end"

    stops = StopStrings(["\n\n"])
    assert stops.feed("one\n") == ("one", False)
    assert stops.flush() == "\n"  # no stop came: the held text is released at the end
    assert StopStrings([]).feed("anything") == ("anything", False)
    assert StopStrings(["x"]).feed("abxcd") == ("ab", True)

"""The text layer of the server: text and chat messages -> token ids, and generated ids -> streamed text.

The engine works in token ids only (docs/architecture.md#serving). This module reads a Hugging Face
tokenizer folder and must agree with ``transformers`` on every id, because a model is trained and evaluated
through transformers' tokenizer: ``encode`` is ``AutoTokenizer.from_pretrained(folder)(text)["input_ids"]``
and ``render_chat`` / ``encode_chat`` are ``apply_chat_template``. transformers itself is only a test
dependency; what it does is reproduced here from its source (transformers 5:
``tokenization_utils_tokenizers.py`` for the special tokens, ``utils/chat_template_utils.py`` for the Jinja
environment), and the tests compare the two.

Streaming needs two more pieces: ``IncrementalDetokenizer`` turns ids into text deltas without ever emitting
half a UTF-8 character, and ``StopStrings`` cuts the text at the first stop string, across delta boundaries.

``DEFAULT_CHAT_TEMPLATE`` is used when a folder (or ``from_tokenizer``) brings no chat template. Each turn is
``<|role|>\n``, the content, then the EOS token, with nothing between turns; ``add_generation_prompt`` appends
``<|assistant|>\n``::

    <|system|>\nBe brief.</s><|user|>\nHi!</s><|assistant|>\n

The role markers are plain text (a freshly trained BPE has no special tokens for them), so the template needs
only the EOS token, which ends an assistant turn and so stops generation. The roles are system, user,
assistant and tool; any other raises (``raise_exception``). Content is a string or OpenAI content parts, whose
text parts are joined.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"
MODEL_CONFIG_FILE = "config.json"
# transformers' named special tokens (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES); a chat template sees
# each one that is set as a variable of the same name.
SPECIAL_TOKEN_NAMES = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"
)
# Names a message's reasoning is passed under; transformers fills all of them from whichever is given.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

# "<|role|>\ncontent</s>" turns; see the module docstring.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}\n"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] -%}\n"
    "{{- raise_exception(\"unknown chat role '\" ~ message['role'] ~ \"': expected system, user, assistant or tool\") -}}\n"  # noqa: E501
    "{%- endif -%}\n"
    "{{- '<|' ~ message['role'] ~ '|>\\n' -}}\n"
    "{%- if message['content'] is string -%}\n"
    "{{- message['content'] -}}\n"
    "{%- elif message['content'] is defined -%}\n"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{- part['text'] -}}{%- endfor -%}\n"
    "{%- endif -%}\n"
    "{{- eos_token -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}\n"
)


# --------------------------------------------------------------------------------------------- chat templates


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` renders its body. transformers uses the tag to find the
    assistant's tokens (``return_assistant_tokens_mask``); templates that carry it must still compile here."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _TemplateDict:
    """``dict`` as templates see it: callable and ``fromkeys``, nothing else to escape the sandbox by."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """Jinja's ``namespace`` refusing underscore-prefixed names, which could reach CPython internals."""

    def __init__(*args, **kwargs):  # Jinja's signature trick, so that `namespace(self=...)` works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscored names: {name!r}")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' filter: Jinja's own tojson escapes HTML characters (<, >, &, ') and takes no json options.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


@lru_cache
def compile_chat_template(template: str) -> jinja2.Template:
    """Compiles a chat template in the environment transformers' ``apply_chat_template`` renders in.

    Chat templates come with downloaded checkpoints, so they are untrusted code: the environment is Jinja's
    immutable sandbox. ``trim_blocks``/``lstrip_blocks``, ``loopcontrols``, ``raise_exception``,
    ``strftime_now``, ``tojson``, ``dict`` and ``namespace`` are what templates written for transformers
    expect; any difference would change the rendered prompt.

    Raises:
        ValueError: the template does not parse.
    """
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_TemplateNamespace)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template does not compile: {e}") from e


def _template_message(message) -> dict:
    """A message as transformers hands it to the template: None-valued keys dropped (OpenAI clients send
    ``content: null``), and the reasoning under all of its names."""
    if not isinstance(message, Mapping):
        raise TypeError(f"chat messages must be dicts, got {message!r}")
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


# ----------------------------------------------------------------------------------------------- tokenizer


def _read_json(path: str, required: bool = False):
    if not os.path.isfile(path):
        if required:
            raise FileNotFoundError(f"{path} does not exist")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _added_token(value, where: str, special: bool = True) -> AddedToken:
    """A token as tokenizer_config.json spells it, a string or a serialised AddedToken ({"content": ...})."""
    if isinstance(value, str):
        return AddedToken(value, special=special, normalized=False)
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        flags = {k: bool(value[k]) for k in ("single_word", "lstrip", "rstrip", "normalized") if k in value}
        return AddedToken(value["content"], **{"normalized": False, **flags, "special": special})
    raise ValueError(f"{where}: expected a token string or {{'content': ...}}, got {value!r}")


def _eos_ids(value, where: str) -> list[int]:
    ids = value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"{where}: eos_token_id must be an int or a list of ints, got {value!r}")
    return ids


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` with the special tokens, stop ids and chat template of a model.

    Attributes:
        tokenizer: the backend, with the named special tokens registered as transformers registers them.
        special_tokens: ``{"bos_token": "<s>", ...}``, the named special tokens a chat template can read.
        eos_token_ids: ids that end generation: the EOS token's, then generation_config.json's.
        bos_token_id: the BOS token's id, or None. ``encode`` adds it only where tokenizer.json's
            post-processor does (transformers 5 ignores ``add_bos_token`` when there is a tokenizer.json).
        chat_template: the Jinja chat template in use.
        special_ids: ids of the special added tokens, the ones ``skip_special_tokens`` drops.
    """

    def __init__(self, tokenizer: Tokenizer, *, special_tokens: Mapping[str, str], chat_template: str,
                 extra_eos_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.special_tokens = dict(special_tokens)
        self.chat_template = chat_template
        self._template = compile_chat_template(chat_template)
        eos, bos = self.special_tokens.get("eos_token"), self.special_tokens.get("bos_token")
        self.bos_token_id = None if bos is None else tokenizer.token_to_id(bos)
        eos_ids = [tokenizer.token_to_id(eos)] if eos is not None else []
        self.eos_token_ids = tuple(dict.fromkeys(i for i in eos_ids + list(extra_eos_ids) if i is not None))
        self.special_ids = frozenset(i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)

    @classmethod
    def from_folder(cls, path) -> TextTokenizer:
        """Reads a tokenizer folder as transformers saves it (and ``save_tokenizer_folder`` writes it).

        ``tokenizer.json`` is required. ``tokenizer_config.json`` names the special tokens (any missing from
        the vocabulary are added, as transformers does) and may hold the chat template;
        ``chat_template.jinja`` wins over it, and ``DEFAULT_CHAT_TEMPLATE`` is used when neither has one. The
        stop ids add
        ``generation_config.json``'s ``eos_token_id`` (or else ``config.json``'s) to the EOS token.

        Raises:
            FileNotFoundError: the folder or its tokenizer.json does not exist.
            ValueError: a file is not valid (the message names it).
        """
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer folder {path} does not exist")
        tokenizer_file = os.path.join(path, TOKENIZER_FILE)
        if not os.path.isfile(tokenizer_file):
            raise FileNotFoundError(f"{tokenizer_file} does not exist: a tokenizer folder needs one")
        try:
            tokenizer = Tokenizer.from_file(tokenizer_file)
        except Exception as e:  # tokenizers raises a bare Exception for unparseable files
            raise ValueError(f"{tokenizer_file}: not a valid tokenizer.json: {e}") from e
        config_file = os.path.join(path, TOKENIZER_CONFIG_FILE)
        config = _read_json(config_file) or {}

        # What transformers' TokenizersBackend.__init__/_post_init do to the backend: tokens of
        # added_tokens_decoder it lacks, then the named special tokens (bos_token, ..., any other "*_token"
        # string, extra_special_tokens) as special tokens, new ones appended to the vocabulary.
        present = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
        decoder = config.get("added_tokens_decoder") or {}
        for _, value in sorted(decoder.items(), key=lambda kv: int(kv[0])):
            special = isinstance(value, Mapping) and bool(value.get("special"))
            token = _added_token(value, f"{config_file} added_tokens_decoder", special)
            if token.content not in present:
                tokenizer.add_tokens([token])
        named: dict[str, AddedToken] = {}
        for key, value in config.items():
            is_token = isinstance(value, str) or (isinstance(value, Mapping) and "content" in value)
            if key in SPECIAL_TOKEN_NAMES and value is not None or key.endswith("_token") and is_token:
                named[key] = _added_token(value, f"{config_file} {key}")
        extras = config.get("extra_special_tokens", config.get("additional_special_tokens")) or []
        if isinstance(extras, Mapping):
            named.update({k: _added_token(v, f"{config_file} {k}") for k, v in extras.items()})
            extras = []
        extras = [_added_token(v, f"{config_file} extra_special_tokens") for v in extras]
        tokenizer.add_special_tokens(list(named.values()) + extras)
        tokenizer.encode_special_tokens = bool(config.get("split_special_tokens", False))

        template_file = os.path.join(path, CHAT_TEMPLATE_FILE)
        if os.path.isfile(template_file):
            with open(template_file, encoding="utf-8") as f:
                chat_template = f.read()
        else:
            chat_template = config.get("chat_template") or DEFAULT_CHAT_TEMPLATE
            if isinstance(chat_template, list):  # [{"name": ..., "template": ...}]: the one named "default"
                by_name = {t.get("name"): t.get("template") for t in chat_template if isinstance(t, Mapping)}
                if not isinstance(by_name.get("default"), str):
                    raise ValueError(f"{config_file}: chat_template list has no 'default' template")
                chat_template = by_name["default"]
            if not isinstance(chat_template, str):
                raise ValueError(f"{config_file}: chat_template must be a string, got {chat_template!r}")

        extra_eos: list[int] = []
        for name in (GENERATION_CONFIG_FILE, MODEL_CONFIG_FILE):
            file = os.path.join(path, name)
            cfg = _read_json(file) or {}
            if cfg.get("eos_token_id") is not None:
                extra_eos = _eos_ids(cfg["eos_token_id"], file)
                break
        try:
            return cls(tokenizer, special_tokens={k: t.content for k, t in named.items()},
                       chat_template=chat_template, extra_eos_ids=extra_eos)
        except ValueError as e:
            where = template_file if os.path.isfile(template_file) else config_file
            raise ValueError(f"{where}: {e}") from e

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, *, eos_token: str | None = None,
                       bos_token: str | None = None, chat_template: str | None = None) -> TextTokenizer:
        """Wraps a bare ``tokenizers.Tokenizer``, e.g. the BPE a training run leaves in its run directory.

        Args:
            tokenizer: copied, never changed.
            eos_token: None picks the first of ``training.data.EOS_CANDIDATES`` the vocabulary has ("</s>" for
                ``train_bpe``'s), as training does.
            bos_token: None: no BOS (training packs documents without one).
            chat_template: None: ``DEFAULT_CHAT_TEMPLATE``.
        """
        tokenizer = Tokenizer.from_str(tokenizer.to_str())
        if eos_token is None:
            from longcat_jax.training.data import EOS_CANDIDATES  # imports grain; only needed here

            eos_token = next((t for t in EOS_CANDIDATES if tokenizer.token_to_id(t) is not None), None)
        named = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v is not None}
        for key, token in named.items():
            if tokenizer.token_to_id(token) is None:
                raise ValueError(f"{key} {token!r} is not in the tokenizer's vocabulary")
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in named.values()])
        tokenizer.encode_special_tokens = False
        return cls(tokenizer, special_tokens=named, chat_template=chat_template or DEFAULT_CHAT_TEMPLATE)

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce, added tokens included (transformers' ``len(tokenizer)``)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Ids of a prompt, with the special tokens tokenizer.json's post-processor adds (a BOS, say); special
        token spellings in the text become their ids, as in transformers."""
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: Sequence[Mapping], add_generation_prompt: bool = True, *,
                    tools: list[dict] | None = None, **template_kwargs) -> str:
        """The prompt string of a conversation: ``apply_chat_template(messages, tokenize=False, ...)``.

        ``tools`` (OpenAI function schemas) and ``template_kwargs`` are template variables, as in
        transformers; ``template_kwargs`` override the special tokens.

        Raises:
            ValueError: an empty conversation, or the template failed (``raise_exception`` in it, say); the
                message is the template's.
        """
        if not messages:
            raise ValueError("cannot apply a chat template to an empty conversation")
        chat = [_template_message(m) for m in messages]
        try:
            return self._template.render(messages=chat, tools=tools, documents=None,
                                         add_generation_prompt=add_generation_prompt,
                                         **{**self.special_tokens, **template_kwargs})
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template error: {e.message}") from e

    def encode_chat(self, messages: Sequence[Mapping], add_generation_prompt: bool = True, *,
                    tools: list[dict] | None = None, **template_kwargs) -> list[int]:
        """``apply_chat_template(messages, tokenize=True, ...)``'s ids: the rendered prompt encoded without
        adding special tokens again (the template writes any BOS itself)."""
        text = self.render_chat(messages, add_generation_prompt, tools=tools, **template_kwargs)
        return self.tokenizer.encode(text, add_special_tokens=False).ids


def save_tokenizer_folder(
    tokenizer: Tokenizer, path, *, bos_token: str | None = "<s>", eos_token: str | None = "</s>",
    pad_token: str | None = "<pad>", chat_template: str | None = DEFAULT_CHAT_TEMPLATE,
    model_max_length: int | None = None,
) -> None:
    """Writes a folder that ``transformers.AutoTokenizer`` and ``TextTokenizer.from_folder`` both load, alike.

    Files: tokenizer.json (the tokenizer as is), tokenizer_config.json (``PreTrainedTokenizerFast``, the named
    special tokens, no clean-up of spaces) and, unless ``chat_template`` is None, chat_template.jinja. A token
    None is left out.

    Raises:
        ValueError: a named special token is not in the vocabulary (transformers would append it, growing the
            vocabulary past the model's embedding).
    """
    path = os.fspath(path)
    named = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}
    named = {k: v for k, v in named.items() if v is not None}
    for key, token in named.items():
        if tokenizer.token_to_id(token) is None:
            raise ValueError(f"{key} {token!r} is not in the tokenizer's vocabulary")
    if chat_template is not None:
        compile_chat_template(chat_template)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **named, "clean_up_tokenization_spaces": False}
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)
    os.makedirs(path, exist_ok=True)
    tokenizer.save(os.path.join(path, TOKENIZER_FILE))
    with open(os.path.join(path, TOKENIZER_CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")
    template_file = os.path.join(path, CHAT_TEMPLATE_FILE)
    if chat_template is not None:
        with open(template_file, "w", encoding="utf-8") as f:
            f.write(chat_template)
    elif os.path.isfile(template_file):
        os.remove(template_file)  # a stale one would override the (absent) template


# ----------------------------------------------------------------------------------------------- streaming


class IncrementalDetokenizer:
    """Generated ids in, text deltas out, in O(1) work per token (vLLM's and HF's TextStreamer's scheme).

    Only a window of ids is decoded: ``[prefix, read)`` is text already emitted, kept as context because
    decoding is not per-token additive (a byte-level BPE token can hold part of a UTF-8 character; a
    SentencePiece decoder drops the first token's leading space). A new token's delta is
    ``decode(ids[prefix:]) - decode(ids[prefix:read])``; while that text ends in U+FFFD the character is not
    complete yet, so it is held back and the window grows until it is. Deltas joined (with ``flush``) equal
    ``tokenizer.decode(generated ids)``.

    Args:
        prompt_ids: the prompt; its last few ids seed the window, so the first token decodes in context.
        skip_special_tokens: drop special tokens (EOS, say) from the text, as ``decode`` does.
    """

    CONTEXT = 5  # prompt ids kept as leading context (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET)

    def __init__(self, tokenizer: TextTokenizer, prompt_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        ids = [int(i) for i in prompt_ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in tokenizer.special_ids]
        self._ids = ids[-self.CONTEXT:] if ids else []
        self._read = len(self._ids)  # ids[:read] are context or emitted; ids[read:] are held back
        self._prefix_text = self._decode(self._ids)

    def _decode(self, ids):
        return self.tokenizer.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """The text ``token_id`` completes; "" while a character is incomplete (or the token is skipped)."""
        token_id = int(token_id)
        if self.skip_special_tokens and token_id in self.tokenizer.special_ids:
            return ""
        self._ids.append(token_id)
        text = self._decode(self._ids)
        if len(text) <= len(self._prefix_text) or text.endswith("\ufffd"):
            return ""
        return self._advance(text)

    def _advance(self, text: str) -> str:
        delta = text[len(self._prefix_text):]
        # The window restarts at the old read offset: the just-emitted ids are the next token's context.
        self._ids = self._ids[self._read:]
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        return delta

    def flush(self) -> str:
        """What is still held back at the end (an incomplete character becomes U+FFFD, as in ``decode``)."""
        if self._read == len(self._ids):
            return ""
        text = self._decode(self._ids)
        return self._advance(text) if len(text) > len(self._prefix_text) else ""


class StopStrings:
    """Cuts streamed text at the first stop string, as OpenAI and vLLM do: the stop and all after it are
    dropped. Stops are found across ``feed`` boundaries, so text that could begin a stop is held back until
    the following text decides it."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(s for s in dict.fromkeys(stops) if s)
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was reached). After a stop, always ("", True)."""
        if self.stopped:
            return "", True
        text = self._held + text
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held, self.stopped = "", True
            return text[:min(hits)], True
        # Hold back the longest tail that is a proper prefix of a stop; nothing before it can start one.
        keep = max((k for s in self.stops for k in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:k])), default=0)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def flush(self) -> str:
        """The held-back text at the end of generation (it turned out not to be a stop)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

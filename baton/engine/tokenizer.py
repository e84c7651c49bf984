"""A model directory's tokenizer, chat template and incremental detokenizer, without torch.

The router and the engine's offline API both use this file, so it imports neither torch nor
transformers: `tokenizer.json` goes through the `tokenizers` library and the chat template
through jinja2, set up the way transformers sets them up (so prompts are byte-identical to
`AutoTokenizer.apply_chat_template`; tests/engine/test_tokenizer.py holds transformers as
the oracle).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as _HFTokenizer

# The named special tokens transformers hands to every chat template as variables.
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


def _token_str(value: Any) -> str | None:
    # tokenizer_config.json writes a special token either as a string or as a serialized
    # AddedToken ({"content": ..., ...}).
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


# Texts longer than this are encoded with the call that releases the GIL.
_GIL_FREE_CHARS = 4096


class Tokenizer:
    """`tokenizer.json` + `tokenizer_config.json` (+ `generation_config.json`) of a HF model dir."""

    def __init__(self, model_dir: str | Path):
        d = Path(model_dir)
        self.model_dir = d
        self._tok = _HFTokenizer.from_file(str(d / "tokenizer.json"))
        config = _read_json(d / "tokenizer_config.json")

        self.special_tokens: dict[str, str] = {}
        for name in SPECIAL_TOKEN_NAMES:
            if (s := _token_str(config.get(name))) is not None:
                self.special_tokens[name] = s
        # Tokens the config declares that tokenizer.json lacks (transformers adds them too).
        missing = []
        for tid, spec in sorted(
            config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0])
        ):
            if self._tok.token_to_id(spec["content"]) is None:
                missing.append(
                    AddedToken(spec["content"], special=spec.get("special", True), normalized=False)
                )
        missing += [
            AddedToken(s, special=True, normalized=False)
            for s in self.special_tokens.values()
            if self._tok.token_to_id(s) is None and s not in {t.content for t in missing}
        ]
        if missing:
            self._tok.add_special_tokens(missing)

        # transformers rebuilds the post-processor (which adds BOS/EOS) when the config says
        # add_bos_token/add_eos_token explicitly, or when tokenizer.json has none.
        if (
            "add_bos_token" in config
            or "add_eos_token" in config
            or self._tok.post_processor is None
        ):
            self._set_post_processor(
                bool(config.get("add_bos_token")), bool(config.get("add_eos_token"))
            )

        # transformers skips the clean-up for BPE models, where it would delete real spaces.
        self._clean_up = bool(config.get("clean_up_tokenization_spaces", False)) and (
            json.loads(self._tok.to_str())["model"]["type"] != "BPE"
        )

        self.chat_template = self._load_chat_template(d, config)
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.bos_token_id = self._id_or_none(self.bos_token)
        self.eos_token_id = self._id_or_none(self.eos_token)
        self.eos_token_ids = self._eos_ids(d)
        self.special_ids = frozenset(
            tid for tid, t in self._tok.get_added_tokens_decoder().items() if t.special
        )
        # The same tokenizer reading special-token text as plain text (message content).
        self._plain = _HFTokenizer.from_str(self._tok.to_str())
        self._plain.encode_special_tokens = True
        # The most bytes of text one token stands for (its piece's UTF-8 length bounds it): a
        # text of more bytes than n times this has more than n tokens, known before encoding.
        self.max_token_bytes = max(len(p.encode()) for p in self._tok.get_vocab(True))
        # A content can make a special token only by holding one, or part of one at its edge
        specials = [t.content for t in self._tok.get_added_tokens_decoder().values() if t.special]
        self._special_texts = tuple(specials)
        self._special_heads = tuple(t[:i] for t in specials for i in range(1, len(t)))
        self._special_tails = tuple(t[i:] for t in specials for i in range(1, len(t)))

    # -- loading ---------------------------------------------------------------------------

    def _id_or_none(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        bos, eos = self.special_tokens.get("bos_token"), self.special_tokens.get("eos_token")
        add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
        single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
        pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
        special = [(bos, self._tok.token_to_id(bos))] if add_bos else []
        special += [(eos, self._tok.token_to_id(eos))] if add_eos else []
        self._tok.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=special
        )

    @staticmethod
    def _load_chat_template(d: Path, config: dict) -> str | None:
        # transformers >= 4.43 saves the template as chat_template.jinja; older dirs keep it in
        # tokenizer_config.json, as a string or a list of named templates.
        if (d / "chat_template.jinja").exists():
            return (d / "chat_template.jinja").read_text(encoding="utf-8")
        template = config.get("chat_template")
        if isinstance(template, list):
            named = {t["name"]: t["template"] for t in template}
            return named.get("default")
        return template

    def _eos_ids(self, d: Path) -> list[int]:
        ids: list[int] = []
        gen = _read_json(d / "generation_config.json").get("eos_token_id")
        for i in gen if isinstance(gen, list) else [gen]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
        if self.eos_token_id is not None and self.eos_token_id not in ids:
            ids.append(self.eos_token_id)
        return ids

    # -- the API -----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return _encode(self._tok, text, add_special_tokens).ids

    def encode_chat(
        self, messages: list[dict], add_generation_prompt: bool = True,
        content_special: bool = False, render: Callable[[list[dict]], str] | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """The chat prompt's token ids: apply_chat_template's text tokenized as transformers'
        apply_chat_template(tokenize=True) does, except that special-token text inside message
        content stays text (only the template's own special tokens are special), unless
        `content_special`. `render(messages) -> text` replaces apply_chat_template (a caller
        that formats tools its own way); it must keep each content as it is or embed it whole.
        Raises ValueError as apply_chat_template does.
        """
        if render is None:
            def render(ms: list[dict]) -> str:
                return self.apply_chat_template(ms, add_generation_prompt, **kwargs)
        text = render(messages)
        if content_special or not any(map(self._may_make_special, _contents(messages))):
            return self.encode(text, add_special_tokens=False)
        # Where the contents sit in the text: render once more with a marker for each content
        # (a nonce, so no other field can fake one) and check that putting the contents back
        # gives the same text (a template that rewrites content gives something else).
        nonce = secrets.token_hex(8)
        contents: list[str] = []
        marked = []
        for m in messages:
            c = m.get("content")
            if isinstance(c, str) and c:
                m = {**m, "content": f"\ue000{nonce}:{len(contents)}\ue001"}
                contents.append(c)
            marked.append(m)
        if not contents:
            return self.encode(text, add_special_tokens=False)
        parts = re.split(f"\ue000{nonce}:(\\d+)\ue001", render(marked))
        pieces: list[tuple[str, bool]] = []  # (text, is content)
        for i, part in enumerate(parts):
            pieces.append((contents[int(part)], True) if i % 2 else (part, False))
        if "".join(p for p, _ in pieces) != text:
            if any(_encode(self._plain, c, False).ids != _encode(self._tok, c, False).ids
                   for c in contents):
                raise ValueError("message content holds special-token text, and this model's chat "
                                 "template rewrites content, so it cannot be kept as text")
            return self.encode(text, add_special_tokens=False)
        enc = _encode(self._tok, text, False)
        spans, at = [], 0
        for p, is_content in pieces:
            if is_content:
                spans.append((at, at + len(p)))
            at += len(p)
        if not any(tid in self.special_ids and any(s < ce and e > cs for cs, ce in spans)
                   for tid, (s, e) in zip(enc.ids, enc.offsets)):
            return enc.ids  # no special token came from content: exactly transformers' ids
        ids: list[int] = []
        for p, is_content in pieces:
            if p:
                ids += _encode(self._plain if is_content else self._tok, p, False).ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up(text) if self._clean_up else text

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def _may_make_special(self, content: str) -> bool:
        """Whether `content`, wherever a template puts it, could take part in a special token."""
        return (content.startswith(self._special_tails) or content.endswith(self._special_heads)
                or any(t in content or content in t for t in self._special_texts))

    @property
    def template_takes_tools(self) -> bool:
        """The chat template reads the `tools` variable (Qwen3's, Llama 3.x's do; plain ChatML
        does not), so tools go to it as transformers' apply_chat_template(tools=...) hands them."""
        return self.chat_template is not None and _takes_tools(self.chat_template)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The prompt text, rendered exactly as transformers renders it (tokenize=False).

        Raises ValueError for an empty conversation, a model without a template, or a template
        that rejects the messages (its `raise_exception`).
        """
        if not messages:
            raise ValueError("messages must not be empty")
        if self.chat_template is None:
            raise ValueError(f"the model in {self.model_dir} has no chat template")
        # transformers drops None-valued keys (OpenAI clients send content=None and the like).
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return _compile(self.chat_template).render(
                messages=chat,
                tools=kwargs.pop("tools", None),
                documents=kwargs.pop("documents", None),
                add_generation_prompt=add_generation_prompt,
                **{**self.special_tokens, **kwargs},
            )
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template: {e}") from e


def _contents(messages: list[dict]):
    return (m["content"] for m in messages if isinstance(m.get("content"), str))


def _encode(tok: _HFTokenizer, text: str, add_special_tokens: bool):
    # encode_batch releases the GIL (encode does not): a long text, encoded on a worker
    # thread, must not stall the thread that runs the event loop
    if len(text) > _GIL_FREE_CHARS:
        return tok.encode_batch([text], add_special_tokens=add_special_tokens)[0]
    return tok.encode(text, add_special_tokens=add_special_tokens)


def _clean_up(text: str) -> str:
    for a, b in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(a, b)
    return text


class _Namespace(jinja2.utils.Namespace):
    # As transformers': a template may not store dunder/underscore attributes on a namespace.
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"namespace attribute {name!r} may not start with '_'"
            )


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; transformers' does not.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@lru_cache(maxsize=8)
def _takes_tools(template: str) -> bool:
    env = _compile(template).environment
    return "tools" in jinja2.meta.find_undeclared_variables(env.parse(template))


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    """The environment transformers builds: sandboxed, trim_blocks + lstrip_blocks, loop controls."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = _Namespace
    env.globals["dict"] = dict
    return env.from_string(template)


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas that never hold a broken character.

    vLLM's scheme: decode the window ids[prefix_offset:] and emit what it adds beyond
    ids[prefix_offset:read_offset]; hold the delta back while it ends in U+FFFD (a multi-byte
    character or a byte-level BPE piece cut in half). `prompt_ids` give the first output token
    its left context (a leading space of a SentencePiece piece survives). After `finish()`,
    the deltas concatenate to decode(prompt + outputs) minus decode(prompt), which without a
    prompt is decode(outputs).
    """

    CONTEXT_TOKENS = 5  # prompt tokens kept as left context, as vLLM does

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: list[int] | None = None,
        skip_special_tokens: bool = True,
    ):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-self.CONTEXT_TOKENS :]) if prompt_ids else []
        self._context = len(self.ids)
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # everything emitted so far

    @property
    def output_ids(self) -> list[int]:
        return self.ids[self._context :]

    def push(self, token_ids: list[int]) -> str:
        """Add tokens; returns the text they complete (possibly "")."""
        self.ids.extend(token_ids)
        prefix_text = self.tok.decode(self.ids[self.prefix_offset : self.read_offset], self.skip)
        new_text = self.tok.decode(self.ids[self.prefix_offset :], self.skip)
        if (
            len(new_text) <= len(prefix_text)
            or new_text.endswith("\ufffd")
            or not new_text.startswith(prefix_text)
        ):
            return ""
        delta = new_text[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta

    def finish(self) -> str:
        """The held-back rest (at the end of the stream a broken character is final)."""
        base = self.tok.decode(self.ids[: self._context], self.skip)
        full = self.tok.decode(self.ids, self.skip)
        want = full.removeprefix(base)
        if not want.startswith(self.text):
            # Only a tokenizer whose decode is not prefix-stable gets here; keep what was sent.
            return ""
        delta = want[len(self.text) :]
        self.text += delta
        self.prefix_offset = self.read_offset = len(self.ids)
        return delta

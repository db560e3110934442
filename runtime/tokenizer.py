"""Kimi's tokenizer: tiktoken BPE (`tiktoken.model`) plus the special tokens and Jinja chat
template of `tokenizer_config.json`, as the official `tokenization_kimi.py` lays them out:
the BPE ranks are ids [0, n), the next 256 ids are reserved special tokens (named by
`added_tokens_decoder`, the rest `<|reserved_token_{id}|>`), and text is pre-split with
Kimi's pattern (Han runs apart from other letters; digits in runs of at most three).
"""
from __future__ import annotations

import base64
import binascii
import codecs
import json
from pathlib import Path

MODEL_FILE, CONFIG_FILE = "tiktoken.model", "tokenizer_config.json"
NUM_RESERVED_SPECIAL_TOKENS = 256
PAT_STR = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
# tiktoken's Rust core misbehaves on very long inputs and very long runs without a break
MAX_ENCODE_CHARS, MAX_RUN_CHARS = 400_000, 25_000


class TokenizerError(ValueError):
    """Missing or malformed tokenizer files, or a request the tokenizer cannot serve."""


def read_bpe(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken BPE file ("<base64 token> <rank>" per line). Read here rather than
    with tiktoken.load, which caches local files by path and would serve a stale copy."""
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise TokenizerError(f"{path}:{n}: not a tiktoken BPE line (base64 token, rank): "
                                 f"{line[:60]!r}") from None
    return ranks


def _token_text(v) -> str | None:
    """A token field of tokenizer_config.json: a string or {"content": ...}."""
    return v.get("content") if isinstance(v, dict) else v


def _split_runs(s: str, limit: int):
    """Cut `s` so no piece holds more than `limit` consecutive space or non-space chars."""
    start, run, space = 0, 0, s[:1].isspace()
    for i, ch in enumerate(s):
        if ch.isspace() != space:
            run, space = 1, ch.isspace()
        else:
            run += 1
            if run > limit:
                yield s[start:i]
                start, run = i, 1
    yield s[start:]


class KimiTokenizer:
    def __init__(self, mergeable_ranks: dict[bytes, int], added_tokens: dict[int, str], *,
                 chat_template: str | None = None, bos_token: str | None = None,
                 eos_token: str | None = None, name: str = "kimi"):
        import tiktoken

        base = len(mergeable_ranks)
        if sorted(mergeable_ranks.values()) != list(range(base)):
            raise TokenizerError("BPE ranks must be the ids 0..n-1, each once")
        clash = sorted(i for i in added_tokens if i < base)
        if clash:
            raise TokenizerError(f"special token ids {clash[:8]} collide with BPE ranks [0, {base})")
        special = {f"<|reserved_token_{i}|>": i for i in range(base, base + NUM_RESERVED_SPECIAL_TOKENS)
                   if i not in added_tokens}
        for i, text in added_tokens.items():
            if text in special:
                raise TokenizerError(f"special token {text!r} is defined twice")
            special[text] = i
        self.special_tokens = special
        self.special_ids = frozenset(special.values())
        self.chat_template, self.name = chat_template, name
        self.bos_token, self.eos_token = bos_token, eos_token
        self.enc = tiktoken.Encoding(name=name, pat_str=PAT_STR, mergeable_ranks=mergeable_ranks,
                                     special_tokens=special)
        self._template = None

    # -- loading ---------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path) -> "KimiTokenizer":
        """Load `tiktoken.model` and `tokenizer_config.json` from a model directory."""
        path = Path(path)
        model, config = path / MODEL_FILE, path / CONFIG_FILE
        missing = [p.name for p in (model, config) if not p.is_file()]
        if missing:
            raise TokenizerError(f"{path} has no tokenizer: missing {', '.join(missing)}")
        ranks = read_bpe(model)
        try:
            cfg = json.loads(config.read_text())
            added = {int(i): _token_text(t) for i, t in cfg.get("added_tokens_decoder", {}).items()}
        except (json.JSONDecodeError, ValueError, AttributeError) as e:
            raise TokenizerError(f"{config}: malformed tokenizer config: {e}") from None
        return cls(ranks, added, chat_template=cfg.get("chat_template"),
                   bos_token=_token_text(cfg.get("bos_token")), eos_token=_token_text(cfg.get("eos_token")),
                   name=path.name or "kimi")

    # -- ids <-> text ------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def token_id(self, token: str) -> int:
        """The id of a special token ("<|im_end|>")."""
        try:
            return self.special_tokens[token]
        except KeyError:
            raise TokenizerError(f"no special token {token!r}") from None

    @property
    def bos_id(self) -> int | None:
        return self.special_tokens.get(self.bos_token) if self.bos_token else None

    @property
    def eos_id(self) -> int | None:
        return self.special_tokens.get(self.eos_token) if self.eos_token else None

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Text -> ids. With `allow_special`, special-token text ("<|im_end|>") becomes its id
        (as in a rendered chat); without, it is encoded as plain text."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode takes a str, got {type(text).__name__}")
        allowed = "all" if allow_special else set()
        ids: list[int] = []
        for i in range(0, len(text), MAX_ENCODE_CHARS):
            for piece in _split_runs(text[i:i + MAX_ENCODE_CHARS], MAX_RUN_CHARS):
                ids += self.enc.encode(piece, allowed_special=allowed, disallowed_special=())
        return ids

    def _check_ids(self, ids) -> list[int]:
        ids = [int(i) for i in ids]
        bad = sorted({i for i in ids if not 0 <= i < self.vocab_size})
        if bad:
            raise TokenizerError(f"token ids outside the tokenizer's vocabulary [0, {self.vocab_size}): "
                                 f"{bad[:8]}")
        return ids

    def decode_bytes(self, ids, skip_special: bool = False) -> bytes:
        ids = self._check_ids(ids)
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        return self.enc.decode_bytes(ids)

    def decode(self, ids, skip_special: bool = False) -> str:
        """Ids -> text; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")

    # -- chat ------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **context) -> str:
        """Render chat messages ([{"role": ..., "content": ...}]) with the Jinja chat template."""
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat_template (tokenizer_config.json)")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise TokenizerError("messages must be a list of {'role': ..., 'content': ...} dicts")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        import jinja2
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                         **context)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template failed: {e}") from None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **context) -> list[int]:
        """Chat messages -> prompt ids (template rendered, special tokens as their ids)."""
        return self.encode(self.render_chat(messages, add_generation_prompt, **context))

    def stream_decoder(self, skip_special: bool = False) -> "TextStream":
        return TextStream(self, skip_special)


class TextStream:
    """Incremental detokenizer: push ids one at a time, get back the text they complete
    (a multi-byte character split across tokens comes out once whole)."""

    def __init__(self, tok: KimiTokenizer, skip_special: bool = False):
        self.tok, self.skip_special = tok, skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._utf8.decode(self.tok.decode_bytes([token], self.skip_special))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


def _compile_template(source: str):
    """The template in a sandbox with the helpers HF chat templates expect."""
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise TokenizerError("chat templates need jinja2 (pip install jinja2)") from None

    def raise_exception(message):
        raise TokenizerError(f"chat template: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"chat_template does not parse: {e}") from None


def load_tokenizer(path: str | Path | None, vocab_size: int | None = None) -> KimiTokenizer:
    """The tokenizer in a model directory; with `vocab_size`, check its ids fit the model."""
    if path is None:
        raise TokenizerError("this model has no directory with tokenizer files (tiktoken.model and "
                             "tokenizer_config.json); give token ids instead of text")
    tok = KimiTokenizer.from_dir(path)
    if vocab_size is not None and tok.vocab_size > vocab_size:
        raise TokenizerError(f"tokenizer in {path} has {tok.vocab_size} ids but the model's "
                             f"vocabulary has {vocab_size}")
    return tok

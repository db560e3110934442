"""The tiktoken tokenizer on a small BPE file built here, in Kimi's layout (BPE ranks, then
256 reserved special ids named by tokenizer_config.json), and a chat round trip through a
model directory: template -> ids -> generate -> text."""
from __future__ import annotations

import base64
import json

import pytest

import kimi_graph
from checkpoints import random_config
from kimi_graph.cli import main as cli_main
from kimi_graph.runtime.tokenizer import (NUM_RESERVED_SPECIAL_TOKENS, PAT_STR, KimiTokenizer,
                                          TokenizerError, load_tokenizer)

HAN = "你好".encode()
MERGES = [b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b" world", b"12", b"123",
          b"1234", b"a" + HAN[:1], b"a" + HAN[:2], b"a" + HAN[:3], HAN[:2], HAN[:3], HAN[3:5],
          HAN[3:], HAN, b"us", b"er", b"user", b"!\n", b"\n\n"]
SPECIAL = ["[BOS]", "[EOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>",
           "<|im_middle|>"]
TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if loop.first and m.role != 'system' -%}"
    "<|im_system|>system<|im_middle|>You are a test.<|im_end|>"
    "{%- endif -%}"
    "{%- if m.role == 'user' -%}<|im_user|>"
    "{%- elif m.role == 'assistant' -%}<|im_assistant|>"
    "{%- elif m.role == 'system' -%}<|im_system|>"
    "{%- else -%}{{ raise_exception('unknown role ' + m.role) }}"
    "{%- endif -%}"
    "{{ m.role }}<|im_middle|>{{ m.content }}<|im_end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}")


def ranks() -> dict[bytes, int]:
    r = {bytes([i]): i for i in range(256)}
    for m in MERGES:
        r[m] = len(r)
    return r


BASE = len(ranks())
VOCAB = BASE + NUM_RESERVED_SPECIAL_TOKENS



def write_tokenizer(path, template=TEMPLATE, specials=SPECIAL):
    lines = [f"{base64.b64encode(t).decode()} {i}" for t, i in ranks().items()]
    (path / "tiktoken.model").write_text("\n".join(lines) + "\n")
    cfg = {"added_tokens_decoder": {str(BASE + i): {"content": s, "special": True}
                                    for i, s in enumerate(specials)},
           "bos_token": "[BOS]", "eos_token": {"content": "[EOS]"}, "tokenizer_class": "TikTokenTokenizer"}
    if template is not None:
        cfg["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return KimiTokenizer.from_dir(write_tokenizer(tmp_path_factory.mktemp("tok")))


def test_layout_and_specials(tok):
    assert tok.vocab_size == VOCAB
    assert tok.token_id("[BOS]") == tok.bos_id == BASE
    assert tok.eos_id == BASE + 1 and tok.token_id("<|im_middle|>") == BASE + 6
    assert tok.decode([BASE + 7]) == f"<|reserved_token_{BASE + 7}|>"
    assert tok.encode("hi<|im_end|>") == [ord("h"), ord("i"), BASE + 2]
    assert tok.encode("<|im_end|>", allow_special=False) == list(b"<|im_end|>")
    assert tok.decode([ord("h"), BASE + 2, ord("i")], skip_special=True) == "hi"
    with pytest.raises(TokenizerError, match="no special token"):
        tok.token_id("<|nope|>")


@pytest.mark.parametrize("text", ["hello world", "hello world!\n\nuser 12345 你好 a你好",
                                  "emoji 🙂 and ünïcode\tTabs  ", "", "x" * 30000 + " " * 30000])
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < BASE for i in ids)
    assert tok.decode(ids) == text


def test_merges_and_kimi_pretokenization(tok):
    r = ranks()
    assert tok.encode("hello world") == [r[b"hello"], r[b" world"]]
    assert tok.encode("你好") == [r[HAN]]
    # digits split in runs of three: "1234" exists but "12345" is "123" + "4" + "5"
    assert tok.encode("12345") == [r[b"123"], ord("4"), ord("5")]
    # Han runs are split from other letters: the "a你" merge is never used
    assert tok.encode("a你") == [ord("a"), r[HAN[:3]]]


def test_bpe_never_merges_across_kimi_pattern_pieces(tok):
    """Encoding the pattern's pieces one by one (split by the `regex` module, which tiktoken
    depends on) gives the whole text's ids: the tokenizer uses Kimi's pre-split."""
    regex = pytest.importorskip("regex")
    pat = regex.compile(PAT_STR, flags=regex.V1)        # V1: the && class intersection
    text = "Hello world!\n\nuser's 12345 你好abc a你好 I'M OK  \n  x"
    pieces = pat.findall(text)
    assert "".join(pieces) == text and "你好" in pieces and "123" in pieces
    assert sum((tok.encode(p) for p in pieces), []) == tok.encode(text)


def test_stream_decoder_joins_split_characters(tok):
    ids = list(HAN)                                   # 你好 as six single-byte tokens
    s = tok.stream_decoder()
    out = [s.push(i) for i in ids]
    assert out == ["", "", "你", "", "", "好"] and s.flush() == ""
    s = tok.stream_decoder()
    assert "".join(s.push(i) for i in [ord("a"), HAN[0]]) + s.flush() == tok.decode([ord("a"), HAN[0]])


def test_chat_template(tok):
    msgs = [{"role": "user", "content": "hello world"}]
    text = tok.render_chat(msgs)
    assert text == ("<|im_system|>system<|im_middle|>You are a test.<|im_end|>"
                    "<|im_user|>user<|im_middle|>hello world<|im_end|>"
                    "<|im_assistant|>assistant<|im_middle|>")
    ids = tok.apply_chat_template(msgs)
    sp = tok.special_tokens
    assert ids[0] == sp["<|im_system|>"] and ids[-1] == sp["<|im_middle|>"]
    assert ids.count(sp["<|im_end|>"]) == 2
    assert tok.decode(ids) == text
    assert not tok.render_chat(msgs, add_generation_prompt=False).endswith("<|im_middle|>")
    with pytest.raises(TokenizerError, match="unknown role tool"):
        tok.render_chat([{"role": "tool", "content": "x"}])
    with pytest.raises(TokenizerError, match="list of"):
        tok.render_chat([{"content": "no role"}])


def test_tokenizer_errors(tmp_path, tok):
    with pytest.raises(TokenizerError, match="missing tiktoken.model, tokenizer_config.json"):
        KimiTokenizer.from_dir(tmp_path)
    with pytest.raises(TokenizerError, match="no directory with tokenizer files"):
        load_tokenizer(None)
    write_tokenizer(tmp_path, template=None)
    with pytest.raises(TokenizerError, match="no chat_template"):
        KimiTokenizer.from_dir(tmp_path).render_chat([{"role": "user", "content": "x"}])
    with pytest.raises(TokenizerError, match="vocabulary has 300"):
        load_tokenizer(tmp_path, vocab_size=300)
    (tmp_path / "tiktoken.model").write_text("not base64 at all\n")
    with pytest.raises(TokenizerError, match="not a tiktoken BPE line"):
        KimiTokenizer.from_dir(tmp_path)
    with pytest.raises(TokenizerError, match="collide"):
        KimiTokenizer(ranks(), {5: "<|x|>"})
    with pytest.raises(TokenizerError, match="outside the tokenizer's vocabulary"):
        tok.decode([VOCAB])
    with pytest.raises(TokenizerError, match="does not parse"):
        KimiTokenizer(ranks(), {}, chat_template="{% if %}").render_chat([{"role": "user"}])


# -- template -> ids -> generate -> text, through a model directory ------------------------
@pytest.fixture(scope="module")
def chat_model_dir(make_checkpoint):
    cfg = random_config(7, vocab_size=VOCAB, eos_token_id=BASE + 2, bos_token_id=BASE)
    return write_tokenizer(make_checkpoint(cfg, seed=7))


def test_chat_round_trip(chat_model_dir):
    model = kimi_graph.load(chat_model_dir)
    tok = model.tokenizer
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello 你好"}]
    ids = tok.apply_chat_template(msgs)
    new = model.generate([ids], max_new_tokens=6, ignore_eos=True)[0]
    assert len(new) == 6 and all(0 <= i < VOCAB for i in new)
    s = tok.stream_decoder()
    streamed = "".join(s.push(t) for t in model.stream(ids, max_new_tokens=6, ignore_eos=True)) + s.flush()
    assert streamed == tok.decode(new)
    # the whole conversation decodes to the rendered template followed by the reply
    assert tok.decode(ids + new) == tok.render_chat(msgs) + tok.decode(new)
    # text prompts go through the tokenizer
    assert model.generate(["hello world"], max_new_tokens=3, ignore_eos=True) == \
        model.generate([tok.encode("hello world")], max_new_tokens=3, ignore_eos=True)
    # the reply ends at the config's eos (<|im_end|>) when the model emits it
    eos = model.config.eos_token_id
    forced = model.generate([ids], max_new_tokens=6, stop_ids=(new[1],), ignore_eos=True)[0]
    assert forced == new[:new.index(new[1]) + 1]
    assert eos == tok.token_id("<|im_end|>")


def test_cli_chat(chat_model_dir, capsys):
    model = kimi_graph.load(chat_model_dir)
    tok = model.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}])
    want = model.generate([ids], max_new_tokens=5, stop_ids=(tok.eos_id,))[0]
    assert cli_main(["generate", str(chat_model_dir), "--prompt", "hello", "--chat",
                     "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr()
    assert out.out == tok.decode(want, skip_special=True) + "\n"
    assert f"{len(ids)} prompt tokens, {len(want)} new" in out.err
    assert cli_main(["generate", str(chat_model_dir), "--prompt", "hello", "--print-ids",
                     "--max-new-tokens", "3", "--ignore-eos"]) == 0
    want = model.generate([tok.encode("hello")], max_new_tokens=3, ignore_eos=True)[0]
    assert capsys.readouterr().out.split() == [str(t) for t in want]


def test_cli_interactive_chat_keeps_the_conversation(chat_model_dir, capsys, monkeypatch):
    """Each reply equals a fresh generation over the whole re-rendered conversation, and a
    turn runs only its new tokens when the conversation so far is a prefix of the render."""
    import io
    model = kimi_graph.load(chat_model_dir)
    tok = model.tokenizer
    stops = (tok.eos_id, tok.token_id("<|im_end|>"))
    messages, want, ran, held = [{"role": "system", "content": "be brief"}], [], [], []
    for turn in ("hello", "hello world 你好", "again"):
        messages.append({"role": "user", "content": turn})
        ids = tok.apply_chat_template(messages)
        reply = model.generate([ids], max_new_tokens=4, stop_ids=stops)[0]
        ran.append(len(ids) - len(held) if ids[:len(held)] == held else len(ids))
        held = ids + reply
        want.append(tok.decode(reply, skip_special=True))
        body = reply[:-1] if reply[-1] in stops else reply
        messages.append({"role": "assistant", "content": tok.decode(body)})
    assert ran[1] < len(tok.apply_chat_template(messages[:4]))       # turn 2 continued
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nhello world 你好\nagain\n\n"))
    assert cli_main(["generate", str(chat_model_dir), "--interactive", "--system", "be brief",
                     "--max-new-tokens", "4", "--max-len", "200"]) == 0
    out = capsys.readouterr()
    assert out.out == "".join(w + "\n" for w in want)
    assert [int(x.split()[0]) for x in out.err.split("[")[1:]] == ran
    assert out.err.count("> ") == 4

"""Incremental detokenization: the streamed pieces add up to what decoding the whole reply gives."""
import random

import pytest

from idletune.inference import Detokenizer, GenerationParams, InferenceEngine, skipped_ids


@pytest.fixture(scope="module")
def tok(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 3.14 — isn't it?",
    "Grüße aus Köln! Ça va? 日本語のテキストと中文。 Emoji: 🦊🌊👍🏽 and ZWJ: 👩‍👩‍👧.",
    "def f(x):\n    return x ** 2  # code, tabs\tand\n\nnew lines",
    "  leading spaces, trailing spaces   ",
]


def stream_all(tok, ids):
    d = Detokenizer(tok)
    pieces = [d.add(i) for i in ids]
    return "".join(pieces), d.text


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_add_up_to_the_whole_decode(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    joined, acc = stream_all(tok, ids)
    assert joined == acc == tok.decode(ids, skip_special_tokens=True) == text


def test_random_ids_with_special_tokens_and_broken_utf8(tok):
    """Random ids (byte tokens that split characters, special tokens the reply skips): the pieces
    still add up to the whole decode, less at most a trailing incomplete character."""
    rng = random.Random(0)
    specials = list(tok.all_special_ids)
    vocab = len(tok)
    for _ in range(200):
        ids = [rng.choice(specials) if rng.random() < 0.05 else rng.randrange(vocab) for _ in range(rng.randint(1, 60))]
        joined, _ = stream_all(tok, ids)
        whole = tok.decode(ids, skip_special_tokens=True)
        assert whole.startswith(joined), (ids, joined, whole)
        assert whole[len(joined):].strip("\ufffd") == "", (ids, joined, whole)


@pytest.fixture(scope="module")
def metaspace_tok():
    """A SentencePiece-style tokenizer (Llama 2, Mistral: "▁" for spaces, the first one stripped
    when decoding), trained here on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    t.train_from_iterator(["The quick brown fox jumps over the lazy dog. Hello world, hello there!"] * 20,
                          trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_sentencepiece_style_spaces(metaspace_tok):
    """A window's first "▁" is stripped when decoded; the pieces must keep every space."""
    tok = metaspace_tok
    for text in ["Hello world, the quick brown fox.", "  two  leading spaces", "the lazy dog!  "]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        joined, _ = stream_all(tok, ids)
        assert joined == tok.decode(ids, skip_special_tokens=True)
    rng = random.Random(1)
    for _ in range(200):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 40))]
        assert stream_all(tok, ids)[0] == tok.decode(ids, skip_special_tokens=True), ids


def engine(tok):
    eng = InferenceEngine.__new__(InferenceEngine)  # _emit needs only the tokenizer and its ids
    eng.tokenizer, eng.stop_ids, eng._skip = tok, {tok.eos_token_id}, skipped_ids(tok)
    return eng


def emit(tok, ids, stop=(), cancel_after=None):
    """Run _emit over ``ids``; returns (text, reason, the streamed pieces joined)."""
    pieces, seen = [], [0]

    def gen():
        for i in ids:
            seen[0] += 1
            yield i

    cancelled = (lambda: seen[0] >= cancel_after) if cancel_after is not None else None
    text, reason, _ = engine(tok)._emit(gen(), GenerationParams(stop=list(stop)), {}, pieces.append, cancelled)
    return text, reason, "".join(pieces)


def test_emit_streams_the_same_text_it_returns(tok):
    ids = tok(TEXTS[1] + " END here", add_special_tokens=False)["input_ids"]
    for stop, want in [([], TEXTS[1] + " END here"), (["END"], TEXTS[1] + " ")]:
        text, reason, streamed = emit(tok, ids + [tok.eos_token_id], stop)
        assert text == streamed == want and reason == "stop"


def test_stop_strings_across_tokens_held_back_and_released(tok):
    body = "Sure. User: what next? Assistant: more"
    ids = tok(body, add_special_tokens=False)["input_ids"]
    assert len(tok("User:", add_special_tokens=False)["input_ids"]) > 1  # spans tokens
    # a stop string spanning tokens, among others: cut at the first to begin
    assert emit(tok, ids, ["Assistant:", "User:"]) == ("Sure. ", "stop", "Sure. ")
    # held back while it might begin a stop string, released when the reply ends (by length)
    assert emit(tok, ids, ["morex"]) == (body, "length", body)
    assert emit(tok, ids, ["more than"]) == (body, "length", body)
    # cancelled mid-way with a stop set: what was streamed is what is returned
    text, reason, streamed = emit(tok, ids, ["Assistant:"], cancel_after=5)
    assert reason == "cancelled" and text == streamed and body.startswith(text) and text


def test_emit_against_decoding_the_whole_reply(tok):
    """Random replies of real text, special tokens in between, random stop strings taken from the
    text: the same text as decoding the whole reply and cutting at the first stop, streamed alike."""
    rng = random.Random(2)
    skipped = sorted(skipped_ids(tok) - {tok.eos_token_id})
    for _ in range(150):
        body = rng.choice(TEXTS) + " " + rng.choice(TEXTS)
        ids = []
        for i in tok(body, add_special_tokens=False)["input_ids"]:
            ids.append(i)
            if rng.random() < 0.05:
                ids.append(rng.choice(skipped))
        whole = tok.decode(ids, skip_special_tokens=True)
        stops = [whole[a:a + rng.randint(1, 6)] for a in (rng.randrange(len(whole)) for _ in range(rng.randint(0, 2)))]
        hits = [whole.find(s) for s in stops if s and s in whole]
        want = whole[:min(hits)] if hits else whole
        text, reason, streamed = emit(tok, ids, stops)
        assert text == streamed == want, (body, stops)
        assert reason == ("stop" if hits else "length")


def test_window_stays_short_whatever_the_model_emits(tok):
    """Runs of skipped special tokens or of bytes that never make a character do not grow the
    window each token decodes."""
    assert 0 in skipped_ids(tok)  # <|endoftext|>: a special token, not the stop id
    d = Detokenizer(tok)
    for i in tok("Hello there", add_special_tokens=False)["input_ids"]:
        d.add(i)
    lone_continuation_byte = tok.convert_tokens_to_ids("\u00a2")  # byte 0x80 in the byte-level alphabet
    for token in [0] * 500 + [lone_continuation_byte] * 500:
        d.add(token)
        assert len(d.ids) - d.prefix <= 2 * Detokenizer.MAX_PENDING
    assert d.text.startswith("Hello there") and "\ufffd" in d.text

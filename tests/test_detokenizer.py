"""Incremental detokenization: the streamed pieces add up to what decoding the whole reply gives."""
import random

import pytest

from idletune.inference import Detokenizer, GenerationParams, InferenceEngine


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


def test_emit_streams_the_same_text_it_returns(tok):
    """The engine's token consumer: stop strings held back, the pieces equal the final text."""
    eng = InferenceEngine.__new__(InferenceEngine)  # _emit needs only the tokenizer and stop ids
    eng.tokenizer, eng.stop_ids = tok, {tok.eos_token_id}
    ids = tok(TEXTS[1] + " END here", add_special_tokens=False)["input_ids"]
    for stop, want in [([], TEXTS[1] + " END here"), (["END"], TEXTS[1] + " ")]:
        pieces = []
        text, reason, n = eng._emit((i for i in ids + [tok.eos_token_id]), GenerationParams(stop=stop), {}, pieces.append, None)
        assert text == want and "".join(pieces) == want
        assert reason == "stop"

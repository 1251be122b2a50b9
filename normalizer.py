"""Whisper's text normalisers, applied to reference and hypothesis before computing WER.

EnglishTextNormalizer: lower case; drop [bracketed] and (parenthesised) text and filler words
(hmm, uh, um); expand contractions and titles; spelled-out numbers, ordinals, currency and
percentages to digits; British spellings to American; punctuation and diacritics to spaces.
BasicTextNormalizer: lower case and symbols to spaces, for any language.

Adapted from openai/whisper (whisper/normalizers/, MIT licence); the tests check that the
output is identical to theirs. normalizer_english.json is their British-to-American table.
"""
import json
import re
import unicodedata
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Iterator, List, Optional, Union

import regex  # tiktoken's dependency; unlike `re` it knows grapheme clusters (\X)

SPELLINGS_PATH = Path(__file__).resolve().parent / "normalizer_english.json"

# ---------------------------------------------------------------------------------------------
# Symbols and diacritics

# Letters that NFKD does not split into a base letter plus a combining mark.
ADDITIONAL_DIACRITICS = {
    "œ": "oe", "Œ": "OE", "ø": "o", "Ø": "O", "æ": "ae", "Æ": "AE", "ß": "ss", "ẞ": "SS",
    "đ": "d", "Đ": "D", "ð": "d", "Ð": "D", "þ": "th", "Þ": "th", "ł": "l", "Ł": "L",
}  # fmt: skip


def remove_symbols_and_diacritics(s: str, keep: str = "") -> str:
    """Marks, symbols and punctuation (Unicode categories M*, S*, P*) to spaces, except those in
    `keep`; diacritics (combining marks, category Mn) dropped, so "café" -> "cafe"."""

    def replace(c: str) -> str:
        if c in keep:
            return c
        if c in ADDITIONAL_DIACRITICS:
            return ADDITIONAL_DIACRITICS[c]
        category = unicodedata.category(c)
        if category == "Mn":
            return ""
        return " " if category[0] in "MSP" else c

    return "".join(replace(c) for c in unicodedata.normalize("NFKD", s))


def remove_symbols(s: str) -> str:
    """Marks, symbols and punctuation to spaces, keeping diacritics."""
    return "".join(" " if unicodedata.category(c)[0] in "MSP" else c for c in unicodedata.normalize("NFKC", s))


def remove_bracketed(s: str) -> str:
    s = re.sub(r"[<\[][^>\]]*[>\]]", "", s)  # [noise], <unk>: annotations, not speech
    return re.sub(r"\(([^)]+?)\)", "", s)  # (laughs)


class BasicTextNormalizer:
    """Language-independent: lower case, no bracketed text, symbols to spaces."""

    def __init__(self, remove_diacritics: bool = False, split_letters: bool = False):
        self.clean = remove_symbols_and_diacritics if remove_diacritics else remove_symbols
        self.split_letters = split_letters  # for scripts without spaces between words

    def __call__(self, s: str) -> str:
        s = self.clean(remove_bracketed(s.lower())).lower()
        if self.split_letters:
            s = " ".join(regex.findall(r"\X", s, regex.U))
        return re.sub(r"\s+", " ", s)


# ---------------------------------------------------------------------------------------------
# English numbers: the words, then a left-to-right pass that builds numbers from them

ZEROS = {"o", "oh", "zero"}
ONES = {
    name: value
    for value, name in enumerate(
        "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen".split(),
        start=1,
    )
}
ONES_SUFFIXED = {  # plurals and ordinals, written as "2s", "2nd"
    **{("sixes" if name == "six" else name + "s"): (value, "s") for name, value in ONES.items()},
    **{"zeroth": (0, "th"), "first": (1, "st"), "second": (2, "nd"), "third": (3, "rd")},
    **{"fifth": (5, "th"), "twelfth": (12, "th")},
    **{
        name + ("h" if name.endswith("t") else "th"): (value, "th")  # "eighth"; "nineth", so "ninth" stays a word
        for name, value in ONES.items()
        if value > 3 and value not in (5, 12)
    },
}
TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
TENS_SUFFIXED = {
    **{name.replace("y", "ies"): (value, "s") for name, value in TENS.items()},
    **{name.replace("y", "ieth"): (value, "th") for name, value in TENS.items()},
}
MULTIPLIERS = {
    name: 10**exponent
    for name, exponent in zip(
        "hundred thousand million billion trillion quadrillion quintillion sextillion septillion "
        "octillion nonillion decillion".split(),
        [2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33],
    )
}
MULTIPLIERS_SUFFIXED = {
    **{name + "s": (value, "s") for name, value in MULTIPLIERS.items()},
    **{name + "th": (value, "th") for name, value in MULTIPLIERS.items()},
}
DECIMALS = {*ONES, *TENS, *ZEROS}  # words that may follow "point"
PRECEDING_PREFIXERS = {"minus": "-", "negative": "-", "plus": "+", "positive": "+"}
FOLLOWING_PREFIXERS = {  # "20 dollars" -> "$20"
    "pound": "£", "pounds": "£", "euro": "€", "euros": "€", "dollar": "$", "dollars": "$", "cent": "¢", "cents": "¢",
}  # fmt: skip
PREFIXES = {*PRECEDING_PREFIXERS.values(), *FOLLOWING_PREFIXERS.values()}
SUFFIXERS = {"per": {"cent": "%"}, "percent": "%"}
SPECIALS = {"and", "double", "triple", "point"}
NUMBER_WORDS = {
    *ZEROS, *ONES, *ONES_SUFFIXED, *TENS, *TENS_SUFFIXED, *MULTIPLIERS, *MULTIPLIERS_SUFFIXED,
    *PRECEDING_PREFIXERS, *FOLLOWING_PREFIXERS, *SUFFIXERS, *SPECIALS,
}  # fmt: skip
ARABIC_NUMBER = re.compile(r"^\d+(\.\d+)?$")

# A number being built is an int while it can still grow arithmetically ("twenty" + "one" = 21),
# and a digit string once it has become a sequence of digits ("one oh one" = "101", "3.").
Value = Union[int, str, None]


def _to_fraction(s) -> Optional[Fraction]:
    try:
        return Fraction(s)
    except ValueError:
        return None


def _add_ones(value: Value, ones: int, prev: Optional[str]) -> Union[int, str]:
    """The number so far followed by a word of 1..19."""
    if value is None:
        return ones
    if isinstance(value, str) or prev in ONES:  # digit by digit: "one two" -> "12"
        if prev in TENS and ones < 10:  # the tens' trailing zero takes the digit: "oh twenty one" -> "021"
            return value[:-1] + str(ones)
        return str(value) + str(ones)
    if value % (10 if ones < 10 else 100) == 0:  # "twenty one" -> 21, "hundred twelve" -> 112
        return value + ones
    return str(value) + str(ones)  # "21 five" -> "215"


def _add_tens(value: Value, tens: int) -> Union[int, str]:
    if value is None:
        return tens
    if isinstance(value, str) or value % 100 != 0:  # "nineteen fifty" -> "1950"
        return str(value) + str(tens)
    return value + tens  # "one hundred twenty" -> 120


def _multiply(value: int, multiplier: int) -> int:
    # Only the last group of three digits is multiplied: "two thousand five hundred" -> 2500.
    return value // 1000 * 1000 + value % 1000 * multiplier


def _number_words_to_digits(words: List[str]) -> Iterator[str]:
    """Yield the words with every run of number words replaced by the number it spells."""
    prefix: Optional[str] = None  # a sign or currency symbol for the number being built
    value: Value = None
    skip = False  # the next word has been consumed already

    def output(result: Union[int, str]) -> str:
        nonlocal prefix, value
        result = str(result) if prefix is None else prefix + str(result)
        prefix = value = None
        return result

    for prev, current, next in zip([None] + words[:-1], words, words[1:] + [None]):
        if skip:
            skip = False
            continue
        next_is_numeric = next is not None and ARABIC_NUMBER.match(next)
        has_prefix = current[0] in PREFIXES
        current_without_prefix = current[1:] if has_prefix else current

        if ARABIC_NUMBER.match(current_without_prefix):  # digits, maybe signed, maybe decimal
            if value is not None:
                if isinstance(value, str) and value.endswith("."):  # "3." + "5", or an IP address
                    value = value + current
                    continue
                yield output(value)
            prefix = current[0] if has_prefix else prefix
            f = Fraction(current_without_prefix)
            value = f.numerator if f.denominator == 1 else current_without_prefix
        elif current not in NUMBER_WORDS:
            if value is not None:
                yield output(value)
            yield output(current)
        elif current in ZEROS:
            value = str(value or "") + "0"
        elif current in ONES:
            value = _add_ones(value, ONES[current], prev)
        elif current in ONES_SUFFIXED:  # plurals and ordinals end the number
            ones, suffix = ONES_SUFFIXED[current]
            yield output(str(_add_ones(value, ones, prev)) + suffix)
        elif current in TENS:
            value = _add_tens(value, TENS[current])
        elif current in TENS_SUFFIXED:
            tens, suffix = TENS_SUFFIXED[current]
            yield output(str(_add_tens(value, tens)) + suffix)
        elif current in MULTIPLIERS:
            multiplier = MULTIPLIERS[current]
            if value is None:
                value = multiplier
            elif isinstance(value, str) or value == 0:  # "1.5 million", "oh five hundred"
                f = _to_fraction(value)
                if f is not None and (f * multiplier).denominator == 1:
                    value = (f * multiplier).numerator
                else:
                    yield output(value)
                    value = multiplier
            else:
                value = _multiply(value, multiplier)
        elif current in MULTIPLIERS_SUFFIXED:
            multiplier, suffix = MULTIPLIERS_SUFFIXED[current]
            if value is None:
                yield output(str(multiplier) + suffix)
            elif isinstance(value, str):
                f = _to_fraction(value)
                if f is not None and (f * multiplier).denominator == 1:
                    yield output(str((f * multiplier).numerator) + suffix)
                else:
                    yield output(value)
                    yield output(str(multiplier) + suffix)
            else:
                yield output(str(_multiply(value, multiplier)) + suffix)
        elif current in PRECEDING_PREFIXERS:  # "minus five" -> "-5", only before a number
            if value is not None:
                yield output(value)
            if next in NUMBER_WORDS or next_is_numeric:
                prefix = PRECEDING_PREFIXERS[current]
            else:
                yield output(current)
        elif current in FOLLOWING_PREFIXERS:  # "five dollars" -> "$5", only after a number
            if value is not None:
                prefix = FOLLOWING_PREFIXERS[current]
                yield output(value)
            else:
                yield output(current)
        elif current in SUFFIXERS:  # "fifty percent", "fifty per cent" -> "50%"
            suffix = SUFFIXERS[current]
            if value is None:
                yield output(current)
            elif not isinstance(suffix, dict):
                yield output(str(value) + suffix)
            elif next in suffix:
                yield output(str(value) + suffix[next])
                skip = True
            else:
                yield output(value)
                yield output(current)
        elif next not in NUMBER_WORDS and not next_is_numeric:  # "and", "double", "triple", "point"
            if value is not None:  # are ordinary words unless a number may follow
                yield output(value)
            yield output(current)
        elif current == "and":
            if prev not in MULTIPLIERS:  # "hundred and five" is one number; "five and six" two
                if value is not None:
                    yield output(value)
                yield output(current)
        elif current in ("double", "triple"):
            if next in ONES or next in ZEROS:  # "double five" -> "55"
                value = str(value or "") + str(ONES.get(next, 0)) * (2 if current == "double" else 3)
                skip = True
            else:
                if value is not None:
                    yield output(value)
                yield output(current)
        elif current == "point" and (next in DECIMALS or next_is_numeric):
            value = str(value or "") + "."
        # any other "point" (before a multiplier word, say) is dropped, as openai-whisper does

    if value is not None:
        yield output(value)


class EnglishNumberNormalizer:
    """Spelled-out numbers to arabic numerals, keeping suffixes ("1960s", "32nd"), currency
    symbols before the number ("twenty dollars" -> "$20"), and reading runs of single digits as
    digit strings ("one oh one" -> "101"). "1" is written back as "one" for readability."""

    def preprocess(self, s: str) -> str:
        # "<number> and a half" -> "<number> point five"
        segments = re.split(r"\band\s+a\s+half\b", s)
        results = []
        for i, segment in enumerate(segments):
            if not segment.strip():
                continue
            results.append(segment)
            if i < len(segments) - 1:
                last_word = segment.rsplit(maxsplit=2)[-1]
                results.append("point five" if last_word in DECIMALS or last_word in MULTIPLIERS else "and a half")
        s = " ".join(results)
        s = re.sub(r"([a-z])([0-9])", r"\1 \2", s)  # a space between letters and digits ...
        s = re.sub(r"([0-9])([a-z])", r"\1 \2", s)
        return re.sub(r"([0-9])\s+(st|nd|rd|th|s)\b", r"\1\2", s)  # ... except before a suffix

    def postprocess(self, s: str) -> str:
        def combine_cents(m: re.Match) -> str:
            return f"{m.group(1)}{m.group(2)}.{int(m.group(3)):02d}"

        s = re.sub(r"([€£$])([0-9]+) (?:and )?¢([0-9]{1,2})\b", combine_cents, s)  # "$2 and ¢7" -> "$2.07"
        # "$0.07" -> "¢7" (the unescaped "." matches any character, as in openai-whisper)
        s = re.sub(r"[€£$]0.([0-9]{1,2})\b", lambda m: f"¢{int(m.group(1))}", s)
        return re.sub(r"\b1(s?)\b", r"one\1", s)

    def __call__(self, s: str) -> str:
        s = self.preprocess(s)
        s = " ".join(_number_words_to_digits(s.split()))
        return self.postprocess(s)


# ---------------------------------------------------------------------------------------------
# English text

FILLER_WORDS = r"\b(hmm|mm|mhm|mmm|uh|um)\b"
REPLACEMENTS = {  # regex -> replacement, applied in this order
    # common contractions
    r"\bwon't\b": "will not",
    r"\bcan't\b": "can not",
    r"\blet's\b": "let us",
    r"\bain't\b": "aint",
    r"\by'all\b": "you all",
    r"\bwanna\b": "want to",
    r"\bgotta\b": "got to",
    r"\bgonna\b": "going to",
    r"\bi'ma\b": "i am going to",
    r"\bimma\b": "i am going to",
    r"\bwoulda\b": "would have",
    r"\bcoulda\b": "could have",
    r"\bshoulda\b": "should have",
    r"\bma'am\b": "madam",
    # titles and other abbreviations
    r"\bmr\b": "mister ",
    r"\bmrs\b": "missus ",
    r"\bst\b": "saint ",
    r"\bdr\b": "doctor ",
    r"\bprof\b": "professor ",
    r"\bcapt\b": "captain ",
    r"\bgov\b": "governor ",
    r"\bald\b": "alderman ",
    r"\bgen\b": "general ",
    r"\bsen\b": "senator ",
    r"\brep\b": "representative ",
    r"\bpres\b": "president ",
    r"\brev\b": "reverend ",
    r"\bhon\b": "honorable ",
    r"\basst\b": "assistant ",
    r"\bassoc\b": "associate ",
    r"\blt\b": "lieutenant ",
    r"\bcol\b": "colonel ",
    r"\bjr\b": "junior ",
    r"\bsr\b": "senior ",
    r"\besq\b": "esquire ",
    # perfect tenses, where "'s" and "'d" are "has" and "had" ("'s done" is ambiguous, so left out)
    r"'d been\b": " had been",
    r"'s been\b": " has been",
    r"'d gone\b": " had gone",
    r"'s gone\b": " has gone",
    r"'d done\b": " had done",
    r"'s got\b": " has got",
    # general contractions
    r"n't\b": " not",
    r"'re\b": " are",
    r"'s\b": " is",
    r"'d\b": " would",
    r"'ll\b": " will",
    r"'t\b": " not",
    r"'ve\b": " have",
    r"'m\b": " am",
}


@lru_cache(maxsize=None)
def british_to_american() -> dict:
    """The spelling table (from https://www.tysto.com/uk-us-spelling-list.html via openai-whisper)."""
    return json.loads(SPELLINGS_PATH.read_text(encoding="utf-8"))


class EnglishTextNormalizer:
    def __init__(self):
        self.standardize_numbers = EnglishNumberNormalizer()
        self.spellings = british_to_american()

    def __call__(self, s: str) -> str:
        s = remove_bracketed(s.lower())
        s = re.sub(FILLER_WORDS, "", s)
        s = re.sub(r"\s+'", "'", s)  # "don 't" -> "don't"
        for pattern, replacement in REPLACEMENTS.items():
            s = re.sub(pattern, replacement, s)

        s = re.sub(r"(\d),(\d)", r"\1\2", s)  # thousands separators: "1,000" -> "1000"
        s = re.sub(r"\.([^0-9]|$)", r" \1", s)  # full stops, but not decimal points
        s = remove_symbols_and_diacritics(s, keep=".%$¢€£")  # the symbols numbers need
        s = self.standardize_numbers(s)
        s = " ".join(self.spellings.get(word, word) for word in s.split())

        # The numeric symbols that ended up without a number beside them go too.
        s = re.sub(r"[.$¢€£]([^0-9])", r" \1", s)
        s = re.sub(r"([^0-9])%", r"\1 ", s)
        return re.sub(r"\s+", " ", s)

"""Human labels in Whisper's style: the reference's words, written as the teacher writes them where they agree.

A LibriSpeech reference is upper case with no punctuation ("MISTER BROWN SAID TWENTY ONE"); Whisper writes
"Mr. Brown said 21." A student trained on raw references would learn a style nobody wants, and one trained
on the teacher's transcripts inherits its mistakes. The target made here has both virtues:

    teacher   " Mr. Brown sad, 21 times."
    reference "MISTER BROWN SAID TWENTY ONE TIMES"
    target    " Mr. Brown said, 21 times."      the teacher's word where it matches (normalised), the
                                               reference's where it does not, in lower case (capitalised
                                               at a sentence start), the teacher's punctuation kept

How: each word of either text is normalised on its own (normalizer.EnglishTextNormalizer, as WER is) and the
two sequences are aligned (difflib's longest matching blocks, then the gaps between them). Matching words,
or a gap whose two sides normalise alike as phrases ("21" / "TWENTY ONE"), keep the teacher's form; any
other gap takes the reference's words; a teacher word the reference lacks (or a filler, which normalises to
nothing) is dropped, its trailing punctuation kept on the word before. A gap whose sides differ in length is
replaced whole ("sad 21" / "SAID TWENTY ONE" becomes "said twenty one": the same words for WER, another
style). A timestamped target keeps the teacher's segments and
their timestamps, each segment holding the corrected words of the teacher words it held.
"""
import difflib
import re
from typing import List, Optional, Sequence, Tuple

from normalizer import EnglishTextNormalizer

_normalize = EnglishTextNormalizer()
TRAILING_PUNCTUATION = re.compile(r"[.,!?;:\"')\]]+$")
SENTENCE_END = (".", "!", "?")
FIRST_PERSON = re.compile(r"^i('[a-z]+)?$")  # i, i'm, i'll, i've, i'd: capital I in any position


def _key(word: str) -> str:
    """What a word is compared by: its normalised form ("" for a word that normalises to nothing)."""
    return _normalize(word).strip()


def _in_teacher_style(word: str, sentence_start: bool) -> str:
    """A reference word (upper case, no punctuation) in the case the teacher would write it."""
    word = word.lower()
    if sentence_start or FIRST_PERSON.match(word):
        return word[:1].upper() + word[1:]
    return word


def corrected_words(teacher_words: Sequence[str], reference: str) -> List[Tuple[str, int]]:
    """The target's words, each with the index of the teacher word whose place it takes (for segments):
    the teacher's word where it matches the reference, the reference's where it does not."""
    reference_words = [w for w in reference.split() if _key(w)]  # fillers, if a reference has any, count as none
    reference_keys = [_key(w) for w in reference_words]
    # words that normalise to nothing (fillers: "Uh,") are dropped first, their punctuation kept before them
    kept: List[Tuple[str, int]] = []
    for index, word in enumerate(teacher_words):
        if _key(word):
            kept.append((word, index))
        elif kept:
            kept[-1] = (_with_punctuation(kept[-1][0], TRAILING_PUNCTUATION.search(word)), kept[-1][1])
    words, places = [w for w, _ in kept], [i for _, i in kept]
    matcher = difflib.SequenceMatcher(a=[_key(w) for w in words], b=reference_keys, autojunk=False)
    out: List[Tuple[str, int]] = []
    for op, t0, t1, r0, r1 in matcher.get_opcodes():
        if op == "equal" or (t1 > t0 and _key(" ".join(words[t0:t1])) == _key(" ".join(reference_words[r0:r1]))):
            for i in range(t0, t1):  # equal, or equal as a phrase ("21" and "TWENTY ONE")
                word = words[i]
                dropped_before = places[i] > (out[-1][1] + 1 if out else 0)
                if dropped_before and (not out or out[-1][0].endswith(SENTENCE_END)):  # now starts a sentence
                    word = word[:1].upper() + word[1:]
                out.append((word, places[i]))
        elif t1 - t0 == r1 - r0:  # word for word: each keeps its place, its closing punctuation and a capital
            for i, j in zip(range(t0, t1), range(r0, r1)):  # (a name misheard is still a name: "Maria" -> "Maria's")
                _append(out, reference_words[j], places[i], TRAILING_PUNCTUATION.search(words[i]),
                        capital=words[i][:1].isupper())
        else:
            place = places[t0] if t0 < len(places) else (places[-1] if places else 0)
            for j in range(r0, r1):
                _append(out, reference_words[j], place, None)
            if t1 > t0:  # the replaced (or dropped) words' closing punctuation stays where it was
                _append(out, None, place, TRAILING_PUNCTUATION.search(words[t1 - 1]))
    return out


def _with_punctuation(word: str, punctuation) -> str:
    """The word with the closing punctuation added, unless it has some already."""
    return word + punctuation.group() if punctuation and not TRAILING_PUNCTUATION.search(word) else word


def _append(out: List[Tuple[str, int]], reference_word: Optional[str], place: int, punctuation,
            capital: bool = False) -> None:
    """Add a reference word in the teacher's style (capitalised at a sentence start, or where the teacher's
    word it replaces was), then the closing punctuation (if the last word has none)."""
    if reference_word is not None:
        starts_sentence = not out or out[-1][0].endswith(SENTENCE_END)
        out.append((_in_teacher_style(reference_word, capital or starts_sentence), place))
    if out:
        out[-1] = (_with_punctuation(out[-1][0], punctuation), out[-1][1])


def human_text(teacher_text: str, reference: str) -> str:
    """The reference's words in the teacher's style (see the module docstring), with Whisper's leading space."""
    words = corrected_words(teacher_text.split(), reference)
    return "".join(" " + word for word, _ in words)


def human_tokens(tokenizer, teacher_tokens: Sequence[int], reference: str, timestamps: bool) -> List[int]:
    """The target's token ids: the teacher's where its text already matches the reference word for word, else
    the corrected text encoded; with timestamps, the teacher's segments (timestamp, text, timestamp) each
    holding the corrected words of the teacher words it held."""
    text = tokenizer.decode(teacher_tokens)
    if _key(text) == _key(reference):  # the teacher got every word right: its target as it is
        return list(teacher_tokens)
    if not timestamps:
        return tokenizer.encode(human_text(text, reference))
    segments = _segments(teacher_tokens, tokenizer.timestamp_begin)
    words, owner = [], []  # every teacher word, and the segment it sits in
    for index, (_, text_tokens, _) in enumerate(segments):
        segment_words = tokenizer.decode(text_tokens).split()
        words += segment_words
        owner += [index] * len(segment_words)
    if not words:  # no segment to place the reference's words in (labelling drops such empty targets)
        return list(teacher_tokens)
    corrected = corrected_words(words, reference)
    texts = [[] for _ in segments]
    for word, place in corrected:
        texts[owner[min(place, len(owner) - 1)]].append(word)
    tokens: List[int] = []
    for (start, _, end), segment_words in zip(segments, texts):
        if segment_words:  # a segment whose words were all dropped goes with them
            tokens += [start, *tokenizer.encode(" " + " ".join(segment_words)), *([end] if end is not None else [])]
    return tokens


def _segments(tokens: Sequence[int], timestamp_begin: int) -> List[Tuple[int, List[int], Optional[int]]]:
    """A timestamped target as (start timestamp, text tokens, end timestamp or None) segments, in order."""
    segments, start, text = [], None, []
    for token in tokens:
        if token < timestamp_begin:
            text.append(token)
        elif start is None:
            start = token
        else:
            segments.append((start, text, token))
            start, text = None, []
    if start is not None:  # a last segment the teacher did not close
        segments.append((start, text, None))
    return segments

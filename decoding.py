"""Decoding one 30-second window per utterance: log-Mel in, tokens and text out, for a whole batch at once.

The same strategies and rules as openai/whisper's decoding.py, so the same model gives the same text:
- token decoders: greedy (argmax, or sampling at temperature > 0) and beam search with patience;
- logit filters, applied before every choice: no blank at the start, no special/non-speech tokens,
  and the timestamp grammar (pairs, non-decreasing, a timestamp first) when timestamps are on;
- a ranker that picks one sequence per utterance from the beams or samples (length-normalised log-prob).
Every row of the batch runs in lock-step on the model's KV cache; rows that finish keep emitting <|endoftext|>.
"""
import zlib
from dataclasses import dataclass, field, replace
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from graphs import static_step
from model import Whisper
from tokenizer import Tokenizer, tokenizer_for

TIME_PRECISION = 0.02  # seconds per timestamp token: 1500 encoder positions span 30 s


@dataclass(frozen=True)
class DecodingOptions:
    task: str = "transcribe"  # or "translate" (multilingual models)
    language: Optional[str] = None  # None: English for .en models, detected per utterance otherwise
    temperature: float = 0.0  # 0: greedy argmax / beam search; > 0: sampling
    sample_len: Optional[int] = None  # most tokens to generate (default: half the text context, 224)
    best_of: Optional[int] = None  # independent samples per utterance when temperature > 0
    beam_size: Optional[int] = None  # beams per utterance when temperature == 0 (None: greedy)
    patience: Optional[float] = None  # beam search: stop after beam_size * patience finished candidates
    length_penalty: Optional[float] = None  # None: divide log-prob by length; else Google NMT's penalty
    prompt: Optional[Union[str, List[int]]] = None  # previous text, to condition on
    prefix: Optional[Union[str, List[int]]] = None  # forced start of this window's text
    suppress_tokens: Optional[Union[str, Iterable[int]]] = "-1"  # "-1": the non-speech symbols
    suppress_blank: bool = True  # no blank or <|endoftext|> as the first token
    without_timestamps: bool = False  # True: <|notimestamps|>, text only
    max_initial_timestamp: Optional[float] = 1.0  # seconds: the first timestamp may not be later
    static_step: bool = False  # fixed-shape decoder steps, replayed as a CUDA graph on GPU (graphs.py)
    seed: Optional[int] = 0  # sampling (temperature > 0) draws from a generator seeded so: same input, same text


@dataclass
class DecodingResult:
    tokens: List[int]
    text: str
    language: str
    avg_logprob: float
    no_speech_prob: float
    temperature: float
    compression_ratio: float
    language_probs: Optional[dict] = field(default=None, repr=False)


def compression_ratio(text: str) -> float:
    """How much zlib shrinks the text: repetitive (looping) output compresses far better than speech."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


# ---------------------------------------------------------------------------------------------
# Logit filters: each masks, in place, the tokens that may not come next. logits (N, V), tokens (N, L).


class TokenIds:
    """A fixed list of token ids as a tensor on each device it is used on, made once: indexing logits
    with a Python list builds a new index tensor on every call, that is on every decoding step."""

    def __init__(self, ids: Sequence[int]):
        self.ids = list(ids)
        self._on = {}

    def on(self, device: torch.device) -> Tensor:
        if device not in self._on:
            self._on[device] = torch.tensor(self.ids, dtype=torch.long, device=device)  # (n,)
        return self._on[device]

    def suppress(self, logits: Tensor):
        """logits (N, V): -inf at these ids, in place."""
        logits.index_fill_(1, self.on(logits.device), -np.inf)


class SuppressBlank:
    """The first sampled token may be neither a space nor <|endoftext|>."""

    def __init__(self, tokenizer: Tokenizer, sample_begin: int):
        self.suppressed = TokenIds(tokenizer.encode(" ") + [tokenizer.eot])
        self.sample_begin = sample_begin

    def apply(self, logits: Tensor, tokens: Tensor):
        if tokens.shape[1] == self.sample_begin:
            self.suppressed.suppress(logits)


class SuppressTokens:
    def __init__(self, suppress_tokens: Sequence[int]):
        self.suppress_tokens = TokenIds(suppress_tokens)

    def apply(self, logits: Tensor, tokens: Tensor):
        self.suppress_tokens.suppress(logits)


class ApplyTimestampRules:
    """Timestamps come in pairs (start, end) except just before EOT, never decrease, and open the text."""

    def __init__(self, tokenizer: Tokenizer, sample_begin: int, max_initial_timestamp_index: Optional[int]):
        self.tokenizer = tokenizer
        self.sample_begin = sample_begin
        self.max_initial_timestamp_index = max_initial_timestamp_index

    def apply(self, logits: Tensor, tokens: Tensor):
        ts_begin, eot = self.tokenizer.timestamp_begin, self.tokenizer.eot
        logits[:, self.tokenizer.no_timestamps] = -np.inf  # handled by without_timestamps instead
        for k in range(tokens.shape[0]):
            sampled = tokens[k, self.sample_begin :]
            seq = sampled.tolist()
            last_was_timestamp = len(seq) >= 1 and seq[-1] >= ts_begin
            penultimate_was_timestamp = len(seq) < 2 or seq[-2] >= ts_begin
            if last_was_timestamp:
                if penultimate_was_timestamp:  # a pair just closed: text must follow
                    logits[k, ts_begin:] = -np.inf
                else:  # a pair is open: close it (or end)
                    logits[k, :eot] = -np.inf
            timestamps = sampled[sampled.ge(ts_begin)]
            if timestamps.numel() > 0:
                # Non-decreasing, and a segment has non-zero length (else it could loop forever).
                last = timestamps[-1] if last_was_timestamp and not penultimate_was_timestamp else timestamps[-1] + 1
                logits[k, ts_begin:last] = -np.inf
        if tokens.shape[1] == self.sample_begin:
            logits[:, :ts_begin] = -np.inf  # the window opens with a timestamp
            if self.max_initial_timestamp_index is not None:
                logits[:, ts_begin + self.max_initial_timestamp_index + 1 :] = -np.inf
        # Where the timestamps together are likelier than any single text token, take a timestamp.
        logprobs = F.log_softmax(logits.float(), dim=-1)
        timestamp_logprob = logprobs[:, ts_begin:].logsumexp(dim=-1)
        max_text_logprob = logprobs[:, :ts_begin].max(dim=-1).values
        logits[timestamp_logprob > max_text_logprob, :ts_begin] = -np.inf


# ---------------------------------------------------------------------------------------------
# Token decoders: choose the next token of every row and keep the running log-probabilities.


class GreedyDecoder:
    def __init__(self, temperature: float, eot: int, generator: Optional[torch.Generator] = None):
        self.temperature, self.eot, self.generator = temperature, eot, generator

    def update(self, tokens: Tensor, logits: Tensor, sum_logprobs: Tensor, cache) -> Tuple[Tensor, bool]:
        if self.temperature == 0:
            next_tokens = logits.argmax(dim=-1)
        else:
            probs = F.softmax(logits.float() / self.temperature, dim=-1)
            next_tokens = torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
        logprobs = F.log_softmax(logits.float(), dim=-1)  # (N, V)
        current = logprobs.gather(1, next_tokens[:, None])[:, 0]  # (N,): each row's chosen token
        finished = tokens[:, -1] == self.eot
        sum_logprobs += current.masked_fill_(finished, 0.0)  # finished rows score nothing more
        next_tokens.masked_fill_(finished, self.eot)  # finished rows keep emitting EOT
        tokens = torch.cat([tokens, next_tokens[:, None]], dim=-1)
        return tokens, bool((tokens[:, -1] == self.eot).all())

    def finalize(self, tokens: Tensor, sum_logprobs: Tensor):
        """tokens (n_audio, n_group, L) -> per utterance, its candidates (each ending in EOT) and scores."""
        tokens = F.pad(tokens, (0, 1), value=self.eot)  # rows that ran out of length end here
        return tokens.tolist(), sum_logprobs.tolist()


class BeamSearchDecoder:
    """Keeps the beam_size likeliest unfinished sequences per utterance; done after enough finish."""

    def __init__(self, beam_size: int, eot: int, patience: Optional[float] = None):
        self.beam_size, self.eot = beam_size, eot
        self.patience = patience or 1.0
        self.max_candidates = round(beam_size * self.patience)
        if self.max_candidates <= 0:
            raise ValueError(f"beam_size * patience must be >= 1, got {beam_size} * {self.patience}")
        self.finished: Optional[List[dict]] = None

    def update(self, tokens: Tensor, logits: Tensor, sum_logprobs: Tensor, cache) -> Tuple[Tensor, bool]:
        n_audio = tokens.shape[0] // self.beam_size
        if self.finished is None:
            self.finished = [{} for _ in range(n_audio)]
        logprobs = F.log_softmax(logits.float(), dim=-1)
        top_logprobs, top_tokens = logprobs.topk(self.beam_size + 1)  # (N, beam+1) each
        next_tokens, source_rows, next_logprobs = [], [], []
        for i in range(n_audio):
            scores, sources = {}, {}
            for row in range(i * self.beam_size, (i + 1) * self.beam_size):
                prefix = tuple(tokens[row].tolist())
                for logprob, token in zip(top_logprobs[row].tolist(), top_tokens[row].tolist()):
                    sequence = prefix + (token,)
                    scores[sequence] = sum_logprobs[row].item() + logprob
                    sources[sequence] = row
            kept = 0
            for sequence in sorted(scores, key=scores.get, reverse=True):
                if sequence[-1] == self.eot:
                    self.finished[i].setdefault(sequence, scores[sequence])
                else:
                    next_logprobs.append(scores[sequence])
                    next_tokens.append(sequence)
                    source_rows.append(sources[sequence])
                    kept += 1
                    if kept == self.beam_size:
                        break
        # Finished candidates beyond the first max_candidates are dropped, as openai/whisper does.
        self.finished = [dict(list(f.items())[: self.max_candidates]) for f in self.finished]
        sum_logprobs.copy_(torch.tensor(next_logprobs, device=sum_logprobs.device))
        cache.reorder_beams(torch.tensor(source_rows, device=tokens.device))
        tokens = torch.tensor(next_tokens, device=tokens.device)
        done = all(len(f) >= self.max_candidates for f in self.finished)
        return tokens, done

    def finalize(self, tokens: Tensor, sum_logprobs: Tensor):
        sum_logprobs = sum_logprobs.view(tokens.shape[:2]).tolist()
        candidates, scores = [], []
        for i, finished in enumerate(self.finished or [{} for _ in range(tokens.shape[0])]):
            if len(finished) < self.beam_size:  # too few ended: add the best unfinished, with EOT
                for j in np.argsort(sum_logprobs[i])[::-1]:
                    sequence = tuple(tokens[i, j].tolist()) + (self.eot,)
                    finished.setdefault(sequence, sum_logprobs[i][j])
                    if len(finished) >= self.beam_size:
                        break
            candidates.append([list(s) for s in finished])
            scores.append(list(finished.values()))
        return candidates, scores


def rank(sequences: List[List[int]], sum_logprobs: List[float], length_penalty: Optional[float]) -> int:
    """Index of the best candidate: log-prob divided by length (or by Google NMT's length penalty)."""

    def score(logprob, length):
        penalty = length if length_penalty is None else ((5 + length) / 6) ** length_penalty
        return logprob / penalty

    return int(np.argmax([score(lp, len(s)) for s, lp in zip(sequences, sum_logprobs)]))


# ---------------------------------------------------------------------------------------------
# The decoding task


@torch.no_grad()
def detect_language(model: Whisper, audio_features: Tensor, tokenizer: Tokenizer,
                    audio_lengths: Optional[Tensor] = None) -> Tuple[List[str], List[dict]]:
    """Most likely language per utterance, from the logits after <|startoftranscript|> alone."""
    sot = torch.full((audio_features.shape[0], 1), tokenizer.sot, device=audio_features.device)
    logits = model.logits(sot, audio_features, audio_lengths=audio_lengths)[:, 0]  # (B, V)
    language_tokens = torch.tensor(tokenizer.all_language_tokens, device=logits.device)
    probs = logits[:, language_tokens].softmax(dim=-1).cpu()  # (B, n_languages)
    codes = tokenizer.all_language_codes
    best = [codes[i] for i in probs.argmax(dim=-1).tolist()]
    return best, [dict(zip(codes, row.tolist())) for row in probs]


def suppressed_tokens(tokenizer: Tokenizer, suppress_tokens) -> List[int]:
    if isinstance(suppress_tokens, str):
        suppress_tokens = [int(t) for t in suppress_tokens.split(",") if t.strip()]
    tokens = list(suppress_tokens or [])
    if -1 in tokens:
        tokens = [t for t in tokens if t >= 0] + list(tokenizer.non_speech_tokens)
    tokens += [tokenizer.transcribe, tokenizer.translate, tokenizer.sot, tokenizer.sot_prev, tokenizer.sot_lm]
    tokens.append(tokenizer.no_speech)  # its probability is read separately, never sampled
    return sorted(set(tokens))


def _as_tokens(tokenizer: Tokenizer, text_or_tokens) -> List[int]:
    if isinstance(text_or_tokens, str):
        return tokenizer.encode(" " + text_or_tokens.strip())
    return list(text_or_tokens)


def sample_length(options: DecodingOptions, n_ctx: int) -> int:
    """The most tokens one window may produce: a window that reaches it has looped or been cut."""
    return options.sample_len or n_ctx // 2


def prompt_limit(n_ctx: int) -> int:
    """How many of the latest prompt (or prefix) tokens the decoder is given: half its context, as Whisper."""
    return n_ctx // 2 - 1


def initial_tokens(tokenizer: Tokenizer, options: DecodingOptions, n_ctx: int) -> List[int]:
    """[<|startofprev|> prompt] <|startoftranscript|> [language task] [<|notimestamps|>] [prefix]."""
    tokens = list(tokenizer.sot_sequence)
    if options.without_timestamps:
        tokens.append(tokenizer.no_timestamps)
    if options.prefix:
        tokens += _as_tokens(tokenizer, options.prefix)[-prompt_limit(n_ctx) :]
    if options.prompt:
        prompt = _as_tokens(tokenizer, options.prompt)[-prompt_limit(n_ctx) :]
        tokens = [tokenizer.sot_prev] + prompt + tokens
    return tokens


@torch.no_grad()
def decode(model: Whisper, mel: Optional[Tensor], options: DecodingOptions = DecodingOptions(),
           audio_lengths: Optional[Tensor] = None, audio_features: Optional[Tensor] = None) -> List[DecodingResult]:
    """Decode one window per utterance. mel (B, n_mels, 2 S) or (n_mels, 2 S): 3000 frames (30 s) for a
    model made for fixed windows, fewer for one made for the real length; audio_lengths (B,): each row's
    encoder positions holding its audio, when rows of different lengths share the batch. audio_features
    (B, S, D), the encoder's output when the caller has it already, skips the encoder."""
    _check_options(model, options)
    if audio_lengths is not None:
        audio_lengths = torch.as_tensor(audio_lengths, device=model.device)
    if audio_features is None:
        mel = mel[None] if mel.ndim == 2 else mel
        audio_features = model.embed_audio(mel.to(model.device, model.dtype), audio_lengths)  # (B, S, D)
    n_audio = audio_features.shape[0]

    language = options.language or ("en" if not model.is_multilingual else None)
    base_tokenizer = tokenizer_for(model, language=language, task=options.task)
    languages, language_probs = [language] * n_audio, [None] * n_audio
    if language is None:
        languages, language_probs = detect_language(model, audio_features, base_tokenizer, audio_lengths)
    tokenizers = [tokenizer_for(model, language=lang, task=options.task) for lang in languages]
    tokenizer = tokenizers[0]  # every row's prompt has the same length and layout; only the language id differs

    n_ctx = model.dims.n_text_ctx
    prompts = [initial_tokens(t, options, n_ctx) for t in tokenizers]
    sample_begin = len(prompts[0])
    sot_index = prompts[0].index(tokenizer.sot)
    sample_len = sample_length(options, n_ctx)
    n_group = options.beam_size or options.best_of or 1

    filters = _logit_filters(tokenizer, options, sample_begin)
    if options.beam_size is not None:
        decoder = BeamSearchDecoder(options.beam_size, tokenizer.eot, options.patience)
    else:
        generator = None
        if options.seed is not None and options.temperature > 0:
            generator = torch.Generator(device=model.device).manual_seed(options.seed)
        decoder = GreedyDecoder(options.temperature, tokenizer.eot, generator)

    tokens = torch.tensor(prompts, device=model.device).repeat_interleave(n_group, dim=0)  # (B*G, L)
    audio_features = audio_features.repeat_interleave(n_group, dim=0)
    if audio_lengths is not None:
        audio_lengths = audio_lengths.repeat_interleave(n_group, dim=0)
    tokens, sum_logprobs, no_speech_probs = _sample(
        model, audio_features, audio_lengths, tokens, decoder, filters, sample_len, sot_index, tokenizer.no_speech,
        options.static_step,
    )
    no_speech_probs = no_speech_probs[::n_group]  # rows of one utterance share the audio
    tokens = tokens.view(n_audio, n_group, -1)
    sum_logprobs = sum_logprobs.view(n_audio, n_group)
    candidates, scores = decoder.finalize(tokens, sum_logprobs)

    results = []
    for i in range(n_audio):
        texts = [c[sample_begin : c.index(tokenizer.eot, sample_begin)] for c in candidates[i]]
        best = rank(texts, scores[i], options.length_penalty)
        text = tokenizers[i].decode(texts[best]).strip()
        results.append(
            DecodingResult(
                tokens=texts[best], text=text, language=languages[i],
                avg_logprob=scores[i][best] / (len(texts[best]) + 1), no_speech_prob=no_speech_probs[i],
                temperature=options.temperature, compression_ratio=compression_ratio(text),
                language_probs=language_probs[i],
            )
        )
    return results


def _sample(model, audio_features, audio_lengths, tokens, decoder, filters, sample_len, sot_index, no_speech,
            use_static_step=False):
    """The loop: one decoder step per token for the whole batch, on the KV cache."""
    n_ctx = model.dims.n_text_ctx
    if use_static_step:
        step = static_step(model, tokens.shape[0])
        cache, run_prompt, run_token = step.cache, step.start, step
    else:
        cache = model.new_cache(tokens.shape[0], max_length=tokens.shape[1] + sample_len)
        run_prompt = run_token = lambda new, features=None, lengths=None: model.logits(  # noqa: E731
            new, audio_features, cache, lengths)
    sum_logprobs = torch.zeros(tokens.shape[0], device=tokens.device)
    no_speech_probs = [float("nan")] * tokens.shape[0]
    for i in range(sample_len):
        if i == 0:
            logits = run_prompt(tokens, audio_features, audio_lengths)  # (N, T, V); fills the cache
            no_speech_probs = logits[:, sot_index].softmax(dim=-1)[:, no_speech].tolist()
        else:
            logits = run_token(tokens[:, -1:])  # (N, 1, V): the cache holds the rest
        logits = logits[:, -1]  # (N, V): the filters write into it
        if use_static_step:
            logits = logits.clone()  # a graph's output buffer must stay intact; other steps return new logits
        for logit_filter in filters:
            logit_filter.apply(logits, tokens)
        tokens, done = decoder.update(tokens, logits, sum_logprobs, cache)
        if done or tokens.shape[1] > n_ctx or cache.length >= cache.max_length:
            break
    return tokens, sum_logprobs, no_speech_probs


def _logit_filters(tokenizer: Tokenizer, options: DecodingOptions, sample_begin: int) -> list:
    filters = []
    if options.suppress_blank:
        filters.append(SuppressBlank(tokenizer, sample_begin))
    if options.suppress_tokens:
        filters.append(SuppressTokens(suppressed_tokens(tokenizer, options.suppress_tokens)))
    if not options.without_timestamps:
        max_index = None
        if options.max_initial_timestamp:
            max_index = round(options.max_initial_timestamp / TIME_PRECISION)
        filters.append(ApplyTimestampRules(tokenizer, sample_begin, max_index))
    return filters


def _check_options(model: Whisper, options: DecodingOptions):
    if options.beam_size is not None and options.best_of is not None:
        raise ValueError("beam_size and best_of cannot be given together")
    if options.temperature == 0 and options.best_of is not None:
        raise ValueError("best_of needs temperature > 0 (sampling)")
    if options.patience is not None and options.beam_size is None:
        raise ValueError("patience needs beam_size")
    if options.beam_size is not None and options.temperature != 0:
        raise ValueError("beam search is deterministic: use temperature 0")
    if options.task not in ("transcribe", "translate"):
        raise ValueError(f"task must be 'transcribe' or 'translate', got {options.task!r}")
    if not model.is_multilingual and (options.task == "translate" or options.language not in (None, "en")):
        raise ValueError("this model is English-only: it can only transcribe English")


def with_temperature(options: DecodingOptions, temperature: float) -> DecodingOptions:
    """The same options at another temperature: greedy/beams at 0, best_of samples above (as openai/whisper)."""
    if temperature > 0:
        return replace(options, temperature=temperature, beam_size=None, patience=None)
    return replace(options, temperature=0.0, best_of=None)


@dataclass(frozen=True)
class FallbackRules:
    """When a greedy/beam result looks wrong, decode again hotter (openai/whisper's defaults)."""

    temperatures: Tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    compression_ratio_threshold: Optional[float] = 2.4  # above: repetition loop
    logprob_threshold: Optional[float] = -1.0  # below: the model is unsure
    no_speech_threshold: Optional[float] = 0.6  # above (and unsure): silence, not a failure

    def is_silence(self, result: DecodingResult) -> bool:
        """Likely no speech, and the text not confident enough to overrule that: nothing to transcribe."""
        if self.no_speech_threshold is None or result.no_speech_prob <= self.no_speech_threshold:
            return False
        return self.logprob_threshold is None or result.avg_logprob <= self.logprob_threshold

    def needs_fallback(self, result: DecodingResult) -> bool:
        too_repetitive = self.compression_ratio_threshold is not None and result.compression_ratio > self.compression_ratio_threshold
        unsure = self.logprob_threshold is not None and result.avg_logprob < self.logprob_threshold
        return too_repetitive or (unsure and not self.is_silence(result))


NO_FALLBACK = FallbackRules(temperatures=(0.0,))


def decode_with_fallback(model: Whisper, mel: Optional[Tensor], options: DecodingOptions,
                         rules: FallbackRules = FallbackRules(), audio_lengths: Optional[Tensor] = None,
                         audio_features: Optional[Tensor] = None) -> List[DecodingResult]:
    """decode() at the first temperature; rows that need it are decoded again at the next one, and so on.
    Either mel or the encoder's audio_features (computed once for every temperature)."""
    if audio_features is None:
        mel = mel[None] if mel.ndim == 2 else mel
        lengths = None if audio_lengths is None else torch.as_tensor(audio_lengths, device=model.device)
        audio_features = model.embed_audio(mel.to(model.device, model.dtype), lengths)
    results: List[Optional[DecodingResult]] = [None] * audio_features.shape[0]
    pending = list(range(audio_features.shape[0]))
    for n, temperature in enumerate(rules.temperatures):
        last = n == len(rules.temperatures) - 1
        lengths = None if audio_lengths is None else torch.as_tensor(audio_lengths)[pending]
        outputs = decode(model, None, with_temperature(options, temperature), lengths, audio_features[pending])
        retry = []
        for row, result in zip(pending, outputs):
            results[row] = result
            if not last and rules.needs_fallback(result):
                retry.append(row)
        pending = retry
        if not pending:
            break
    return results

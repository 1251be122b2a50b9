"""int8 decoding (quantize.py): the product is its plain-PyTorch reference, and real speech keeps its words."""
import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from audio import load_audio
from data import list_utterances
from decoding import NO_FALLBACK, DecodingOptions
from evaluate import word_error_rate
from load import load_model
from model import MODEL_DIMS, Whisper
from quantize import Int8Weight, int8_for_decoding, int8_linear_reference
from tokenizer import tokenizer_for
from transcribe import clip_mels, load_model_for_decoding, transcribe_clips

GREEDY = DecodingOptions(language="en", without_timestamps=True)


@pytest.mark.parametrize("shape,with_bias", [((1, 384), True), ((3, 384), False), ((2, 7, 512), True)])
@torch.no_grad()
def test_the_int8_product_is_its_reference_and_not_the_float_one(shape, with_bias):
    torch.manual_seed(len(shape) + shape[-1])
    weight = torch.randn(1000, shape[-1]) * 0.05  # (N, K)
    bias = torch.randn(1000) * 0.1 if with_bias else None
    x = torch.randn(shape) * 2 + 0.3  # not centred: the zero point matters
    got = Int8Weight().linear(x, weight, bias)
    reference = int8_linear_reference(x, weight, bias)
    exact = F.linear(x, weight, bias)
    assert got.shape == exact.shape and got.dtype == torch.float32
    off_reference = (got - reference).abs().max().item()
    off_float = (got - exact).abs().max().item()
    assert off_reference < 1e-2  # a rounding tie may land one level apart
    assert 0.02 < off_float < 0.05 * exact.abs().max().item()  # it is int8, and close
    assert off_reference < off_float / 10


@torch.no_grad()
def test_a_rows_result_does_not_depend_on_the_rest_of_the_batch():
    torch.manual_seed(1)
    weight, bias = torch.randn(300, 64), torch.randn(300)
    quiet, loud = torch.randn(1, 64) * 0.01, torch.randn(5, 64) * 50  # one activation scale would round quiet away
    int8 = Int8Weight()
    alone = int8.linear(quiet, weight, bias)
    together = int8.linear(torch.cat([loud[:2], quiet, loud[2:]]), weight, bias)[2:3]
    assert torch.equal(alone, together)
    assert torch.allclose(alone, F.linear(quiet, weight, bias), rtol=0, atol=0.05)


@torch.no_grad()
def test_the_int8_copy_follows_the_weight():
    weight, x = torch.randn(64, 32), torch.randn(4, 32)
    int8 = Int8Weight()
    before = int8.linear(x, weight, None)
    weight.mul_(-2)  # an in-place update, as an optimiser step makes
    torch.testing.assert_close(int8.linear(x, weight, None), int8_linear_reference(x, weight), atol=1e-2, rtol=0)
    assert not torch.allclose(before, int8.linear(x, weight, None))


def test_training_and_other_dtypes_keep_the_float_path():
    torch.manual_seed(0)
    model = int8_for_decoding(Whisper(MODEL_DIMS["tiny.en"]), "all")
    layer = model.decoder.blocks[0].mlp[0]
    x = torch.randn(2, 3, 384)
    with torch.enable_grad():  # a gradient is needed: the plain product, exactly
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    with torch.no_grad():
        assert not torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    with pytest.raises(ValueError, match="float32"):
        int8_for_decoding(Whisper(MODEL_DIMS["tiny.en"]).to(torch.bfloat16))


@torch.no_grad()
def test_int8_with_a_shortlist_keeps_minus_infinity_off_the_list():
    torch.manual_seed(0)
    model = int8_for_decoding(Whisper(MODEL_DIMS["tiny.en"]).eval())
    hidden = torch.randn(1, 4, 384)
    full = model.decoder.logits_of(hidden)
    ids = sorted(torch.randperm(model.dims.n_vocab)[:2000].tolist())
    short = model.restrict_output(ids).decoder.logits_of(hidden)
    assert torch.isfinite(short[..., ids]).all()
    assert (torch.isneginf(short).sum(-1) == model.dims.n_vocab - len(ids)).all()
    torch.testing.assert_close(short[..., ids], full[..., ids], atol=2e-2, rtol=0)  # per-call activation scale


@torch.no_grad()
def test_int8_tiny_en_keeps_the_words_of_real_speech(data_dir):
    """Greedy transcripts of test-clean: int8 within 5 WER points of float32 (one word is ~2 points on these
    few utterances; RESULTS.md has the dev set, where every product in int8 costs 0.09); teacher-forced on the float
    transcript, int8 picks the same next token at nine positions in ten or more."""
    plain = load_model("tiny.en", device="cpu").optimize_for_decoding()
    int8 = int8_for_decoding(copy.deepcopy(plain), "all")  # the widest scope: the largest error
    utterances = [u for u in list_utterances(data_dir / "test-clean") if u.text]
    clips = [load_audio(u.audio) for u in utterances]
    references = [u.text for u in utterances]
    float_results = transcribe_clips(plain, clips, GREEDY, NO_FALLBACK)
    int8_results = transcribe_clips(int8, clips, GREEDY, NO_FALLBACK)
    float_wer = word_error_rate(references, [r.text for r in float_results])["wer"]
    int8_wer = word_error_rate(references, [r.text for r in int8_results])["wer"]
    assert int8_wer <= float_wer + 0.05, (float_wer, int8_wer)  # measured: 6.9 % and 10.3 %, two words

    tokenizer = tokenizer_for(plain, language="en", task="transcribe")
    prompt = list(tokenizer.sot_sequence_including_notimestamps)
    agree = total = 0
    for clip, result in zip(clips, float_results):
        tokens = torch.tensor([prompt + result.tokens])  # (1, T)
        mel = clip_mels([clip], plain.dims.n_mels, "cpu")  # (1, n_mels, 3000)
        picks = [model.logits(tokens, model.embed_audio(mel))[0, len(prompt) - 1:-1].argmax(-1)
                 for model in (plain, int8)]
        agree, total = agree + (picks[0] == picks[1]).sum().item(), total + len(result.tokens)
    assert agree / total >= 0.9, (agree, total)  # measured 72 of 78 here, 325 of 333 on 12 dev utterances


@pytest.mark.filterwarnings("ignore:bfloat16 has no hardware support")  # CPUs without it warn first
def test_int8_flag_on_a_bfloat16_model_exits_with_a_clear_error():
    args = SimpleNamespace(model="tiny.en", device="cpu", dtype="bfloat16", audio_ctx=None, audio_margin=None,
                           int8="output")
    with pytest.raises(SystemExit, match="--int8.*float32"):
        load_model_for_decoding(args)


def test_each_scope_quantises_its_products_and_no_other():
    def int8_names(scope):
        model = int8_for_decoding(Whisper(MODEL_DIMS["tiny.en"]), scope)
        return {name for name, m in model.named_modules() if isinstance(getattr(m, "inference_weight", None),
                                                                         Int8Weight)}

    output, decoder, every = int8_names("output"), int8_names("decoder"), int8_names("all")
    assert output == {"decoder"}  # the output projection, tied to the token embedding
    assert output < decoder < every
    assert all(n.startswith("decoder") for n in decoder) and "decoder.blocks.3.mlp.2" in decoder
    assert "encoder.blocks.0.attn.query" in every - decoder
    with pytest.raises(ValueError, match="unknown int8 scope"):
        int8_for_decoding(Whisper(MODEL_DIMS["tiny.en"]), "encoder")


def test_the_int8_flag_takes_a_scope():
    import argparse

    from transcribe import add_model_arguments

    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    assert "6.15 % WER" in " ".join(parser.format_help().split())  # each scope's measured cost, as --help says it
    assert parser.parse_args([]).int8 is None
    assert parser.parse_args(["--int8", "all"]).int8 == "all"
    with pytest.raises(SystemExit):
        parser.parse_args(["--int8", "encoder"])

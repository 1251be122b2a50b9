"""An output shortlist: the model multiplies by the rows of the tokens it may emit, and nothing else changes."""
import pytest
import torch

from audio import load_audio
from data import list_utterances
from decoding import NO_FALLBACK, DecodingOptions
from load import load_model, save_checkpoint
from model import MODEL_DIMS, Whisper
from student import output_shortlist
from transcribe import transcribe_clips
from weights import CheckpointError

GREEDY = DecodingOptions(language="en", without_timestamps=True)


def _random_model(seed=0):
    torch.manual_seed(seed)
    return Whisper(MODEL_DIMS["tiny.en"]).eval()


@pytest.mark.parametrize("optimized", [False, True])
@torch.no_grad()
def test_logits_are_the_full_ones_on_the_list_and_minus_infinity_elsewhere(optimized):
    model = _random_model()
    if optimized:  # oneDNN on CPU: the blocked copy of the shortlist's rows
        model.optimize_for_decoding()
    hidden = torch.randn(2, 5, model.dims.n_text_state)
    full = model.decoder.logits_of(hidden)
    ids = sorted(torch.randperm(model.dims.n_vocab)[:3000].tolist())
    model.restrict_output(ids)
    short = model.decoder.logits_of(hidden)
    kept = torch.zeros(model.dims.n_vocab, dtype=torch.bool)
    kept[ids] = True
    assert short.shape == full.shape and short.dtype == torch.float32
    torch.testing.assert_close(short[..., kept], full[..., kept], rtol=1e-5, atol=1e-5)
    assert torch.isneginf(short[..., ~kept]).all()
    assert model.output_ids == ids
    assert model.restrict_output(None).output_ids is None


def test_a_shortlisted_model_still_trains_its_rows():
    model = _random_model().train()
    model.restrict_output([5, 50256, 50300])
    logits = model.decoder.logits_of(torch.randn(1, 3, model.dims.n_text_state))
    logits[..., [5, 50256]].sum().backward()
    grad = model.decoder.token_embedding.weight.grad
    assert grad[5].abs().sum() > 0 and grad[50256].abs().sum() > 0 and grad[7].abs().sum() == 0


@torch.no_grad()
def test_a_list_holding_the_transcript_gives_the_same_transcript(data_dir):
    """Greedy decoding restricted to the tokens it emits anyway (and the special ones) emits the same."""
    model = load_model("tiny.en", device="cpu").optimize_for_decoding()
    clips = [load_audio(u.audio) for u in list_utterances(data_dir / "test-clean")[:2]]
    expected = transcribe_clips(model, clips, GREEDY, NO_FALLBACK)
    eot = 50256
    ids = output_shortlist([r.tokens for r in expected], eot, model.dims.n_vocab, frequent=500)
    assert len(ids) < 2500  # the projection shrinks from 51864 rows
    got = transcribe_clips(model.restrict_output(ids), clips, GREEDY, NO_FALLBACK)
    assert [r.tokens for r in got] == [r.tokens for r in expected]


def test_the_shortlist_holds_targets_specials_and_the_frequent_ids():
    ids = output_shortlist([[7000, 12], [45000]], eot=50256, n_vocab=51864, frequent=100)
    assert ids == sorted(set(range(100)) | {7000, 45000} | set(range(50256, 51864)))


def test_checkpoints_carry_the_shortlist(tmp_path):
    model = _random_model().restrict_output([1, 2, 50256, 50257])
    path = tmp_path / "student.pt"
    save_checkpoint(model, path)
    assert load_model(path, device="cpu").output_ids == [1, 2, 50256, 50257]
    save_checkpoint(model.restrict_output(None), path)
    assert load_model(path, device="cpu").output_ids is None
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["output_ids"] = [3, 999999]
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="output_ids"):
        load_model(path, device="cpu")

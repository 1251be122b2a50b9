"""The model is openai-whisper's model: same logits on the official weights, from every checkpoint format."""
import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import whisper  # test-only reference implementation

from data import list_utterances
from load import load_model, save_checkpoint
import model as model_module
from model import MODEL_DIMS, MultiHeadAttention, Whisper, onednn_linear_available, onednn_takes
from weights import CheckpointError, find_model_files, read_checkpoint

MODELS = ["tiny.en", "base"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=MODELS)
def loaded(request):
    """(our model, openai-whisper's model holding the same float32 weights)."""
    ours = load_model(request.param, device="cpu", dtype=torch.float32)
    reference = whisper.model.Whisper(whisper.model.ModelDimensions(**ours.dims.__dict__))
    reference.load_state_dict(ours.state_dict())
    return ours, reference.eval()


def _mels(data_dir, n=3):
    utterances = list_utterances(data_dir / "test-clean")[:n]
    audio = [torch.from_numpy(sf.read(u.audio, dtype="float32")[0]) for u in utterances]
    return torch.stack([whisper.log_mel_spectrogram(whisper.pad_or_trim(a)) for a in audio])


def _prompt(model: Whisper, n_text: int, seed: int = 0) -> torch.Tensor:
    """A start-of-transcript prompt followed by random text tokens, (3, len)."""
    sot = [50257, 50362] if not model.is_multilingual else [50258, 50259, 50359, 50363]
    text = torch.randint(0, 50000, (3, n_text), generator=torch.Generator().manual_seed(seed))
    return torch.cat([torch.tensor([sot] * 3), text], dim=1)


@torch.no_grad()
def test_logits_match_openai_whisper(loaded, data_dir):
    ours, reference = loaded
    mel = _mels(data_dir)
    tokens = _prompt(ours, 20)
    audio = ours.embed_audio(mel)
    assert (audio - reference.embed_audio(mel)).abs().max() <= 1e-3
    diff = (ours.logits(tokens, audio) - reference.logits(tokens, reference.embed_audio(mel))).abs().max()
    assert diff <= 1e-3, f"max |logit diff| {diff}"


@torch.no_grad()
def test_kv_cache_steps_equal_full_forward(loaded, data_dir):
    ours, _ = loaded
    audio = ours.embed_audio(_mels(data_dir))
    tokens = _prompt(ours, 8, seed=1)
    full = ours.logits(tokens, audio)
    cache = ours.new_cache(batch_size=3, max_length=tokens.shape[1])
    steps = [ours.logits(tokens[:, :5], audio, cache)]  # the prompt at once, then one token at a time
    steps += [ours.logits(tokens[:, i : i + 1], audio, cache) for i in range(5, tokens.shape[1])]
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-3
    with pytest.raises(ValueError, match="KV cache holds"):
        ours.logits(tokens[:, :1], audio, cache)


@torch.no_grad()
def test_optimized_for_decoding_takes_another_path_to_the_same_logits(loaded, data_dir):
    ours, _ = loaded
    fast = copy.deepcopy(ours).optimize_for_decoding()
    assert onednn_linear_available() and fast.decoder.inference_weight  # else this test would compare a path with itself
    mel, tokens = _mels(data_dir), _prompt(ours, 8)
    audio = ours.embed_audio(mel)

    def relative_error(got, expected):
        return ((got - expected).abs().max() / expected.abs().max()).item()

    assert 0 < relative_error(fast.embed_audio(mel), audio) <= 5e-4  # 1.3e-4 seen: float32 sums reordered
    plain_logits, fast_logits = ours.logits(tokens, audio), fast.logits(tokens, audio)
    assert 0 < relative_error(fast_logits, plain_logits) <= 1e-4
    cache = fast.new_cache(batch_size=3, max_length=tokens.shape[1])  # the decoding step: one row per product
    steps = [fast.logits(tokens[:, :5], audio, cache)]
    steps += [fast.logits(tokens[:, i : i + 1], audio, cache) for i in range(5, tokens.shape[1])]
    assert relative_error(torch.cat(steps, dim=1), plain_logits) <= 1e-4


@torch.no_grad()
def test_blocked_weights_follow_updates_to_the_weights(data_dir):
    """optimize_for_decoding keeps a copy of each weight in oneDNN's layout: after an in-place update
    (an optimizer step), a load_state_dict or a dtype change, inference must use the new weights."""
    model = load_model("tiny.en", device="cpu", dtype=torch.float32)
    original = copy.deepcopy(model.state_dict())
    fast = copy.deepcopy(model).optimize_for_decoding()
    mel, tokens = _mels(data_dir, n=1), _prompt(model, 5)[:1]

    def relative_error(a, b):  # b's logits against a's
        expected = a.logits(tokens, a.embed_audio(mel.to(a.dtype)))
        got = b.logits(tokens, b.embed_audio(mel.to(b.dtype)))
        return ((got - expected).abs().max() / expected.abs().max()).item()

    assert relative_error(model, fast) <= 1e-4  # the blocked copies are made here
    for p, q in zip(model.parameters(), fast.parameters()):  # in place, as an optimizer step
        p.mul_(0.9)
        q.mul_(0.9)
    assert relative_error(model, fast) <= 1e-4
    model.load_state_dict(original)
    fast.load_state_dict(original)
    assert relative_error(model, fast) <= 1e-4
    assert relative_error(model.to(torch.bfloat16), fast.to(torch.bfloat16)) <= 3e-2  # bfloat16 rounding
    # Which bfloat16 path ran: oneDNN's blocked copy where the CPU takes it, plain F.linear elsewhere.
    onednn_bf16 = onednn_takes(torch.bfloat16)
    print(f"bfloat16 path: {'oneDNN blocked weights' if onednn_bf16 else 'F.linear fallback'} "
          f"({torch.backends.cpu.get_cpu_capability()})")
    blocked = fast.decoder.inference_weight._blocked
    assert (blocked.dtype == torch.bfloat16) == onednn_bf16  # else the copy is still the float32 one


def _decoder_logits(model, tokens, audio):
    return model.logits(tokens, audio.to(model.dtype))


@torch.no_grad()
def test_bfloat16_falls_back_to_plain_linear_where_onednn_cannot_take_it(monkeypatch):
    """Any CPU: with oneDNN refusing bfloat16, optimize_for_decoding warns once and every layer runs
    F.linear, giving the plain bfloat16 model's logits exactly."""
    monkeypatch.setattr(model_module, "onednn_takes", lambda dtype: dtype == torch.float32)
    torch.manual_seed(0)
    dims = model_module.ModelDimensions(80, 1500, 64, 2, 1, 51864, 448, 64, 2, 2)
    plain = Whisper(dims).to(torch.bfloat16).eval()
    with pytest.warns(UserWarning, match="bfloat16 has no hardware support on this CPU"):
        fast = copy.deepcopy(plain).optimize_for_decoding()
    tokens, audio = torch.randint(0, 50000, (2, 5)), torch.randn(2, 1500, 64)
    assert torch.equal(_decoder_logits(fast, tokens, audio), _decoder_logits(plain, tokens, audio))
    assert fast.decoder.inference_weight._blocked is None  # no reorder was attempted


@pytest.mark.parametrize("reorder_works", [True, False])
def test_onednn_dtype_support_is_found_by_trying_the_reorder(monkeypatch, reorder_works):
    """The decision comes from trying oneDNN's reorder once: mocked to work, and to raise as it does on a
    CPU without AVX-512 or AVX-NE-CONVERT."""
    calls = []

    def reorder(weight, groups):
        calls.append(weight.dtype)
        if not reorder_works:
            raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert")
        return weight

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", reorder)
    onednn_takes.cache_clear()
    try:
        assert onednn_takes(torch.bfloat16) is reorder_works
        assert onednn_takes(torch.bfloat16) is reorder_works
        assert calls == [torch.bfloat16]  # tried once, then remembered
    finally:
        onednn_takes.cache_clear()  # the real answer for the tests after this one


def test_single_query_cross_attention_in_half_precision_on_cpu():
    """Decoding steps in bfloat16 on CPU attend to the audio by two matmuls, not PyTorch's flash kernel."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 8, 1, 64), torch.randn(2, 8, 1500, 64), torch.randn(2, 8, 1500, 64)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    got = MultiHeadAttention._attend_audio(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert got.dtype == torch.bfloat16 and got.shape == expected.shape
    assert (got.float() - expected).abs().max() <= 2e-2 * expected.abs().max()


def test_optimized_model_still_trains():
    """oneDNN's linear has no backward: with gradients on, the optimized model takes F.linear."""
    model = Whisper(MODEL_DIMS["tiny.en"]).optimize_for_decoding()
    tokens = torch.randint(0, 50000, (2, 6))
    loss = model(torch.randn(2, 80, 3000), tokens).logsumexp(-1).mean()
    loss.backward()
    grads = [p.grad for p in model.decoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_model_built_from_dimensions_is_set_by_the_seed():
    """Every parameter is drawn, none left as whatever memory torch.empty returned (that gave NaN in CI)."""
    def build():
        torch.manual_seed(0)
        return Whisper(MODEL_DIMS["tiny.en"]).state_dict()
    first, second = build(), build()
    for name, tensor in first.items():
        assert torch.isfinite(tensor).all(), name
        assert torch.equal(tensor, second[name]), name


@torch.no_grad()
def test_half_precision_runs_on_cpu(data_dir):
    """bfloat16 weights on CPU: LayerNorm must cast its parameters as well as its input."""
    model = load_model("tiny.en", device="cpu", dtype=torch.bfloat16)
    reference = load_model("tiny.en", device="cpu", dtype=torch.float32)
    mel, tokens = _mels(data_dir, n=1), _prompt(reference, 4)[:1]
    logits = model.logits(tokens, model.embed_audio(mel.bfloat16()))
    expected = reference.logits(tokens, reference.embed_audio(mel))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.8


def test_dimensions_match_published_table():
    for name in MODELS:
        dims, _, extra = read_checkpoint(name)
        assert extra == {}  # official weights carry nothing beyond dims and tensors
        assert dims == MODEL_DIMS[name].__dict__


def test_openai_checkpoint_round_trip(tmp_path):
    model = load_model("tiny.en", device="cpu")
    path = tmp_path / "tiny.en.pt"
    save_checkpoint(model, path)
    again = load_model(path, device="cpu")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    # openai-whisper reads what we write
    checkpoint = torch.load(path, weights_only=True)
    reference = whisper.model.Whisper(whisper.model.ModelDimensions(**checkpoint["dims"]))
    reference.load_state_dict(checkpoint["model_state_dict"])


@torch.no_grad()
def test_hugging_face_folder_gives_the_same_model(tmp_path):
    """A real transformers model, saved as config.json + model.safetensors, loads as the same function."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(
        vocab_size=51864, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256,
        max_source_positions=1500, max_target_positions=448,
    )
    torch.manual_seed(0)
    hf = WhisperForConditionalGeneration(config).eval()
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path, device="cpu")
    mel, tokens = torch.randn(2, 80, 3000), torch.tensor([[50257, 50362, 400, 500]] * 2)
    expected = hf(input_features=mel, decoder_input_ids=tokens).logits
    assert (ours(mel, tokens) - expected).abs().max() <= 1e-4


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="unknown model 'tiny.xx'"):
        load_model("tiny.xx")
    with pytest.raises(FileNotFoundError, match="not installed"):
        load_model("large-v2")  # a real name whose weights are not here


def test_corrupt_and_truncated_weights_are_clear_errors(tmp_path):
    (source,) = find_model_files("tiny.en")
    truncated = tmp_path / "truncated" / "model.bin"
    truncated.parent.mkdir()
    truncated.write_bytes(source.read_bytes()[: 5_000_000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(truncated.parent)

    garbage = tmp_path / "model.bin"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError):
        load_model(garbage)

    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_model(not_a_checkpoint)


def test_shape_mismatch_names_the_tensor(tmp_path):
    model = load_model("tiny.en", device="cpu")
    state = model.state_dict()
    state["decoder.ln.weight"] = torch.ones(7)
    path = tmp_path / "bad.pt"
    torch.save({"dims": model.dims.__dict__, "model_state_dict": state}, path)
    with pytest.raises(CheckpointError, match=r"decoder\.ln\.weight: \(7,\)"):
        load_model(path)
    del state["decoder.ln.weight"]
    torch.save({"dims": model.dims.__dict__, "model_state_dict": state}, path)
    with pytest.raises(CheckpointError, match=r"missing \(1\): decoder\.ln\.weight"):
        load_model(path)


def test_split_base_package_needs_both_parts(tmp_path):
    parts = find_model_files("base")
    assert [p.name for p in parts] == ["model.bin.part1", "model.bin.part2"]
    folder = tmp_path / "base"
    folder.mkdir()
    shutil.copy(parts[0], folder / "model.bin.part1")
    with pytest.raises(FileNotFoundError, match="holds no Whisper checkpoint"):
        load_model(folder)


@pytest.mark.parametrize("optimized", [False, True])
@torch.no_grad()
def test_static_step_equals_ordinary_step(loaded, data_dir, optimized):
    """The fixed-shape step (what a CUDA graph replays) computes the same logits at every position, on the
    plain path and on the inference path (oneDNN, the stacked q/k/v product)."""
    ours, _ = loaded
    model = copy.deepcopy(ours).optimize_for_decoding() if optimized else ours
    audio = ours.embed_audio(_mels(data_dir))
    tokens = _prompt(ours, 6, seed=2)
    prompt_length = tokens.shape[1] - 6
    expected = ours.logits(tokens, audio)[:, prompt_length:]
    cache = model.new_cache(batch_size=3, max_length=model.dims.n_text_ctx)
    model.logits(tokens[:, :prompt_length], audio, cache)
    steps = []
    for i in range(prompt_length, tokens.shape[1]):
        steps.append(model.decoder.step(tokens[:, i : i + 1], torch.tensor([cache.length]), cache))
        cache.length += 1
    difference = (torch.cat(steps, dim=1) - expected).abs().max()
    if optimized:
        assert (difference / expected.abs().max()).item() <= 1e-4  # float32 sums reordered, as above
        assert model.decoder.blocks[0].attn.fused_qkv._weight is not None  # the stacked product ran
    else:
        assert difference <= 1e-3


@torch.no_grad()
def test_stacked_qkv_product_is_the_three_products_and_follows_the_weights():
    """FusedLinear: the decoder's self-attention q, k, v in one product, as the three layers give them (int8:
    bit for bit, per-row scales do not see the stacking), rebuilt after an in-place update, unused in
    training, and absent from the state_dict."""
    from quantize import int8_for_decoding

    torch.manual_seed(0)
    dims = model_module.ModelDimensions(80, 1500, 64, 2, 1, 51864, 448, 64, 2, 2)
    plain = Whisper(dims).eval()
    fast = copy.deepcopy(plain).optimize_for_decoding()
    attn, x = fast.decoder.blocks[0].attn, torch.randn(2, 3, 64)
    layers = (attn.query, attn.key, attn.value)
    separate = [torch.nn.functional.linear(x, layer.weight, layer.bias) for layer in layers]
    stacked = attn._project_qkv(x)
    assert attn.fused_qkv._weight.shape == (3 * 64, 64)
    for got, expected in zip(stacked, separate):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    attn.key.weight.mul_(0.5)  # in place, as an optimizer step
    torch.testing.assert_close(attn._project_qkv(x)[1], 0.5 * separate[1], rtol=1e-5, atol=1e-5)
    with torch.enable_grad():
        assert not attn.fused_qkv.takes(x, layers)  # oneDNN's product has no backward
    assert fast.state_dict().keys() == plain.state_dict().keys()

    int8 = int8_for_decoding(copy.deepcopy(fast), "decoder")
    attn = int8.decoder.blocks[0].attn
    layers = (attn.query, attn.key, attn.value)
    for got, alone in zip(attn._project_qkv(x), (layer(x) for layer in layers)):
        assert torch.equal(got, alone)
    assert type(attn.fused_qkv._inference_weight).__name__ == "Int8Weight"


def test_the_model_imports_nothing_of_ours():
    """model.py is the architecture alone: importing it loads no other module of the project."""
    ours = sorted({p.stem for p in ROOT.glob("*.py")} | {"kernels", "benchmarks"})
    code = f"import sys, model; print(sorted(set(sys.modules) & set({ours!r}) - {{'model'}}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"

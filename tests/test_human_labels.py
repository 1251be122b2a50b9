"""Human labels in Whisper's style (human_labels.py): the reference's words, the teacher's writing."""
import pytest

from evaluate import normalize
from human_labels import human_text, human_tokens
from tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer(multilingual=False)


@pytest.mark.parametrize("teacher, reference, target", [
    # agreement after normalisation keeps the teacher's form: title, numeral, spelling, punctuation
    (" Mr. Brown said 21 times.", "MISTER BROWN SAID TWENTY ONE TIMES", " Mr. Brown said 21 times."),
    (" The colour, grey.", "THE COLOR GRAY", " The colour, grey."),
    # a wrong word: the reference's, lower case, with the teacher's punctuation after it
    (" The cat sad, on the mat.", "THE CAT SAT ON THE MAT", " The cat sat, on the mat."),
    (" Hello. Word is out.", "HELLO WORLD IS OUT", " Hello. World is out."),  # capitalised at a sentence start
    (" He said so.", "I SAID SO", " I said so."),
    (" But Maria still missing.", "BUT MARIA'S STILL MISSING", " But Maria's still missing."),  # a name stays one
    # words the teacher missed are inserted; words it added are dropped, their punctuation kept
    (" Hello, world.", "HELLO WORLD I'M HERE", " Hello, world. I'm here"),
    (" Um, the cat, you know, sat.", "THE CAT SAT", " The cat, sat."),
    (" This is extra stuff.", "THIS IS", " This is."),
    ("", "GO ON", " Go on"),
])
def test_the_reference_in_the_teachers_style(teacher, reference, target):
    assert human_text(teacher, reference) == target
    assert normalize(human_text(teacher, reference)) == normalize(reference)  # always the reference's words


def test_a_target_that_agrees_keeps_the_teachers_tokens(tokenizer):
    tokens = tokenizer.encode(" Mr. Brown said 21 times.")
    assert human_tokens(tokenizer, tokens, "MISTER BROWN SAID TWENTY ONE TIMES", timestamps=False) == tokens
    fixed = human_tokens(tokenizer, tokenizer.encode(" Mr. Brown sad, 21 times."), "MISTER BROWN SAID TWENTY ONE TIMES",
                         timestamps=False)
    assert tokenizer.decode(fixed) == " Mr. Brown said twenty one times."  # a gap of unequal sides: replaced whole


def test_timestamped_targets_keep_the_teachers_segments(tokenizer):
    ts = lambda seconds: tokenizer.timestamp_begin + round(seconds / 0.02)  # noqa: E731
    teacher = [ts(0), *tokenizer.encode(" The cat sad."), ts(1.5), ts(1.5), *tokenizer.encode(" Uh, on the mat."), ts(3.0)]
    fixed = human_tokens(tokenizer, teacher, "THE CAT SAT ON A MAT", timestamps=True)
    assert fixed == [ts(0), *tokenizer.encode(" The cat sat."), ts(1.5), ts(1.5), *tokenizer.encode(" On a mat."), ts(3.0)]
    assert human_tokens(tokenizer, teacher[:-1], "THE CAT SAD UH ON THE MAT", timestamps=True) == teacher[:-1]
    # a segment whose every word the reference lacks goes, timestamps and all
    extra = teacher + [ts(3.0), *tokenizer.encode(" Thank you."), ts(4.0)]
    assert human_tokens(tokenizer, extra, "THE CAT SAT ON A MAT", timestamps=True) == fixed


def test_real_utterances_where_the_teacher_errs(data_dir, tmp_path):
    """tiny.en mishears one word in each; the target is the reference's word in the teacher's sentence."""
    import torch

    from cache import ArrayCache
    from data import list_utterances
    from load import load_model
    from prepare import Example, label_examples, labelling_key, with_human_labels
    from tokenizer import tokenizer_for

    teacher = load_model("tiny.en", device="cpu", dtype=torch.float32)
    wanted = {"118-47824-0022": "You see, I spent a good deal in Smithtown yesterday.",
              "3664-178355-0019": "They prepared to depart, having declined an invitation to pass the night there."}
    utterances = [u for u in list_utterances(data_dir / "train-clean-5", speakers=["118", "3664"]) if u.id in wanted]
    examples = [Example(u.id, (u.audio,), u.text, False) for u in utterances]
    labelled, _ = label_examples(teacher, examples, ArrayCache(tmp_path, labelling_key(teacher)), 2, log=lambda *a: None)
    assert {x.example.id: x.text for x in labelled} == {
        "118-47824-0022": "You see, I spent a good deal on Smithtown yesterday.",
        "3664-178355-0019": "They prepare to depart, having declined an invitation to pass the night there."}
    tokenizer = tokenizer_for(teacher, language="en", task="transcribe")
    relabelled = with_human_labels(labelled, tokenizer)
    assert {x.example.id: x.text for x in relabelled} == wanted
    assert all(x.human and tokenizer.decode(x.tokens) == " " + x.text for x in relabelled)
    assert len({x.target_item for x in labelled + relabelled}) == 4  # another target, another cache item
    unlabelled = [replace_reference(x) for x in labelled]
    assert with_human_labels(unlabelled, tokenizer) == unlabelled  # no reference: the teacher's transcript


def replace_reference(x):
    from dataclasses import replace

    return replace(x, example=replace(x.example, reference=None))

"""refmodel's tokenization against TRL 1.16's own dataset preparation, token for token.

The oracle is TRL itself: ``DPOTrainer._prepare_dataset`` / ``KTOTrainer._prepare_dataset`` /
``SFTTrainer._prepare_dataset`` (the code that runs inside the trainers' ``__init__``, called here on a
stand-in ``self`` that holds just the attributes those methods read) followed by TRL's data collators
(``DataCollatorForPreference``, ``DataCollatorForUnpairedPreference``), which do DPO's and KTO's
truncation. ``test_prepare_dataset_shortcut_is_the_trainer`` checks the stand-in against a real
``DPOTrainer`` built on a tiny model. Every record of every case is compared: the sequences the model
is fed (ids), the score masks (TRL's completion mask / labels, position 0 excluded since neither side
scores the first token), and which records are dropped.
"""

from __future__ import annotations

import logging
import random
import warnings
from types import SimpleNamespace

import pytest

from refmodel.data import collate_examples, extract_prompt, load_examples, tokenize_record
from refmodel.errors import DataFormatError
from refmodel.testing import TOKENIZER_KINDS, make_tokenizer, preference_pairs

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer  # noqa: E402
from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference, KTOTrainer  # noqa: E402
from trl.trainer.sft_trainer import SFTTrainer  # noqa: E402

datasets.disable_progress_bars()
logging.getLogger("trl").setLevel(logging.ERROR)

SHORT = 10  # tokens: some prompts fill it (dropped), most sequences are cut


@pytest.fixture(scope="module", params=TOKENIZER_KINDS)
def tok(request):
    return make_tokenizer(request.param)


def _text_rows(n: int = 24, seed: int = 0) -> list[dict]:
    """Preference pairs in both TRL spacing conventions (completion with and without a leading space),
    some prompts padded out to fill ``SHORT``, one prompt ending in a space."""
    rng = random.Random(seed)
    rows = []
    for i, r in enumerate(preference_pairs(n, seed=seed)):
        sep = " " if i % 2 else ""
        prompt = r["prompt"] if i % 5 else "so " * rng.randint(4, 8) + r["prompt"]
        if i == 3:
            prompt += " "
        rows.append({"prompt": prompt, "chosen": sep + r["chosen"], "rejected": sep + r["rejected"]})
    return rows


def _conversational(rows: list[dict]) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": r["prompt"].strip()}],
             "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
             "rejected": [{"role": "assistant", "content": r["rejected"].strip()}]} for r in rows]


def _rows(form: str) -> list[dict]:
    rows = _text_rows()
    return rows if form == "text" else _conversational(rows)


def _config(cls, max_length, **kw):
    warnings.filterwarnings("ignore", category=FutureWarning)  # keep_end and training_args deprecations
    return cls(output_dir="unused", max_length=max_length, report_to=[], use_cpu=True, bf16=False, **kw)


def _trl_dpo(rows, tok, max_length, truncation_mode):
    args = _config(trl.DPOConfig, max_length, truncation_mode=truncation_mode)
    ds = DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tok), datasets.Dataset.from_list(rows), tok,
                                     args, "train")
    collator = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=max_length,
                                         truncation_mode=truncation_mode)
    out = []
    for ex in ds:  # one example per call; chosen and rejected are padded to one width: cut by attention
        b = collator([{k: ex[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}])
        out.append([(ids[a.bool()].tolist(), m[a.bool()].tolist())
                    for ids, m, a in zip(b["input_ids"], b["completion_mask"], b["attention_mask"], strict=True)])
    return ds, out


def _trl_kto(rows, tok, max_length):
    args = _config(trl.KTOConfig, max_length)
    self = SimpleNamespace(_tokenizer=tok, calculate_KL=False, desirable_weight=1.0, undesirable_weight=1.0)
    ds = KTOTrainer._prepare_dataset(self, datasets.Dataset.from_list(rows), tok, args, "train")
    collator = DataCollatorForUnpairedPreference(pad_token_id=tok.pad_token_id, max_length=max_length)
    out = []
    for ex in ds:
        batch = collator([{k: ex[k] for k in ("prompt_ids", "completion_ids", "label")}])
        out.append(([(batch["input_ids"][0].tolist(), batch["completion_mask"][0].tolist())], bool(ex["label"])))
    return out


def _trl_sft(rows, tok, max_length, truncation_mode):
    args = _config(trl.SFTConfig, max_length, truncation_mode=truncation_mode)
    self = SimpleNamespace(_tokenizer=tok, completion_only_loss=True, chat_template=None)
    ds = SFTTrainer._prepare_dataset(self, datasets.Dataset.from_list(rows), tok, args, False, None, "train")
    return [[(ex["input_ids"], [int(lab != -100) for lab in ex["labels"]])] for ex in ds]


def _ours(rows, tok, max_length, truncation_mode="keep_start"):
    examples = load_examples(rows, tok, max_length=max_length, truncation_mode=truncation_mode)
    return examples, [ex.sequences() for ex in examples]


def _same(trl_seqs, our_seqs):
    assert len(our_seqs) == len(trl_seqs), "a different set of records was dropped"
    for i, (theirs, ours) in enumerate(zip(trl_seqs, our_seqs, strict=True)):
        assert [ids for ids, _ in ours] == [ids for ids, _ in theirs], f"record {i}: token ids differ"
        assert [[bool(x) for x in m[1:]] for _, m in ours] == [[bool(x) for x in m[1:]] for _, m in theirs], \
            f"record {i}: score masks differ"


SETTINGS = [(None, "keep_start"), (SHORT, "keep_start"), (SHORT, "keep_end")]


@pytest.mark.parametrize("form", ["text", "conversational"])
@pytest.mark.parametrize("max_length,mode", SETTINGS)
def test_preference_matches_dpo_trainer(tok, form, max_length, mode):
    rows = _rows(form)
    ds, theirs = _trl_dpo(rows, tok, max_length, mode)
    examples, ours = _ours(rows, tok, max_length, mode)
    _same(theirs, ours)
    if max_length is not None:  # the cases do exercise dropping (keep_start only) and truncation
        assert (len(ours) < len(rows)) == (mode == "keep_start")
        assert all(len(ids) == max_length for seqs in ours for ids, _ in seqs)
    if max_length is None:  # the dataset-level columns too: prompt / chosen / rejected split
        for ex, row in zip(examples, ds, strict=True):
            assert list(ex.prompt_ids) == row["prompt_ids"]
            assert [list(c) for c in ex.completions] == [row["chosen_ids"], row["rejected_ids"]]


@pytest.mark.parametrize("form", ["text", "conversational"])
def test_implicit_prompt_preference_matches_dpo_trainer(tok, form):
    # text: strings concatenated; conversational: the prompt messages, then the reply
    rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in _rows(form)]
    _, theirs = _trl_dpo(rows, tok, None, "keep_start")
    _same(theirs, _ours(rows, tok, None)[1])


@pytest.mark.parametrize("form", ["text", "conversational"])
@pytest.mark.parametrize("max_length", [None, SHORT])
def test_unpaired_matches_kto_trainer(tok, form, max_length):
    rows = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
            for r in _rows(form) for side in ("chosen", "rejected")]
    theirs = _trl_kto(rows, tok, max_length)
    examples, ours = _ours(rows, tok, max_length)
    _same([s for s, _ in theirs], ours)
    assert [ex.label for ex in examples] == [label for _, label in theirs]
    # KTOTrainer always truncates the end: truncation_mode does not apply to unpaired data
    assert _ours(rows, tok, max_length, "keep_end")[1] == ours


@pytest.mark.parametrize("form", ["text", "conversational"])
@pytest.mark.parametrize("max_length,mode", SETTINGS)
def test_prompt_completion_matches_sft_trainer(tok, form, max_length, mode):
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in _rows(form)]
    _same(_trl_sft(rows, tok, max_length, mode), _ours(rows, tok, max_length, mode)[1])


@pytest.mark.parametrize("form", ["text", "conversational"])
def test_language_modeling_matches_sft_trainer(tok, form):
    rows = [{"text": r["prompt"] + r["chosen"]} if form == "text" else {"messages": r["prompt"] + r["chosen"]}
            for r in _rows(form)]
    for max_length, mode in SETTINGS:
        _same(_trl_sft(rows, tok, max_length, mode), _ours(rows, tok, max_length, mode)[1])


def test_kinds_really_differ():
    """The tokenizer kinds exercise different rules: BOS, EOS after the prompt, merges at the boundary."""
    row = {"prompt": "what is 1 plus 2 ?", "chosen": "sure , it is 3 .", "rejected": "it is 4 ."}
    got = {k: tokenize_record(row, make_tokenizer(k)) for k in TOKENIZER_KINDS}
    t = {k: make_tokenizer(k) for k in TOKENIZER_KINDS}
    assert got["plain"].prompt_ids[0] != t["plain"].bos_token_id
    assert got["bos"].prompt_ids[0] == t["bos"].bos_token_id
    # BOS+EOS: the EOS the post-processor puts after the prompt alone is left out (TRL's common prefix),
    # and every completion ends in the appended EOS string plus the post-processor's EOS.
    assert got["bos_eos"].prompt_ids == got["bos"].prompt_ids
    assert got["bos_eos"].completions[0][-2:] == (3, 3)
    # Metaspace merges "?" with the next word ("▁?sure"), so the prompt loses its last token
    assert len(got["metaspace"].prompt_ids) == len(t["metaspace"](row["prompt"])["input_ids"]) - 1


def test_extract_prompt_keeps_trl_quirks():
    from trl.data_utils import extract_prompt as trl_extract

    cases = [("The sky is blue.", "The sky is green."), ("ab", "abc"), ("same", "same"), (" x", "y"),
             ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
              [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}])]
    for c, r in cases:
        want = trl_extract({"chosen": c, "rejected": r})
        assert extract_prompt(c, r) == (want["prompt"], want["chosen"], want["rejected"])
    with pytest.raises(DataFormatError, match="empty"):
        extract_prompt("", "x")


def test_collate_is_trls_preference_collator():
    tok = make_tokenizer("bos")
    rows = _text_rows(6)
    examples = load_examples(rows, tok, max_length=None)
    ds, _ = _trl_dpo(rows, tok, None, "keep_start")
    theirs = DataCollatorForPreference(pad_token_id=tok.pad_token_id)(
        [{k: ex[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for ex in ds])
    ours = collate_examples(examples, tok.pad_token_id)
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
    assert ours["attention_mask"].tolist() == theirs["attention_mask"].tolist()
    assert ours["score_mask"][:, 1:].tolist() == theirs["completion_mask"][:, 1:].bool().tolist()


@pytest.mark.slow
def test_prepare_dataset_shortcut_is_the_trainer(tmp_path):
    """A real DPOTrainer on a tiny model prepares the same dataset as the stand-in ``self`` above."""
    from refmodel.testing import load_tiny, make_tiny_model

    model, tok = load_tiny(make_tiny_model("llama", tmp_path / "m", tokenizer="bos_eos"))
    rows = _text_rows(8)
    trainer = trl.DPOTrainer(model=model, ref_model=None, args=_config(trl.DPOConfig, SHORT),
                             train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    ds, _ = _trl_dpo(rows, tok, SHORT, "keep_start")
    cols = ("prompt_ids", "chosen_ids", "rejected_ids")
    assert [[r[c] for c in cols] for r in trainer.train_dataset] == [[r[c] for c in cols] for r in ds]


@pytest.mark.parametrize("form", ["text", "conversational"])
def test_prompt_only_matches_grpo_trainer(tok, form):
    from trl.trainer.grpo_trainer import GRPOTrainer

    from refmodel.data import tokenize_prompt

    prompts = [r["prompt"] for r in _rows(form)]
    self = SimpleNamespace(_is_vlm=False, environment_factories=None, processing_class=tok, tools=None,
                           chat_template=None, chat_template_kwargs={})
    theirs, _, _ = GRPOTrainer._tokenize_prompts(self, prompts)
    assert [tokenize_prompt(p, tok) for p in prompts] == [list(t) for t in theirs]


def test_prompt_records_and_bad_prompts():
    """Prompt-only records tokenize like their prompt (record ``tools`` reach the chat template); bad
    prompts raise DataFormatError naming the prompt."""
    from refmodel.data import tokenize_prompt, tokenize_prompts

    tok = make_tokenizer("byte_bpe_bos_eos")
    chat = [{"role": "user", "content": "what comes after 4"}]
    assert tokenize_prompts([{"prompt": "so"}, "so", {"prompt": chat}, chat], tok) == [
        tokenize_prompt("so", tok)] * 2 + [tokenize_prompt(chat, tok)] * 2
    tok.chat_template = "{{ tools | length if tools else 0 }}" + tok.chat_template
    assert tokenize_prompt({"prompt": chat, "tools": '[{"name": "f"}]'}, tok) == (
        tok("1", add_special_tokens=False)["input_ids"] + tokenize_prompt(chat, tok)[1:])
    for bad, match in (({"question": "x"}, "prompt 1: a prompt-only record needs a 'prompt' field"),
                       ({"prompt": 3}, "prompt 1: a prompt must be text or a list"),
                       (" ", "prompt 1: the prompt is empty after tokenization")):
        with pytest.raises(DataFormatError, match=match):
            tokenize_prompts(["so", bad], make_tokenizer("plain"))

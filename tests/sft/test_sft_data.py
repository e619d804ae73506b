"""SFT data path (single process, no Megatron): record validation, image skips, the TRM
prompt/target contract with the client, policy warm-start targets, collation, configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer(sft_case):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(sft_case["model"])


@pytest.fixture(scope="module")
def builder(sft_case, tokenizer):
    from sophiavl_mcore.trainer.sft.data import ExampleBuilder, image_config_for

    return ExampleBuilder(tokenizer, image_config_for(sft_case["model"]), max_seq_len=2048)


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


GOOD = {"problem_id": 7, "problem": "What is shown?", "path": "a.png",
        "reasoning": "A red square.", "score": 0.5}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"reasoning": None}, "missing field 'reasoning' or 'response'"),
        ({"reasoning": "   "}, "field 'reasoning' must be a non-empty string"),
        ({"score": 1.5}, "field 'score' is 1.5; expected a number in [0, 1]"),
        ({"score": -0.1}, "field 'score' is -0.1; expected a number in [0, 1]"),
        ({"score": "high"}, "field 'score' must be a number in [0, 1], got 'high'"),
        ({"problem": None}, "missing field 'problem' or 'question'"),
        ({"path": 3}, "field 'path' must be a non-empty string path"),
    ],
)
def test_bad_record_names_file_record_and_field(tmp_path, change, expected):
    from sophiavl_mcore.data.records import RecordError
    from sophiavl_mcore.trainer.sft.data import load_thinking_records

    bad = {k: v for k, v in {**GOOD, "problem_id": 9, **change}.items() if v is not None}
    path = _write(tmp_path / "t.jsonl", [GOOD, {**GOOD, "problem_id": 8}, bad])
    with pytest.raises(RecordError) as err:
        load_thinking_records(path)
    msg = str(err.value)
    assert f"{path}:3" in msg and "problem_id=9" in msg, msg
    assert expected in msg, msg


def test_duplicate_ids_and_aliases(tmp_path):
    from sophiavl_mcore.data.records import RecordError
    from sophiavl_mcore.trainer.sft.data import load_thinking_records

    with pytest.raises(RecordError, match="problem_id '7' appears twice"):
        load_thinking_records(_write(tmp_path / "d.jsonl", [GOOD, GOOD]))
    alias = {"question": "Q?", "image": "x.png", "response": "R.", "score": "0.3"}
    recs = load_thinking_records(_write(tmp_path / "a.jsonl", [alias]), image_root="/imgs")
    assert (recs[0].problem, recs[0].reasoning, recs[0].score) == ("Q?", "R.", 0.3)
    assert recs[0].image_path == "/imgs/x.png" and recs[0].problem_id == "0"


def test_bad_images_are_skipped_and_counted(tmp_path, sft_case, tokenizer):
    from sophiavl_mcore.trainer.sft.data import (
        ExampleBuilder,
        image_config_for,
        load_thinking_records,
    )

    img_dir = sft_case["root"] / "images"
    (tmp_path / "garbage.png").write_bytes(b"this is not an image at all")
    recs = [
        {**GOOD, "problem_id": 1, "path": str(img_dir / "0.png")},
        {**GOOD, "problem_id": 2, "path": str(tmp_path / "missing.png")},
        {**GOOD, "problem_id": 3, "path": str(tmp_path / "garbage.png")},
        {**GOOD, "problem_id": 4, "path": None},  # text-only is allowed
    ]
    records = load_thinking_records(_write(tmp_path / "r.jsonl", recs))
    builder = ExampleBuilder(tokenizer, image_config_for(sft_case["model"]))
    examples = builder.trm_examples(records)
    assert [e.source.split("problem_id=")[1] for e in examples] == ["1)", "4)"]
    m = builder.metrics()
    assert m["data/skipped_missing"] == 1 and m["data/skipped_unreadable"] == 1, m
    assert m["data/examples"] == 2 and m["data/images_loaded"] == 1
    assert examples[0].pixel_values is not None and examples[1].pixel_values is None


def test_trm_example_matches_client_prompt_and_parses(sft_case, tokenizer, builder):
    from sophiavl_mcore.data.prompts import expand_image_tokens
    from sophiavl_mcore.rewards.config import ThinkingRewardConfig
    from sophiavl_mcore.rewards.thinking import (
        INSTRUCTION,
        ThinkingRequest,
        build_messages,
        parse_score,
    )
    from sophiavl_mcore.trainer.sft.data import load_thinking_records

    rec = load_thinking_records(sft_case["data"])[1]  # score 0.4
    (ex,) = builder.trm_examples([rec])
    grid = ex.image_grid_thw
    assert grid.shape == (1, 3) and ex.pixel_values.shape[0] == int(grid.prod())
    # What the in-process client / vllm serve render for the same request.
    client = tokenizer.apply_chat_template(
        build_messages(ThinkingRequest(rec.problem, rec.reasoning, [rec.image_path]),
                       ThinkingRewardConfig()),
        tokenize=False, add_generation_prompt=True)
    assert INSTRUCTION.split("{question}")[0].strip() in client  # the grading instruction
    prompt_ids = ex.input_ids[~ex.target_mask].tolist()
    assert prompt_ids == tokenizer(expand_image_tokens(client, grid.tolist()),
                                   add_special_tokens=False)["input_ids"]
    # Targets are exactly the trailing tokens and read back as the record's score.
    n_target = int(ex.target_mask.sum())
    assert ex.target_mask[-n_target:].all() and not ex.target_mask[:-n_target].any()
    target = tokenizer.decode(ex.input_ids[-n_target:])
    assert target == "<answer>0.4</answer><|im_end|>"
    assert parse_score(target) == pytest.approx(rec.score)


def test_long_reasoning_is_truncated_like_the_client(tmp_path, builder):
    from sophiavl_mcore.rewards.config import ThinkingRewardConfig
    from sophiavl_mcore.trainer.sft.data import load_thinking_records

    tail = "THE-END-OF-THE-REASONING"
    rec = {**GOOD, "path": None, "reasoning": "x" * 5000 + tail}
    records = load_thinking_records(_write(tmp_path / "l.jsonl", [rec]))
    (ex,) = builder.trm_examples(records, ThinkingRewardConfig(max_reasoning_chars=200))
    text = builder.tokenizer.decode(ex.input_ids)
    assert "[...]" in text and tail in text and "x" * 300 not in text


def test_too_long_examples_are_dropped_and_counted(sft_case, tokenizer):
    from sophiavl_mcore.trainer.sft.data import (
        ExampleBuilder,
        image_config_for,
        load_thinking_records,
    )

    records = load_thinking_records(sft_case["data"])[:2]
    short = ExampleBuilder(tokenizer, image_config_for(sft_case["model"]), max_seq_len=64)
    assert short.trm_examples(records) == []
    assert short.metrics()["data/skipped_too_long"] == 2


def test_score_text_is_on_the_client_grid():
    import re

    from sophiavl_mcore.rewards.thinking import SCORE_CHOICES, SCORE_REGEX
    from sophiavl_mcore.trainer.sft.data import score_text

    cases = {0.0: "0.0", 0.04: "0.0", 0.05: "0.1", 0.65: "0.7", 0.94: "0.9", 1.0: "1.0"}
    for score, want in cases.items():
        text = score_text(score)
        assert text == f"<answer>{want}</answer>" and want in SCORE_CHOICES
        assert re.fullmatch(SCORE_REGEX, text)


def test_policy_warm_start_target_passes_the_format_gate(tmp_path, tokenizer, builder):
    from sophiavl_mcore.data.records import load_records
    from sophiavl_mcore.rewards.outcome import parse_response

    raw = {"problem_id": 1, "problem": "How many squares?", "data_type": "text",
           "problem_type": "numerical", "options": [], "solution": "<answer>3</answer>"}
    (rec,) = load_records(_write(tmp_path / "p.jsonl", [raw]))
    (ex,) = builder.policy_examples([rec], reasoning=lambda r: "I count three squares.")
    target = tokenizer.decode(ex.input_ids[ex.target_mask], skip_special_tokens=False)
    assert target.endswith("<|im_end|>")
    parsed = parse_response(target.removesuffix("<|im_end|>"))
    assert parsed.well_formed and parsed.answer == "3" and parsed.think == "I count three squares."
    prompt = tokenizer.decode(ex.input_ids[~ex.target_mask])
    assert prompt.rstrip().endswith("<|im_start|>assistant") and "How many squares?" in prompt


def test_collate_shifts_labels_and_mask():
    from sophiavl_mcore.trainer.collate import SFTExample, collate

    a = SFTExample(torch.tensor([10, 11, 12, 13]), torch.tensor([False, False, True, True]))
    b = SFTExample(torch.tensor([20, 21, 22]), torch.tensor([False, True, True]))
    mb = collate([a, b], pad_id=0, pad_to_multiple_of=8)
    assert mb["input_ids"].tolist() == [[10, 11, 12, 13, 0, 0, 0, 0], [20, 21, 22, 0, 0, 0, 0, 0]]
    # output at t predicts token t+1: the mask marks t where t+1 is a target token
    assert mb["labels"][0, :4].tolist() == [11, 12, 13, 0]
    assert mb["loss_mask"].tolist() == [[0, 1, 1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]]
    assert mb["num_input_tokens"] == 7 and mb["pixel_values"] is None
    with pytest.raises(ValueError, match="no target token after position 0"):
        SFTExample(torch.tensor([1, 2]), torch.tensor([True, False]), source="rec#3")


def test_image_config_follows_the_served_processor(sft_case):
    from sophiavl_mcore.data.config import ImageConfig
    from sophiavl_mcore.trainer.sft.data import image_config_for

    # build_tiny_qwen2_5_vl's processor: min 28*28*4, max 28*28*16 pixels
    cfg = image_config_for(sft_case["model"], ImageConfig(num_threads=1))
    assert (cfg.min_pixels, cfg.max_pixels, cfg.num_threads) == (28 * 28 * 4, 28 * 28 * 16, 1)


def test_configs_fail_early_with_numbers(tmp_path):
    from sophiavl_mcore.config import ConfigError, load_config
    from sophiavl_mcore.trainer.config import OptimConfig
    from sophiavl_mcore.trainer.sft.config import SFTConfig, TRMTrainConfig

    with pytest.raises(ValueError, match=r"need 0 <= min_lr=0.5 <= lr=0.1"):
        OptimConfig(lr=0.1, min_lr=0.5)
    with pytest.raises(ValueError, match="warmup_steps=10 must be < decay_steps=5"):
        OptimConfig(warmup_steps=10, decay_steps=5)
    with pytest.raises(ValueError, match="micro_batch_size=8 exceeds global_batch_size=4"):
        SFTConfig(global_batch_size=4, micro_batch_size=8)
    with pytest.raises(ValueError, match="global_batch_size=6 is not divisible by .* dp=4"):
        SFTConfig(global_batch_size=6, micro_batch_size=2).check_dp(4)
    from sophiavl_mcore.trainer.optim import check_backend

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="use_distributed_optimizer=true needs CUDA"):
            check_backend(OptimConfig(use_distributed_optimizer=True))
    recipe = Path(__file__).resolve().parents[2] / "examples" / "configs" / "trm_sft_tiny.yaml"
    need = ["model.hf_dir=/m", "data.path=/d.jsonl", f"output_dir={tmp_path}"]
    cfg = load_config(recipe, need + ["optim.lr=1e-3"], cls=TRMTrainConfig)
    assert cfg.parallel.tp == 2 and cfg.optim.lr == 1e-3 and cfg.sft.train_steps > 0
    with pytest.raises(ConfigError, match="unknown key.*optim.learning_rate"):
        load_config(recipe, need + ["optim.learning_rate=1"], cls=TRMTrainConfig)
    with pytest.raises(ConfigError, match="warmup_steps=2 must be < the decay horizon 2 "):
        load_config(recipe, need + ["sft.train_steps=2"], cls=TRMTrainConfig)
    with pytest.raises(ConfigError, match="model.hf_dir, data.path, output_dir must be set"):
        load_config(recipe, [], cls=TRMTrainConfig)


def test_cli_dry_run_validates_the_recipe(tmp_path, sft_case):
    from sophiavl_mcore.config import ConfigError
    from sophiavl_mcore.parallel import LayoutError
    from sophiavl_mcore.trm_train import main

    recipe = Path(__file__).resolve().parents[2] / "examples" / "configs" / "trm_sft_tiny.yaml"
    args = ["--config", str(recipe), "--dry-run", f"model.hf_dir={sft_case['model']}",
            f"data.path={sft_case['data']}", f"output_dir={tmp_path}"]
    assert main(args) == 0
    with pytest.raises(ConfigError, match="sft.micro_batch"):
        main(args + ["sft.micro_batch=2"])
    with pytest.raises(LayoutError, match="num_attention_heads=2 is not divisible by tp=4"):
        main(args + ["parallel.tp=4"])

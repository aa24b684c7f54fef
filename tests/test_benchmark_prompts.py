"""The benchmark's prompt split: no evaluated HumanEval problem can reach an in-domain store."""

import pytest

from benchmarks.prompts import (
    EVAL_PROMPTS,
    INSTRUCTION,
    chat,
    heldout_humaneval_prompts,
    humaneval_prompts,
    write_prompt_jsonl,
)


def test_evaluation_and_heldout_prompts_are_disjoint_and_cover_humaneval():
    evaluated, heldout = humaneval_prompts(), heldout_humaneval_prompts()
    assert len(evaluated) == EVAL_PROMPTS
    assert len(evaluated) + len(heldout) == 164
    assert not set(evaluated) & set(heldout)
    assert humaneval_prompts(3) == evaluated[:3]


@pytest.mark.parametrize("n", [0, EVAL_PROMPTS + 1])
def test_asking_for_prompts_outside_the_evaluation_split_is_an_error(n):
    with pytest.raises(ValueError, match="at most the first"):
        humaneval_prompts(n)


def test_store_prompts_are_written_in_the_evaluation_chat_format(tmp_path):
    import json

    path = write_prompt_jsonl(heldout_humaneval_prompts()[:2], tmp_path / "p.jsonl")
    rows = [json.loads(line)["prompt"] for line in path.read_text().splitlines()]
    code = heldout_humaneval_prompts()[0]
    assert rows[0] == INSTRUCTION.format(code=code) == chat(code)[0]["content"]
    assert len(rows) == 2

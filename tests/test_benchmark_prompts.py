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


def test_howto_evaluation_and_store_requests_never_share_a_module(tmp_path):
    """The second family: user requests about the standard library, split by module, so the
    howto store answers no request about a module the evaluation asks about."""
    import json
    import re

    from benchmarks.prompts import (
        HOWTO_TEMPLATES,
        howto_chat,
        howto_eval_prompts,
        howto_store_prompts,
    )

    def module(request):
        m = re.search(r"from Python's `([\w.]+)` module", request)
        return m.group(1) if m else re.search(r"`([\w.]+)\.\w+`", request).group(1)

    evaluated, stored = howto_eval_prompts(), howto_store_prompts(400)
    assert len(evaluated) == EVAL_PROMPTS and len(stored) == 400
    assert not {module(r) for r in evaluated} & {module(r) for r in stored}
    assert len({module(r) for r in evaluated}) >= 10  # not one module's requests
    assert howto_eval_prompts(3) == evaluated[:3] and howto_store_prompts(5) == stored[:5]
    assert {t.split("`")[0] for t in HOWTO_TEMPLATES} >= {r.split("`")[0] for r in evaluated}
    assert howto_chat(evaluated[0]) == [{"role": "user", "content": evaluated[0]}]
    path = write_prompt_jsonl(stored[:2], tmp_path / "h.jsonl", template="{code}")
    assert [json.loads(x)["prompt"] for x in path.read_text().splitlines()] == stored[:2]
    with pytest.raises(ValueError, match="at most"):
        howto_eval_prompts(EVAL_PROMPTS + 1)

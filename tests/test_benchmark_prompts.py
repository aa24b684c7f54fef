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


def test_errors_evaluation_and_store_requests_never_share_a_package():
    """The third family (issue 30, untuned): users pasting a library's error message. Split by
    package, each request quoting its message, every phrasing one of the templates."""
    from benchmarks.error_requests import TEMPLATES
    from benchmarks.prompts import (
        FAMILIES,
        _error_requests,
        errors_eval_prompts,
        errors_store_prompts,
    )

    rows = _error_requests()
    package = {r["request"]: r["package"] for r in rows}
    evaluated, stored = errors_eval_prompts(), errors_store_prompts(256)
    assert len(evaluated) == EVAL_PROMPTS and len(stored) == 256
    assert not {package[r] for r in evaluated} & {package[r] for r in stored}
    assert len({package[r] for r in evaluated}) >= 5  # not one package's errors
    assert all(r["message"] in r["request"] and r["exception"] in r["request"] for r in rows)
    assert all(any(r["request"] == t.format(exc=r["exception"], msg=r["message"],
                                           package=r["package"]) for t in TEMPLATES)
               for r in rows)
    assert errors_eval_prompts(3) == evaluated[:3]
    assert FAMILIES["errors"].messages(evaluated[0]) == [{"role": "user",
                                                          "content": evaluated[0]}]
    with pytest.raises(ValueError, match="at most"):
        errors_eval_prompts(EVAL_PROMPTS + 1)


def test_error_requests_are_made_from_literal_messages_split_by_package(tmp_path):
    """benchmarks.error_requests on a site-packages of two packages: plain literal messages
    only (no f-strings, placeholders or short ones), tests skipped, each package in one split."""
    from benchmarks import error_requests as er

    for name in ("alpha", "beta"):
        (tmp_path / name / "tests").mkdir(parents=True)
        (tmp_path / name / "__init__.py").write_text("")
        (tmp_path / name / "core.py").write_text(
            "def f(x):\n"
            "    if x:\n"
            f"        raise ValueError('the {name} frame has no column of that name at all')\n"
            "    raise TypeError(f'not {x}')\n"
            "def g():\n"
            "    raise KeyError('too short')\n"
            "def h():\n"
            "    raise RuntimeError('expected %s rows but the reader found fewer')\n")
        (tmp_path / name / "tests" / "test_core.py").write_text(
            "raise ValueError('a message from a test file, never a user request')\n")
    (tmp_path / "gamma.dist-info").mkdir()
    rows = er.requests(tmp_path)
    assert [(r["package"], r["exception"], r["message"]) for r in sorted(
        rows, key=lambda r: r["package"])] == [
        ("alpha", "ValueError", "the alpha frame has no column of that name at all"),
        ("beta", "ValueError", "the beta frame has no column of that name at all")]
    for r in rows:
        assert r["split"] == ("eval" if er.digest(r["package"]) % er.EVAL_SHARE == 0
                              else "store")
        assert r["file"] == f"{r['package']}/core.py"

"""What ``generate`` refuses and where it stops (issue 29, point 3): the model's context ends a
generation losslessly, every argument and DecodeConfig field is checked by its own name, and a
prompt that is no text or token ids is refused, through the API and through ``dresd generate``.
"""

import pytest
import torch
from tiny_models import greedy_reference, make_tiny_model

from dresd.cli import main
from dresd.decode import DecodeConfig, generate
from dresd.drafters.base import Draft, Drafter
from dresd.tree import DraftTree, TreeBudget

PROMPT = "def parse_args(argv):\n    parser = "
CONTEXT = 64


def with_context(model, n: int):
    """``model`` with a context of ``n`` positions, as its config says: gpt2's learned position
    table cut to ``n`` rows (a position past it is an IndexError); llama's and qwen2's rotary
    positions have no table, so only the config says where the context ends."""
    if hasattr(model.config, "n_positions"):
        wpe = model.transformer.wpe.weight[:n].clone()
        model.transformer.wpe = torch.nn.Embedding.from_pretrained(wpe)
        model.config.n_positions = n
    else:
        model.config.max_position_embeddings = n
    return model


class Oracle(Drafter):
    """Drafts the known greedy output, and filler past its end: every draft is as long as
    asked, so a tree that were not trimmed near the context's end would run past it."""

    name = "oracle"

    def __init__(self, prompt_len: int, reference: list[int]):
        self.prompt_len = prompt_len
        self.truth = list(reference) + [5] * 100

    def propose(self, request):
        i = len(request.tokens) - self.prompt_len
        return [Draft(tuple(self.truth[i:i + request.draft_len]), 1.0, self.name)]


class DeepOracle(Oracle):
    """Plans its own tree and ignores the depth asked (as a drafter that plans may)."""

    def propose_tree(self, request, budget, vocab_size=None):
        i = len(request.tokens) - self.prompt_len
        tree = DraftTree(request.tokens[-1])
        tree.add(self.truth[i:i + 40])
        return tree


def _positions(model) -> tuple[list[int], object]:
    """The highest position each forward of ``model`` feeds (a hook, recording only)."""
    seen: list[int] = []

    def hook(module, args, kwargs):
        pos = kwargs.get("position_ids")
        seen.append(int(pos.max()) if pos is not None else kwargs["input_ids"].shape[1] - 1)

    return seen, model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("drafter", [Oracle, DeepOracle, None])
def test_generation_stops_at_the_context_and_equals_plain_greedy(family, drafter):
    model, tok = make_tiny_model(family)
    with_context(model, CONTEXT)
    ids = tok(PROMPT)["input_ids"]
    room = CONTEXT - len(ids)
    ref = greedy_reference(model, ids, room)  # the most model.generate can give
    assert len(ref) == room and tok.eos_token_id not in ref
    source = drafter(len(ids), ref) if drafter else None
    seen, handle = _positions(model)
    try:
        res = generate(model, tok, source, ids, max_new_tokens=500, drafter="prompt_lookup",
                       budget="fixed", num_drafts=3, draft_len=8)
    finally:
        handle.remove()
    assert res.tokens == ref
    assert len(res.prompt_tokens) + len(res.tokens) == CONTEXT
    assert res.stats.stopped_by == "context"
    assert res.stats.summary().endswith("| stopped by context")
    # The last token is decided at the context's last position but one, and no forward (the
    # prefill, a verify pass over a tree) feeds a position past it.
    assert max(seen) == CONTEXT - 2
    if drafter is not None:  # the drafts were accepted up to the end
        assert res.stats.accepted_tokens > room // 2


def test_the_last_positions_of_the_context(tiny_model):
    model, tok = tiny_model
    with_context(model, CONTEXT)
    ids = (tok(PROMPT)["input_ids"] * 10)[: CONTEXT - 1]
    ref = greedy_reference(model, ids, 1)
    res = generate(model, tok, Oracle(len(ids), ref), ids, max_new_tokens=5)
    assert (res.tokens, res.stats.stopped_by) == (ref, "context")
    # Exactly the room asked for: max_new_tokens stopped it, not the context.
    ids = ids[:-3]
    ref = greedy_reference(model, ids, 4)
    res = generate(model, tok, Oracle(len(ids), ref), ids, max_new_tokens=4)
    assert (res.tokens, res.stats.stopped_by) == (ref, "max_new_tokens")
    res = generate(model, tok, Oracle(len(ids), ref), ids, max_new_tokens=5)
    assert (res.tokens, res.stats.stopped_by) == (ref, "context")


def test_cut_keeps_the_shallow_nodes_in_order():
    tree = DraftTree.build(7, [Draft((40, 41, 42, 43), 0.9), Draft((40, 50), 0.8),
                               Draft((60, 61, 62), 0.7)], TreeBudget())
    cut = tree.cut(2)
    assert (cut.tokens, cut.parents, cut.depths) == ([7, 40, 41, 50, 60, 61],
                                                     [-1, 0, 1, 1, 0, 4], [0, 1, 2, 2, 1, 2])
    assert tree.cut(4) is tree
    assert tree.cut(0).tokens == [7]


FIELDS = [
    ("max_new_tokens", 2.5, TypeError, "max_new_tokens must be a positive int, not 2.5"),
    ("max_new_tokens", True, TypeError, "max_new_tokens must be a positive int, not True"),
    ("max_new_tokens", 0, ValueError, "max_new_tokens must be >= 1, not 0"),
    ("num_drafts", -1, ValueError, "num_drafts must be >= 0, not -1"),
    ("num_drafts", 2.0, TypeError, "num_drafts must be an int >= 0, not 2.0"),
    ("draft_len", "3", TypeError, "draft_len must be an int >= 0, not '3'"),
    ("draft_len", -2, ValueError, "draft_len must be >= 0, not -2"),
    ("max_tree_tokens", 0, ValueError, "max_tree_tokens must be >= 1 (the root), not 0"),
    ("max_tree_tokens", None, TypeError,
     "max_tree_tokens must be a positive int (the root), not None"),
    ("k", 0, ValueError, "k must be >= 1, not 0"),
    ("k", False, TypeError, "k must be a positive int, not False"),
    ("nprobe", -1, ValueError, "nprobe must be >= 0 (0: the store's default), not -1"),
    ("nprobe", 1.5, TypeError,
     "nprobe must be an int >= 0 (0: the store's default), not 1.5"),
    ("temperature", "0.5", TypeError, "temperature must be a number, not '0.5'"),
    ("temperature", True, TypeError, "temperature must be a number, not True"),
    ("temperature", -1, ValueError, "temperature must be 0 (greedy) or between 0.01 and 10000, "
                                    "got -1"),
    ("top_k", 1.5, TypeError, "top_k must be an int >= 0 (0: off), not 1.5"),
    ("top_k", -1, ValueError, "top_k must be >= 0 (0: off), not -1"),
    ("top_p", None, TypeError, "top_p must be a number, not None"),
    ("top_p", 0, ValueError, "top_p must be in (0, 1], got 0"),
    ("seed", 1.0, TypeError, "seed must be an int, not 1.0"),
    ("seed", 2**64, ValueError, f"seed must be between -2**63 and 2**64 - 1, not {2**64}"),
    ("stop_strings", "\n", TypeError, "stop_strings must be a tuple of strings, not '\\n' "
                                      "(write ('\\n',) for one)"),
    ("stop_strings", ("a", 3), TypeError, "stop_strings[1] must be a str, not 3"),
    ("stop_strings", ("",), ValueError,
     "stop_strings[0] is empty: a stop string needs a character"),
    ("drafter", 3, TypeError, "drafter must be a str, not 3"),
    ("budget", None, TypeError, "budget must be a str, not None"),
]


@pytest.mark.parametrize("name,value,error,message", FIELDS)
def test_decode_config_fields_are_checked_by_name(name, value, error, message):
    with pytest.raises(error) as e:
        DecodeConfig(**{name: value})
    assert str(e.value) == message


@pytest.fixture(scope="module")
def llama():
    return make_tiny_model("llama")


@pytest.mark.parametrize("name,value,error,message",
                         [f for f in FIELDS if f[0] in ("max_new_tokens", "draft_len", "seed",
                                                        "stop_strings", "temperature")])
def test_generate_keywords_are_checked_by_name(llama, name, value, error, message):
    model, tok = llama
    with pytest.raises(error) as e:
        generate(model, tok, None, PROMPT, drafter="prompt_lookup", budget="fixed",
                 **{name: value})
    assert str(e.value) == message


def test_good_values_pass(llama):
    model, tok = llama
    config = DecodeConfig(stop_strings=["\n"], seed=-1, temperature=1, top_p=1)
    assert config.stop_strings == ("\n",)
    ids = tok(PROMPT)["input_ids"]
    res = generate(model, tok, None, ids, config, max_new_tokens=6, temperature=0,
                   drafter="prompt_lookup", budget="fixed")
    assert res.tokens == greedy_reference(model, ids, 6)[: len(res.tokens)]


def test_generate_arguments_are_checked_by_name(llama):
    model, tok = llama
    cases = [
        (dict(model="gpt2"), "model must be a loaded transformers causal LM (e.g. from "
                             "dresd.models.load_model), not str"),
        (dict(tokenizer=None), "tokenizer must be a transformers tokenizer (e.g. from "
                               "dresd.models.load_model), not NoneType"),
        (dict(source=3), "source must be a Drafter or a Store (or None), not int"),
        (dict(config={"max_new_tokens": 3}), "config must be a DecodeConfig or None, not dict"),
        (dict(on_token="print"),
         "on_token must be None or a callable(new_tokens, new_text), not str"),
        (dict(max_tokens=3), "generate() got an unexpected keyword argument 'max_tokens' (did "
                             "you mean max_new_tokens? the DecodeConfig fields are "
                             "max_new_tokens, num_drafts, draft_len, max_tree_tokens, k, nprobe, "
                             "temperature, top_k, top_p, seed, stop_strings, drafter, budget)"),
    ]
    for change, message in cases:
        args = dict(model=model, tokenizer=tok, source=None, prompt=PROMPT, budget="fixed",
                    drafter="prompt_lookup")
        args.update(change)
        with pytest.raises(TypeError) as e:
            generate(**args)
        assert str(e.value) == message


PROMPTS = [
    (b"def f():", TypeError,
     "prompt is bytes: decode it to str first, or pass a list of token ids"),
    (bytearray(b"def f():"), TypeError,
     "prompt is bytearray: decode it to str first, or pass a list of token ids"),
    (None, TypeError, "prompt is None: pass a str, a list of chat messages ({'role': ..., "
                      "'content': ...}) or a list of token ids"),
    ("ab\ud800c", ValueError, "prompt is not valid Unicode text: lone surrogate at character 2 "
                              "('\\ud800'); decode the bytes it came from with their real "
                              "encoding (a UTF-8 str has no surrogates)"),
    ([{"role": "user", "content": "\udcff"}], ValueError,
     "prompt message 0's content is not valid Unicode text: lone surrogate at character 0 "
     "('\\udcff'); decode the bytes it came from with their real encoding (a UTF-8 str has "
     "no surrogates)"),
    ({"role": "user", "content": "hi"}, TypeError,
     "prompt must be a str, a list of chat messages ({'role': ..., 'content': ...}) or a list "
     "of token ids, not dict"),
    ([5, "6"], TypeError, "prompt[1] is str '6': a list prompt holds token ids (ints) or chat "
                          "messages (dicts), not a mix"),
    ([5, True], TypeError, "prompt[1] is bool True: a list prompt holds token ids (ints) or "
                           "chat messages (dicts), not a mix"),
]


@pytest.mark.parametrize("prompt,error,message", PROMPTS)
def test_prompts_that_are_not_text_or_token_ids(tiny_model, prompt, error, message):
    model, tok = tiny_model
    with pytest.raises(error) as e:
        generate(model, tok, None, prompt, max_new_tokens=3, drafter="prompt_lookup",
                 budget="fixed")
    assert str(e.value) == message


def _cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("raw,byte,offset", [(b"\xff\xfe", 0xff, 0), (b"caf\xe9!", 0xe9, 3)])
def test_cli_prompt_of_non_utf8_bytes(capsys, tiny_llama_dir, raw, byte, offset):
    # What Python makes of such a command-line argument (os.fsdecode on a UTF-8 system).
    prompt = raw.decode("utf-8", "surrogateescape")
    rc, out, err = _cli(capsys, "generate", "--model", tiny_llama_dir, "--prompt", prompt)
    assert rc == 2 and out == ""
    assert err == (f"dresd generate: error: --prompt is not UTF-8 text: byte 0x{byte:02x} at "
                   f"byte offset {offset} (convert it first, e.g. with iconv -t UTF-8)\n")


def test_cli_prompt_with_a_lone_surrogate(capsys, tiny_llama_dir):
    # Not from a command line's bytes (they only give \udc80-\udcff), but from a caller of main.
    rc, out, err = _cli(capsys, "generate", "--model", tiny_llama_dir, "--prompt", "a\ud800",
                        "--chat")
    assert rc == 2 and out == ""
    assert err == ("dresd generate: error: --prompt is not valid Unicode text: lone surrogate "
                   "at character 1 ('\\ud800'); decode the bytes it came from with their real "
                   "encoding (a UTF-8 str has no surrogates)\n")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cli_stops_at_the_context_and_compares(capsys, tmp_path, family):
    model, tok = make_tiny_model(family)
    with_context(model, CONTEXT)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    rc, out, err = _cli(capsys, "generate", "--model", tmp_path, "--prompt", PROMPT,
                        "--max-new-tokens", "500", "--budget", "fixed", "--drafter",
                        "prompt_lookup", "--compare")
    assert rc == 0, err
    room = CONTEXT - len(tok(PROMPT)["input_ids"])
    assert f"dresd: tokens {room} in " in out and out.rstrip().splitlines()[-2].endswith(
        "| stopped by context")
    assert f"plain greedy: identical ({room} tokens from model.generate)" in out

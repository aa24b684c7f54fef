"""Draft trees: trie merging under a budget, the tree mask, one-forward verification, pruning."""

import pytest
import torch
from transformers import DynamicCache

from dresd.drafters.base import Draft
from dresd.tree import DraftTree, TreeBudget, model_forward, prune_cache, verify_tree

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12]
DRAFTS = [
    Draft((40, 41, 42, 43), 0.9),
    Draft((40, 41, 50), 0.8),  # shares two tokens with the first
    Draft((60, 61), 0.7),
    Draft((40, 70, 71), 0.6),
]


def test_trie_merges_shared_prefixes_best_first():
    tree = DraftTree.build(7, DRAFTS, TreeBudget(10, 10, 64))
    assert tree.tokens == [7, 40, 41, 42, 43, 50, 60, 61, 70, 71]
    assert tree.parents == [-1, 0, 1, 2, 3, 2, 0, 6, 1, 8]
    assert tree.depths == [0, 1, 2, 3, 4, 3, 1, 2, 2, 3]
    assert list(tree.children(1)) == [41, 70]
    assert tree.path_to(5) == [0, 1, 2, 5]
    assert tree.height_below(0) == 4 and tree.height_below(6) == 1


def test_budget_limits_drafts_length_and_nodes():
    assert DraftTree.build(7, DRAFTS, TreeBudget(2, 10, 64)).tokens == [7, 40, 41, 42, 43, 50]
    assert DraftTree.build(7, DRAFTS, TreeBudget(10, 2, 64)).tokens == [7, 40, 41, 60, 61, 70]
    # Node budget: the best draft fills first; a partial prefix of the next is kept.
    assert DraftTree.build(7, DRAFTS, TreeBudget(10, 10, 6)).tokens == [7, 40, 41, 42, 43, 50]
    assert DraftTree.build(7, DRAFTS, TreeBudget(10, 10, 3)).tokens == [7, 40, 41]
    assert DraftTree.build(7, [], TreeBudget()).tokens == [7]
    with pytest.raises(ValueError, match="max_tree_tokens"):
        TreeBudget(10, 10, 0)


def test_draft_tokens_outside_vocabulary_are_rejected():
    with pytest.raises(ValueError, match="outside the vocabulary of size 100"):
        DraftTree.build(7, [Draft((5, 100), 1.0, "bad")], TreeBudget(), vocab_size=100)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        DraftTree.build(7, [Draft((-1,), 1.0)], TreeBudget(), vocab_size=100)


def test_mask_and_positions():
    tree = DraftTree.build(7, DRAFTS[:3], TreeBudget())  # [7, 40, 41, 42, 43, 50, 60, 61]
    mask = tree.attention_mask(3, torch.float32, "cpu")
    assert mask.shape == (1, 1, 8, 11)
    allowed = (mask[0, 0] == 0).int()
    assert allowed[:, :3].all()  # every node sees the whole prefix
    assert allowed[5, 3:].tolist() == [1, 1, 1, 0, 0, 1, 0, 0]  # 50 sees 7, 40, 41, itself
    assert allowed[7, 3:].tolist() == [1, 0, 0, 0, 0, 0, 1, 1]  # 61 sees 7, 60, itself
    assert (mask[0, 0][allowed == 0] == torch.finfo(torch.float32).min).all()
    assert tree.position_ids(3, "cpu").tolist() == [[3, 4, 5, 6, 7, 6, 4, 5]]


def _prefill(model, tokens):
    cache = DynamicCache()
    out = model_forward(model, torch.tensor([tokens]), cache)
    return cache, out


def test_tree_logits_equal_each_branch_as_its_own_sequence(tiny_model):
    model, _ = tiny_model
    cache, _ = _prefill(model, PROMPT)
    tree = DraftTree.build(3, DRAFTS, TreeBudget())
    out = verify_tree(model, tree, cache)
    assert cache.get_seq_length() == len(PROMPT) + len(tree)
    leaves = [i for i in range(len(tree)) if not tree.children(i)]
    assert len(leaves) == 4
    with torch.no_grad():
        for leaf in leaves:
            path = tree.path_to(leaf)
            seq = torch.tensor([PROMPT + [tree.tokens[i] for i in path]])
            ref = model(seq, output_hidden_states=True)
            torch.testing.assert_close(out.logits[path], ref.logits[0, len(PROMPT):],
                                       atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(out.hidden[path], ref.hidden_states[-1][0, len(PROMPT):],
                                       atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("leaf_token", [43, 50, 71])  # contiguous path, then two that are not
def test_pruned_cache_keeps_exactly_the_accepted_path(tiny_model, leaf_token):
    model, _ = tiny_model
    cache, _ = _prefill(model, PROMPT)
    tree = DraftTree.build(3, DRAFTS, TreeBudget())
    verify_tree(model, tree, cache)
    path = tree.path_to(tree.tokens.index(leaf_token))
    prune_cache(cache, len(PROMPT), len(tree), path)

    ref_cache, _ = _prefill(model, PROMPT + [tree.tokens[i] for i in path])
    assert cache.get_seq_length() == len(PROMPT) + len(path)
    for layer, ref in zip(cache.layers, ref_cache.layers):
        torch.testing.assert_close(layer.keys, ref.keys, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(layer.values, ref.values, atol=1e-4, rtol=1e-4)

    # The pruned cache decodes on exactly like one that never saw the other branches.
    nxt = torch.tensor([[17]])
    pos = torch.tensor([[len(PROMPT) + len(path)]])
    with torch.no_grad():
        a = model(nxt, cache=cache, position_ids=pos).logits
        b = model(nxt, cache=ref_cache, position_ids=pos).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_prune_rejects_a_cache_of_the_wrong_length(tiny_model):
    model, _ = tiny_model
    cache, _ = _prefill(model, PROMPT)
    with pytest.raises(ValueError, match="cache holds"):
        prune_cache(cache, len(PROMPT), 5, [0])


def test_one_trie_for_paths_parents_and_selection():
    from dresd.budget import FixedBudget, select_nodes

    tree = DraftTree.build(7, DRAFTS, TreeBudget(10, 10, 64))
    paths = tree.token_paths()
    assert paths[5] == (40, 41, 50) and paths[0] == ()
    same = DraftTree.from_paths(7, [(d.tokens, d.source) for d in DRAFTS], TreeBudget(10, 10, 64))
    assert (same.tokens, same.parents) == (tree.tokens, tree.parents)
    shape = DraftTree.from_parents(tree.parents)
    assert shape.parents == tree.parents and shape.depths == tree.depths
    assert tree.add((40, 41, 99), limit=len(tree)) == -1 and len(tree) == 10  # full: unchanged
    probs = [1.0] + [0.9 ** d for d in tree.depths[1:]]
    for policy in (FixedBudget(5), FixedBudget(64)):
        assert (select_nodes(tree, probs, policy, max_leaves=2)
                == select_nodes(tree.parents, probs, policy, max_leaves=2))

"""In-domain corpus generation with a tiny model, read back by the builder."""

import json

import pyarrow.parquet as pq
import torch

from dresd.models import load_model
from pipelines.build import build_store
from pipelines.config import BuildConfig, GenerateConfig
from pipelines.generate import generate_corpus


def _greedy_alone(model, tokenizer, prompt, max_new_tokens):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                        add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()


def test_generated_corpus_is_batched_greedy_and_builds_a_store(tmp_path, tiny_llama_dir):
    prompts = tmp_path / "prompts.jsonl"
    texts = ["Write a function that adds two numbers.", "Sort a list.",
             "Explain recursion in one line of a very long prompt " * 3]
    with open(prompts, "w") as f:
        for t in texts:
            f.write(json.dumps({"prompt": t}) + "\n")
        f.write('{"prompt": 3}\n{broken\n')
    out = tmp_path / "corpus.jsonl"
    config = GenerateConfig(model=str(tiny_llama_dir), max_new_tokens=12, batch_size=3,
                            progress=False)
    generate_corpus(prompts, out, config)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == texts
    model, tokenizer = load_model(tiny_llama_dir)
    for r in records:
        # batched with left padding == generated alone
        assert r["response"] == _greedy_alone(model, tokenizer, r["prompt"], 12)
    dead = pq.read_table(tmp_path / "corpus.jsonl.dead_letter.parquet").to_pylist()
    assert sorted(d["reason"].split(":")[0] for d in dead) == [
        "malformed JSON", "no string field 'prompt'"]

    manifest = build_store(out, tmp_path / "store",
                           BuildConfig(model=str(tiny_llama_dir), dim=8, sample_size=40,
                                       nlist=1, progress=False))
    want_tokens = sum(len(tokenizer.apply_chat_template(
        [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}],
        return_dict=False)) for r in records)
    assert (manifest.num_docs, manifest.num_tokens) == (3, want_tokens)

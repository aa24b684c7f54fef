"""In-domain corpora: the target model's own responses to a prompt set.

Prompts come from JSONL or Parquet records (``prompt_field``); each is wrapped as one user turn
with the chat template and a generation prompt, batched with left padding, and generated greedy
or sampled. The output is a JSONL file of prompt/response records that ``build`` reads directly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import apache_beam as beam

from pipelines.config import GenerateConfig
from pipelines.dead_letter import write_dead_letters
from pipelines.documents import DeadLetter
from pipelines.readers import DEAD, utf8_error
from schemas.atomic import write_text_atomic


def read_prompts(path: str, prompt_field: str):
    """(source, prompt) pairs of one JSONL or Parquet file; dead letters tagged ``dead``."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if prompt_field not in table.column_names:
            yield beam.pvalue.TaggedOutput(DEAD, DeadLetter.of(
                path, f"missing field {prompt_field!r} (columns: {table.column_names})"))
            return
        records = ((f"{path}#{i}", {prompt_field: v})
                   for i, v in enumerate(table.column(prompt_field).to_pylist()))
    elif path.endswith(".jsonl"):
        records = _jsonl_records(path)
    else:
        yield beam.pvalue.TaggedOutput(DEAD, DeadLetter.of(path, "prompts must be .jsonl or .parquet"))
        return
    for source, record in records:
        if isinstance(record, DeadLetter):
            yield beam.pvalue.TaggedOutput(DEAD, record)
        elif not isinstance(record, dict) or not isinstance(record.get(prompt_field), str):
            yield beam.pvalue.TaggedOutput(DEAD, DeadLetter.of(
                source, f"no string field {prompt_field!r}", json.dumps(record, default=str)))
        elif utf8_error(record[prompt_field]):
            yield beam.pvalue.TaggedOutput(DEAD, DeadLetter.of(
                source, f"field {prompt_field!r} is not UTF-8 text: "
                f"{utf8_error(record[prompt_field])}", json.dumps(record)))
        elif not record[prompt_field].strip():
            yield beam.pvalue.TaggedOutput(DEAD, DeadLetter.of(source, "empty prompt"))
        else:
            yield source, record[prompt_field]


def _jsonl_records(path: str):
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            source = f"{path}:{lineno}"
            try:
                yield source, json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                yield source, DeadLetter.of(source, f"malformed JSON: {e}", raw)


class GenerateResponsesFn(beam.DoFn):
    """(source, prompt) -> record dicts, ``batch_size`` prompts per generate call."""

    def __init__(self, config: GenerateConfig):
        self.config = config

    def setup(self):
        import torch

        from dresd.models import eos_token_id, load_model

        self.model, self.tokenizer = load_model(self.config.model, self.config.device or None,
                                                self.config.dtype or None)
        if not self.tokenizer.chat_template:
            raise ValueError(f"{self.config.model}: the tokenizer has no chat template")
        self.eos = eos_token_id(self.model, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad = self.eos if pad is None else pad
        torch.manual_seed(self.config.seed)
        from tqdm.auto import tqdm

        # Responses are collected before the JSONL is written, so this bar is the only sign
        # of life during a long generation.
        self.bar = tqdm(desc="generate", unit="prompt", disable=not self.config.progress,
                        dynamic_ncols=True)
        self.new_tokens = 0

    def teardown(self):
        bar = getattr(self, "bar", None)
        if bar is not None:
            bar.close()

    def start_bundle(self):
        self.pending: list[tuple[str, str]] = []

    def process(self, item):
        self.pending.append(item)
        if len(self.pending) >= self.config.batch_size:
            yield from self._generate()

    def finish_bundle(self):
        for record in self._generate():
            yield beam.transforms.window.GlobalWindows.windowed_value(record)

    def _generate(self):
        import torch

        batch, self.pending = self.pending, []
        if not batch:
            return
        c = self.config
        prompts = [
            self.tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                               add_generation_prompt=True, return_dict=False)
            for _, p in batch
        ]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        device = next(self.model.parameters()).device
        sampling = dict(do_sample=True, temperature=c.temperature, top_p=c.top_p) if c.sample \
            else dict(do_sample=False)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device),
                max_new_tokens=c.max_new_tokens, pad_token_id=self.pad, eos_token_id=self.eos,
                **sampling,
            )
        rows = out[:, width:].tolist()
        self.new_tokens += sum(len([t for t in r if t not in (self.pad, self.eos)]) for r in rows)
        self.bar.update(len(batch))
        self.bar.set_postfix_str(f"{self.new_tokens} new tokens")
        for (source, prompt), row in zip(batch, rows):
            response = self.tokenizer.decode(row, skip_special_tokens=True).strip()
            yield {"source": source, c.prompt_field: prompt, c.response_field: response}


def write_jsonl(records: list[dict], path: str) -> int:
    records = sorted(records, key=lambda r: r["source"])
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return len(records)


class GenerateCorpus(beam.PTransform):
    """prompt files -> the output JSONL written (main output: record count)."""

    def __init__(self, prompt_files: Sequence[str], output: str, config: GenerateConfig):
        super().__init__()
        self.prompt_files = list(prompt_files)
        self.output = str(output)
        self.config = config

    def expand(self, pbegin):
        prompts = (
            pbegin
            | "PromptFiles" >> beam.Create(self.prompt_files)
            | "ReadPrompts" >> beam.FlatMap(read_prompts, self.config.prompt_field)
            .with_outputs(DEAD, main="prompts")
        )
        _ = (
            prompts[DEAD]
            | "CollectDead" >> beam.combiners.ToList()
            | "WriteDead" >> beam.Map(write_dead_letters, f"{self.output}.dead_letter.parquet")
        )
        return (
            prompts.prompts
            | "Spread" >> beam.Reshuffle()
            | "Generate" >> beam.ParDo(GenerateResponsesFn(self.config))
            | "Collect" >> beam.combiners.ToList()
            | "WriteJsonl" >> beam.Map(write_jsonl, self.output)
        )


def generate_corpus(prompts, output: str | os.PathLike, config: GenerateConfig | None = None,
                    beam_args: Sequence[str] | None = None) -> Path:
    """Run the generation pipeline; returns the path of the JSONL corpus written."""
    from pipelines.options import pipeline_options
    from pipelines.readers import list_corpus_files

    config = config or GenerateConfig()
    files = list_corpus_files(prompts, "**/*.jsonl")
    p = beam.Pipeline(options=pipeline_options(beam_args))
    _ = p | "GenerateCorpus" >> GenerateCorpus(files, str(output), config)
    p.run().wait_until_finish()
    return Path(output)

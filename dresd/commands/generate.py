"""``dresd generate``: decode one prompt speculatively; print the text and the stats.

Every DecodeConfig field is a flag: ``--drafter`` picks the draft sources (default ``hybrid``;
the registered sources are listed by dresd.drafters.registry, and so in ``--help``) and
``--budget`` the tree size policy (``calibrated``, fitted to this device, or ``fixed``).
``--store`` is needed only by the sources that draft from a store.
"""

from __future__ import annotations

import sys

from dresd.config import add_arguments, from_arguments
from dresd.decode import DecodeConfig
from dresd.drafters.registry import DRAFTERS, hybrid_names
from dresd.models import DTYPE_HELP
from dresd.prompt import check_text, context_length


def run(args) -> int:
    import torch

    from dresd.decode import generate
    from dresd.models import load_model
    from dresd.store import load_store

    config = from_arguments(DecodeConfig, args)
    _check_utf8(args.prompt)
    model, tokenizer = load_model(args.model, device=args.device or None,
                                  dtype=args.dtype or None)
    store = (load_store(args.store, model, tokenizer, verify=not args.no_verify)
             if args.store else None)
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt

    def stream(tokens, text):
        sys.stdout.write(text)
        sys.stdout.flush()

    result = generate(model, tokenizer, store, prompt, config,
                      on_token=stream if args.stream else None)
    if not args.stream:
        sys.stdout.write(result.text)
    print("\n---")
    if store is not None:
        print(f"store: {store.stats.summary()}")
    print(f"dresd: {result.stats.summary()}")
    if args.compare:
        ids = torch.tensor([result.prompt_tokens], device=model.device)
        with torch.inference_mode():
            # Past the context's end plain decoding has no positions left either.
            room = context_length(model)
            room = config.max_new_tokens if room is None else min(config.max_new_tokens,
                                                                  room - ids.shape[1])
            out = model.generate(ids, do_sample=False, max_new_tokens=room,
                                 attention_mask=torch.ones_like(ids))
        plain = out[0, ids.shape[1]:].tolist()
        n = len(result.tokens)
        same = plain[:n] == result.tokens and (n == len(plain) or result.stats.stopped_by
                                               == "stop_string")
        print(f"plain greedy: {'identical' if same else 'DIFFERENT'} "
              f"({len(plain)} tokens from model.generate)")
        if config.temperature > 0:
            print("note: sampling is compared in distribution, not token for token")
        return 0 if same or config.temperature > 0 else 1
    return 0


def _check_utf8(prompt: str) -> None:
    """Refuse a ``--prompt`` whose bytes were not UTF-8 (Python hands them over as surrogate
    escapes), naming the first bad byte and its offset, or that holds another lone surrogate,
    before the model loads."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        try:
            raw = prompt.encode("utf-8", "surrogateescape")
            raw.decode("utf-8")
        except UnicodeEncodeError:  # not from bytes: a surrogate no byte decodes to
            check_text("--prompt", prompt)
        except UnicodeDecodeError as e:
            raise ValueError(f"--prompt is not UTF-8 text: byte 0x{raw[e.start]:02x} at byte "
                             f"offset {e.start} (convert it first, e.g. with iconv -t UTF-8)"
                             ) from None


def register(sub) -> None:
    p = sub.add_parser("generate", help="speculative decoding with drafts from a store, the "
                                        "live context and prompt lookup")
    needs = [s.name for s in DRAFTERS.values() if s.needs_store]
    p.add_argument("--store", default="", help=f"store directory or s3:// URL (needed by the "
                   f"{' and '.join(needs)} drafters; 'hybrid' without one drafts from the "
                   f"{' and '.join(hybrid_names(False))} sources only)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--model", default="default", help="model directory or 'default'")
    p.add_argument("--device", default="", help="torch device ('' picks CUDA when present)")
    p.add_argument("--dtype", default="", help=DTYPE_HELP)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--stream", action="store_true", help="print tokens as they are accepted")
    p.add_argument("--no-verify", action="store_true", help="skip the store's checksums")
    p.add_argument("--compare", action="store_true",
                   help="also decode with plain greedy model.generate and say whether the "
                        "outputs are identical")
    add_arguments(p, DecodeConfig)
    p.set_defaults(func=run)

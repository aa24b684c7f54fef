"""``dresd calibrate``: measure the target model's verify cost per tree size on this device.

The table is saved per model fingerprint, device and weights dtype
(``dresd.calibrate.calibration_path``) and reused by every later run of the calibrated budget;
``--force`` measures again. A measurement whose rounds disagree beyond the tolerance (the machine
was busy) is repeated up to ``--attempts`` times and never saved: the command says so and exits
with status 1.
"""

from __future__ import annotations

from dresd.models import DTYPE_HELP


def format_table(cal) -> str:
    lines = [f"{'tree tokens':>11} {'ms':>9} {'fitted ms':>10} {'x 1 token':>10}"]
    for n, s, f in zip(cal.sizes, cal.seconds, cal.fitted()):
        lines.append(f"{n:>11} {1000 * s:>9.2f} {1000 * f:>10.2f} {cal.relative_cost(n):>10.2f}")
    return "\n".join(lines)


def run(args) -> int:
    import sys

    from dresd.calibrate import calibration_path, measure_verify_cost, saved_calibration
    from dresd.models import dtype_name, load_model, model_fingerprint

    if args.attempts < 1:
        print("error: --attempts must be >= 1", file=sys.stderr)
        return 2
    model, tokenizer = load_model(args.model, device=args.device or None,
                                  dtype=args.dtype or None)
    fingerprint = model_fingerprint(model, tokenizer)
    path = calibration_path(fingerprint, model.device, model.dtype)
    cal = None if args.force else saved_calibration(path)
    if cal is not None and cal.provisional:
        cal = None  # a provisional curve is measured again
    measured = cal is None
    if measured:
        for attempt in range(1, args.attempts + 1):
            cal = measure_verify_cost(model, fingerprint=fingerprint)
            if not cal.provisional:
                break
            print(f"attempt {attempt}/{args.attempts}: unreliable, {cal.describe_rounds()}",
                  file=sys.stderr, flush=True)
    print(f"model:  {args.model} ({fingerprint[:16]})")
    print(f"device: {cal.device} ({dtype_name(model.dtype)}), KV cache of {cal.past_len} tokens")
    print(format_table(cal))
    print(f"rounds: {cal.describe_rounds()}")
    if cal.provisional:
        print(f"unreliable: the rounds disagree beyond the tolerance in {args.attempts} "
              f"attempt(s), so the machine was busy; NOT saved to {path}. Run it again on a quiet "
              "machine.", file=sys.stderr)
        return 1
    if measured:
        cal.save(path)
    print(f"file:   {path} ({'measured now' if measured else 'reused; --force measures again'})")
    return 0


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="measure verify cost per tree size on this device "
                                         "(saved per model, device and dtype)")
    p.add_argument("--model", default="default", help="model directory or 'default'")
    p.add_argument("--device", default="", help="torch device ('' picks CUDA when present)")
    p.add_argument("--dtype", default="", help=DTYPE_HELP)
    p.add_argument("--force", action="store_true", help="measure again even if saved")
    p.add_argument("--attempts", type=int, default=3,
                   help="measurements to try while the rounds disagree (a busy machine)")
    p.set_defaults(func=run)

"""``dresd calibrate``: measure the target model's verify cost per tree size on this device.

The table is saved per model fingerprint, device and weights dtype
(``dresd.calibrate.calibration_path``) and reused by every later run of the calibrated budget;
``--force`` measures again.
"""

from __future__ import annotations

from dresd.models import DTYPE_HELP


def format_table(cal) -> str:
    lines = [f"{'tree tokens':>11} {'ms':>9} {'fitted ms':>10} {'x 1 token':>10}"]
    for n, s, f in zip(cal.sizes, cal.seconds, cal.fitted()):
        lines.append(f"{n:>11} {1000 * s:>9.2f} {1000 * f:>10.2f} {cal.relative_cost(n):>10.2f}")
    return "\n".join(lines)


def run(args) -> int:
    from dresd.calibrate import calibration_path, load_or_measure, saved_calibration
    from dresd.models import dtype_name, load_model, model_fingerprint

    model, tokenizer = load_model(args.model, device=args.device or None,
                                  dtype=args.dtype or None)
    fingerprint = model_fingerprint(model, tokenizer)
    path = calibration_path(fingerprint, model.device, model.dtype)
    reused = not args.force and saved_calibration(path) is not None
    cal = load_or_measure(model, fingerprint, refresh=args.force)
    print(f"model:  {args.model} ({fingerprint[:16]})")
    print(f"device: {cal.device} ({dtype_name(model.dtype)}), KV cache of {cal.past_len} tokens")
    print(f"file:   {path} ({'reused; --force measures again' if reused else 'measured now'})")
    print(format_table(cal))
    return 0


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="measure verify cost per tree size on this device "
                                         "(saved per model, device and dtype)")
    p.add_argument("--model", default="default", help="model directory or 'default'")
    p.add_argument("--device", default="", help="torch device ('' picks CUDA when present)")
    p.add_argument("--dtype", default="", help=DTYPE_HELP)
    p.add_argument("--force", action="store_true", help="measure again even if saved")
    p.set_defaults(func=run)

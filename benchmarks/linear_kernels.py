"""F.linear against ``(W @ x.T).T`` for the default model's matrix shapes on 1-32 rows (issue 30).

    .venv/bin/python benchmarks/linear_kernels.py     # benchmarks/results/linear-kernels-cpu.{json,txt}

A verify pass of n tokens multiplies n rows by each weight matrix. An earlier torch on this CPU
ran F.linear on 2-32 rows far below what ``(W @ x.T).T`` reached (RESULTS.md, 2026-12-01:
lm_head, 2 rows, 15.1 ms against 2.8 ms), which made a kernel choice a candidate for the verify
pass. This measures both on the installed torch: median of timed repeats after a warm-up, the
same inputs for both, and whether their outputs are bitwise equal (a kernel the decoder used for
some passes only must give the same bits as the one the others use, or greedy outputs could
differ). Run it on a quiet machine.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

OUT = Path(__file__).resolve().parent / "results" / "linear-kernels-cpu"
# SmolLM2-135M: hidden 576, MLP 1536, vocabulary 49,152 (the tied lm_head)
SHAPES = {"lm_head 49152x576": (49152, 576), "mlp up 1536x576": (1536, 576),
          "mlp down 576x1536": (576, 1536), "q/o 576x576": (576, 576)}
ROWS = (1, 2, 4, 8, 16, 32)


def timed(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> int:
    torch.manual_seed(0)
    rows = []
    for name, (out, inp) in SHAPES.items():
        w = torch.randn(out, inp)
        repeats = 20 if out > 10_000 else 200
        for m in ROWS:
            x = torch.randn(1, m, inp)
            linear = lambda x=x, w=w: F.linear(x, w)  # noqa: E731
            transposed = lambda x=x, w=w: (w @ x[0].T).T.unsqueeze(0)  # noqa: E731
            rows.append(dict(shape=name, rows=m, f_linear_ms=timed(linear, repeats),
                             w_xt_ms=timed(transposed, repeats),
                             bitwise_equal=bool(torch.equal(linear(), transposed()))))
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.platform()}",
             f"{'shape':20s} {'rows':>4s} {'F.linear ms':>12s} {'(W@x.T).T ms':>13s} "
             f"{'ratio':>6s}  bitwise equal"]
    for r in rows:
        lines.append(f"{r['shape']:20s} {r['rows']:4d} {r['f_linear_ms']:12.3f} "
                     f"{r['w_xt_ms']:13.3f} {r['w_xt_ms'] / r['f_linear_ms']:6.2f}  "
                     f"{r['bitwise_equal']}")
    text = "\n".join(lines)
    print(text)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.with_suffix(".json").write_text(json.dumps(
        dict(torch=torch.__version__, threads=torch.get_num_threads(),
             machine=platform.platform(), rows=rows), indent=1) + "\n")
    OUT.with_suffix(".txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

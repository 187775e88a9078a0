"""First-step time of compiled AdamW for 100 vs 1,000 tensors, each in a fresh process
with a fresh inductor cache (so compilation is included and nothing is reused).

Usage: python benchmarks/compile_scaling.py [--counts 100,1000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import sys, time, torch, optorch
torch.set_num_threads(2)
count = int(sys.argv[1])
params = [torch.randn((1 << 16) + 64 * (i % 8)) for i in range(count)]
grads = [torch.randn_like(p) for p in params]
opt = optorch.get_optimizer("adamw", impl="compiled", weight_decay=0.01)
state = opt.init(params)
start = time.perf_counter()
opt.step(params, grads, state)
first = time.perf_counter() - start
start = time.perf_counter()
for _ in range(5):
    opt.step(params, grads, state)
print(f"{count} {first:.2f} {(time.perf_counter() - start) / 5 * 1e3:.1f}")
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--counts", default="100,1000")
    args = parser.parse_args()
    results = {}
    for count in [int(c) for c in args.counts.split(",")]:
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(count)],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
        results[count] = float(out[1])
        print(f"{count:>6} tensors: first step {out[1]} s (compile included), then {out[2]} ms")
    counts = sorted(results)
    if len(counts) >= 2:
        print(f"ratio {counts[-1]} vs {counts[0]}: {results[counts[-1]] / results[counts[0]]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

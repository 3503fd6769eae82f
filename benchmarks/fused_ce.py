"""The fused linear + cross-entropy (launcher.kernels.fused_ce) against the eager computation, each in a fresh
process: peak memory of the loss step (forward and backward) and its time, on this machine's CPU.

    python benchmarks/fused_ce.py                        # 8,192 tokens x 128,256 vocabulary, hidden 1,024
    python benchmarks/fused_ce.py --tokens 2048 --vocab 32000 --hidden 512

Targets: peak memory of the loss step at most 1/8 of eager's, time at most 1.2x, loss and gradients equal
(here within 1e-4 relative at this size; tests/test_kernels.py checks 1e-5 on small ones).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (resource.getpagesize() // 1024)


def one(method: str, tokens: int, vocab: int, hidden: int, chunk: int, train_weight: bool) -> dict:
    import torch

    from launcher.kernels.fused_ce import linear_cross_entropy, reference

    torch.manual_seed(0)
    # In place: a temporary copy would raise the process's peak above the loss step's before it starts.
    h = torch.randn(tokens, hidden).div_(hidden**0.5).requires_grad_()
    w = torch.randn(vocab, hidden).div_(hidden**0.5).requires_grad_(train_weight)
    y = torch.randint(0, vocab, (tokens,))
    y[: tokens // 10] = -100  # prompt tokens carry no label
    before = _rss_kib()  # now, not the peak so far
    t0 = time.perf_counter()
    loss = linear_cross_entropy(h, w, y, chunk=chunk) if method == "fused" else reference(h, w, y)
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "loss": loss.item(),
        "seconds": seconds,
        "peak_mib": (peak - before) / 1024,
        "grad_hidden_sum": h.grad.double().abs().sum().item(),
        "grad_weight_sum": w.grad.double().abs().sum().item() if train_weight else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=0, help="tokens per chunk (0: the kernel's default)")
    ap.add_argument("--train-weight", action="store_true", help="the output layer is trained too (its gradient)")
    ap.add_argument("--runs", type=int, default=1, help="runs of each method (alternating); medians are printed")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = (args.tokens, args.vocab, args.hidden, args.chunk, args.train_weight)
    if args.one:
        print(json.dumps(one(args.one, *shape)))
        return 0
    results: dict[str, list[dict]] = {"eager": [], "fused": []}
    for _ in range(args.runs):
        for method in results:
            argv = [sys.executable, __file__, "--one", method, "--tokens", str(args.tokens), "--vocab", str(args.vocab)]
            argv += ["--hidden", str(args.hidden), "--chunk", str(args.chunk)]
            argv += ["--train-weight"] if args.train_weight else []
            proc = subprocess.run(argv, capture_output=True, text=True, check=True)
            results[method].append(json.loads(proc.stdout.strip().splitlines()[-1]))

    def median(method: str, key: str) -> float:
        values = sorted(r[key] for r in results[method])
        return values[len(values) // 2]

    print(f"tokens {args.tokens}  vocab {args.vocab}  hidden {args.hidden}  chunk {args.chunk}  "
          f"weight {'trained' if args.train_weight else 'frozen'}  runs {args.runs}")  # fmt: skip
    print(f"{'':8}{'loss':>14}{'peak MiB':>12}{'seconds':>10}")
    for method in results:
        print(f"{method:8}{median(method, 'loss'):>14.7f}{median(method, 'peak_mib'):>12.0f}"
              f"{median(method, 'seconds'):>10.2f}")  # fmt: skip
    memory = median("fused", "peak_mib") / max(median("eager", "peak_mib"), 1.0)
    speed = median("fused", "seconds") / median("eager", "seconds")
    e, f = results["eager"][0], results["fused"][0]
    loss_diff = abs(e["loss"] - f["loss"]) / abs(e["loss"])
    grad_diff = abs(e["grad_hidden_sum"] - f["grad_hidden_sum"]) / e["grad_hidden_sum"]
    print(f"fused/eager: peak memory {memory:.3f} (target <= 0.125), time {speed:.2f}x (target <= 1.2)")
    print(f"relative difference: loss {loss_diff:.1e}, sum |d hidden| {grad_diff:.1e}")
    return 0 if memory <= 0.125 and speed <= 1.2 and loss_diff < 1e-4 and grad_diff < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())

"""Benchmarks (random weights at the real shapes, no download). Timings live here, never in tests.

    python bench.py reparam            # FastViTHD training form vs fused form, 1024 px
    python bench.py reparam --quick    # a tiny config, for the smoke test

Medians over several runs after one warm-up; the thread count and OpenMP settings are printed.
"""

import argparse
import os
import statistics
import time

import torch

import repmixer as R


def median_seconds(fn, runs, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def settings_line():
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")


@torch.no_grad()
def bench_reparam(args):
    """The reparameterization claim: the fused encoder computes the same function, faster."""
    cfg = R.FASTVITHD if not args.quick else R.FastViTHDConfig(
        depths=(1, 1, 1, 1, 1), widths=(8, 16, 32, 64, 128), head_dim=8, image_size=128)
    side = cfg.image_size
    torch.manual_seed(0)
    model = R.FastViTHD(cfg).eval()
    x = torch.rand(1, 3, side, side)
    runs = 1 if args.quick else args.runs
    t_train = median_seconds(lambda: model(x), runs)
    reference = model(x)
    model.reparameterize()
    t_fused = median_seconds(lambda: model(x), runs)
    err = ((model(x) - reference).abs().max() / reference.abs().max()).item()
    print(f"FastViTHD at {side}px, batch 1, fp32 -- {settings_line()}")
    print(f"| form | latency (s) |\n|---|---|\n| training (branches) | {t_train:.2f} |\n| fused | {t_fused:.2f} |")
    print(f"speed-up {t_train / t_fused:.2f}x, max relative difference {err:.1e}")
    return t_train, t_fused


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["reparam"], help="which benchmark")
    p.add_argument("--quick", action="store_true", help="tiny config, one run: checks the script runs")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    {"reparam": bench_reparam}[args.what](args)


if __name__ == "__main__":
    main()

"""tools/bench.py and tools/gpu_check.py cannot rot: every section runs on tiny shapes."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_bench_quick_runs_every_section(tmp_path):
    import bench

    run = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "all", "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    for heading in ("machine probe", "encoder scaling", "Qwen2 tiny shapes", "FastVLM tiny", "speed-up",
                    "where the time goes", "OMP_WAIT_POLICY", "batch mode:", "| float32 |", "| bfloat16 |", "| int8 |",
                    "bf16 / fp32: TTFT", "int8 / bf16 decode", "read: ", "## serve:", "| 2 |"):
        assert heading in out, heading
    assert "| ours |" in out and "| transformers |" in out           # the decoder reference ran
    # Quick mode says that its numbers are not measurements, first and last, and prints none that look
    # like bugs: no rate from two medians subtracted (once 7,000,000,000 tokens/s), no 0.0 GFLOP rows.
    assert out.startswith(bench.QUICK_BANNER) and out.rstrip().endswith(bench.QUICK_BANNER)
    rate = r"([\d.]+|too short to time)"
    rates = (re.findall(rf"^\| (?:ours|transformers) \| [\d.]+ \| {rate} \|", out, re.M)      # decoder
             + re.findall(rf"^\| [12] \| \S+ \| {rate} \|$", out, re.M))                         # threads
    assert len(rates) == 6, out
    assert all(r == "too short to time" or float(r) < 1e6 for r in rates), rates
    assert not re.search(r"\| 0\.0 \|", out), out
    assert (tmp_path / "encoder_scaling.png").stat().st_size > 1000
    assert (tmp_path / "precision_cpu.png").stat().st_size > 1000


def test_a_rate_from_too_short_an_interval_is_not_printed_as_a_number():
    """Two medians subtracted can leave nothing, or less than nothing: the rate is then 'too short to
    time', not 1 / 1e-9."""
    import bench

    assert bench.rate_per_s(31, 0.5) == 62.0
    assert bench.rate_per_s(31, 0.0) is None and bench.rate_per_s(31, -0.01) is None
    assert bench.shown_rate(None) == "too short to time" and bench.shown_rate(62.04) == "62.0"
    assert bench.gflop(3.2e6) == "0.0032" and bench.gflop(690e9) == "690"


def test_breakdown_rows_cover_every_flop_once():
    """bench.py breakdown's rows: together they hold the whole model's FLOPs, none counted twice, and the
    rows that are plain matrix products hold exactly the closed-form count of their shapes."""
    import torch

    import bench
    import qwen2 as Q
    import repmixer as R
    from support import speedups

    torch.manual_seed(0)
    cfg = bench.QUICK_VISION
    encoder = speedups.apply(R.FastViTHD(cfg).eval().reparameterize())
    side = 128
    image = torch.rand(1, 3, side, side)
    llm = speedups.apply(Q.Qwen2(bench.llm_config(quick=True)).init_weights().eval())
    llm.setup_cache(16)
    T = 16
    embeds = torch.randn(1, T, llm.cfg.hidden_size)
    with torch.no_grad():
        for part, rows, fn in (("encoder", bench.encoder_rows(encoder), lambda: encoder(image)),
                               ("decoder", bench.decoder_rows(llm), lambda: llm(embeds=embeds, last_only=True))):
            seconds, flops, total = bench.BlockTimer(rows).measure(fn, runs=1)
            assert set(flops) == set(rows.values())
            elementwise = {k for k in flops if "Norm" in k or "SwiGLU" in k}  # the counter counts products only
            assert all((flops[k] == 0) == (k in elementwise) for k in flops), flops
            assert sum(flops.values()) == bench.flops_of(fn)
            # exclusive times: a row charged with a child's time twice would go negative elsewhere
            assert all(s >= 0 for k, s in seconds.items() if not k.startswith("other")) and total > 0
            if part == "encoder":
                for i, (depth, c) in enumerate(zip(cfg.depths, cfg.widths), start=1):
                    pixels = (side // (4 * 2 ** (i - 1))) ** 2
                    hidden = int(c * cfg.mlp_ratio)
                    row = f"ConvFFN 1x1 convs, stage {i} ({c} -> {hidden} -> {c})"
                    assert flops[row] == depth * 2 * pixels * (c * hidden + hidden * c), row
            else:
                c = llm.cfg
                d, f, L, hd = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.head_dim
                qkvo = d * (c.num_attention_heads * hd) * 2 + d * (c.num_key_value_heads * hd) * 2
                assert flops["LLM MLP linears (gate, up, down)"] == L * 2 * T * 3 * d * f
                assert flops["LLM attention linears (q, k, v, o)"] == L * 2 * T * qkvo
                assert flops["LLM lm_head (last position only)"] == 2 * d * c.vocab_size


def test_gpu_check_runs_every_part_on_the_cpu(tmp_path):
    """The GPU check is run where GPU time is short: here every part runs on tiny shapes on the CPU,
    and what it reports must already be right (agreement, exit codes, training steps)."""
    out = tmp_path / "check.json"
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--device", "cpu", "--quick",
                          "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["errors"] == {}
    agree = report["agreement"]
    assert agree["cpu fp32"]["greedy_equal_prefix"] == agree["cpu fp32"]["greedy_tokens"] == 8
    assert agree["graph_vs_eager_fp32"]["greedy_identical"] and agree["pixels_exact"]
    assert report["ours"]["decode_tokens_per_s"] > 0 and report["ours"]["ttft_ms"] > 0
    timing = report["infer"]["timing"]
    assert timing["exit"] == 0 and timing["ttft_ms"] > 0 and timing["peak_host_mib"] > 100
    assert "startup_ms" not in timing                                   # no warm-up turn on a CPU
    assert report["infer"]["float16"]["exit"] == 2
    for name, result in report["train"].items():
        assert result["exit"] == 0 and result["steps"] == 3, (name, result)
    assert "| **time to first token (ms)** |" in run.stdout and "| train.py, 3 steps |" in run.stdout


def test_gpu_check_without_a_gpu_says_so():
    hidden = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}               # no GPU, also on a machine that has one
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py")], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, env=hidden)
    assert run.returncode == 2 and run.stderr.startswith("error: no CUDA GPU here") and len(run.stderr.splitlines()) == 1

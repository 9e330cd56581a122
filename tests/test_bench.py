"""bench.py cannot rot: every section runs on tiny shapes."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_bench_quick_runs_every_section(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "bench.py"), "all", "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    for heading in ("machine probe", "encoder scaling", "Qwen2 tiny shapes", "FastVLM tiny", "speed-up",
                    "where the time goes", "OMP_WAIT_POLICY"):
        assert heading in out, heading
    assert "| ours |" in out and "| transformers |" in out           # the decoder reference ran
    assert (tmp_path / "encoder_scaling.png").stat().st_size > 1000


def test_breakdown_rows_cover_every_flop_once():
    """bench.py breakdown's rows: together they hold the whole model's FLOPs, none counted twice."""
    import torch

    import bench
    import qwen2 as Q
    import repmixer as R

    torch.manual_seed(0)
    encoder = R.FastViTHD(bench.QUICK_VISION).eval().optimize_for_inference()
    image = torch.rand(1, 3, 128, 128).contiguous(memory_format=torch.channels_last)
    llm = Q.Qwen2(bench.llm_config(quick=True)).init_weights().eval()
    llm.setup_cache(16)
    embeds = torch.randn(1, 16, llm.cfg.hidden_size)
    with torch.no_grad():
        for rows, fn in ((bench.encoder_rows(encoder), lambda: encoder(image)),
                         (bench.decoder_rows(llm), lambda: llm(embeds=embeds, last_only=True))):
            seconds, flops, total = bench.BlockTimer(rows).measure(fn, runs=1)
            assert set(flops) == set(rows.values())
            elementwise = {k for k in flops if "Norm" in k or "SwiGLU" in k}  # the counter counts products only
            assert all((flops[k] == 0) == (k in elementwise) for k in flops), flops
            assert sum(flops.values()) == bench.flops_of(fn)
            assert all(s >= 0 for s in seconds.values()) and abs(sum(seconds.values()) - total) < 1e-9

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
                    "OMP_WAIT_POLICY"):
        assert heading in out, heading
    assert "| ours |" in out and "| transformers |" in out           # the decoder reference ran
    assert (tmp_path / "encoder_scaling.png").stat().st_size > 1000

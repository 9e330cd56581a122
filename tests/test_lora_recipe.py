"""The LoRA recipe of tools/lora_recipe.sh, shortened: the shipped tiny model learns a question type it
has never seen ("How many corners does the red object have?": 0, 3 or 4, chance one in three) through
adapters alone, and still answers the questions it knew."""

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_the_recipe_teaches_a_new_question_type(tmp_path):
    env = {**os.environ, "DATA": str(tmp_path / "data"), "RUNS": str(tmp_path / "runs"), "TRAIN": "1600",
           "SAMPLES": "100", "DTYPE": "float32"}       # float32: the same run on a CPU with or without bf16 units
    proc = subprocess.run(["bash", str(ROOT / "tools" / "lora_recipe.sh")], capture_output=True, text=True,
                          timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = json.loads((tmp_path / "runs" / "tiny-corners-before.json").read_text())
    after = json.loads((tmp_path / "runs" / "tiny-corners-after.json").read_text())
    known = json.loads((tmp_path / "runs" / "tiny-corners-known.json").read_text())
    assert before["per_type"]["corners"] < 0.4                 # never taught: below chance (it counts shapes)
    assert after["per_type"]["corners"] >= 0.8                 # learnt: far above chance
    assert after["blind_per_type"]["corners"] <= 0.5           # from the image, not from the question
    assert known["accuracy"] >= 0.9 and min(known["per_type"].values()) >= 0.8, known   # nothing it knew was lost
    config = json.loads((tmp_path / "runs" / "tiny-corners" / "adapter_config.json").read_text())
    assert config["r"] == 8 and not (tmp_path / "runs" / "tiny-corners" / "model.safetensors").exists()

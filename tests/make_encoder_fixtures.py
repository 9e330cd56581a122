"""Regenerate tests/fixtures/encoder_reference.safetensors with timm's FastViTHD (`fastvit_mci3`).

timm computes exactly Apple's FastViTHD and is independent of our code, so its outputs on the same
synthetic weights (tools/synthetic.py) are the reference for tests/test_repmixer.py. timm needs
torchvision, which needs a torch build other than the project's, so run this once in its own venv:

    python -m venv /tmp/venv-timm
    /tmp/venv-timm/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/venv-timm/bin/pip install timm safetensors numpy
    /tmp/venv-timm/bin/python tests/make_encoder_fixtures.py

(tools/synthetic.py's `timm_encoder` builds timm's model on the synthetic weights.)

It prints the timm version and the output spread; commit the resulting file (about 1 MB).
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tools"), str(ROOT)]
from synthetic import synthetic_image, timm_encoder  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"


def main():
    torch.set_grad_enabled(False)
    model = timm_encoder()
    out = {}
    for side in (256, 1024):
        features = model.forward_features(synthetic_image(side))   # (1, 3072, side/64, side/64)
        print(side, tuple(features.shape), "std", features.std().item(), "mean", features.mean().item(),
              "max", features.abs().max().item(), "exact zeros", (features == 0).float().mean().item())
        if side == 256:
            out["features_256"] = features.contiguous()
        else:
            # every 4th channel (about 800 KB); tests/make_e2e_fixtures.py stores a whole 1024-px map
            out["features_1024_every4"] = features[:, ::4].contiguous()
            out["features_1024_stats"] = torch.stack([features.mean(), features.std(), features.abs().max()])
    save_file(out, str(FIXTURES / "encoder_reference.safetensors"))


if __name__ == "__main__":
    main()

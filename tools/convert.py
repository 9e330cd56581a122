"""Convert a FastVLM folder between Apple's LLaVA layout and transformers' `fast_vlm` layout.

    python tools/convert.py checkpoints/FastVLM-0.5B checkpoints/FastVLM-0.5B-hf            # -> fast_vlm
    python tools/convert.py checkpoints/FastVLM-0.5B-hf checkpoints/FastVLM-0.5B-llava     # -> LLaVA

The direction follows from the source's config.json (`--to` names it explicitly). A model trained with
train.py (LLaVA layout) becomes a folder that transformers' FastVlmForConditionalGeneration and its
processor load; a folder of transformers' becomes one that Apple's code (and this project) loads.

What changes is names, the config and the tokenizer files; every tensor keeps its dtype and value:
* tensor names follow fastvlm.py's layout tables (LLAVA, FAST_VLM), through our own names, checked on
  the meta device against the model the config describes (every tensor consumed, every one filled);
* the embedding and head keep all their rows, those past the tokenizer included; a model with no row to
  spare for transformers' `<image>` token (a small one whose vocabulary is exactly its tokenizer's) gets
  rows up to a multiple of 64, each the mean of the others, as transformers' own conversion pads them;
* Apple's files also hold MobileCLIP's projection head (`...model.head.proj`), which FastVLM never uses and
  transformers' layout has no place for: LLaVA -> fast_vlm drops it (and says so), so a round trip
  LLaVA -> fast_vlm -> LLaVA gives the same tensors without it; fast_vlm -> LLaVA -> fast_vlm is exact;
* fast_vlm's tokenizer is a `tokenizer.json` with an extra `<image>` token (its id is the config's
  `image_token_index`); LLaVA's is the slow tokenizer's vocab.json + merges.txt + added_tokens.json.

The folder is written beside its destination and renamed into place when complete, every file with the
mode new files get (0o666 less the umask; safetensors alone would write the weights 0o600). The source
may also be a Hugging Face repo id, found as infer.py's --model finds it (loading.resolve_model).
"""

import argparse
import errno
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fastvlm as FV  # noqa: E402
from support import loading  # noqa: E402
from support.checkpoint import (CheckpointError, iter_safetensors, load_exact, safetensors_names, write_errno,  # noqa: E402
                                write_safetensors)

SHARD_BYTES = 4 * 2**30          # shards of at most this many bytes, as save_pretrained writes them
CHAT_TEMPLATE = (  # transformers' template for FastVLM: Apple's qwen_2 conversation, the image before the text
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}"
    "{% endfor %}{{'<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SPECIAL_TOKENS_MAP = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                      "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}


def pad_rows(t, rows):
    """An embedding (or head) with rows added up to `rows`, each the mean of the existing ones."""
    extra = t.float().mean(0, keepdim=True).to(t.dtype).expand(rows - t.shape[0], -1)
    return torch.cat([t, extra])


def convert_tensors(src, layout, target, vision_cfg, llm_cfg, tmp, rows=None):
    """Stream every tensor of `src` into `tmp` under the new layout's names; returns (stored dtype, Qwen2 config)."""
    names = safetensors_names(src)
    cfg = loading.tied_as_stored(llm_cfg, names)
    with torch.device("meta"):                        # the model the config describes: names and shapes only
        model = FV.FastVLM(vision_cfg, cfg)
    shards, shard, size, dropped, dtypes = [], {}, 0, [], set()

    def stream():
        nonlocal shard, size
        for name, t in tqdm(iter_safetensors(src), total=len(names), desc="converting", unit="tensor", disable=None):
            ours = layout.ours(name, vision_cfg)
            if ours is None:
                dropped.append(name)
                continue
            yield ours, t.to("meta")                  # load_exact checks name and shape (nothing is copied)
            if t.is_floating_point():
                dtypes.add(str(t.dtype).removeprefix("torch."))
            if shard and size + t.nbytes > SHARD_BYTES:
                shards.append(shard)
                write_safetensors(shard, tmp / f"part-{len(shards)}.safetensors")
                shard, size = {}, 0
            if rows and ours in ("llm.embed_tokens.weight", "llm.lm_head.weight"):
                t = pad_rows(t, rows)
            shard[target.theirs(ours, vision_cfg)] = t.contiguous()
            size += t.nbytes

    load_exact(model, stream(), where=loading.part_of,
               file_names={name: layout.theirs(name, vision_cfg) for name in model.state_dict()})
    shards.append(shard)
    write_safetensors(shard, tmp / f"part-{len(shards)}.safetensors")
    if len(shards) == 1:
        (tmp / "part-1.safetensors").rename(tmp / "model.safetensors")
    else:                                             # save_pretrained's names and index
        weight_map = {}
        for i, part in enumerate(shards, 1):
            final = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            (tmp / f"part-{i}.safetensors").rename(tmp / final)
            weight_map.update({name: final for name in part})
        total = sum(t.nbytes for part in shards for t in part.values())
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    for name in dropped:
        print(f"dropped {name}: MobileCLIP's projection head, which FastVLM never uses and the "
              f"{target.name} layout has no place for", file=sys.stderr)
    if rows:
        cfg = FV.qwen2.Qwen2Config(**{**cfg.__dict__, "vocab_size": rows})
    return sorted(dtypes)[0] if len(dtypes) == 1 else "float32", cfg


def write_fast_vlm_tokenizer(tokenizer, folder):
    """tokenizer.json with `<image>` added as a special token after the others; returns its id."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_str(tokenizer.tok.to_str())            # a copy: the caller's stays as it is
    if tok.token_to_id(FV.IMAGE) is None:
        tok.add_special_tokens([AddedToken(FV.IMAGE, special=True, normalized=False)])
    tok.save(str(folder / "tokenizer.json"))
    image_id = tok.token_to_id(FV.IMAGE)
    added = {str(i): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for i, t in tok.get_added_tokens_decoder().items()}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "model_max_length": 8192, "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "errors": "replace", "clean_up_tokenization_spaces": False,
        "split_special_tokens": False, "added_tokens_decoder": added, "extra_special_tokens": {"image_token": FV.IMAGE},
        "processor_class": "LlavaProcessor"}, indent=2))
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return image_id


def write_llava_tokenizer(tokenizer, folder):
    """The slow-tokenizer files Apple's checkpoints ship, without transformers' `<image>` token."""
    tokenizer.tok.model.save(str(folder))                          # vocab.json, merges.txt
    added = {t.content: i for i, t in tokenizer.tok.get_added_tokens_decoder().items() if t.content != FV.IMAGE}
    (folder / "added_tokens.json").write_text(json.dumps(added, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS_MAP, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "model_max_length": 8192, "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "errors": "replace", "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for t, i in added.items()}}, indent=2))


def convert(src, dst, to=None):
    """Convert the folder `src` into a new folder `dst` in the layout `to` (default: the other one)."""
    src, dst = loading.resolve_model(src), Path(dst)
    if dst.exists():
        raise CheckpointError(f"{dst} already exists; choose a new folder for the converted model")
    if src.resolve() in dst.resolve().parents:
        raise CheckpointError(f"{dst} is inside the model folder {src}; choose a folder outside it")
    layout, vision_cfg, llm_cfg, config = loading.model_config(src)
    target = loading.LAYOUTS[to] if to else (
        loading.FAST_VLM if layout is loading.LLAVA else loading.LLAVA)
    if target is layout:
        raise CheckpointError(f"{src} is already in the {layout.name} layout")
    tokenizer = loading.load_tokenizer(src)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        rows = None
        if target is loading.FAST_VLM and tokenizer.token_id(FV.IMAGE) is None and len(tokenizer) >= llm_cfg.vocab_size:
            # no embedding row for the `<image>` token about to be added (a model whose vocabulary is exactly
            # its tokenizer's): rows up to a multiple of 64, as transformers' own conversion pads them
            rows = -(-(len(tokenizer) + 1) // 64) * 64
        dtype, llm_cfg = convert_tensors(src, layout, target, vision_cfg, llm_cfg, tmp, rows)
        if target is loading.FAST_VLM:
            image_id = write_fast_vlm_tokenizer(tokenizer, tmp)
            new_config = loading.fast_vlm_config(vision_cfg, llm_cfg, image_id, dtype)
            side = vision_cfg.image_size
            (tmp / "preprocessor_config.json").write_text(json.dumps({  # Apple's CLIP processor settings
                "image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor",
                "do_resize": True, "size": {"shortest_edge": side}, "resample": 3, "do_center_crop": True,
                "crop_size": {"height": side, "width": side}, "do_rescale": True, "rescale_factor": 1 / 255,
                "do_normalize": True, "image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0],
                "do_convert_rgb": True}, indent=2))
            (tmp / "processor_config.json").write_text(json.dumps({
                "processor_class": "LlavaProcessor", "patch_size": vision_cfg.stride,
                "vision_feature_select_strategy": "full", "num_additional_image_tokens": 0,
                "image_token": FV.IMAGE}, indent=2))
        else:
            write_llava_tokenizer(tokenizer, tmp)
            new_config = loading.llava_config(vision_cfg, llm_cfg, {"torch_dtype": dtype, "eos_token_id": 151645,
                                                               "bos_token_id": 151643})
        (tmp / "config.json").write_text(json.dumps(new_config, indent=2))
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst, target


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="FastVLM folder (or Hugging Face repo id) to convert")
    p.add_argument("dst", type=Path, help="new folder to write")
    p.add_argument("--to", choices=["llava", "fast_vlm"], default=None,
                   help="the layout to write (default: the one the source is not in)")
    args = p.parse_args(argv)
    try:
        dst, target = convert(args.src, args.dst, args.to)
    except CheckpointError as e:
        print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)
        return 2
    except Exception as e:   # a failed write: an OSError, or safetensors' own type with "(os error N)" in it
        number = write_errno(e)
        if number is None:
            raise
        fix = {errno.ENOSPC: "free some space", getattr(errno, "EDQUOT", -1): "free some space",
               errno.EFBIG: "raise this process's file-size limit (ulimit -f)"}.get(number, "choose another place")
        print(f"error: cannot write {args.dst} ({os.strerror(number)}); nothing was kept: {fix} and rerun",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(f"wrote {dst} ({target.name} layout)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

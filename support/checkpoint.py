"""Reading checkpoints exactly: safetensors files in, every tensor accounted for.

Both halves of FastVLM load the same way, so the rules live here once:

* weights come from `model.safetensors`, or from shards listed in `model.safetensors.index.json`;
  pickled `.bin` files are refused (unpickling runs arbitrary code) with the command that converts them;
* `load_exact` copies a name -> tensor mapping into a module and fails on the *first* problem with one
  line that names the key: a tensor the module has no place for, a parameter the file does not fill,
  or a shape that disagrees. Nothing is skipped silently; a caller that wants to drop tensors (the
  unused CLIP head of the vision tower) removes them by name before calling;
* `safetensors_headers` gives every stored tensor's name, shape and dtype from the file headers, as
  tensors on the meta device: fed to `load_exact` with a model built on the meta device, it checks a
  whole checkpoint against its config before a byte of either is allocated or read;
* `write_safetensors` is the one writer (train.py's checkpoints, tools/convert.py, the synthetic test
  weights): the file gets the mode every other new file gets, not safetensors' owner-only 0o600.
"""

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open


class CheckpointError(ValueError):
    """A checkpoint that does not match the model; the message names the file or key and the fix."""


def safetensors_files(folder):
    """The weight files of an HF-style folder: one `model.safetensors`, or the shards of its index."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map must map tensor names to file names")
        except (ValueError, KeyError, TypeError, RecursionError) as e:   # JSON and UTF-8 errors are ValueErrors
            raise CheckpointError(f"{index} is not a valid safetensors index ({e}); re-download it") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shard {missing[0]} but {folder} has no such file; download it")
        return files
    single = sorted(folder.glob("*.safetensors"))
    if single:
        return single
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth")) if folder.is_dir() else []
    if pickled:
        raise CheckpointError(
            f"{folder} holds pickled weights ({pickled[0]}), which are refused because unpickling can run code; "
            "if you trust the file, convert it once with torch >= 2.6 (whose weights_only loader runs no code): "
            "python -c \"import torch; from safetensors.torch import save_file; "
            f"save_file(torch.load('{pickled[0]}', map_location='cpu', weights_only=True), 'model.safetensors')\" "
            "inside that folder, or download the safetensors release")
    raise CheckpointError(f"{folder} has no model.safetensors (or sharded index); point --model at a FastVLM folder")


# safetensors' names of the element types (its header's "dtype" field) -> torch's.
STORED_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                 "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def safetensors_headers(folder):
    """{name: tensor on the meta device with the stored shape and dtype} for every tensor of the folder's
    files, read from the headers alone (no tensor data): what a loader compares with the model that the
    config describes before it allocates anything, so that a config.json describing a far larger model
    than its file is named, not attempted."""
    stored = {}
    for path in safetensors_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    header = f.get_slice(name)
                    kind = header.get_dtype()
                    if kind not in STORED_DTYPES:
                        raise CheckpointError(f"{path}: '{name}' is stored as {kind}, which this loader does not "
                                              "read; convert the file to bfloat16 or float32")
                    stored[name] = torch.empty(header.get_shape(), dtype=STORED_DTYPES[kind], device="meta")
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own types for truncated or non-safetensors files
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}); re-download it") from None
    return stored


def safetensors_names(folder):
    """The tensor names of every weight file of the folder, read from the headers (no tensor data)."""
    return list(safetensors_headers(folder))


def iter_safetensors(folder, dtype=None):
    """(name, tensor) for every tensor of the folder's files, read one at a time.

    `dtype` casts floating tensors as they are read (bf16 files into an fp32 model, say); integer
    buffers such as BatchNorm's `num_batches_tracked` keep their type. A caller that copies each tensor
    into the model and drops it holds one tensor at a time, never a second copy of the whole model.
    """
    for path in safetensors_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys())
            for name in names:
                # The file is memory-mapped while open, and the pages a tensor was read from count as the
                # process's memory until it is closed: open it per tensor, so only one tensor's pages
                # are ever mapped (a 0.5B file read whole would add its size to the peak).
                with safe_open(str(path), framework="pt") as f:
                    t = f.get_tensor(name)
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                yield name, t
        except Exception as e:  # safetensors raises its own types for truncated or non-safetensors files
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}); re-download it") from None


def read_safetensors(folder, prefix="", dtype=None):
    """All tensors whose names start with `prefix` (prefix removed), from every file of the folder."""
    return {name[len(prefix):]: t for name, t in iter_safetensors(folder, dtype) if name.startswith(prefix)}


def load_exact(module, tensors, where="checkpoint", file_names=None):
    """Copy `tensors` ({name: tensor}, or (name, tensor) pairs streamed one at a time) into `module`'s
    parameters and buffers; every one on both sides must match.

    Non-persistent buffers (RoPE tables) are computed, not stored, so they are not expected. Tied
    parameters (one tensor under two names) are filled once and may appear under either name.
    `file_names` maps our names to the checkpoint's, so that an error names the key in the file;
    `where` names the part being loaded (a string, or a function of our name).
    """
    file_names = file_names or {}
    part = where if callable(where) else (lambda name: where)
    own = module.state_dict(keep_vars=True)
    filled = set()
    with torch.no_grad():
        for name, value in (tensors.items() if hasattr(tensors, "items") else tensors):
            shown = f"'{file_names[name]}' (ours: {name})" if name in file_names else f"'{name}'"
            if name not in own:
                raise CheckpointError(f"{part(name)}: unexpected tensor {shown} (shape {tuple(value.shape)}): "
                                      "the checkpoint does not match this model's config")
            target = own[name]
            if target.is_floating_point() != value.is_floating_point() or value.is_complex():
                raise CheckpointError(f"{part(name)}: {shown} is stored as {str(value.dtype).removeprefix('torch.')} "
                                      f"but the model holds {str(target.dtype).removeprefix('torch.')} there: "
                                      "the file is damaged or not for this model")
            if tuple(target.shape) != tuple(value.shape):
                raise CheckpointError(f"{part(name)}: {shown} has shape {tuple(value.shape)} but the config "
                                      f"gives {tuple(target.shape)}: config.json and the weights disagree")
            target.copy_(value)
            filled.add(id(target))
    for name, target in own.items():
        if id(target) not in filled:
            shown = f"'{file_names[name]}' (ours: {name})" if name in file_names else f"'{name}'"
            raise CheckpointError(f"{part(name)}: missing tensor {shown} (shape {tuple(target.shape)}): "
                                  "the checkpoint is incomplete or for another model")


def new_file_mode():
    """The mode open() gives a new file: 0o666 less the umask."""
    mask = os.umask(0o022)         # reading the umask means setting it: put it straight back
    os.umask(mask)
    return 0o666 & ~mask


def write_safetensors(tensors, path, metadata=None):
    """name -> tensor into one safetensors file at `path`, with the mode of the folder's other files
    (safetensors alone writes its files readable by their owner only, 0o600); `metadata`: more
    string -> string entries for the file's header."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt", **(metadata or {})})
    os.chmod(path, new_file_mode())


def write_errno(e):
    """The system's error number behind a failed write, or None: an OSError's own, one further down the
    chain (torch.save writing to a Python file raises a RuntimeError whose context is the OSError), or
    the "(os error N)" that the Rust writers of safetensors and tokenizers put in their message."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e.errno
        found = re.search(r"\(os error (\d+)\)", str(e))
        if found:
            return int(found.group(1))
        e = e.__cause__ or e.__context__
    return None

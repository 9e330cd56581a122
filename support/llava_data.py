"""LLaVA's training data into batches: conversation files and image folders in, (pixels, ids, labels) out.

    [{"id": ..., "image": "photo.jpg", "conversations": [{"from": "human", "value": "<image>\\n..."},
                                                       {"from": "gpt", "value": "..."}, ...]}, ...]

A data file is a JSON array of such records (LLaVA's files) or JSON lines; `image` may be absent (a
text-only conversation). Every record is checked when the files are read (load_datasets), so that bad
data fails before a model loads; the conversations become ids and labels through fastvlm.py's one prompt
renderer (conversation_ids), the images pixels through its preprocessing. StepBatches hands a training
loop each optimizer step's micro-batches, in an order that follows from the step alone (resume).
"""

import json
from pathlib import Path

import torch

import fastvlm as FV
from support.chat import InputError, load_image
from support.options import DataError

ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}   # LLaVA's names, and the chat names


def read_records(path):
    """The records of one data file: a JSON array (as LLaVA's files are) or JSON lines (one record a line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e})") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON ({e})") from None
    else:
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} line {number} is not valid JSON ({e}); a data file is a JSON "
                                    "array of records or one JSON record a line") from None
    if not records:
        raise DataError(f"{path} holds no records")
    return records


def normalise(r, where, counts):
    """One LLaVA record -> {"id", "image": file name or None (text-only), "conversations": [{"from":
    "human"|"gpt", "value"}]}, alternating from a human turn. A leading assistant turn is dropped, as
    LLaVA's preprocessing drops it, and counted."""
    if not isinstance(r, dict) or not isinstance(r.get("conversations"), list):
        raise DataError(f"{where}: needs 'conversations' (a list of turns) and, unless text-only, 'image'")
    image = r.get("image")
    if isinstance(image, list):
        raise DataError(f"{where}: 'image' lists {len(image)} images; FastVLM is trained with one image per "
                        "conversation: split the record or leave it out")
    if image is not None and (not isinstance(image, str) or not image):
        raise DataError(f"{where}: 'image' must be a file name (or absent, for a text-only conversation)")
    turns = []
    for t in r["conversations"]:
        if not isinstance(t, dict) or t.get("from") not in ROLES or not isinstance(t.get("value"), str):
            raise DataError(f"{where}: conversations must be a list of {{'from': 'human'|'gpt' (or 'user'|"
                            "'assistant'), 'value': str}")
        turns.append({"from": ROLES[t["from"]], "value": t["value"]})
    if turns and turns[0]["from"] == "gpt":
        turns = turns[1:]
        counts["leading assistant turns dropped"] += 1
    if not any(t["from"] == "gpt" for t in turns):
        raise DataError(f"{where}: the conversation has no assistant ('gpt') turn to learn from")
    if any(a["from"] == b["from"] for a, b in zip(turns, turns[1:])):
        raise DataError(f"{where}: turns must alternate human, gpt, human, ... starting with human")
    later = [k for k, t in enumerate(turns) if k > 0 and FV.IMAGE in t["value"]]
    if later:
        raise DataError(f"{where}: turn {later[0]} holds an '{FV.IMAGE}' marker; one image per conversation, "
                        "marked in the first human turn only")
    if image is None:
        if FV.IMAGE in turns[0]["value"]:
            raise DataError(f"{where}: the first turn has an '{FV.IMAGE}' marker but the record no 'image'")
        counts["text-only"] += 1
    return {"id": r.get("id"), "image": image, "conversations": turns}


def image_problem(path):
    """Why an image file cannot be used (a cheap check: it exists and its header is an image's), or None."""
    if not path.is_file():
        return "not found"
    try:
        from PIL import Image

        with Image.open(path):
            return None
    except Exception as e:  # PIL raises several types for files that are not images
        return f"not a readable image ({type(e).__name__})"


def load_records(data_path, image_folder=None, skip_missing=False, counts=None):
    """The normalised records of one data file, each with its image folder. Images are checked when the
    folder is given: a missing or unreadable one stops with the first few named, or with `skip_missing`
    is left out and counted."""
    counts = counts if counts is not None else {}
    for key in ("records", "text-only", "leading assistant turns dropped", "images skipped"):
        counts.setdefault(key, 0)
    out, bad = [], []
    for i, r in enumerate(read_records(data_path)):
        where = f"{data_path} record {i}" + (f" (id {r.get('id')!r})" if isinstance(r, dict) and "id" in r else "")
        rec = normalise(r, where, counts)
        rec["folder"] = None if image_folder is None else Path(image_folder)
        if rec["image"] is not None and image_folder is not None:
            problem = image_problem(rec["folder"] / rec["image"])
            if problem:
                if skip_missing:
                    counts["images skipped"] += 1
                    continue
                bad.append(f"{where}: image {rec['folder'] / rec['image']} {problem}")
        out.append(rec)
    if bad:
        raise DataError(f"{len(bad)} image(s) cannot be used, e.g. {'; '.join(bad[:3])}; fix them or pass "
                        "--skip-missing-images to train without those records")
    counts["records"] += len(out)
    return out


def load_datasets(data_paths, image_folders, skip_missing=False):
    """Every record of several data files (`--data A B --images DIR_A DIR_B`, or one folder for all) and
    the summary line printed at the start."""
    if len(image_folders) not in (1, len(data_paths)):
        raise DataError(f"--images: give one folder for all data files or one per file "
                        f"({len(data_paths)} files, {len(image_folders)} folders)")
    folders = image_folders * len(data_paths) if len(image_folders) == 1 else image_folders
    records, parts, total = [], [], {}
    for path, folder in zip(data_paths, folders):
        counts = {}
        records += load_records(path, folder, skip_missing, counts)
        extra = [f"{n:,} {what}" for what, n in counts.items() if what != "records" and n]
        parts.append(f"{Path(path).name}: {counts['records']:,} records" + (f" ({', '.join(extra)})" if extra else ""))
        for k, v in counts.items():
            total[k] = total.get(k, 0) + v
    return records, "data: " + "; ".join(parts), total


def exchanges(turns, image=True):
    """A record's alternating turns -> [(question, answer or None), ...]. With an image, the first
    question loses its `<image>` marker: the prompt renderer places the image before it, as LLaVA does."""
    questions = [t["value"] for t in turns[0::2]]
    if image:
        questions[0] = questions[0].replace(FV.IMAGE, "").strip()
    answers = [t["value"] for t in turns[1::2]]
    return [(q, answers[k] if k < len(answers) else None) for k, q in enumerate(questions)]


class Dataset(torch.utils.data.Dataset):
    """(pixels or None for a text-only record, ids, labels) per record; truncation at `max_length` counted."""

    def __init__(self, records, image_folder, tokenizer, image_size, max_length):
        self.records, self.folder = records, None if image_folder is None else Path(image_folder)
        self.tokenizer, self.image_size, self.max_length = tokenizer, image_size, max_length
        self.truncated = 0

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        r = self.records[i]
        pixels = None
        if r.get("image") is not None:
            folder = r.get("folder") or self.folder
            try:
                pixels = FV.preprocess(load_image(folder / r["image"]), self.image_size)
            except InputError as e:
                raise DataError(f"record {i} (id {r.get('id')!r}): {e}") from None
        ids, labels = FV.conversation_ids(self.tokenizer, exchanges(r["conversations"], pixels is not None),
                                          image=pixels is not None)
        if len(ids) > self.max_length:     # truncate (and count), as LLaVA does at model_max_length
            ids, labels = ids[:self.max_length], labels[:self.max_length]
            if FV.IMAGE_TOKEN_INDEX not in ids:
                pixels = None
            self.truncated += 1
        return pixels, torch.tensor(ids), torch.tensor(labels)


def size_at(step, total_steps, sizes):
    """The image size of an optimizer step under `--image-sizes`: equal shares of the run, in order (stage
    1.5 "at increasing resolutions": 512, 768, 1024 gives the first third of the steps at 512 px)."""
    return sizes[min(len(sizes) - 1, step * len(sizes) // max(1, total_steps))]


class StepBatches(torch.utils.data.Dataset):
    """The micro-batches of optimizer steps `first` to `last` - 1, in training order: item k is this
    process's micro-batch k, collated, at the image size of its step. A DataLoader's workers build them
    ahead of the training loop; everything about an item follows from its step, so a resumed run sees
    the same samples in the same order, with any number of workers.

    A record whose image fails to decode is left out with `skip` (the item names it, so that the loop
    counts each such record once however often it comes round); otherwise the item carries the error
    for the loop to report (an exception raised in a worker would arrive with its traceback)."""

    def __init__(self, dataset, sampler, plan, first, last, pad_id, skip):
        self.dataset, self.sampler, self.plan, self.pad_id, self.skip = dataset, sampler, plan, pad_id, skip
        self.first, self.last = first, last
        self.orders = {}

    def __len__(self):
        return (self.last - self.first) * self.plan["grad_accum"]

    def __getitem__(self, k):
        plan = self.plan
        step, j = divmod(k, plan["grad_accum"])
        step += self.first
        epoch, position = divmod(step, plan["steps_per_epoch"])
        if epoch not in self.orders:                     # this process's share of the epoch's permutation
            self.sampler.set_epoch(epoch)
            self.orders = {epoch: list(self.sampler)}
        start = position * plan["per_step"] + j * plan["batch_size"]
        self.dataset.image_size = size_at(step, plan["total_steps"], plan["image_sizes"])
        truncated, items, skipped = self.dataset.truncated, [], []
        for i in self.orders[epoch][start:start + plan["batch_size"]]:
            try:
                items.append(self.dataset[i])
            except DataError as e:
                if not self.skip:
                    return {"error": str(e)}
                skipped.append(i)
        if not items:
            return {"error": "every record of a micro-batch had an image that failed to decode"}
        return {"batch": collate(items, self.pad_id), "skipped": skipped,
                "truncated": self.dataset.truncated - truncated, "image_size": self.dataset.image_size}


def collate(items, pad_id):
    """Right-padded ids and labels; the images of the records that have one, in order (maybe none)."""
    images = [p for p, _, _ in items if p is not None]
    pixels = torch.stack(images) if images else None
    T = max(len(i) for _, i, _ in items)
    ids = torch.full((len(items), T), pad_id)
    labels = torch.full((len(items), T), -100)
    for b, (_, i, l) in enumerate(items):
        ids[b, :len(i)], labels[b, :len(l)] = i, l
    return pixels, ids, labels

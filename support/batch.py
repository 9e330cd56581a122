"""Batch mode (infer.py --batch): many questions about many images, answered once each.

Batch mode reads one JSON object per line, {"image": ..., "question": ...} with optional "id",
"max_new_tokens" and "chat" (true: consecutive chat lines about the same image are one conversation;
a chat line about another image starts a new one), image paths relative to the question file's folder.
It loads the model once, encodes each image once for the questions about it, and writes one JSON
answer per line (id, image, question, answer, ttft_ms, tokens, error), appended and flushed as each is
done; rerun with the same --out to answer only the ids not answered yet. A bad line becomes an answer
with an error, and the run goes on; but a file that is not JSON lines at all (binary data such as an
image, or none of its first 5 lines a JSON object) is refused before anything is written.
About --out:
- It is locked while a run writes to it (an flock, which ends with the process however it ends): a
  second run on the same --out refuses at once, naming the process that holds it, instead of
  answering every question a second time.
- A conversation is written in one write. Should a kill cut that write, the rerun removes the
  conversation's first answers from the end of the file and answers it again whole, so that no id is
  ever in --out twice. Part of a conversation elsewhere in the file (an answer deleted by hand to ask
  it again) is refused, naming the ids to delete: each later answer depends on the earlier ones.
- On a full disk (or a file-size limit) the run stops with one line; the write it was in is undone,
  the answers written before are kept whole, and a rerun after freeing space answers the rest.
Problems with the input are reported in one line on stderr with a non-zero exit code.
"""

import errno
import json
import os
import re
import stat
import sys
from collections import OrderedDict
from pathlib import Path

from support.options import UsageError, load


def answer_record(id_, image, question, answer, chat=None, error=None):
    """One line of batch output (and the object of --json)."""
    t = chat.timing if chat is not None and error is None else None
    return {"id": id_, "image": image, "question": question, "answer": answer,
            "ttft_ms": None if t is None else round(t.ttft * 1000, 1),
            "tokens": None if t is None else t.new_tokens, "error": error}


# A question file is refused as a whole, before anything is written, when it is not JSON lines at all:
# an image or other binary data (a NUL byte, which JSON text never holds, in its first bytes), or a text
# file none of whose first lines is a JSON object. Answering it line by line would append an error
# "answer" per line, which would then count as answered ids. A few bad lines among good ones are fine.
SNIFF_BYTES = 8192


FIRST_LINES = 5


# A \ud800-\udfff escape: JSON can spell a lone surrogate, which is not text and cannot be written out
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


def parse_line(line):
    """(the line's JSON object or why it cannot be asked, whether the line is a JSON object)."""
    try:
        item = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError) as e:   # ValueError: bad UTF-8 or JSON, an int of > 4300 digits
        return f"the line is not valid JSON ({str(e)[:200]})", False
    if not isinstance(item, dict):
        return "the line is not a JSON object", False
    if SURROGATE_ESCAPE.search(line):        # only then: the check below copies the whole line once more
        try:
            json.dumps(item, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return "the line holds a lone surrogate escape (e.g. \\ud800), which is not text", True
    return item, True


def read_batch(path):
    """The question file as a list of (line number, parsed object or an error string). Read one line at
    a time, so that a 20 MB question is held once, as its parsed text (not also as the file's bytes, its
    list of lines and their decoded copies); see SNIFF_BYTES for the files refused whole."""
    out, objects = [], 0

    def refuse_unless_questions():
        if not objects:
            number, problem = out[0]
            which = f"first {FIRST_LINES} lines" if len(out) == FIRST_LINES else "lines"
            raise UsageError(f"{path} does not look like JSON lines: none of its {which} is a JSON object (line "
                             f"{number}: {problem}); write one JSON object per line, e.g. "
                             '{"image": "photo.jpg", "question": "What is in it?"}')

    try:
        # a FIFO or a device would block open() or read without end: refused before it is opened
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise UsageError(f"--batch {path} is not a regular file (a folder, a pipe or a device); "
                             "pass a file of questions")
        with open(path, "rb") as f:
            if b"\0" in f.peek(SNIFF_BYTES)[:SNIFF_BYTES]:
                raise UsageError(f"{path} holds binary data (a NUL byte near its start: an image? text saved as "
                                 "UTF-16?), not JSON lines; pass a UTF-8 text file with one JSON object per line")
            for number, line in enumerate(f, 1):
                if number == 1:
                    line = line.removeprefix(b"\xef\xbb\xbf")      # a byte-order mark some editors write
                if not line or line.isspace():
                    continue
                item, is_object = parse_line(line)
                del line                               # its bytes freed before the next line is read
                out.append((number, item))
                objects += is_object
                if len(out) == FIRST_LINES:
                    refuse_unless_questions()
    except OSError as e:
        raise UsageError(f"cannot read the question file {path} ({e.strerror})") from None
    if not out:
        raise UsageError(f"the question file {path} has no questions (one JSON object per line)")
    if len(out) < FIRST_LINES:
        refuse_unless_questions()
    return out


def check_out(out_path, batch_path):
    """--out must be a regular file (or not exist yet) in a writable folder, and not the question file."""
    if out_path is None:
        return
    try:
        if out_path.exists() and not out_path.is_file():
            raise UsageError(f"--out {out_path} is not a regular file; pass a file name")
        if out_path.exists() and os.path.samefile(out_path, batch_path):
            raise UsageError("--out is the question file itself; pass another file for the answers")
        folder = out_path.parent if str(out_path.parent) else Path(".")
        if not folder.is_dir():
            raise UsageError(f"--out {out_path}: the folder {folder} does not exist")
        if not os.access(folder, os.W_OK) or (out_path.exists() and not os.access(out_path, os.W_OK)):
            raise UsageError(f"--out {out_path} is not writable; pass another file")
    except OSError as e:
        raise UsageError(f"--out {out_path} cannot be used ({e.strerror})") from None


def lock_holder(fd):
    """' (pid N)' for the process that holds the flock on fd's file, as Linux's /proc/locks tells it
    ("1: FLOCK  ADVISORY  WRITE 4242 fe:00:2146414 0 EOF"), else '' (another system, or not found)."""
    inode = str(os.fstat(fd).st_ino)
    try:
        with open("/proc/locks") as f:
            for fields in map(str.split, f):
                # the device is left out: overlay file systems report another one than stat() does
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == inode:
                    return f" (pid {fields[4]})"
    except OSError:
        pass
    return ""


def lock_out(out_path):
    """The --out file opened for appending (created if need be) and locked for this run: an exclusive
    flock, asked for without waiting, held by the open file and so released when the process ends,
    whatever ends it. A second run on the same file is refused at once, before it reads what is
    answered (it would answer the same ids) and before it loads a model."""
    try:
        fd = os.open(out_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as e:
        raise UsageError(f"--out {out_path} cannot be written ({e.strerror})") from None
    try:
        import fcntl
    except ImportError:          # Windows has no flock: --out is not locked there
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock_holder(fd)
        os.close(fd)
        raise UsageError(f"another process{holder} holds the lock on --out {out_path} (another infer.py --batch "
                         "run writing to it?); wait for it to end, or pass another --out") from None
    except OSError as e:
        os.close(fd)
        raise UsageError(f"--out {out_path} cannot be locked ({e.strerror}); pass a file on a local disk") from None
    return fd


def answer_key(line):
    """The id (as JSON) of an answer line of this program, else None."""
    try:
        record = json.loads(line)
        return json.dumps(record["id"]) if {"id", "answer", "error"} <= set(record) else None
    except (ValueError, KeyError, TypeError):
        return None


def answered_ids(out_path):
    """The answers already in an output file, as (id as JSON, offset of its line) in the file's order.
    Blank lines are skipped (one is left where an answer was deleted by hand). A last line without its
    newline is kept, the newline added, when it is a whole answer (an editor may strip the final
    newline); cut short by a killed process, it is removed, so that what follows is appended to whole
    lines only; but only once every whole line is an answer and the cut one starts as an answer does, so
    that a file of something else is never touched."""
    if out_path is None or not out_path.is_file():
        return []
    data = out_path.read_bytes()
    whole, _, tail = data.rpartition(b"\n") if not data.endswith(b"\n") else (data, b"", b"")
    whole += _                                           # the newline of the last whole line, if any
    done, offset = [], 0
    for number, line in enumerate(whole.splitlines(keepends=True), 1):
        if not line.isspace():
            key = answer_key(line)
            if key is None:
                raise UsageError(f"{out_path} has lines that are not answers of this program (line {number}); "
                                 "pass another --out")
            done.append((key, offset))
        offset += len(line)
    if tail:
        key = None if tail.isspace() else answer_key(tail)
        if key is None and not tail.isspace() and not tail.startswith(b'{"id": '):
            raise UsageError(f"{out_path} does not end with an answer of this program; pass another --out")
        with open(out_path, "r+b") as f:
            if key is not None or tail.isspace():        # a whole answer (or blanks): only its newline is missing
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
            else:                                        # cut short: removed, to be answered again
                f.truncate(len(data) - len(tail))
        if key is not None:
            done.append((key, offset))
    return done


def drop_interrupted_conversation(fd, done, groups, out_path, batch_path):
    """`done` less a conversation only partly answered. A conversation is written in one write, but a
    kill can cut that write after its first lines (a failed write is undone, see append_whole): they
    are at the end of the file, and are cut off here, so that the rerun answers the whole conversation
    again and no id is in the file twice. Part of a conversation anywhere else was deleted by hand:
    deleting the rest of it (each later answer depends on the earlier) is the user's call, so the run
    is refused, naming the ids."""
    answered = {key for key, _ in done}
    for group in groups:
        have = [json.dumps(e["id"]) for e in group if json.dumps(e["id"]) in answered]
        if not have or len(have) == len(group):
            continue
        last = done[len(done) - len(have):]
        if sorted(key for key, _ in last) != sorted(have):
            raise UsageError(f"{out_path} holds only part of the conversation of lines {group[0]['line']}-"
                             f"{group[-1]['line']} of {batch_path} (ids {', '.join(have)}); a conversation is "
                             "answered whole: delete those answers from it and rerun to answer it again")
        os.ftruncate(fd, last[0][1])
        done = done[:len(done) - len(have)]
        answered -= set(have)
    return done


def append_whole(fd, text):
    """Append `text` (whole answer lines) to --out in one unit: a write that fails part way (a full disk,
    a file-size limit) is undone, so that the file keeps whole answers and whole conversations only."""
    start = os.fstat(fd).st_size
    data = memoryview(text.encode("utf-8"))
    try:
        while data:
            data = data[os.write(fd, data):]                  # a write may take only part of the data
    except OSError:
        try:
            os.ftruncate(fd, start)
        except OSError:
            pass                # left to the rerun, which removes a cut last line (answered_ids)
        raise


def stdout_failed(e, batch=False):
    """The line for a failed write to stdout. Nothing more can go there: stdout is pointed at the null
    device, so that Python's flush at exit does not fail a second time (a traceback-like complaint and
    exit code 120 after our line)."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError):        # ValueError: stdout replaced by an object without a file number
        pass
    if e.errno == errno.EPIPE:
        return "stdout was closed before the answer was written (a pipe whose reader ended)"
    return write_error(None, e) if batch else f"cannot write the answer to stdout ({e.strerror})"


def write_error(out_path, e):
    """The line for a failed write of answers."""
    full = e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    if out_path is None:
        return (f"cannot write the answers to stdout ({e.strerror})"
                + ("; pass --out FILE to keep whole answers and to answer the rest in a rerun" if full else ""))
    return (f"cannot write to {out_path} ({e.strerror}); the answers written before are kept whole: "
            + ("free space and " if full else "") + "rerun with the same --out to answer the rest")


def batch(args):
    """Every question of the --batch file; see the module docstring."""
    items = read_batch(args.batch)
    # Each entry: its id (the line number when it has none), what to ask, or why it cannot be asked.
    entries = []
    for number, item in items:
        if isinstance(item, str):
            entries.append(dict(id=number, line=number, image=None, question=None, error=item))
            continue
        entry = dict(id=item.get("id", number), line=number, image=item.get("image"), question=item.get("question"),
                     chat=item.get("chat", False), max_new_tokens=item.get("max_new_tokens", args.max_new_tokens),
                     own_limit="max_new_tokens" in item, error=None)
        if not isinstance(entry["chat"], bool):
            entry["error"] = "\"chat\" must be true or false"
        elif not isinstance(entry["image"], str) or not entry["image"]:
            entry["error"] = "the line has no \"image\" (a path to an image file)"
        elif not isinstance(entry["question"], str) or not entry["question"].strip():
            entry["error"] = "the line has no \"question\" (non-empty text)"
        elif not isinstance(entry["max_new_tokens"], int) or isinstance(entry["max_new_tokens"], bool) \
                or entry["max_new_tokens"] < 1:
            entry["error"] = "\"max_new_tokens\" must be a whole number >= 1"
        entries.append(entry)
    seen = {}
    for entry in entries:
        key = json.dumps(entry["id"])
        if key in seen:
            raise UsageError(f"{args.batch}: the id {key} is used twice (lines {seen[key]} and {entry['line']}); "
                             "every line needs its own id")
        seen[key] = entry["line"]

    # Conversations: consecutive chat lines about the same image (a chat line about another image starts
    # a new one). Answered, then written in one write, so that a rerun answers an interrupted one whole.
    groups = []
    for entry in entries:
        if entry["error"] is None and entry["chat"]:
            last = groups[-1][-1] if groups else None
            if last is not None and last.get("chat") and last["error"] is None and last["image"] == entry["image"]:
                groups[-1].append(entry)
                continue
        groups.append([entry])
    check_out(args.out, args.batch)
    fd = lock_out(args.out) if args.out is not None else None
    try:
        done = answered_ids(args.out)
        if fd is not None:
            done = drop_interrupted_conversation(fd, done, groups, args.out, args.batch)
        answered = {key for key, _ in done}
        todo = [g for g in groups if not all(json.dumps(e["id"]) in answered for e in g)]
        skipped = len(entries) - sum(len(g) for g in todo)
        if skipped:
            print(f"{skipped} of {len(entries)} questions already answered in {args.out}; answering the rest",
                  file=sys.stderr)
        return answer_groups(args, todo, fd) if todo else 0
    finally:
        if fd is not None:
            os.close(fd)                 # nothing buffered: closing cannot fail with a second error


def answer_groups(args, todo, fd):
    """Load the model, answer the groups of batch() and write each group's lines in one write to `fd`
    (the locked --out) or stdout."""
    from tqdm import tqdm

    from fastvlm import SYSTEM_PROMPT
    from support.chat import Chat, InputError, load_image, memory_line
    from support.checkpoint import CheckpointError

    model, tokenizer, config, device = load(args)
    # A --max-new-tokens too large for any question would turn every line that uses it into an error
    # answer, each then counted as answered: refused once instead (a line's own limit is that line's error).
    system = SYSTEM_PROMPT if args.system is None else args.system
    # so would a --system too long for any question (it is in every conversation's first turn)
    try:
        Chat(model, tokenizer, None, config, system=system).check_system()
    except InputError as e:
        raise UsageError(str(e)) from None
    context = Chat(model, tokenizer, None, config).context
    room = context - model.vision_tower.cfg.num_tokens()
    if args.max_new_tokens >= room and any(e["error"] is None and not e["own_limit"] for g in todo for e in g):
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a question in the model's "
                         f"context of {context} tokens ({context - room} of them the image's); pass less than {room}")
    base = args.batch.parent
    failed = 0
    encoded = OrderedDict()                              # image path -> its (1, N, d) embeddings, the last 16
    options = dict(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    with tqdm(total=sum(len(g) for g in todo), desc="answering", unit="question", file=sys.stderr,
              disable=None) as bar:   # shown on a terminal only
        for group in todo:
            lines, chat = [], None
            for entry in group:
                record = answer_record(entry["id"], entry["image"], entry["question"], None, error=entry["error"])
                if entry["error"] is None:
                    path = Path(entry["image"])
                    path = path if path.is_absolute() else base / path
                    try:
                        if chat is None or not entry["chat"]:
                            chat = Chat(model, tokenizer, load_image(path), config, system=system)
                            chat.image_embeds = encoded.get(str(path))
                        # the limit that does not fit is the line's own, or the run's option
                        limit = 'the line\'s "max_new_tokens"' if entry["own_limit"] else "--max-new-tokens"
                        text = chat.ask(entry["question"], max_new_tokens=entry["max_new_tokens"], limit=limit,
                                        **options)
                        record = answer_record(entry["id"], entry["image"], entry["question"], text, chat)
                        encoded[str(path)] = chat.image_embeds
                        encoded.move_to_end(str(path))
                        if len(encoded) > 16:
                            encoded.popitem(last=False)
                    except (InputError, CheckpointError) as e:
                        record["error"] = str(e)
                failed += record["error"] is not None
                lines.append(json.dumps(record, ensure_ascii=False) + "\n")
                bar.update()
            try:                                         # one write per answer or conversation, flushed:
                if fd is not None:                       # a killed run loses at most what is in progress
                    append_whole(fd, "".join(lines))
                else:                                    # stdout: no undo (a pipe, a terminal, a file the
                    sys.stdout.write("".join(lines))      # shell opened), which is what --out is for
                    sys.stdout.flush()
            except OSError as e:
                raise UsageError(write_error(args.out, e) if fd is not None else stdout_failed(e, batch=True)) from None
    if failed:
        print(f"{failed} of {sum(len(g) for g in todo)} questions could not be answered (see their \"error\"); "
              "to ask one again, delete its line from the answers and rerun", file=sys.stderr)
    if args.timing:
        print(memory_line(device), file=sys.stderr)
        if getattr(model, "precision", None) is not None:       # set by support/options.load: dtype and why
            print(model.precision.line(), file=sys.stderr)
    return 0

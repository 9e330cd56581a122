"""Every FastVLM a user holds: Apple's LLaVA layout, transformers' `fast_vlm` layout (checked against
transformers itself), conversions both ways, folders that cannot work, and models named by Hub repo id."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import convert
import fastvlm as FV
import infer
import qwen2
import repmixer as R
from support.checkpoint import CheckpointError
from synthetic import REFERENCE, synthetic_image, write_fastvlm_checkpoint
from tolerance import assert_close
from support import chat as CH, loading  # noqa: E402

pytestmark = pytest.mark.inference
FIXTURES = Path(__file__).parent / "fixtures"
RTOL = ATOL = 1e-4             # as tests/test_fastvlm.py's end-to-end comparison


@pytest.fixture(scope="module")
def llava_small(small_model_dir):
    return small_model_dir


@pytest.fixture(scope="module")
def hf_small(llava_small, tmp_path_factory):
    return convert.convert(llava_small, tmp_path_factory.mktemp("hf") / "m")[0]


def answers(folder, questions=("What is it?", "And the colour?"), **kw):
    model, tokenizer, config = loading.load_model(folder, **kw)
    chat = CH.Chat(model, tokenizer, CH.load_image(FIXTURES / "e2e_image.png"), config)
    return [chat.ask(q, max_new_tokens=8) for q in questions]


# --- the fast_vlm layout's names ------------------------------------------------------------------------

def test_every_transformers_key_maps_onto_the_model_and_back():
    """All 923 keys of transformers' FastVLM-0.5B (committed manifest) name a tensor of our model with
    the same shape, every tensor of ours is named once, and the mapping inverts exactly."""
    rows = [r.split("\t") for r in (REFERENCE / "transformers_fast_vlm_0.5b_state_dict.tsv").read_text().splitlines()[1:]]
    config = json.loads((REFERENCE / "transformers_fast_vlm_0.5b_config.json").read_text())
    vision_cfg = loading.vision_config(config)
    llm_cfg = qwen2.Qwen2Config.from_dict(config["text_config"])
    assert vision_cfg == R.FASTVITHD and llm_cfg.vocab_size == 152000 and llm_cfg.rope_theta == 1e6
    with torch.device("meta"):
        own = FV.FastVLM(vision_cfg, qwen2.Qwen2Config(**{**llm_cfg.__dict__, "tie_word_embeddings": False})).state_dict()
    seen = set()
    for key, shape, _ in rows:
        ours = loading.FAST_VLM.ours(key, vision_cfg)
        assert ours in own, (key, ours)
        assert tuple(own[ours].shape) == tuple(int(s) for s in shape.split(",") if s), key
        assert loading.FAST_VLM.theirs(ours, vision_cfg) == key
        seen.add(ours)
    assert seen == set(own)
    assert loading.timm_key("stages.3.pos_emb.reparam_conv.weight") == "stages.3.cpe.fused.weight"
    assert loading.timm_key("stages.4.blocks.1.layer_scale_2.gamma") == "stages.4.blocks.1.layer_scale_2"
    assert loading.timm_key("final_conv.se.fc1.weight") == "expand.se.reduce.weight"


@pytest.mark.parametrize("tied", [True, False])
def test_fast_vlm_folder_matches_transformers(tied, tmp_path):
    """Our converter's fast_vlm folder, loaded by transformers' FastVlmForConditionalGeneration and its
    processor (tests/make_fast_vlm_fixtures.py: no key missing or unexpected), and by us: prompt ids
    exactly, first-step logits elementwise, and 12 greedy tokens."""
    ref = load_file(str(FIXTURES / "fast_vlm_reference.safetensors"))
    name = "tied" if tied else "untied"
    llava = write_fastvlm_checkpoint(tmp_path / "llava", tied=tied)
    folder, _ = convert.convert(llava, tmp_path / "hf")
    model, tokenizer, config = loading.load_model(folder)
    assert model.layout == "fast_vlm" and (model.llm.lm_head.weight is model.llm.embed_tokens.weight) == tied
    image = Image.fromarray((synthetic_image(512)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    question = "What is in the picture?"
    ids = FV.turn_ids(tokenizer, question, first=True)
    at = ids.index(FV.IMAGE_TOKEN_INDEX)
    expanded = ids[:at] + [config["image_token_index"]] * 256 + ids[at + 1:]
    assert expanded == ref[f"{name}_input_ids"].tolist()
    image_embeds = model.encode_image(FV.preprocess(image, 1024)[None])
    logits = model.llm(embeds=model.embed(ids, image_embeds))[0, -1]
    assert_close(logits, ref[f"{name}_logits"], RTOL, ATOL, "first-step logits", min_std=0.5)
    greedy = ref[f"{name}_greedy"].tolist()
    assert len(set(greedy)) >= 2
    chat = CH.Chat(model, tokenizer, image, config)
    chat.stop_ids = set()                                  # transformers generated past any stop token
    chat.ask(question, max_new_tokens=len(greedy))
    assert chat.history[len(ids):] == greedy


def test_fast_vlm_tokenizer_never_answers_its_image_token(hf_small):
    _, tokenizer, config = loading.load_model(hf_small)
    assert tokenizer.token_id("<image>") == config["image_token_index"] == len(tokenizer) - 1
    assert CH.Chat(loading.load_model(hf_small)[0], tokenizer, None, config).vocab_limit == len(tokenizer) - 1


# --- conversions ----------------------------------------------------------------------------------------

def test_layouts_give_the_same_answers(llava_small, hf_small, tmp_path):
    """The same model in either layout, stored in bf16 or fp32, single file or sharded, answers the same."""
    expected = answers(llava_small)
    assert answers(hf_small) == expected
    fp32 = shutil.copytree(hf_small, tmp_path / "fp32")
    save_file({k: v.float() if v.is_floating_point() else v for k, v in load_file(str(fp32 / "model.safetensors")).items()},
              str(fp32 / "model.safetensors"))
    assert answers(fp32) == expected


def test_sharded_conversion(llava_small, tmp_path, monkeypatch):
    monkeypatch.setattr(convert, "SHARD_BYTES", 200_000)
    folder, _ = convert.convert(llava_small, tmp_path / "hf")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert answers(folder) == answers(llava_small)


def test_round_trips(tmp_path):
    """fast_vlm -> LLaVA -> fast_vlm is bit-identical; LLaVA -> fast_vlm -> LLaVA is identical but for the
    unused MobileCLIP head, which transformers' layout does not hold; rows past the tokenizer stay."""
    llava = write_fastvlm_checkpoint(tmp_path / "llava", tied=False)     # full FastViTHD, with head.proj
    hf, _ = convert.convert(llava, tmp_path / "hf")
    back, _ = convert.convert(hf, tmp_path / "back")
    hf2, _ = convert.convert(back, tmp_path / "hf2")
    a, b = load_file(str(llava / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert set(a) - set(b) == {loading.VISION_PREFIX + "head.proj"} and set(b) <= set(a)
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in b)
    assert a["model.embed_tokens.weight"].shape[0] == 151936 > 151646                # padding rows kept
    c, d = load_file(str(hf / "model.safetensors")), load_file(str(hf2 / "model.safetensors"))
    assert set(c) == set(d) and all(torch.equal(c[k], d[k]) and c[k].dtype == d[k].dtype for k in c)
    assert json.loads((hf / "config.json").read_text()) == json.loads((hf2 / "config.json").read_text())
    for folder in (hf, back):
        tokenizer = loading.load_tokenizer(folder)
        assert tokenizer.encode("Describe the image. 答えて") == loading.load_tokenizer(llava).encode("Describe the image. 答えて")


def test_convert_refuses_to_overwrite(llava_small, hf_small, capsys):
    assert convert.main([str(llava_small), str(hf_small)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_train_output_converts_and_answers_alike(tmp_path):
    """A folder written by train.py (the shipped tiny model: its own tokenizer and vision config)."""
    tiny = Path(__file__).parent.parent / "models" / "fastvlm-tiny"
    hf, _ = convert.convert(tiny, tmp_path / "hf")
    back, _ = convert.convert(hf, tmp_path / "back")
    assert answers(hf) == answers(tiny) == answers(back)


# --- folders that cannot work ---------------------------------------------------------------------------

def test_mlx_exports_are_named(llava_small, tmp_path):
    apple = shutil.copytree(llava_small, tmp_path / "apple")
    (apple / "fastvithd.mlpackage").mkdir()
    with pytest.raises(CheckpointError, match="CoreML package"):
        loading.load_model(apple)
    mlx = shutil.copytree(llava_small, tmp_path / "mlx")
    save_file({"language_model.model.embed_tokens.weight": torch.zeros(2, 2),
               "language_model.model.embed_tokens.scales": torch.zeros(2, 1)}, str(mlx / "model.safetensors"))
    with pytest.raises(CheckpointError, match="mlx-vlm's MLX layout"):
        loading.load_model(mlx)


# --- by name ----------------------------------------------------------------------------------------------

def hub_cache(root, repo, folder):
    """A Hugging Face cache as huggingface_hub lays it out: blobs, a snapshot of symlinks, refs/main."""
    base = root / ("models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (base / "blobs").mkdir(parents=True)
    (base / "snapshots" / commit).mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    for i, f in enumerate(sorted(folder.iterdir())):
        shutil.copy(f, base / "blobs" / f"blob{i}")
        os.symlink(Path("..") / ".." / "blobs" / f"blob{i}", base / "snapshots" / commit / f.name)
    return root


def test_model_by_repo_id_from_the_cache(llava_small, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache(tmp_path / "hub", "apple/FastVLM-small", llava_small)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert answers("apple/FastVLM-small") == answers(llava_small)
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))                 # HF_HOME/hub is the next place looked in
    assert loading.resolve_model("apple/FastVLM-small") == next((tmp_path / "hub").glob("models--*/snapshots/*"))
    monkeypatch.chdir(tmp_path)
    local = shutil.copytree(llava_small, tmp_path / "apple" / "FastVLM-small")
    assert loading.resolve_model("apple/FastVLM-small") == Path("apple/FastVLM-small")   # a local folder wins
    shutil.rmtree(local.parent)                      # a folder `apple` here would make the name a path
    code = infer.main([str(FIXTURES / "e2e_image.png"), "What is it?", "--model", "apple/FastVLM-small",
                       "--max-new-tokens", "8"])
    assert code == 0 and capsys.readouterr().out.strip() == answers(llava_small)[0]


def test_model_not_cached_gets_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE is set.*hf download apple/FastVLM-0.5B"):
        loading.resolve_model("apple/FastVLM-0.5B")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)     # not installed
    with pytest.raises(CheckpointError, match="pip install huggingface_hub"):
        loading.resolve_model("apple/FastVLM-0.5B")
    with pytest.raises(CheckpointError, match="model folder not found"):
        loading.resolve_model("no/such/folder")


def test_hub_cache_is_found_as_huggingface_hub_finds_it(llava_small, tmp_path, monkeypatch):
    """HF_HUB_CACHE wins over HF_HOME when both are set (as in huggingface_hub's constants.py), HF_HOME/hub
    over XDG_CACHE_HOME/huggingface/hub; a download goes into the cache that was searched."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    hub = hub_cache(tmp_path / "hub", "apple/FastVLM-small", llava_small)
    home = hub_cache(tmp_path / "home" / "hub", "apple/FastVLM-small", llava_small).parent
    xdg = hub_cache(tmp_path / "xdg" / "huggingface" / "hub", "apple/FastVLM-small", llava_small).parent.parent
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    assert loading.resolve_model("apple/FastVLM-small").is_relative_to(xdg)
    monkeypatch.setenv("HF_HOME", str(home))
    assert loading.resolve_model("apple/FastVLM-small").is_relative_to(home)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    assert loading.resolve_model("apple/FastVLM-small").is_relative_to(hub)
    import huggingface_hub

    asked = {}
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: asked.update(kw) or str(tmp_path))
    assert loading.resolve_model("apple/FastVLM-other") == tmp_path
    assert Path(asked["cache_dir"]) == hub


def test_a_path_is_never_looked_up_on_the_hub(tmp_path, monkeypatch):
    """`--model models/fastvlm-tiy` (a typo) or `./org/name` used to be looked up on the Hub and fail as a
    network error. A name that is a path (a leading ./ or /, more than one slash, or a first part that is
    a folder here) is "model folder not found", with a near miss named; an ORG/NAME that is neither a folder
    nor cached says both, with the `hf download` command."""
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("looked up on the Hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "fastvlm-tiny").mkdir(parents=True)
    for name, near in (("models/fastvlm-tiy", " (did you mean models/fastvlm-tiny?)"), ("./apple/FastVLM-0.5B", ""),
                       ("apple/FastVLM-0.5B/x", ""), (str(tmp_path / "absent"), ""), ("apple--x/y", "")):
        with pytest.raises(CheckpointError) as refused:
            loading.resolve_model(name)
        assert str(refused.value) == f"model folder not found: {name}{near}; pass the folder that holds config.json"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"^model folder not found: checkpoints/FastVLM-0\.5B \(there is no "
                       r"folder checkpoints here\), nor is checkpoints/FastVLM-0\.5B a cached or downloadable "
                       r"Hugging Face Hub repo .*`hf download checkpoints/FastVLM-0\.5B` .* if it is a repo id, "
                       r"or, if it is meant as a folder, .*`hf download apple/FastVLM-0\.5B --local-dir "
                       r"checkpoints/FastVLM-0\.5B`\)$"):
        loading.resolve_model("checkpoints/FastVLM-0.5B")                  # no `checkpoints` here: either
    home = tmp_path / "home"
    (home / "my-model").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    assert loading.resolve_model("~/my-model") == home / "my-model"       # `--model=~/x`: no shell expanded it
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match=r"^model folder not found: checkpoints/FastVLM-0\.5B \(a path, "
                       r"since checkpoints is a folder here; .*\); pass the folder that holds config\.json$"):
        loading.resolve_model("checkpoints/FastVLM-0.5B")                  # `checkpoints` is here: a path


def test_without_a_network_a_hub_name_gets_the_download_hint(tmp_path):
    """No network but no HF_HUB_OFFLINE either: huggingface_hub raises LocalEntryNotFoundError around a
    ConnectError, which infer.py used to print raw. Now one line with the `hf download` command. The Hub
    address is a local port that refuses connections, so the test neither needs nor waits for a network."""
    import socket

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))                  # bound, never listening: connections are refused
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        env.update(HF_HOME=str(tmp_path), HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_ETAG_TIMEOUT="5",
                   HF_HUB_DOWNLOAD_TIMEOUT="5", HF_ENDPOINT=f"http://127.0.0.1:{closed.getsockname()[1]}")
        proc = subprocess.run([sys.executable, str(Path(__file__).parent.parent / "infer.py"),
                               str(FIXTURES / "e2e_image.png"), "What is it?", "--model", "apple/FastVLM-0.5B"],
                              capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: model folder not found: apple/FastVLM-0.5B (there is no folder apple here), "
                                  "nor is apple/FastVLM-0.5B a cached or downloadable Hugging Face Hub repo (it is "
                                  "not in the cache ")
    assert "the Hub could not be reached: ConnectError" in proc.stderr
    assert "run `hf download apple/FastVLM-0.5B` where the Hub can be reached" in proc.stderr


def test_what_the_hub_answered_is_told_apart(tmp_path, monkeypatch):
    """A repo the Hub does not have (check the name: no download hint), a gated one (log in), a Hub that
    cannot be reached or that fails (the download hint), each in one line that names the repo."""
    import httpx
    import huggingface_hub
    from huggingface_hub import errors

    response = httpx.Response(401, request=httpx.Request("GET", "https://huggingface.co/api/models/apple/x"))
    unreachable = errors.LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub")
    unreachable.__cause__ = httpx.ConnectError("[Errno 111] Connection refused")
    cases = [(errors.RepositoryNotFoundError("401 Client Error", response=response),
              "(the Hub has no public repo apple/x); check the name", False),
             (errors.GatedRepoError("401 Client Error", response=response), "`hf auth login`", False),
             (unreachable, "the Hub could not be reached: ConnectError: [Errno 111] Connection refused", True),
             (errors.HfHubHTTPError("503 Server Error", response=response),
              "downloading it failed: HfHubHTTPError: 503 Server Error", True)]
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for error, fragment, hint in cases:
        def fail(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
        with pytest.raises(CheckpointError) as refused:
            loading.resolve_model("apple/x")
        message = str(refused.value)
        assert message.startswith("model folder not found: apple/x (there is no folder apple here), nor is apple/x "
                                  "a cached or downloadable")
        assert fragment in message and ("`hf download apple/x`" in message) == hint and "\n" not in message


# --- file modes and options of the converter ----------------------------------------------------------------

TINY = Path(__file__).parent.parent / "models" / "fastvlm-tiny"


def test_converted_files_respect_the_umask_and_to_names_the_layout(tmp_path, capsys):
    """model.safetensors came out 0600 (safetensors' own mode) beside 0644 files: every file of a converted
    folder now gets the mode the umask gives new files. --to names the layout to write: the one the source
    is already in is refused, the other is written (as without --to)."""
    old = os.umask(0o027)
    try:
        assert convert.main([str(TINY), str(tmp_path / "same"), "--to", "llava"]) == 2
        assert "is already in the llava layout" in capsys.readouterr().err and not (tmp_path / "same").exists()
        assert convert.main([str(TINY), str(tmp_path / "hf"), "--to", "fast_vlm"]) == 0
        assert convert.main([str(tmp_path / "hf"), str(tmp_path / "same"), "--to", "fast_vlm"]) == 2
        assert "is already in the fast_vlm layout" in capsys.readouterr().err
        assert convert.main([str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    finally:
        os.umask(old)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "fast_vlm"
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == "llava_qwen2"
    for folder in (tmp_path / "hf", tmp_path / "back"):
        assert folder.stat().st_mode & 0o777 == 0o750
        assert {f.name: f.stat().st_mode & 0o777 for f in folder.iterdir()} == {f.name: 0o640 for f in folder.iterdir()}


def test_a_file_size_limit_while_converting_is_one_line_and_leaves_nothing(tmp_path):
    """Under `ulimit -f` safetensors fails with its own error type ("File too large (os error 27)"), which
    convert.py let through as a traceback (it looked only for "No space left"). Now one line with the
    cause and the fix, exit 2, and no folder (temporary or final) left behind."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))       # the weights are ~5 MB

    proc = subprocess.run([sys.executable, str(Path(convert.__file__)), str(TINY), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, preexec_fn=limit)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"error: cannot write {tmp_path / 'out'} (File too large); nothing was kept: raise "
                                  "this process's file-size limit (ulimit -f) and rerun"), proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_untied_head_is_padded_like_the_embedding_and_converts_back(tmp_path):
    """A model whose vocabulary is exactly its tokenizer's gets rows for transformers' <image> token: the
    untied head must get them too (each the mean of the others, as the embedding's), or the converted folder
    does not load; either way the logits of every real token stay the same, converted and back."""
    untied = shutil.copytree(TINY, tmp_path / "untied")
    tensors = load_file(str(untied / "model.safetensors"))
    head = tensors["model.embed_tokens.weight"].flip(0).contiguous()
    save_file({**tensors, "lm_head.weight": head}, str(untied / "model.safetensors"))
    config = json.loads((untied / "config.json").read_text())
    (untied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    hf, _ = convert.convert(untied, tmp_path / "hf")
    back, _ = convert.convert(hf, tmp_path / "back")
    stored = load_file(str(hf / "model.safetensors"))
    rows = stored["model.language_model.embed_tokens.weight"].shape[0]
    assert rows == 384 and json.loads((hf / "config.json").read_text())["text_config"]["vocab_size"] == rows
    assert torch.equal(stored["lm_head.weight"][:377], head)
    assert torch.allclose(stored["lm_head.weight"][377:], head.mean(0).expand(rows - 377, -1))
    expected = None
    for folder in (untied, hf, back):
        model, tokenizer, _ = loading.load_model(folder, fast=False)
        assert model.llm.lm_head.weight is not model.llm.embed_tokens.weight
        logits = model.llm(tokens=torch.tensor([tokenizer.encode("What is in the picture?")]))[0, :, :377]
        expected = logits if expected is None else expected
        assert torch.equal(logits, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none): checks that loading "
                    "places each tensor on the GPU as it is read, with no second copy")
def test_cuda_load_places_tensors_directly(llava_small):
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model, _, _ = loading.load_model(llava_small, device="cuda", dtype=torch.bfloat16)
    assert all(t.is_cuda for t in model.state_dict().values())
    stored = sum(t.nbytes for t in {t.data_ptr(): t for t in model.state_dict().values()}.values())
    assert torch.cuda.max_memory_allocated() - before <= 1.25 * stored + 2**22

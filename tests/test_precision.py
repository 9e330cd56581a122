"""Running in bfloat16 and with int8 weights (support/speedups.py, 7.; --dtype auto, --quantize int8).

* `--dtype auto` on a CPU reads the CPU's flags: bfloat16 where it has bf16 matmul units, float32
  elsewhere, and says which and why (--timing, --json).
* oneDNN's fused kernels run in bfloat16 too, and agree with the plain ops there.
* `Int8Linear` is the linear layer of its dequantized weights: every weight within half a step of
  the float one, every row's scale its own, the bias kept; `quantize_int8` converts the decoder and a
  separate copy of a tied head, and nothing else.
* Fidelity against float32 over 50 prompts on the shipped tiny model (tools/fidelity.py), each
  figure bounded: loosely enough for any CPU, tightly enough that a wrong scale fails.
"""

import json

import pytest
import torch
import torch.nn as nn
from torch.profiler import profile

import fastvlm as FV
import infer
from support import loading, options, speedups
from support import chat as CH
from support.speedups import bf16_units as real_bf16_units     # conftest replaces it in every test
from test_speedups import LLM, SMALL, both_paths, small_fastvlm

TINY = FV.__file__.rsplit("/", 1)[0] + "/models/fastvlm-tiny"


# ----------------------------------------------------------------------------------------------------
# --dtype auto
# ----------------------------------------------------------------------------------------------------

X86_FLAGS = "fpu vme de pse tsc msr avx2 fma avx512f avx512bw"
CPUINFO = {
    "x86 avx512_bf16": (f"processor\t: 0\nflags\t\t: {X86_FLAGS} avx512_bf16 avx512_vnni\n", True, "avx512_bf16"),
    "x86 amx": (f"processor\t: 0\nflags\t\t: {X86_FLAGS} amx_bf16 amx_tile avx512_bf16\n", True, "amx_bf16, avx512_bf16"),
    "x86 without": (f"processor\t: 0\nflags\t\t: {X86_FLAGS} avx512_vnni\nbugs\t\t: bf16\n", False, "none of"),
    "arm bf16": ("processor\t: 0\nFeatures\t: fp asimd evtstrm aes bf16 i8mm\n", True, "(bf16)"),
    "arm without": ("processor\t: 0\nFeatures\t: fp asimd evtstrm aes\n", False, "none of"),
}


@pytest.mark.parametrize("name", CPUINFO)
def test_bf16_units_are_read_from_the_cpu_flags(tmp_path, name):
    text, has, said = CPUINFO[name]
    (tmp_path / "cpuinfo").write_text(text)
    units, why = real_bf16_units(tmp_path / "cpuinfo")
    assert units is has and said in why, why


def test_bf16_units_unknown_is_no(tmp_path):
    units, why = real_bf16_units(tmp_path / "missing")
    assert units is False and "cannot be read" in why


@pytest.mark.parametrize("units", [True, False])
def test_auto_picks_bfloat16_where_the_cpu_has_bf16_units(monkeypatch, units):
    monkeypatch.setattr(speedups, "bf16_units", lambda: (units, "the CPU says so"))
    dtype, why = options.pick_dtype("auto", torch.device("cpu"))
    assert dtype == (torch.bfloat16 if units else torch.float32) and why == "--dtype auto: the CPU says so"
    assert options.pick_dtype("float32", torch.device("cpu")) == (torch.float32, "--dtype float32")
    assert options.pick_dtype("auto", torch.device("cuda"))[0] == torch.bfloat16


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    import shutil

    path = tmp_path_factory.mktemp("photo") / "shapes.png"
    shutil.copy(FV.__file__.rsplit("/", 1)[0] + "/examples/shapes.png", path)
    return path


def cli(capsys, *args):
    code = infer.main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, err


def test_auto_runs_bfloat16_and_says_why(capsys, monkeypatch, small_model_dir, photo):
    """On a CPU with bf16 units auto answers as the Python API does in bfloat16, and --json and --timing
    say so; the same model in float32 by name says that."""
    monkeypatch.setattr(speedups, "bf16_units", lambda: (True, "the CPU has bf16 matmul units (avx512_bf16)"))
    out, _ = cli(capsys, photo, "What is it?", "--model", small_model_dir, "--max-new-tokens", "8", "--json")
    record = json.loads(out)
    model, tokenizer, _ = loading.load_model(small_model_dir, dtype=torch.bfloat16)
    assert record["answer"] == CH.answer(model, tokenizer, photo, "What is it?", max_new_tokens=8)
    assert record["precision"] == {**record["precision"], "dtype": "bfloat16", "quantize": None,
                                   "dtype_why": "--dtype auto: the CPU has bf16 matmul units (avx512_bf16)"}
    _, err = cli(capsys, photo, "What is it?", "--model", small_model_dir, "--max-new-tokens", "2", "--timing",
                 "--dtype", "float32")
    assert err.splitlines()[-1].startswith("ran in float32 (--dtype float32); weights: ")


def test_the_fused_kernels_run_in_bfloat16_and_agree_with_the_plain_ops():
    """In bfloat16 the encoder's and the decoder's swapped modules run oneDNN's kernels, and agree with the
    plain bfloat16 ops within bfloat16's rounding (a few units of its 2**-8 precision, relative to the
    output's scale); a wrong post-op or a lost bias is O(1) off."""
    fast = speedups.apply(small_fastvlm().to(torch.bfloat16))
    x, ids = torch.rand(1, 3, 64, 64, dtype=torch.bfloat16), torch.arange(10)[None]
    with profile() as prof:
        outputs = both_paths(lambda: fast.vision_tower(x)), both_paths(lambda: fast.llm(ids))
    assert {"mkldnn::_convolution_pointwise", "mkldnn::_linear_pointwise"} <= {e.name for e in prof.events()}
    for plain, fused in outputs:
        plain, fused = plain.float(), fused.float()
        assert plain.std() > 1e-2
        assert ((fused - plain).abs() <= 0.05 * plain.abs().mean() + 0.03 * plain.abs()).all()
        assert torch.corrcoef(torch.stack([plain.flatten(), fused.flatten()]))[0, 1] > 0.999


# ----------------------------------------------------------------------------------------------------
# int8 weights
# ----------------------------------------------------------------------------------------------------

def float_linear(out=96, inp=64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(inp, out, bias=bias)
    layer.weight.data = torch.randn(out, inp, generator=g) * torch.logspace(-2, 1, out)[:, None]   # rows of
    if bias:                                                                 # different scale: scales per row
        layer.bias.data = torch.randn(out, generator=g)
    return layer


def test_int8_weights_are_within_half_a_step_of_the_float_ones():
    layer = float_linear()
    q = speedups.Int8Linear(layer.weight, layer.bias)
    assert q.weight.dtype == torch.int8 and q.scales.shape == (96,) and q.scales.dtype == torch.bfloat16
    w, step = layer.weight.data, q.scales.float()[:, None]
    assert (q.weight.abs().amax(dim=1) >= 126).all()                          # each row uses its whole range
    assert ((q.weight.float() * step - w).abs() <= step / 2 * (1 + 1e-6)).all()
    assert (step.flatten() / (w.abs().amax(dim=1) / 127) - 1).abs().max() < 2 ** -8    # bf16's rounding only


@pytest.mark.parametrize("rows", [1, 5, speedups.INT8_MM_ROWS, speedups.INT8_MM_ROWS + 1, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.inference
def test_int8_linear_is_the_linear_of_its_dequantized_weights(rows, dtype):
    """Both kernels (the int8 one up to INT8_MM_ROWS rows, with x rounded to bfloat16; above, a matmul in
    the dtype of x) give x W'^T + b for the dequantized W' = scales * q, and return the input's dtype."""
    layer = float_linear()
    q = speedups.Int8Linear(layer.weight, layer.bias.to(dtype))
    x = torch.randn(1, rows, 64).to(dtype)                                   # rows as given: the boundary
    dequantized = q.weight.float() * q.scales.float()[:, None]
    rounded = x.to(torch.bfloat16).float() if rows <= speedups.INT8_MM_ROWS else x.float()   # the kernel's input
    expected = rounded @ dequantized.T + layer.bias
    got = q(x)
    assert got.dtype == dtype and got.shape == (1, rows, 96)
    assert ((got.float() - expected).abs() <= 0.01 * expected.abs() + 0.02 * expected.abs().mean()).all()
    exact = x.float() @ layer.weight.T + layer.bias                          # and near the float layer
    assert ((got.float() - exact).abs().mean() / exact.abs().mean()) < 0.02


def test_int8_linear_without_bias_and_with_a_zero_row():
    layer = float_linear(bias=False)
    layer.weight.data[3] = 0
    q = speedups.Int8Linear(layer.weight)
    x = torch.randn(4, 64)
    with torch.no_grad():
        y = q(x)
    assert torch.isfinite(y).all() and (y[:, 3] == 0).all() and q.bias is None


@pytest.mark.inference
def test_quantize_int8_converts_the_decoder_and_a_copy_of_the_tied_head():
    model = small_fastvlm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    embedding = model.llm.embed_tokens.weight
    speedups.apply(model, quantize="int8")
    llm = model.llm
    linears = [m for m in llm.modules() if isinstance(m, nn.Linear)]
    int8 = [m for m in llm.modules() if isinstance(m, speedups.Int8Linear)]
    assert linears == [] and len(int8) == 7 * LLM.num_hidden_layers + 1
    assert llm.embed_tokens.weight is embedding and torch.equal(embedding, before["llm.embed_tokens.weight"])
    head = llm.lm_head
    assert isinstance(head, speedups.Int8Linear) and head.weight.dtype == torch.int8
    assert ((head.weight.float() * head.scales.float()[:, None] - embedding).abs()
            <= head.scales.float()[:, None] / 2 * (1 + 1e-6)).all()
    for name, t in model.state_dict().items():                     # vision tower and projector untouched
        if not name.startswith("llm."):
            assert torch.equal(t, before[name]), name
    assert llm.layers[0].self_attn.q_proj.bias is not None                    # Qwen2's q/k/v biases kept
    assert torch.equal(llm.layers[0].self_attn.q_proj.bias, before["llm.layers.0.self_attn.q_proj.bias"])
    ids = torch.arange(12)[None]
    got, expected = llm(ids)[0], small_fastvlm().llm(ids)[0]                   # the same model in float32
    assert expected.std() > 0.1 and torch.corrcoef(torch.stack([got.flatten(), expected.flatten()]))[0, 1] > 0.99


def test_int8_is_refused_off_the_cpu_and_with_the_plain_model(capsys, small_model_dir, photo):
    with torch.device("meta"):
        model = FV.FastVLM(SMALL, LLM)
    with pytest.raises(ValueError, match="CPU only"):
        speedups.apply(model, quantize="int8")
    with pytest.raises(ValueError, match="quantize"):
        speedups.apply(small_fastvlm(), quantize="int4")
    with pytest.raises(ValueError, match="speed step"):
        loading.load_model(small_model_dir, fast=False, quantize="int8")
    code = infer.main([str(photo), "q", "--model", str(small_model_dir), "--quantize", "int8", "--plain"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--quantize is part of the speed step" in err


def test_int8_in_chat_and_batch_answers_as_the_api(capsys, small_model_dir, photo, tmp_path):
    """--quantize int8 reaches the model in a single question and in a batch: both answer as the Python API
    with int8 weights; the batch's --timing says what ran, and the weights are a fraction of float32's."""
    model, tokenizer, _ = loading.load_model(small_model_dir, quantize="int8")
    expected = CH.answer(model, tokenizer, photo, "What is it?", max_new_tokens=6)
    out, _ = cli(capsys, photo, "What is it?", "--model", small_model_dir, "--quantize", "int8",
                 "--max-new-tokens", "6", "--json", "--dtype", "float32")
    record = json.loads(out)
    assert record["answer"] == expected and record["precision"]["quantize"] == "int8"
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"image": str(photo), "question": "What is it?"}) + "\n")
    out, err = cli(capsys, "--batch", questions, "--model", small_model_dir, "--quantize", "int8",
                   "--max-new-tokens", "6", "--timing")
    assert json.loads(out)["answer"] == expected
    line = err.splitlines()[-1]
    assert line.startswith("ran in float32 (--dtype auto: ") and \
        "(int8 decoder weights, decoded with bfloat16 activations; the rest in float32)" in line
    assert record["precision"]["weight_mib"] == round(loading.model_bytes(model) / 2**20, 1)


def test_int8_weights_are_a_fraction_of_float32s():
    """On the shipped model (a small vocabulary, so the float embedding is small): every decoder layer at
    a quarter of its float32 bytes, plus its scales."""
    plain = loading.model_bytes(loading.load_model(TINY)[0])
    int8 = loading.model_bytes(loading.load_model(TINY, quantize="int8")[0])
    assert int8 < 0.6 * plain


def test_int8_layers_pass_gradients_and_survive_a_cast():
    """The int8 kernel has no backward: with autograd on, the layer multiplies the converted weights, so
    gradients reach its input; and a model cast after quantizing (.float()) keeps decoding."""
    layer = float_linear()
    q = speedups.Int8Linear(layer.weight, layer.bias)
    x = torch.randn(3, 64, requires_grad=True)
    q(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    q.float()
    with torch.no_grad():
        assert q(torch.randn(1, 64)).shape == (1, 96)


# ----------------------------------------------------------------------------------------------------
# Fidelity on the shipped tiny model, 50 prompts
# ----------------------------------------------------------------------------------------------------

# Measured on 2026-12-04 (AMD EPYC, avx512_bf16): every variant 100 % first tokens, 99-100 % top-5,
# max |dlogit| / spread 0.05-0.06, 100 % greedy tokens. The bounds leave room for another CPU's
# rounding; a scale off by 2x or a dropped bias each fail them (tools/mutants.py).
BOUNDS = {"first": 0.9, "top5": 0.85, "dlogit": 0.2, "greedy": 0.85}


@pytest.fixture(scope="module")
def tiny_fidelity():
    from fidelity import fidelity

    return fidelity(TINY, n_prompts=50, new_tokens=8, progress=False)


@pytest.mark.parametrize("variant", ["bfloat16", "int8 (bfloat16)", "int8 (float32)"])
def test_fidelity_of_each_variant_is_bounded(tiny_fidelity, variant):
    table, spread = tiny_fidelity
    row = table[variant]
    assert spread > 0.1                                         # the logits are alive
    assert row["first"] >= BOUNDS["first"] and row["top5"] >= BOUNDS["top5"], row
    assert 0 < row["dlogit"] <= BOUNDS["dlogit"] and row["greedy"] >= BOUNDS["greedy"], row


def test_fidelity_figures_are_computed_as_documented():
    """compare(): first-token agreement, top-5 overlap, max |dlogit| / spread, and the share of the
    reference's greedy tokens reproduced before the first difference."""
    from fidelity import compare

    ref = torch.tensor([0.0, 1, 2, 3, 4, 5, 6])
    other = ref.clone()
    other[6], other[1] = 4.5, 5.5                                # argmax moves to 5; top-5 {2,3,4,5,1} vs {2..6}
    row = compare((ref, [1, 2, 3, 4]), (other, [1, 2, 9, 4]), limit=4)
    assert row == {"first": 0.0, "top5": 0.8, "dlogit": pytest.approx(4.5 / float(ref.std())), "greedy": 0.5}
    # An answer that stops where the other goes on differs there: its end counts as one more token.
    assert compare((ref, [7]), (ref, [7, 8]), limit=4)["greedy"] == 0.5
    assert compare((ref, [7]), (ref, [7]), limit=4)["greedy"] == 1.0
    assert compare((ref, []), (ref, []), limit=4)["greedy"] == 1.0 and compare((ref, []), (ref, [5]), limit=4)["greedy"] == 0


@pytest.mark.inference
def test_decode_bytes_count_what_one_token_reads():
    """tools/bench.py's bytes per decoded token: the whole decoder when the head is the embedding table;
    with int8 weights the int8 layers and the head's copy, and not the table (one row of it is read)."""
    import bench

    model = small_fastvlm()
    llm = model.llm
    every = sum(t.numel() * t.element_size() for t in llm.state_dict().values()) - llm.lm_head.weight.numel() * 4
    assert bench.decode_bytes(llm) == every                       # the tied head counted once
    speedups.apply(model, quantize="int8")
    table = llm.embed_tokens.weight.numel() * 4
    int8 = sum(m.weight.numel() + m.scales.numel() * 2 + (0 if m.bias is None else m.bias.numel() * 4)
               for m in llm.modules() if isinstance(m, speedups.Int8Linear))
    norms = sum(p.numel() * 4 for n, p in llm.named_parameters() if "norm" in n)
    row = llm.embed_tokens.weight[0].numel() * 4                  # the one row of the table a step looks up
    assert bench.decode_bytes(llm) == int8 + norms + row and bench.decode_bytes(llm) < every - table + row + 1


@pytest.mark.inference
def test_quantize_int8_frees_each_float_layer():
    """Loading with --quantize int8 peaks at the float model plus one layer: nothing keeps the replaced
    float layers (and their weights) alive. (The tied head's weight is the embedding, which stays.)"""
    import gc
    import weakref

    model = small_fastvlm()
    layers = [weakref.ref(m) for m in model.llm.modules() if isinstance(m, nn.Linear)]
    weights = [weakref.ref(m.weight) for m in model.llm.modules() if isinstance(m, nn.Linear)
               and m.weight is not model.llm.embed_tokens.weight]
    speedups.quantize_int8(model)
    gc.collect()
    assert layers and weights and all(r() is None for r in layers + weights)


def test_int8_on_a_gpu_is_refused_in_one_line(monkeypatch, capsys, photo):
    """(No GPU here: the device choice is made to say cuda.) Refused before anything is loaded."""
    monkeypatch.setattr(options, "pick_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded"))
    code = infer.main([str(photo), "q", "--quantize", "int8"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "runs on the CPU only" in err and "--dtype bfloat16" in err

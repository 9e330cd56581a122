"""Qwen2 decoder: cache, causality, RoPE and GQA properties; transformers as the reference; the tokenizer."""

import unicodedata

import pytest
import torch
import transformers
from hypothesis import given, settings, strategies as st

import fastvlm as FV
import qwen2 as Q
from checkpoint import CheckpointError
from synthetic import hf_reference, synthetic_llm_tensors, write_official_tokenizer
from tolerance import assert_close

pytestmark = pytest.mark.inference

TINY = Q.Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
TINY_UNTIED = Q.Qwen2Config(**{**TINY.__dict__, "tie_word_embeddings": False, "num_key_value_heads": 1})


def ours(cfg, dtype=torch.float32, tied=None):
    return FV.load_llm(cfg, synthetic_llm_tensors(cfg, tied), dtype=dtype)


def prompt(cfg, length, seed=0):
    return torch.randint(0, cfg.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))


# --- properties --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny64():
    return ours(TINY, dtype=torch.float64)


@settings(deadline=None, max_examples=30)
@given(length=st.integers(2, 40), cuts=st.lists(st.integers(1, 39), max_size=4), sdpa=st.booleans())
def test_cached_prefill_and_decode_equal_one_full_forward(tiny64, length, cuts, sdpa):
    """Any split into a prefill, further prefill chunks and one-token decode steps gives the same logits."""
    Q.Attention.use_sdpa = sdpa
    try:
        ids = prompt(TINY, length, seed=length)
        full = tiny64(ids)                                       # no cache: the whole sequence at once
        tiny64.setup_cache(max_len=40)
        bounds = sorted({0, length, *[c for c in cuts if c < length]})
        pieces = [tiny64(ids[:, a:b], start=a) for a, b in zip(bounds, bounds[1:])]
        cached = torch.cat(pieces, dim=1)
        assert cached.shape == full.shape and full.std() > 0.1
        assert (cached - full).abs().max() < 1e-10
        # and the decode path proper: prefill 1 token, then every other token alone
        tiny64.setup_cache(max_len=40)
        steps = [tiny64(ids[:, :1], start=0)] + [tiny64(ids[:, i:i + 1], start=i) for i in range(1, length)]
        assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-10
    finally:
        Q.Attention.use_sdpa = True
        tiny64.drop_cache()


def test_growing_the_cache_keeps_what_it_holds(tiny64):
    """setup_cache() with a larger max_len mid-conversation (a long chat) keeps every cached key and
    value: the logits after growing equal those of one uninterrupted pass."""
    ids = prompt(TINY, 30, seed=5)
    full = tiny64(ids)
    try:
        tiny64.setup_cache(max_len=12)
        first = tiny64(ids[:, :10], start=0)
        tiny64.setup_cache(max_len=40)                            # grows: positions 0..9 must survive
        rest = [tiny64(ids[:, i:i + 1], start=i) for i in range(10, 30)]
        assert (torch.cat([first, *rest], dim=1) - full).abs().max() < 1e-10
    finally:
        tiny64.drop_cache()


@settings(deadline=None, max_examples=20)
@given(length=st.integers(2, 30), where=st.integers(0, 29), new=st.integers(0, 511))
def test_causality_later_tokens_never_change_earlier_logits(tiny64, length, where, new):
    where = where % length
    ids = prompt(TINY, length, seed=where)
    changed = ids.clone()
    changed[0, where] = (ids[0, where] + 1 + new % 510) % TINY.vocab_size
    a, b = tiny64(ids), tiny64(changed)
    assert torch.equal(a[:, :where], b[:, :where])
    assert (a[:, where] - b[:, where]).abs().max() > 1e-6


@settings(deadline=None, max_examples=30)
@given(m=st.integers(0, 500), n=st.integers(0, 500), shift=st.integers(0, 3000), seed=st.integers(0, 1000))
def test_rope_scores_depend_only_on_relative_position(m, n, shift, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, 1, 1, 64, generator=g, dtype=torch.float64), torch.randn(1, 1, 1, 64, generator=g, dtype=torch.float64)
    cos, sin = Q.rope_tables(64, 4000, 1e6, dtype=torch.float64)

    def score(i, j):
        return (Q.apply_rope(q, cos[i:i + 1], sin[i:i + 1]) * Q.apply_rope(k, cos[j:j + 1], sin[j:j + 1])).sum()

    assert torch.allclose(score(m, n), score(m + shift, n + shift), atol=1e-9)


@settings(deadline=None, max_examples=15)
@given(kv_heads=st.sampled_from([1, 2, 4]), length=st.integers(1, 12), sdpa=st.booleans(), seed=st.integers(0, 99))
def test_grouped_query_attention_equals_multi_head_with_repeated_kv(kv_heads, length, sdpa, seed):
    torch.manual_seed(seed)
    gqa_cfg = Q.Qwen2Config(**{**TINY.__dict__, "num_attention_heads": 8, "num_key_value_heads": kv_heads})
    mha_cfg = Q.Qwen2Config(**{**gqa_cfg.__dict__, "num_key_value_heads": 8})
    gqa, mha = Q.Attention(gqa_cfg).double(), Q.Attention(mha_cfg).double()
    groups, hd = 8 // kv_heads, gqa_cfg.head_dim
    mha.q_proj.load_state_dict(gqa.q_proj.state_dict())
    mha.o_proj.load_state_dict(gqa.o_proj.state_dict())
    for name in ("k_proj", "v_proj"):
        src, dst = getattr(gqa, name), getattr(mha, name)
        dst.weight.copy_(src.weight.view(kv_heads, hd, -1).repeat_interleave(groups, 0).reshape(8 * hd, -1))
        dst.bias.copy_(src.bias.view(kv_heads, hd).repeat_interleave(groups, 0).reshape(-1))
    x = torch.randn(1, length, 64, dtype=torch.float64)
    cos, sin = (t[:length].double() for t in Q.rope_tables(hd, length, 1e6))
    Q.Attention.use_sdpa = sdpa
    try:
        assert torch.allclose(gqa(x, cos, sin, 0), mha(x, cos, sin, 0), atol=1e-12)
    finally:
        Q.Attention.use_sdpa = True


@settings(deadline=None, max_examples=40)
@given(start=st.integers(0, 12), length=st.integers(1, 12), cached=st.booleans(), seed=st.integers(0, 99))
def test_both_attention_paths_agree_and_never_see_later_tokens(tiny64, start, length, cached, seed):
    """For every start position, length, and with or without a cache, SDPA and the plain softmax
    path give the same logits, and no position's logits change when a later token changes."""
    ids = prompt(TINY, start + length, seed=seed)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % TINY.vocab_size

    def run(tokens, sdpa):
        Q.Attention.use_sdpa = sdpa
        try:
            if cached:
                tiny64.setup_cache(max_len=32)
                if start:
                    tiny64(tokens[:, :start], start=0)            # the earlier positions, in the cache
            return tiny64(tokens[:, start:], start=start)         # (1, length, vocab)
        finally:
            Q.Attention.use_sdpa = True
            tiny64.drop_cache()

    sdpa, plain = run(ids, True), run(ids, False)
    assert (sdpa - plain).abs().max() < 1e-10
    later = run(changed, True)
    assert torch.equal(later[:, :-1], sdpa[:, :-1])                # only the last position may change


def test_causal_mask_by_hand():
    """Two queries after three cached keys see keys 0-3 and 0-4; a lone query needs no mask."""
    assert Q.causal_mask(1, 9) is None
    assert Q.causal_mask(2, 5).tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    assert Q.causal_mask(3, 3).tolist() == [[True, False, False], [True, True, False], [True, True, True]]


def test_sdpa_and_plain_attention_agree(tiny64):
    ids = prompt(TINY, 17)
    fast = tiny64(ids)
    Q.Attention.use_sdpa = False
    try:
        plain = tiny64(ids)
    finally:
        Q.Attention.use_sdpa = True
    assert (fast - plain).abs().max() < 1e-10


# --- transformers as the reference ---------------------------------------------------------------------

def check_against_transformers(cfg, tied, length=20, new_tokens=32):
    tensors = synthetic_llm_tensors(cfg, tied)
    ref = hf_reference(cfg, tensors)
    model = FV.load_llm(cfg, tensors)
    ids = prompt(cfg, length, seed=2)          # a prompt whose greedy continuation is diverse (asserted below)
    expected = ref(ids).logits
    got = model(ids)
    # elementwise (tests/tolerance.py): float32 on both sides, summation order apart
    assert_close(got, expected, rtol=1e-4, atol=1e-4, what="logits", min_std=0.1)
    greedy = ref.generate(ids, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens,
                          pad_token_id=0)[0, length:].tolist()
    model.setup_cache(length + new_tokens)
    tokens, pos = Q.generate(model, ids, max_new_tokens=new_tokens)
    assert tokens == greedy and pos == length + new_tokens
    assert len(set(greedy)) > 3, "a constant greedy sequence would be a weak check"


def test_tiny_tied_matches_transformers():
    check_against_transformers(TINY, tied=True)


def test_tiny_untied_matches_transformers():
    check_against_transformers(TINY_UNTIED, tied=False)


def test_real_0_5b_shapes_match_transformers():
    check_against_transformers(Q.QWEN2_0_5B, tied=True, length=12, new_tokens=32)


# --- loading -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tied", [True, False])
def test_from_pretrained_sharded_any_dtype(tmp_path, dtype, tied):
    cfg = TINY if tied else TINY_UNTIED
    tensors = synthetic_llm_tensors(cfg, tied)
    ref = hf_reference(cfg, tensors).to(dtype)
    ref.save_pretrained(tmp_path, max_shard_size="100KB")    # several shards + model.safetensors.index.json
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = FV.load_qwen2(tmp_path, dtype=torch.float32)
    assert model.cfg.tie_word_embeddings == tied
    assert (model.lm_head.weight is model.embed_tokens.weight) == tied
    expected = {k: v.float() for k, v in tensors.items()}
    for name, value in expected.items():
        mine = model.state_dict()[name.removeprefix("model.")]
        assert torch.equal(mine, value.to(dtype).float()), name


def test_loader_names_the_bad_key():
    tensors = synthetic_llm_tensors(TINY)
    bad = dict(tensors, **{"model.layers.1.mlp.up_proj.weight": torch.zeros(3, 3)})
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight'.*\(3, 3\)"):
        FV.load_llm(TINY, bad)
    missing = dict(tensors)
    del missing["model.layers.0.self_attn.k_proj.bias"]
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.0\.self_attn\.k_proj\.bias'"):
        FV.load_llm(TINY, missing)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.2\.mlp\.up_proj\.weight'"):
        FV.load_llm(TINY, dict(tensors, **{"model.layers.2.mlp.up_proj.weight": torch.zeros(96, 64)}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_freshly_built_tied_model_shares_one_tensor(dtype):
    """Tying is the model's own doing, not only the loader's: a new tied Qwen2 has one tensor for the
    embedding and the head (also after a dtype change), an untied one has two."""
    tied = Q.Qwen2(TINY).to(dtype)
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert "lm_head.weight" not in dict(tied.named_parameters())           # one parameter, not two
    untied = Q.Qwen2(TINY_UNTIED).to(dtype)
    assert untied.lm_head.weight is not untied.embed_tokens.weight
    assert untied.lm_head.weight.data_ptr() != untied.embed_tokens.weight.data_ptr()


def test_config_from_hf_dict_reads_nested_rope_theta():
    d = transformers.Qwen2Config(rope_theta=12345.0, hidden_size=64, num_attention_heads=4,
                                 num_key_value_heads=2).to_dict()
    assert Q.Qwen2Config.from_dict(d).rope_theta == 12345.0


# --- generation ----------------------------------------------------------------------------------------

def test_generation_sampling_stop_tokens_and_streaming():
    model = ours(TINY)
    ids = prompt(TINY, 8)
    model.setup_cache(64)
    greedy, _ = Q.generate(model, ids, max_new_tokens=16)
    streamed = []
    again, _ = Q.generate(model, ids, max_new_tokens=16, on_token=streamed.append)
    assert streamed == again == greedy
    # a nucleus so small that only the top token survives is greedy, at any temperature
    nucleus, _ = Q.generate(model, ids, max_new_tokens=16, temperature=5.0, top_p=1e-6, seed=1)
    assert nucleus == greedy
    a, _ = Q.generate(model, ids, max_new_tokens=16, temperature=1.5, top_p=0.9, seed=7)
    b, _ = Q.generate(model, ids, max_new_tokens=16, temperature=1.5, top_p=0.9, seed=7)
    c, _ = Q.generate(model, ids, max_new_tokens=16, temperature=1.5, top_p=0.9, seed=8)
    assert a == b and a != c
    stop = greedy[5]
    cut, pos = Q.generate(model, ids, max_new_tokens=16, stop_ids={stop})
    assert cut == greedy[:greedy.index(stop)] and pos == 8 + len(cut)
    with pytest.raises(ValueError, match="exceeds the cache"):
        Q.generate(model, ids, max_new_tokens=60)


def test_sample_top_p_keeps_the_nucleus_only():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    seen = {Q.sample(logits, 1.0, 0.7, g) for _ in range(300)}
    assert seen == {0, 1}


# --- tokenizer -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizers_pair(tmp_path_factory):
    folder = write_official_tokenizer(tmp_path_factory.mktemp("tok"))
    return FV.load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder), folder


TRICKY = [
    "Hello world", "你好，世界！こんにちは 세계 中文测试", "emoji 👍🏽 🇯🇵 👨‍👩‍👧 x", "1234567 3.14159 0.5B 2025",
    "a   b\n\n\nc \t\td  ", "I'm can't we'll they'd you're I'M", "  leading", "trailing   ", "\r\n\r\nwin\r",
    "<|im_start|>user\nhi<|im_end|>\n", "x<|endoftext|>y<|im_end|>", "Ａｂｃ café naïve", "tabs\tand\u00a0nbsp",
    "def f(x):\n    return x**2  # comment", "URL https://example.com/a?b=c&d=e", "$1,000.00 vs €5",
    # decomposed (NFD) forms: Qwen2 normalises to NFC before splitting, so these must tokenize as the
    # composed text does; a tokenizer that skipped NFC would give other ids for every one of them
    "cafe\u0301 au lait", "nin\u0303o A\u030angstro\u0308m", "\u1100\u1161\u11a8 hangul jamo", "e\u0301\u0302",
]


def test_decomposed_text_really_is_not_nfc():
    """The NFD entries above exercise the normalizer only if normalising changes them."""
    nfd = [t for t in TRICKY if unicodedata.normalize("NFC", t) != t]
    assert len(nfd) == 4


@pytest.mark.parametrize("text", TRICKY)
def test_tokenizer_ids_equal_transformers(tokenizers_pair, text):
    """The raw text goes to both tokenizers, and round-trips to its NFC form."""
    mine, ref, _ = tokenizers_pair
    assert mine.encode(text) == ref.encode(text, add_special_tokens=False)
    assert mine.encode(text) == mine.encode(unicodedata.normalize("NFC", text))
    assert mine.decode(mine.encode(text), skip_special_tokens=False) == unicodedata.normalize("NFC", text)


def nfc(text):
    """NFC by the Unicode tables of the `tokenizers` library: Python's own tables can be older (Python
    3.11 has Unicode 14), and for characters added since, the two compose differently."""
    from tokenizers import normalizers

    return normalizers.NFC().normalize_str(text)


@settings(deadline=None, max_examples=200)
@given(st.text(max_size=40))
def test_tokenizer_roundtrip_and_reference_on_any_text(tokenizers_pair, text):
    """Any text, not normalised beforehand: the same ids as transformers', decoding to the NFC form."""
    mine, ref, _ = tokenizers_pair
    ids = mine.encode(text)
    assert ids == ref.encode(text, add_special_tokens=False)
    assert mine.decode(ids, skip_special_tokens=False) == nfc(text)


# Latin letters and combining diacritics (U+0300-U+036F), whose compositions every Unicode version agrees on
LATIN_AND_MARKS = st.characters(min_codepoint=0x41, max_codepoint=0x24F) | st.characters(min_codepoint=0x300,
                                                                                          max_codepoint=0x36F)


@settings(deadline=None, max_examples=100)
@given(st.text(alphabet=LATIN_AND_MARKS, max_size=20))
def test_tokenizer_on_decomposed_letters(tokenizers_pair, text):
    """Letters and marks in decomposed form, where NFC changes the text most often."""
    mine, ref, _ = tokenizers_pair
    nfd = unicodedata.normalize("NFD", text)
    assert mine.encode(nfd) == ref.encode(nfd, add_special_tokens=False)
    assert mine.encode(nfd) == mine.encode(unicodedata.normalize("NFC", nfd))


def test_tokenizer_specials_and_length(tokenizers_pair, tmp_path):
    mine, ref, folder = tokenizers_pair
    assert len(mine) == len(ref) == 151646
    assert [mine.token_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [151643, 151644, 151645]
    assert mine.decode([151644, 9707, 151645]) == "Hello"
    mine.tok.save(str(tmp_path / "tokenizer.json"))            # the tokenizer.json path gives the same ids
    assert FV.load_tokenizer(tmp_path).encode(TRICKY[1] + TRICKY[9]) == mine.encode(TRICKY[1] + TRICKY[9])
    with pytest.raises(CheckpointError, match="no tokenizer"):
        FV.load_tokenizer(tmp_path / "nothing")

"""Qwen2 decoder: cache, causality, RoPE and GQA properties; transformers as the reference; the tokenizer."""

import re
import unicodedata
from dataclasses import fields

import pytest
import torch
import transformers
from hypothesis import assume, given, settings, strategies as st
from PIL import Image

import qwen2 as Q
from support.checkpoint import CheckpointError
from synthetic import OFFICIAL_CONFIG, hf_reference, synthetic_llm_tensors, write_official_tokenizer
from tolerance import assert_close
from support import chat as CH, loading  # noqa: E402

pytestmark = pytest.mark.inference

TINY = Q.Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
TINY_UNTIED = Q.Qwen2Config(**{**TINY.__dict__, "tie_word_embeddings": False, "num_key_value_heads": 1})


def ours(cfg, dtype=torch.float32, tied=None):
    return loading.load_llm(cfg, synthetic_llm_tensors(cfg, tied), dtype=dtype)


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
    model = loading.load_llm(cfg, tensors)
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


# Every field away from the release's value, and all but the head count away from TINY's. A RoPE base
# of 10000 (Llama's) and an RMSNorm eps of 1e-2 move every logit far past the tolerance, so a decoder
# that hard-coded Qwen2's 1e6 and 1e-6 (which every other test model has) fails here.
ODD = Q.Qwen2Config(vocab_size=384, hidden_size=96, intermediate_size=80, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-2, rope_theta=1e4,
                    max_position_embeddings=64, tie_word_embeddings=False)


def test_every_config_field_at_another_value_matches_transformers():
    """rope_theta, rms_norm_eps and the sizes reach the computation: transformers' Qwen2 built with the
    same unusual values, on the same weights, gives the same logits and greedy tokens."""
    defaults = Q.Qwen2Config()
    assert all(getattr(ODD, f.name) != getattr(defaults, f.name) for f in fields(Q.Qwen2Config))
    assert all(getattr(ODD, f.name) != getattr(TINY, f.name) for f in fields(Q.Qwen2Config)
               if f.name not in ("tie_word_embeddings", "num_attention_heads"))
    check_against_transformers(ODD, tied=False, length=12, new_tokens=16)


@pytest.mark.parametrize("rms, eps", [(1e-4, 1e-6), (1e-2, 1e-6), (1.0, 1e-2)])
def test_rms_norm_takes_eps_inside_the_square_root_as_transformers(rms, eps):
    """x / sqrt(mean(x^2) + eps) * weight, as transformers' Qwen2RMSNorm. At the activations of the model
    tests (RMS about 1, eps 1e-6) eps hardly matters; on inputs of tiny RMS, or with a large eps, an eps
    outside the root (or none) is off by up to 10x."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 64, generator=g) * rms
    mine, theirs = Q.RMSNorm(64, eps), Qwen2RMSNorm(64, eps=eps)
    weight = torch.rand(64, generator=g) + 0.5
    mine.weight.copy_(weight)
    theirs.weight.copy_(weight)
    torch.testing.assert_close(mine(x), theirs(x), rtol=1e-6, atol=0)
    assert mine(x).square().mean().sqrt() > 0.1                    # normalised: the comparison is not of zeros


def test_the_cache_is_bounded_by_max_position_embeddings():
    """max_position_embeddings is the model's context: a cache of exactly that many positions is
    allowed, one more is refused (with this config's number, not the release's 32768)."""
    model = Q.Qwen2(ODD)
    model.setup_cache(ODD.max_position_embeddings)
    assert model.max_len == 64
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        model.setup_cache(65)


# transformers' own spelling of what the release computes: accepted, and the same config as without it
PLAIN_KEYS = {"hidden_act": "silu", "rope_scaling": None, "head_dim": 64, "use_sliding_window": False,
              "layer_types": ["full_attention"] * 24, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}


@pytest.mark.parametrize("key, value, fragment", [
    ("hidden_act", "gelu", "hidden_act 'gelu' is not supported"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "rope_scaling {'type': 'linear'"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}, "rope_parameters {'rope_type': 'yarn'"),
    ("use_sliding_window", True, "sliding-window attention"),
    ("layer_types", ["full_attention"] * 23 + ["sliding_attention"], "sliding-window attention"),
    ("head_dim", 128, "head_dim 128 is not supported"),
])
def test_config_keys_this_decoder_would_compute_differently_are_refused(key, value, fragment):
    """A config.json asking for what transformers' Qwen2 computes and this decoder does not (another
    activation, scaled RoPE, sliding windows, another head size) is refused by name instead of loading
    into a model that answers differently; the same keys at the release's values are accepted."""
    assert Q.Qwen2Config.from_dict({**OFFICIAL_CONFIG, **PLAIN_KEYS}) == Q.QWEN2_0_5B
    with pytest.raises(ValueError, match=re.escape(fragment)):
        Q.Qwen2Config.from_dict({**OFFICIAL_CONFIG, **PLAIN_KEYS, key: value})


# --- loading -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tied", [True, False])
def test_load_model_sharded_any_dtype(tmp_path, dtype, tied):
    cfg = TINY if tied else TINY_UNTIED
    tensors = synthetic_llm_tensors(cfg, tied)
    ref = hf_reference(cfg, tensors).to(dtype)
    ref.save_pretrained(tmp_path, max_shard_size="100KB")    # several shards + model.safetensors.index.json
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = loading.load_qwen2(tmp_path, dtype=torch.float32)
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
        loading.load_llm(TINY, bad)
    missing = dict(tensors)
    del missing["model.layers.0.self_attn.k_proj.bias"]
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.0\.self_attn\.k_proj\.bias'"):
        loading.load_llm(TINY, missing)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.2\.mlp\.up_proj\.weight'"):
        loading.load_llm(TINY, dict(tensors, **{"model.layers.2.mlp.up_proj.weight": torch.zeros(96, 64)}))


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


def transformers_scores(logits, temperature, top_p):
    """The scores transformers' generate samples from (the official FastVLM's sampler): its temperature
    and top-p warpers, in the order it applies them."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    scores = TemperatureLogitsWarper(temperature)(None, logits[None].float())
    return (TopPLogitsWarper(top_p)(None, scores) if top_p < 1.0 else scores)[0]


def test_a_run_summing_to_exactly_top_p_is_the_nucleus():
    """Probabilities 1/2, 1/4, 1/8, 1/8 (exact in float32) and top_p 3/4: the two most likely tokens sum
    to top_p exactly; they are kept and nothing after them, as transformers keeps them."""
    logits = torch.log(torch.tensor([0.5, 0.25, 0.125, 0.125]))
    assert logits.softmax(-1).tolist() == [0.5, 0.25, 0.125, 0.125]
    for scores in (Q.nucleus(logits, 1.0, 0.75), transformers_scores(logits, 1.0, 0.75)):
        assert torch.isfinite(scores).tolist() == [True, True, False, False]
    past = 0.7500001                                                # a little more: one of the 1/8s joins
    assert torch.equal(Q.nucleus(logits, 1.0, past), transformers_scores(logits, 1.0, past))
    assert torch.isfinite(Q.nucleus(logits, 1.0, past)).sum() == 3


@settings(deadline=None, max_examples=80)
@given(vocab=st.integers(2, 80), spread=st.floats(0.1, 4.0), temperature=st.sampled_from([0.2, 0.7, 1.0, 1.5]),
       cut=st.integers(0, 200), seed=st.integers(0, 2**31 - 1))
def test_top_p_keeps_and_samples_what_transformers_does(vocab, spread, temperature, cut, seed):
    """top_p placed exactly on a boundary of the nucleus as float32 sums it (the k least likely tokens
    sum to 1 - top_p, exactly): the same tokens kept as by transformers' warpers, none of those k among
    them, every kept token more likely than every dropped one, and the same token drawn from the same
    random stream."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, generator=g) * spread
    k = cut % (vocab - 1) + 1
    least_likely = float((logits / temperature).sort().values.softmax(-1).cumsum(-1)[k - 1])
    assume(least_likely >= 2**-28)               # then 1 - (1 - x) is x again in float64: the bound is exact
    top_p = 1.0 - least_likely
    mine = Q.nucleus(logits, temperature, top_p)
    theirs = transformers_scores(logits, temperature, top_p)
    assert torch.equal(mine, theirs)
    kept = torch.isfinite(mine)
    assert 1 <= kept.sum() <= vocab - k
    assert logits[kept].min() >= logits[~kept].max()
    drawn = torch.multinomial(theirs.softmax(-1), 1, generator=torch.Generator().manual_seed(seed))
    assert Q.sample(logits, temperature, top_p, torch.Generator().manual_seed(seed)) == int(drawn)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_an_infinite_logit_without_nan_is_refused(temperature):
    """One logit of +inf among finite ones, no NaN anywhere (the head's sum overflowed the dtype): greedy
    or sampling, generation raises NonFiniteLogits instead of answering with the overflowed token,
    whose real size is lost (its argmax a guess, its probability NaN); a later turn at the same position
    (the weights mended) answers as if the failed one had never run."""
    model = ours(TINY_UNTIED)
    ids = prompt(TINY_UNTIED, 6)
    seen = []
    hook = model.norm.register_forward_hook(lambda module, args, out: seen.append(out[0, -1]))
    overflowed = int(model(ids)[0, -1].argmin())                    # the least likely token
    hook.remove()
    kept = model.lm_head.weight[overflowed].clone()
    model.lm_head.weight[overflowed] = 3e38 * seen[0].sign()        # every term of its sum positive: +inf
    logits = model(ids)[0, -1]
    assert logits[overflowed] == float("inf") and not logits.isnan().any()
    assert torch.isfinite(torch.cat([logits[:overflowed], logits[overflowed + 1:]])).all()
    model.setup_cache(32)
    with pytest.raises(Q.NonFiniteLogits, match="after 0 new tokens"):
        Q.generate(model, ids, max_new_tokens=8, temperature=temperature, seed=0)
    model.lm_head.weight[overflowed] = kept
    again = Q.generate(model, ids, max_new_tokens=8)                # over what the failed turn cached
    model.drop_cache()
    model.setup_cache(32)
    assert again == Q.generate(model, ids, max_new_tokens=8) and len(again[0]) == 8


@pytest.fixture(scope="module")
def unstopped_chat(small_model_dir):
    """(model, tokenizer, image, the first answer's tokens when nothing stops it) of the small model."""
    model, tokenizer, _ = loading.load_model(small_model_dir)
    image = Image.new("RGB", (96, 64), (200, 40, 90))
    free, tokens = CH.Chat(model, tokenizer, image), []
    free.stop_ids = set()
    free.ask("What is this?", max_new_tokens=5, on_token=tokens.append)
    return model, tokenizer, image, tokens


@pytest.mark.parametrize("stop", ["<|im_end|>", "<|endoftext|>"])
def test_an_answer_ends_at_either_stop_token_and_leaves_it_out(unstopped_chat, stop):
    """Qwen2 ends a chat turn with <|im_end|> and a document with <|endoftext|> (its instruct models'
    generation config stops at both): a chat's answer stops at whichever the model writes, and neither
    the text, the streamed tokens nor the conversation's history contains it."""
    model, tokenizer, image, unstopped = unstopped_chat
    assert not {151643, 151645} & set(unstopped[:3])               # the model writes no stop token itself
    calls = []

    def stop_at_the_fourth_token(module, args, out):               # the prefill's logits, then each decode step's
        calls.append(None)
        if len(calls) == 4:
            out[..., tokenizer.token_id(stop)] = out.max() + 1.0
        return out

    hook = model.llm.lm_head.register_forward_hook(stop_at_the_fourth_token)
    try:
        chat, streamed = CH.Chat(model, tokenizer, image), []
        answer = chat.ask("What is this?", max_new_tokens=5, on_token=streamed.append)
    finally:
        hook.remove()
    assert streamed == unstopped[:3]
    assert answer == tokenizer.decode(unstopped[:3]).strip()
    assert chat.history[-3:] == unstopped[:3] and chat.timing.new_tokens == 3


# --- tokenizer -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizers_pair(tmp_path_factory):
    folder = write_official_tokenizer(tmp_path_factory.mktemp("tok"))
    return loading.load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder), folder


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
    assert loading.load_tokenizer(tmp_path).encode(TRICKY[1] + TRICKY[9]) == mine.encode(TRICKY[1] + TRICKY[9])
    with pytest.raises(CheckpointError, match="no tokenizer"):
        loading.load_tokenizer(tmp_path / "nothing")

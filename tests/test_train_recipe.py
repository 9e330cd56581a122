"""train.py's recipe, number by number: what the loss learns at each position (across the image
splice), the warm-up and cosine schedule, gradient accumulation, and a held-out evaluation that leaves
the model as it found it."""

import copy
import json
import math

import pytest
import torch

import fastvlm as FV
import shapes_data
import train as T
from support import llava_data as DA, training as TR  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """One CPU thread, as the command-line tests' --threads 1: on a shared 2-core machine two threads
    that wait on each other made these float64 steps ten times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    shapes_data.generate(folder, n_train=8, n_heldout=2, seed=11)
    return folder


SIZE = 128    # px: 4 image tokens, enough to see a splice, and fast in float64


def records(data, name="train.json"):
    return DA.load_records(data / name, data / "images")


def scratch(recs, dtype=torch.float32):
    torch.manual_seed(0)
    model, tokenizer = TR.build_scratch(recs)
    return model.to(dtype), tokenizer


TEXT_ONLY = {"id": "t", "conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "yes"}]}


# --- labels ---------------------------------------------------------------------------------------------

def test_every_learnt_label_is_the_next_token_across_the_image_splice(data):
    """A label shifted by one position after the image (or anywhere) trains "copy the current token",
    and that still lowers the loss, so no loss curve shows it. Through the path training takes
    (fastvlm.conversation_ids, Dataset, collate, the model's forward with labels, step_loss) for a
    single-turn, a multi-turn and a text-only conversation in one batch: (1) the learnt labels are
    exactly the answers and their <|im_end|>; (2) each learnt label is the token the LLM reads at its
    position (the image's N embeddings stand where its one placeholder stood); (3) step_loss is the mean,
    over those positions, of -log p(the token at t + 1 | the logits at t), computed here by hand; with
    --loss-average sample, the mean over the three conversations of each one's mean (a step normalised
    by its tokens instead weighs a long conversation more, and only the loss's scale shows it)."""
    recs = records(data)
    multi = recs[0]
    single = {**recs[1], "conversations": recs[1]["conversations"][:2]}
    text = DA.normalise(TEXT_ONLY, "t", {"text-only": 0})
    model, tokenizer = scratch(recs, torch.float64)
    T.set_trainable(model, "2", bn_train=False)
    batch = [(p if p is None else p.double(), i, l) for p, i, l in
             (DA.Dataset([r], None, tokenizer, SIZE, 2048)[0] for r in (single, multi, text))]
    pixels, ids, labels = DA.collate(batch, pad_id=0)
    logits, spread = model(pixels, ids, labels)
    n_image = model.vision_tower.cfg.num_tokens(SIZE, SIZE)
    assert n_image == 4
    expected_loss, learnt, sample_means = 0.0, 0, []
    for b, r in enumerate((single, multi, text)):
        row = ids[b]
        at = (row == FV.IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
        # the LLM's input, as token ids: -1 where an image embedding stands
        read = torch.cat([row[:at[0]], torch.full((n_image,), -1), row[at[0] + 1:]]) if at else row
        read = torch.cat([read, torch.full((spread.shape[1] - len(read),), -1)])
        with torch.no_grad():   # the reconstruction above is what the model embeds, position by position
            embeds = model.splice(row, model.encode_image(pixels[b:b + 1])[0] if at else None)
            tokens = read[:len(embeds)] >= 0
            assert torch.equal(embeds[tokens], model.llm.embed_tokens(read[:len(embeds)][tokens]))
        where = (spread[b] != -100).nonzero().flatten()
        assert torch.equal(spread[b, where], read[where]), f"row {b}: a learnt label is not the token at its position"
        answers = "".join(t["value"] + "<|im_end|>" for t in r["conversations"] if t["from"] == "gpt")
        assert tokenizer.decode(read[where].tolist(), skip_special_tokens=False) == answers
        assert 0 not in where.tolist()    # (position 0 has no earlier position to predict it)
        logp = torch.log_softmax(logits[b], -1)
        row_loss = sum(-logp[t - 1, read[t]].item() for t in where.tolist())
        expected_loss += row_loss
        learnt += len(where)
        sample_means.append(row_loss / len(where))
    loss = T.step_loss(model, [(pixels, ids, labels)], "token", world=1)
    assert loss == pytest.approx(expected_loss / learnt, rel=1e-12)
    loss = T.step_loss(model, [(pixels, ids, labels)], "sample", world=1)
    assert loss == pytest.approx(sum(sample_means) / 3, rel=1e-12)
    assert loss != pytest.approx(expected_loss / learnt, rel=1e-6)


# --- schedule -------------------------------------------------------------------------------------------

def test_warm_up_and_cosine_values():
    """The schedule's values, exactly: a wrong warm-up start, end or a decay that does not reach 0 at
    the last step only shows as a slightly different loss curve. 103 steps with 3 of warm-up: steps 0-2
    climb 1/3, 2/3, 1 (the peak at the end of the warm-up, never 0: a step at lr 0 would be wasted),
    then the cosine over the 100 steps left: 1 at step 3, 1/2 half-way (step 53), 0 at step 103 and
    after."""
    f = T.cosine_with_warmup
    assert [f(s, 103, 3) for s in range(4)] == [1 / 3, 2 / 3, 1.0, 1.0]
    assert f(28, 103, 3) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)), abs=1e-15)
    assert f(53, 103, 3) == pytest.approx(0.5, abs=1e-15)
    assert f(102, 103, 3) == pytest.approx(0.5 * (1 + math.cos(math.pi * 99 / 100)), abs=1e-15)
    assert f(103, 103, 3) == 0.0 and f(150, 103, 3) == 0.0
    assert f(0, 1, 1) == 1.0           # a one-step run trains at the peak


# --- gradient accumulation ------------------------------------------------------------------------------

@pytest.mark.parametrize("average", ["token", "sample"])
def test_accumulated_micro_batches_equal_one_large_batch(data, average):
    """step_loss's claim: the loss is normalised by the answer tokens (or samples) of the whole step,
    so k micro-batches accumulate exactly the gradient of one k-times larger batch. Averaging per
    micro-batch instead weights a token of a short micro-batch more and passes any loose check. In
    float64 (BatchNorm on running statistics, as when fine-tuning: batch statistics would differ by
    design): the loss, every gradient and the weights after the AdamW step, elementwise."""
    recs = records(data)
    model, tokenizer = scratch(recs, torch.float64)
    T.set_trainable(model, "2", bn_train=False)
    ds = DA.Dataset(recs, None, tokenizer, SIZE, 2048)
    items = [tuple(t if t is None or t.dtype != torch.float32 else t.double() for t in ds[i]) for i in range(4)]
    # micro-batches of 1 and 3 samples with different answer lengths: their token counts differ
    micro = [DA.collate(items[:1], 0), DA.collate(items[1:], 0)]
    whole = DA.collate(items, 0)
    tokens = [(m[2][:, 1:] != -100).sum().item() for m in micro]
    assert tokens[0] * 3 != tokens[1]
    runs = []
    for batches in (micro, [whole]):
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
        loss = T.step_loss(m, batches, average, world=1)
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        opt.step()
        runs.append((loss, grads, m.state_dict()))
    (l0, g0, w0), (l1, g1, w1) = runs
    assert l0 == pytest.approx(l1, rel=1e-12, abs=0)
    assert g0.keys() == g1.keys() and len(g0) > 50
    for name in g0:
        assert torch.allclose(g0[name], g1[name], rtol=1e-9, atol=1e-14), name
    for name in w0:
        assert torch.allclose(w0[name], w1[name], rtol=1e-9, atol=1e-14), name


# --- held-out evaluation --------------------------------------------------------------------------------

def test_evaluation_leaves_the_model_bit_identical(data):
    """evaluate() switches the model to eval mode and runs greedy answers through a KV cache. Left in
    eval mode, the training after it would use running statistics where it should use batch ones (and
    dropout-free train mode elsewhere); a forward in train mode would move the BatchNorm running
    statistics; a cache left behind would be written into by the next training forward. After it:
    every parameter and buffer bit-identical, every module in the mode it had (a mixed one: stage 1.5
    from scratch, encoder and BatchNorm training, LLM frozen in eval), no cache, the RNG untouched.
    Its loss is the training loss of those records in eval mode (a shifted label there would report a
    held-out loss of another task)."""
    recs = records(data)
    model, tokenizer = scratch(recs)
    T.set_trainable(model, "1.5", bn_train=True)
    model.mm_projector.eval()                 # an odd mode too, that a blanket train() would change
    before = {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    modes = {name: m.training for name, m in model.named_modules()}
    assert len(set(modes.values())) == 2
    rng = torch.get_rng_state()
    held_out = records(data, "heldout.json")
    loss, exact, asked = TR.evaluate(model, tokenizer, held_out, 256, 2048, 2, torch.device("cpu"), T.answer_loss)
    assert asked == 2 and 0 <= exact <= 1
    reference = copy.deepcopy(model).eval()
    ds = DA.Dataset(held_out, None, tokenizer, 256, 2048)
    assert loss == pytest.approx(T.step_loss(reference, [DA.collate([ds[0], ds[1]], 0)], "token", 1), rel=1e-5)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {k: v for k, v in model.named_buffers()}.keys() == buffers.keys()
    assert all(torch.equal(buffers[k], v) for k, v in model.named_buffers())
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(layer.self_attn.cache is None for layer in model.llm.layers) and model.llm.max_len == 0
    assert torch.equal(torch.get_rng_state(), rng)

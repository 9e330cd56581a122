"""Do the tests catch real bugs? Plant plausible one-line bugs, one at a time, and run the tests that
should notice.

    python tools/mutants.py               # every mutant (about 15-25 minutes on 2 cores)
    python tools/mutants.py --list        # the mutants and the tests each one runs
    python tools/mutants.py rope_start    # some of them, by name

Each mutant replaces one exact piece of code in one file of a temporary copy of the checkout, runs
its tests there (hypothesis derandomized, stopping at the first failure) and restores the file. The
table at the end says which were caught; the exit status is 0 only when every mutant was caught and
every unmutated test run passed.

Every pattern must occur exactly once in its file. When a refactor moves or rewrites the code, the
pattern stops matching and this script fails loudly, naming the mutant: re-anchor it on the new code
(same bug, new text) rather than deleting it. This is an on-demand check, not part of the suite.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    before: str          # must occur exactly once in `file`
    after: str
    tests: tuple         # pytest node ids or files, relative to the checkout
    why: str = ""        # the bug it stands for


FASTVLM, REPMIXER, QWEN2 = "tests/test_fastvlm.py", "tests/test_repmixer.py", "tests/test_qwen2.py"
SPEEDUPS = "tests/test_speedups.py"
E2E = FASTVLM + "::test_matches_independent_pipeline"
TIMM = REPMIXER + "::test_matches_timm_reference_at_256_and_1024"
PREPROCESS = FASTVLM + "::test_preprocessing_equals_official_image_processor"
PROPERTIES = (REPMIXER + "::test_mobileone_block_fuses_exactly", REPMIXER + "::test_large_kernel_conv_fuses_exactly",
              REPMIXER + "::test_repmixer_fuses_exactly", REPMIXER + "::test_repcpe_fuses_exactly",
              REPMIXER + "::test_convffn_fuses_exactly", REPMIXER + "::test_small_encoder_fuses_exactly")
HF = (QWEN2 + "::test_tiny_tied_matches_transformers", QWEN2 + "::test_tiny_untied_matches_transformers")

MUTANTS = [
    # --- preprocessing -------------------------------------------------------------------------------
    Mutant("resize_filter", "fastvlm.py", "img = expand_to_square(img).resize((size, size), Image.BICUBIC)",
           "img = expand_to_square(img).resize((size, size), Image.BILINEAR)", (PREPROCESS,),
           "bilinear where CLIP's processor resizes bicubic"),
    Mutant("scale_by_reciprocal", "fastvlm.py", "PIXEL_VALUES = torch.arange(256, dtype=torch.float32).div_(255.0)",
           "PIXEL_VALUES = torch.arange(256, dtype=torch.float32).mul_(1 / 255.0)",
           ("tests/test_fastvlm.py::test_pixels_on_the_device_are_numpys_k_over_255",),
           "x * (1/255) is not the correctly rounded x / 255 for every byte (the GPU's table)"),
    Mutant("pad_corner", "fastvlm.py", "canvas.paste(img, ((side - w) // 2, (side - h) // 2))",
           "canvas.paste(img, (0, 0))", (PREPROCESS,), "image pasted in the corner instead of centred"),
    # --- the encoder -----------------------------------------------------------------------------------
    Mutant("mobileone_tanh_gelu", "repmixer.py", "self.act = nn.GELU() if activation else nn.Identity()",
           'self.act = nn.GELU(approximate="tanh") if activation else nn.Identity()',
           (TIMM, SPEEDUPS), "GELU in its tanh form in the stem/downsample/expansion blocks"),
    Mutant("bn_fold_without_eps", "repmixer.py", "scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)",
           "scale = bn.weight / torch.sqrt(bn.running_var)", PROPERTIES, "BatchNorm folded without its eps"),
    Mutant("pad_kernel_one_side", "repmixer.py", "return F.pad(kernel, [p, p, p, p])",
           "return F.pad(kernel, [0, 2 * p, 0, 2 * p])", PROPERTIES, "small kernel padded off-centre"),
    Mutant("repmixer_norm_unscaled", "repmixer.py",
           "return x + self.layer_scale * (self.mixer(x) - self.norm(x))",
           "return x + self.layer_scale * self.mixer(x) - self.norm(x)", PROPERTIES,
           "RepMixer's layer scale applied to the mixer only"),
    Mutant("repcpe_fold_drops_identity", "repmixer.py",
           "return self.pe.weight + identity_kernel(dim, dim, k, self.pe.weight), self.pe.bias",
           "return self.pe.weight, self.pe.bias", PROPERTIES, "positional encoding folded without its residual"),
    Mutant("large_kernel_no_gelu", "repmixer.py", "        return self.act(y)\n", "        return y\n",
           (TIMM,), "downsampling conv without its GELU"),
    Mutant("convffn_no_gelu", "repmixer.py", "return self.fc2(self.act(self.fc1(x)))", "return self.fc2(self.fc1(x))",
           (TIMM,), "ConvFFN without its activation"),
    Mutant("repmixer_block_residual", "repmixer.py", "return y + self.layer_scale * self.convffn(y)",
           "return x + self.layer_scale * self.convffn(y)", (TIMM,),
           "ConvFFN residual taken from before the token mixer"),
    Mutant("attention_layer_scales_swapped", "repmixer.py",
           "y = x + self.layer_scale_1 * self.token_mixer(self.norm(x))",
           "y = x + self.layer_scale_2 * self.token_mixer(self.norm(x))",
           (TIMM,), "attention branch scaled by the FFN's layer scale"),
    Mutant("mhsa_q_k_swapped", "repmixer.py", "q, k, v = qkv.permute(2, 0, 3, 1, 4)",
           "k, q, v = qkv.permute(2, 0, 3, 1, 4)", (TIMM,), "query and key halves of qkv swapped"),
    Mutant("se_gelu_instead_of_relu", "repmixer.py", "s = torch.sigmoid(self.expand(F.relu(self.reduce(s))))",
           "s = torch.sigmoid(self.expand(F.gelu(self.reduce(s))))", (TIMM,),
           "squeeze-excite of the final expansion with the wrong activation"),
    Mutant("expansion_act_before_se", "repmixer.py", "return self.act(self.se(y))", "return self.se(self.act(y))",
           (TIMM,), "final expansion: GELU before the squeeze-excite gate instead of after"),
    # --- projector and tokens -------------------------------------------------------------------------
    Mutant("projector_tanh_gelu", "fastvlm.py",
           "nn.Sequential(nn.Linear(vision_cfg.out_channels, d), nn.GELU(), nn.Linear(d, d))",
           'nn.Sequential(nn.Linear(vision_cfg.out_channels, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))',
           (E2E + "[tied]",), "projector GELU in its tanh form"),
    Mutant("tokens_column_major", "repmixer.py", "return features.permute(0, 2, 3, 1).reshape(B, h * w, C)",
           "return features.permute(0, 3, 2, 1).reshape(B, h * w, C)", (TIMM, E2E + "[tied]"),
           "feature map flattened column by column"),
    # --- the decoder -----------------------------------------------------------------------------------
    Mutant("rope_rotates_backwards", "qwen2.py", "rotated = torch.cat([-x2, x1], dim=-1)",
           "rotated = torch.cat([x2, -x1], dim=-1)", HF, "RoPE rotation of the wrong sign"),
    Mutant("rope_ignores_start", "qwen2.py", "cos = self.rope_cos[start:start + T].to(x.dtype)",
           "cos = self.rope_cos[:T].to(x.dtype)", (QWEN2 + "::test_cached_prefill_and_decode_equal_one_full_forward",),
           "decode steps rotated as if at position 0"),
    Mutant("cache_returns_new_only", "qwen2.py", "return self.k[:, :, :end], self.v[:, :, :end]",
           "return self.k[:, :, start:end], self.v[:, :, start:end]",
           (QWEN2 + "::test_cached_prefill_and_decode_equal_one_full_forward",), "attention sees only new tokens"),
    Mutant("cache_growth_drops_values", "qwen2.py",
           "new.k[:, :, :keep], new.v[:, :, :keep] = old.k[:, :, :keep], old.v[:, :, :keep]",
           "new.k[:, :, :keep] = old.k[:, :, :keep]", (QWEN2 + "::test_growing_the_cache_keeps_what_it_holds",),
           "a growing cache keeps the keys but not the values"),
    Mutant("no_causal_mask", "qwen2.py", "attn_mask=mask, is_causal=triangle", "attn_mask=mask, is_causal=False",
           (QWEN2 + "::test_causality_later_tokens_never_change_earlier_logits",), "prefill without a causal mask"),
    Mutant("plain_mask_off_by_one", "qwen2.py", ".tril(diagonal=S - T)", ".tril(diagonal=S - T + 1)",
           (QWEN2 + "::test_sdpa_and_plain_attention_agree",), "each position sees one token ahead"),
    Mutant("tied_head_not_tied", "qwen2.py",
           "            self.lm_head.weight = self.embed_tokens.weight       # one tensor, two names",
           "            pass", (QWEN2 + "::test_a_freshly_built_tied_model_shares_one_tensor",),
           "a new tied model trains two tensors (only the loader re-ties)"),
    Mutant("tied_export_writes_head", "train.py", 'if k != "lm_head.weight" or llm.lm_head.weight is not llm.embed_tokens.weight}',
           'if True}', ("tests/test_train.py::test_tied_export_writes_no_head_and_untied_does",),
           "a tied model exported with a duplicate lm_head.weight"),
    # --- tokenizer and prompt --------------------------------------------------------------------------
    Mutant("tokenizer_without_nfc", "qwen2.py", "tok.normalizer = normalizers.NFC()", "tok.normalizer = None",
           (QWEN2 + "::test_tokenizer_ids_equal_transformers",), "text tokenized without NFC"),
    Mutant("whitespace_runs_whole", "qwen2.py", r"""|\s+(?!\S)|\s+")""", r"""|\s+")""",
           (QWEN2 + "::test_tokenizer_ids_equal_transformers",),
           "a run of spaces no longer leaves its last space to the next word"),
    Mutant("system_prompt", "fastvlm.py", 'SYSTEM_PROMPT = "You are a helpful assistant."',
           'SYSTEM_PROMPT = "You are a helpful assistant"',
           (FASTVLM + "::test_prompt_ids_equal_transformers_tokenizer",), "system prompt off by a full stop"),
    Mutant("follow_up_without_end", "fastvlm.py",
           "head = tokenizer.encode(END + START) + tokenizer.encode_text(\"user\\n\" + question)",
           "head = tokenizer.encode(START) + tokenizer.encode_text(\"user\\n\" + question)",
           (FASTVLM + "::test_follow_up_turns_follow_the_qwen_2_template",),
           "a follow-up turn that does not close the answer before it"),
    # --- sampling options -------------------------------------------------------------------------------
    Mutant("temperature_ignored", "infer.py", "max_new_tokens=args.max_new_tokens, temperature=args.temperature,",
           "max_new_tokens=args.max_new_tokens, temperature=0.0,",
           ("tests/test_infer.py::test_greedy_is_deterministic_and_sampling_is_seeded",), "--temperature ignored"),
    Mutant("top_p_drops_boundary", "qwen2.py", "drop = sorted_p.cumsum(-1) - sorted_p >= top_p",
           "drop = sorted_p.cumsum(-1) >= top_p", (QWEN2 + "::test_sample_top_p_keeps_the_nucleus_only",),
           "the token that crosses top_p is dropped from the nucleus"),
    # --- the speed step ---------------------------------------------------------------------------------
    Mutant("fused_residual_without_layer_scale", "speedups.py", "w = conv.weight * scale.reshape(-1, 1, 1, 1)",
           "w = conv.weight", (SPEEDUPS, E2E + "[tied]"), "the fused residual add forgets the layer scale"),
    Mutant("fast_linear_without_bias", "speedups.py",
           'return _OPS._linear_pointwise(x, self.weight, self.bias, "none", [], "")',
           'return _OPS._linear_pointwise(x, self.weight, None, "none", [], "")', (SPEEDUPS,),
           "the oneDNN linear drops the bias"),
    Mutant("channels_last_not_applied", "speedups.py", "            module.to(memory_format=torch.channels_last)\n",
           "            pass\n", (SPEEDUPS,), "the speed step leaves the encoder's weights in NCHW"),
    # --- checkpoint loading -----------------------------------------------------------------------------
    Mutant("missing_tensor_ignored", "checkpoint.py",
           "        if id(target) not in filled:",
           "        if False:", (FASTVLM + "::test_loader_names_the_bad_key", QWEN2 + "::test_loader_names_the_bad_key"),
           "a tensor missing from the file leaves a parameter uninitialised, silently"),
    # --- layouts, user text, bad input, batch ---------------------------------------------------------------
    Mutant("timm_se_swapped", "fastvlm.py", '    ("se.fc1.", "se.reduce."),\n    ("se.fc2.", "se.expand."),',
           '    ("se.fc1.", "se.expand."),\n    ("se.fc2.", "se.reduce."),',
           ("tests/test_layouts.py::test_every_transformers_key_maps_onto_the_model_and_back",),
           "transformers' squeeze-excite convs loaded into each other's places"),
    Mutant("image_token_answerable", "fastvlm.py",
           "self.vocab_limit = image_id if image_id is not None and image_id == len(tokenizer) - 1 else len(tokenizer)",
           "self.vocab_limit = len(tokenizer)",
           ("tests/test_layouts.py::test_fast_vlm_tokenizer_never_answers_its_image_token",),
           "an answer may contain transformers' <image> token"),
    Mutant("user_text_parses_specials", "qwen2.py", "        self.tok.encode_special_tokens = True\n",
           "        self.tok.encode_special_tokens = False\n",
           ("tests/test_infer.py::test_typed_control_tokens_are_only_text",),
           "a typed <|im_end|> closes the user's turn: a user can forge turns"),
    Mutant("square_bound_too_tight", "fastvlm.py", "    bound = max(EXACT_SQUARE_PIXELS, 2 * w * h)",
           "    bound = 2 * w * h", ("tests/test_infer.py::test_photo_aspect_ratios_stay_exact",),
           "elongated photos shrunk before padding: their pixels are no longer the official ones"),
    Mutant("resume_keeps_half_line", "infer.py", "            f.truncate(len(data) - len(tail))", "            pass",
           ("tests/test_batch.py::test_resume_after_a_kill",),
           "a line cut short by a kill stays, and the next answer is glued to it"),
    Mutant("stream_drops_partial_character", "infer.py", "        if answer.startswith(self.shown):\n",
           "        if False:\n", ("tests/test_infer.py::test_streamed_answer_ends_with_the_api_answer",),
           "stdout loses the end of the answer (a character cut by the token limit)"),
    # --- training at scale -----------------------------------------------------------------------------------
    Mutant("nan_loss_unchecked", "train.py", "                if not (math.isfinite(loss) and math.isfinite(grad_norm)):",
           "                if False:", ("tests/test_train_data.py::test_diverging_run_stops_and_keeps_nothing_bad",),
           "a diverged run writes a NaN checkpoint and exits 0"),
    Mutant("leading_turn_kept", "train.py", "        turns = turns[1:]\n", "        pass\n",
           ("tests/test_train_data.py::test_llava_data_as_published",),
           "a conversation opening with an assistant turn is refused instead of trained on"),
    Mutant("checkpointed_batchnorm_stages", "train.py",
           "    blocks = list(model.llm.layers) + ([] if bn_train else list(model.vision_tower.stages))",
           "    blocks = list(model.llm.layers) + list(model.vision_tower.stages)",
           ("tests/test_train_data.py::test_grad_checkpoint_gives_the_same_loss_and_gradients",),
           "recomputation updates BatchNorm running statistics twice"),
    Mutant("size_schedule_off_by_one", "train.py",
           "    return sizes[min(len(sizes) - 1, step * len(sizes) // max(1, total_steps))]",
           "    return sizes[min(len(sizes) - 1, (step + 1) * len(sizes) // max(1, total_steps))]",
           ("tests/test_train_data.py::test_rising_image_sizes",), "each resolution starts a step early"),
    # the CUDA decode graph and the GPU's pixels (tested on CPU through their fixed-shape form)
    Mutant("graph_mask_hides_the_new_token", "speedups.py",
           "    later = torch.arange(S, device=x.device) > positions[:, None] ",
           "    later = torch.arange(S, device=x.device) >= positions[:, None] ",
           ("tests/test_speedups.py::test_decode_step_equals_the_plain_forward_at_every_position",),
           "the decode step's own key is masked out"),
    Mutant("graph_recorded_at_slot_zero", "speedups.py",
           "        start = torch.full((1,), self.max_len - inputs.shape[1], dtype=torch.long, device=device)",
           "        start = torch.zeros((1,), dtype=torch.long, device=device)",
           ("tests/test_speedups.py::test_recording_writes_only_the_last_cache_slots",),
           "recording overwrites the first prompt token's keys and values"),
    Mutant("graph_key_ignores_the_cache", "speedups.py",
           "        caches = tuple(id(layer.self_attn.cache) for layer in self.layers)",
           "        caches = ()",
           ("tests/test_speedups.py::test_graph_is_recorded_again_when_the_cache_grows_and_a_follow_up_matches",),
           "a reallocated cache is replayed through the old recording"),
    Mutant("graph_outlives_its_cache", "speedups.py",
           "        self._graphs = {}                           # they read the old cache: free both\n",
           "", ("tests/test_speedups.py::test_graph_is_recorded_again_when_the_cache_grows_and_a_follow_up_matches",),
           "a grown cache leaves the old one alive beside it, held by the old recording"),
    Mutant("gqa_heads_grouped_wrongly", "speedups.py",
           "    q = q.reshape(B, H_kv, H // H_kv * T, hd)  ",
           "    q = q.reshape(B, H // H_kv * T, H_kv, hd).transpose(1, 2)  ",
           ("tests/test_speedups.py::test_decode_step_equals_the_plain_forward_at_every_position",),
           "query heads paired with the wrong k/v heads"),
    Mutant("prefill_logits_of_the_padding", "speedups.py", '            graph["last"].fill_(T - 1)',
           '            graph["last"].fill_(width - 1)',
           ("tests/test_speedups.py::test_padded_prefill_graphs_answer_as_the_plain_model",),
           "the padded prefill answers from its last padding row"),
    Mutant("view_of_a_gpu_kernels_output", "speedups.py", "    out = out.reshape(B, H, T, hd).transpose(1, 2)",
           "    out = out.view(B, H, T, hd).transpose(1, 2)",
           ("tests/test_speedups.py::test_static_forward_takes_a_gpu_kernels_output_layout",),
           "every graph fails to record on a GPU (and falls back, slow)"),
    Mutant("padding_cached", "speedups.py", "        k, v = k.where(real, 0.0), v.where(real, 0.0)", "        k, v = k, v",
           ("tests/test_speedups.py::test_no_nan_reaches_a_graph_through_masked_slots",),
           "a padded prompt's padding leaves values in the cache that 0 * inf turns into NaN"),
    Mutant("failed_turn_kept", "qwen2.py", "                layer.self_attn.cache.forget(start)\n", "                pass\n",
           ("tests/test_speedups.py::test_no_nan_reaches_a_graph_through_masked_slots",),
           "a turn that produced NaN poisons every later turn through the graphs' masked slots"),
    Mutant("warm_up_without_reserving", "fastvlm.py",
           "        self.reserve(question, max_new_tokens)\n        self.stop_ids = set()",
           "        self.stop_ids = set()",
           ("tests/test_fastvlm.py::test_warm_up_pays_the_first_call_and_leaves_the_chat_as_it_was",),
           "the timed turn grows the cache and records the graph again"),
    Mutant("pixels_by_reciprocal", "fastvlm.py", "    return x.float().div_(255.0)", "    return x.float().mul_(1 / 255.0)",
           ("tests/test_fastvlm.py::test_pixels_on_the_device_are_numpys_k_over_255",),
           "pixels one rounding away from Apple's"),
]


def checkout_copy(dest):
    """The files git tracks (and untracked, not ignored ones) as they are in the working tree."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def run_tests(where, tests, timeout):
    env = {**os.environ, "HYPOTHESIS_PROFILE": "ci", "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                              cwd=where, capture_output=True, text=True, timeout=timeout, env=env)
        code, tail = proc.returncode, (proc.stdout + proc.stderr)[-2000:]
    except subprocess.TimeoutExpired:
        code, tail = -1, "timed out"
    return code, tail, time.perf_counter() - start


def check_anchors(mutants):
    problems = []
    for m in mutants:
        count = (ROOT / m.file).read_text().count(m.before)
        if count != 1:
            problems.append(f"{m.name}: its pattern occurs {count} times in {m.file}; re-anchor it on the code")
    return problems


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help="run only these mutants")
    p.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    p.add_argument("--timeout", type=int, default=600, help="seconds per test run")
    args = p.parse_args(argv)
    known = {m.name: m for m in MUTANTS}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        p.error(f"unknown mutant {unknown[0]!r}; see --list")
    mutants = [known[n] for n in args.names] if args.names else MUTANTS
    if args.list:
        for m in mutants:
            print(f"{m.name:32s} {m.file:14s} {m.why}\n{'':47s}{' '.join(m.tests)}")
        return 0
    problems = check_anchors(mutants)
    if problems:
        print("\n".join(f"error: {line}" for line in problems), file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        where = Path(tmp)
        checkout_copy(where)
        tests = sorted({t for m in mutants for t in m.tests})
        print(f"unmutated: running the {len(tests)} selected tests once ...", flush=True)
        code, tail, seconds = run_tests(where, tests, args.timeout * 3)
        if code != 0:
            print(f"error: the selected tests fail without any mutant ({seconds:.0f} s):\n{tail}", file=sys.stderr)
            return 2
        print(f"unmutated: pass ({seconds:.0f} s)\n", flush=True)
        rows = []
        for i, m in enumerate(mutants, start=1):
            path = where / m.file
            original = path.read_text()
            path.write_text(original.replace(m.before, m.after, 1))
            try:
                code, tail, seconds = run_tests(where, m.tests, args.timeout)
            finally:
                path.write_text(original)
            verdict = {0: "NOT CAUGHT", 1: "caught"}.get(code, f"error (exit {code})")
            rows.append((m, verdict, seconds))
            print(f"[{i}/{len(mutants)}] {m.name}: {verdict} ({seconds:.0f} s)", flush=True)
            if code not in (0, 1):
                print("    " + tail.strip().replace("\n", "\n    ")[-1200:], flush=True)

    print("\n| mutant | file | the bug | caught by | result |\n|---|---|---|---|---|")
    for m, verdict, _ in rows:
        shown = ", ".join(t.split("::")[-1] if "::" in t else t for t in m.tests)
        print(f"| `{m.name}` | {m.file} | {m.why} | {shown} | {verdict} |")
    caught = sum(v == "caught" for _, v, _ in rows)
    print(f"\n{caught} of {len(rows)} mutants caught")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())

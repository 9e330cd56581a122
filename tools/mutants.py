"""Do the tests catch real bugs? Plant plausible one-line bugs, one at a time, and run the tests that
should notice.

    python tools/mutants.py               # every mutant (the first 170: 36 minutes on 2 cores, 2026-12-04)
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
PRECISION = "tests/test_precision.py::"
SERVE = "tests/test_serve.py::"
PAGE = "tests/test_page.py::"
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
    Mutant("scale_by_reciprocal", "support/speedups.py", "PIXEL_VALUES = torch.arange(256, dtype=torch.float32).div_(255.0)",
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
    Mutant("tied_export_writes_head", "support/training.py", 'if k != "lm_head.weight" or llm.lm_head.weight is not llm.embed_tokens.weight}',
           'if True}', ("tests/test_train.py::test_tied_export_writes_no_head_and_untied_does",),
           "a tied model exported with a duplicate lm_head.weight"),
    # --- tokenizer and prompt --------------------------------------------------------------------------
    Mutant("tokenizer_without_nfc", "support/tokenizer.py", "tok.normalizer = normalizers.NFC()", "tok.normalizer = None",
           (QWEN2 + "::test_tokenizer_ids_equal_transformers",), "text tokenized without NFC"),
    Mutant("whitespace_runs_whole", "support/tokenizer.py", r"""|\s+(?!\S)|\s+")""", r"""|\s+")""",
           (QWEN2 + "::test_tokenizer_ids_equal_transformers",),
           "a run of spaces no longer leaves its last space to the next word"),
    Mutant("system_prompt", "fastvlm.py", 'SYSTEM_PROMPT = "You are a helpful assistant."',
           'SYSTEM_PROMPT = "You are a helpful assistant"',
           (FASTVLM + "::test_prompt_ids_equal_transformers_tokenizer",), "system prompt off by a full stop"),
    Mutant("follow_up_without_end", "support/chat.py",
           "            ids = self.tokenizer.encode(END) + ids\n",
           "            pass\n",
           (FASTVLM + "::test_follow_up_turns_follow_the_qwen_2_template",), "a follow-up turn that does not close the answer before it"),
    # --- sampling options -------------------------------------------------------------------------------
    Mutant("temperature_ignored", "infer.py", "max_new_tokens=args.max_new_tokens, temperature=args.temperature,",
           "max_new_tokens=args.max_new_tokens, temperature=0.0,",
           ("tests/test_infer.py::test_greedy_is_deterministic_and_sampling_is_seeded",), "--temperature ignored"),
    Mutant("top_p_drops_boundary", "qwen2.py", "drop = sorted_probs.cumsum(-1) <= 1 - top_p",
           "drop = sorted_probs.cumsum(-1) - sorted_probs <= 1 - top_p",
           (QWEN2 + "::test_sample_top_p_keeps_the_nucleus_only",),
           "the token that crosses top_p is dropped from the nucleus"),
    # --- the speed step ---------------------------------------------------------------------------------
    Mutant("fused_residual_without_layer_scale", "support/speedups.py", "w = conv.weight * scale.reshape(-1, 1, 1, 1)",
           "w = conv.weight", (SPEEDUPS, E2E + "[tied]"), "the fused residual add forgets the layer scale"),
    Mutant("fast_linear_without_bias", "support/speedups.py",
           'return _OPS._linear_pointwise(x, weight, bias, "none", [], "")',
           'return _OPS._linear_pointwise(x, weight, None, "none", [], "")', (SPEEDUPS,),
           "the oneDNN linear drops the bias"),
    Mutant("channels_last_not_applied", "support/speedups.py", "            module.to(memory_format=torch.channels_last)\n",
           "            pass\n", (SPEEDUPS,), "the speed step leaves the encoder's weights in NCHW"),
    # --- checkpoint loading -----------------------------------------------------------------------------
    Mutant("missing_tensor_ignored", "support/checkpoint.py",
           "        if id(target) not in filled:",
           "        if False:", (FASTVLM + "::test_loader_names_the_bad_key", QWEN2 + "::test_loader_names_the_bad_key"),
           "a tensor missing from the file leaves a parameter uninitialised, silently"),
    # --- layouts, user text, bad input, batch ---------------------------------------------------------------
    Mutant("timm_se_swapped", "support/loading.py", '    ("se.fc1.", "se.reduce."),\n    ("se.fc2.", "se.expand."),',
           '    ("se.fc1.", "se.expand."),\n    ("se.fc2.", "se.reduce."),',
           ("tests/test_layouts.py::test_every_transformers_key_maps_onto_the_model_and_back",),
           "transformers' squeeze-excite convs loaded into each other's places"),
    Mutant("image_token_answerable", "support/chat.py",
           "self.vocab_limit = image_id if image_id is not None and image_id == len(tokenizer) - 1 else len(tokenizer)",
           "self.vocab_limit = len(tokenizer)",
           ("tests/test_layouts.py::test_fast_vlm_tokenizer_never_answers_its_image_token",),
           "an answer may contain transformers' <image> token"),
    Mutant("user_text_parses_specials", "support/tokenizer.py", "        self.tok.encode_special_tokens = True\n",
           "        self.tok.encode_special_tokens = False\n",
           ("tests/test_infer.py::test_typed_control_tokens_are_only_text",),
           "a typed <|im_end|> closes the user's turn: a user can forge turns"),
    Mutant("square_bound_too_tight", "fastvlm.py", "    bound = max(EXACT_SQUARE_PIXELS, 2 * w * h)",
           "    bound = 2 * w * h", ("tests/test_infer.py::test_photo_aspect_ratios_stay_exact",),
           "elongated photos shrunk before padding: their pixels are no longer the official ones"),
    Mutant("resume_keeps_half_line", "support/batch.py", "            f.truncate(len(data) - len(tail))", "            pass",
           ("tests/test_batch.py::test_resume_after_a_kill",),
           "a line cut short by a kill stays, and the next answer is glued to it"),
    Mutant("stream_drops_partial_character", "support/chat.py", "        if answer.startswith(self.shown):\n",
           "        if False:\n", ("tests/test_infer.py::test_streamed_answer_ends_with_the_api_answer",),
           "stdout loses the end of the answer (a character cut by the token limit)"),
    # --- training at scale -----------------------------------------------------------------------------------
    Mutant("nan_loss_unchecked", "support/training.py",
           "        if not (math.isfinite(loss) and math.isfinite(grad_norm)):",
           "        if False:",
           ("tests/test_train_data.py::test_diverging_run_stops_and_keeps_nothing_bad",), "a diverged run writes a NaN checkpoint and exits 0"),
    Mutant("leading_turn_kept", "support/llava_data.py", "        turns = turns[1:]\n", "        pass\n",
           ("tests/test_train_data.py::test_llava_data_as_published",),
           "a conversation opening with an assistant turn is refused instead of trained on"),
    Mutant("checkpointed_batchnorm_stages", "support/training.py",
           "    blocks = list(model.llm.layers) + ([] if bn_train else list(model.vision_tower.stages))",
           "    blocks = list(model.llm.layers) + list(model.vision_tower.stages)",
           ("tests/test_train_data.py::test_grad_checkpoint_gives_the_same_loss_and_gradients",),
           "recomputation updates BatchNorm running statistics twice"),
    Mutant("size_schedule_off_by_one", "support/llava_data.py",
           "    return sizes[min(len(sizes) - 1, step * len(sizes) // max(1, total_steps))]",
           "    return sizes[min(len(sizes) - 1, (step + 1) * len(sizes) // max(1, total_steps))]",
           ("tests/test_train_data.py::test_rising_image_sizes",), "each resolution starts a step early"),
    # the CUDA decode graph and the GPU's pixels (tested on CPU through their fixed-shape form)
    Mutant("graph_mask_hides_the_new_token", "support/speedups.py",
           "    later = torch.arange(S, device=x.device) > positions[:, None] ",
           "    later = torch.arange(S, device=x.device) >= positions[:, None] ",
           ("tests/test_speedups.py::test_decode_step_equals_the_plain_forward_at_every_position",),
           "the decode step's own key is masked out"),
    Mutant("graph_recorded_at_slot_zero", "support/speedups.py",
           "        start = torch.full((1,), self.max_len - inputs.shape[1], dtype=torch.long, device=device)",
           "        start = torch.zeros((1,), dtype=torch.long, device=device)",
           ("tests/test_speedups.py::test_recording_writes_only_the_last_cache_slots",),
           "recording overwrites the first prompt token's keys and values"),
    Mutant("graph_key_ignores_the_cache", "support/speedups.py",
           "        caches = tuple(id(layer.self_attn.cache) for layer in self.layers)",
           "        caches = ()",
           ("tests/test_speedups.py::test_graph_is_recorded_again_when_the_cache_grows_and_a_follow_up_matches",),
           "a reallocated cache is replayed through the old recording"),
    Mutant("graph_outlives_its_cache", "support/speedups.py",
           "        self._graphs = {}                           # they read the old cache: free both\n",
           "", ("tests/test_speedups.py::test_graph_is_recorded_again_when_the_cache_grows_and_a_follow_up_matches",),
           "a grown cache leaves the old one alive beside it, held by the old recording"),
    Mutant("gqa_heads_grouped_wrongly", "support/speedups.py",
           "    q = q.reshape(B, H_kv, H // H_kv * T, hd)  ",
           "    q = q.reshape(B, H // H_kv * T, H_kv, hd).transpose(1, 2)  ",
           ("tests/test_speedups.py::test_decode_step_equals_the_plain_forward_at_every_position",),
           "query heads paired with the wrong k/v heads"),
    Mutant("prefill_logits_of_the_padding", "support/speedups.py", '            graph["last"].fill_(T - 1)',
           '            graph["last"].fill_(width - 1)',
           ("tests/test_speedups.py::test_padded_prefill_graphs_answer_as_the_plain_model",),
           "the padded prefill answers from its last padding row"),
    Mutant("view_of_a_gpu_kernels_output", "support/speedups.py", "    out = out.reshape(B, H, T, hd).transpose(1, 2)",
           "    out = out.view(B, H, T, hd).transpose(1, 2)",
           ("tests/test_speedups.py::test_static_forward_takes_a_gpu_kernels_output_layout",),
           "every graph fails to record on a GPU (and falls back, slow)"),
    Mutant("padding_cached", "support/speedups.py", "        k, v = k.where(real, 0.0), v.where(real, 0.0)", "        k, v = k, v",
           ("tests/test_speedups.py::test_no_nan_reaches_a_graph_through_masked_slots",),
           "a padded prompt's padding leaves values in the cache that 0 * inf turns into NaN"),
    Mutant("failed_turn_kept", "support/speedups.py",
           "            self._forget_after(start + T)           # a prompt, graphed or not: the decode graph reads every slot\n",
           "            pass\n",
           ("tests/test_speedups.py::test_no_nan_reaches_a_graph_through_masked_slots", "tests/test_speedups.py::test_a_prompt_too_long_for_a_graph_clears_what_a_failed_turn_left"), "a turn that produced NaN poisons every later turn through the graphs' masked slots"),
    Mutant("warm_up_without_reserving", "support/speedups.py",
           "    chat.reserve(question, max_new_tokens)\n    chat.stop_ids = set()",
           "    chat.stop_ids = set()",
           ("tests/test_fastvlm.py::test_warm_up_pays_the_first_call_and_leaves_the_chat_as_it_was",), "the timed turn grows the cache and records the graph again"),
    Mutant("pixels_by_reciprocal", "fastvlm.py",
           "    return rgb.permute(2, 0, 1)[None].float().div_(255.0).contiguous()",
           "    return rgb.permute(2, 0, 1)[None].float().mul_(1 / 255.0).contiguous()",
           ("tests/test_fastvlm.py::test_pixels_on_the_device_are_numpys_k_over_255",), "pixels one rounding away from Apple's"),
]


# --- training: labels, the stages' defaults, the schedule, accumulation, evaluation, data, options, failed writes ---
RECIPE = "tests/test_train_recipe.py"
OPTIONS = "tests/test_train_options.py"
STAGE = "tests/test_train.py::test_each_stage_trains_exactly_its_parts_at_its_default_lr"
DEFAULTS = "tests/test_train.py::test_default_options_are_llava_1_5s"

MUTANTS += [
    Mutant("loss_copies_the_current_token", "train.py",
           "    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),",
           "    ce = F.cross_entropy(logits[:, 1:].flatten(0, 1), labels[:, 1:].flatten(),",
           (RECIPE + "::test_every_learnt_label_is_the_next_token_across_the_image_splice",), "the shift applied to the logits too: each position learns the token it reads"),
    Mutant("held_out_loss_unshifted", "support/training.py",
           "            total += loss(logits, spread, \"token\").item()",
           "            total += loss(logits[:, 1:], spread[:, :-1], \"token\").item()",
           (RECIPE + "::test_evaluation_leaves_the_model_bit_identical",), "the held-out loss scores copying the current token"),
    Mutant("newline_after_answer_learnt", "fastvlm.py",
           "            labels += text + end[:1] + [-100] * (len(end) - 1)         # learnt: the answer and <|im_end|>",
           "            labels += text + end",
           (RECIPE + "::test_every_learnt_label_is_the_next_token_across_the_image_splice",), "the template's newline after <|im_end|> is trained as part of the answer"),
    Mutant("stage_1_lr_of_stage_2", "train.py", '    "1": (("mm_projector",), 1e-3),', '    "1": (("mm_projector",), 2e-5),',
           (DEFAULTS, STAGE + "[1]"), "stage 1 at the fine-tuning learning rate"),
    Mutant("stage_1_5_trains_the_llm", "train.py", '    "1.5": (("vision_tower", "mm_projector"), 2e-5),',
           '    "1.5": (("vision_tower", "mm_projector", "llm"), 2e-5),', (STAGE + "[1.5]",),
           "stage 1.5 unfreezes the LLM"),
    Mutant("default_lr_not_the_stages", "train.py", "    lr = args.lr if args.lr is not None else STAGES[args.stage][1]",
           "    lr = args.lr if args.lr is not None else 1e-3", (STAGE + "[2]",),
           "a run without --lr trains every stage at 1e-3"),
    Mutant("weight_decay_default", "support/options.py", 'p.add_argument("--weight-decay", type=float, default=0.0,',
           'p.add_argument("--weight-decay", type=float, default=0.01,', (DEFAULTS, STAGE + "[2]"),
           "transformers' usual 0.01 where LLaVA-1.5 sets 0"),
    Mutant("warm_up_starts_at_zero", "train.py", "        return (step + 1) / warmup", "        return step / warmup",
           (RECIPE + "::test_warm_up_and_cosine_values", OPTIONS + "::test_warmup_sets_the_logged_learning_rates"),
           "the first step trains at lr 0"),
    Mutant("cosine_over_the_warm_up_too", "train.py",
           "    progress = (step - warmup) / max(1, total - warmup)", "    progress = step / max(1, total)",
           (RECIPE + "::test_warm_up_and_cosine_values",), "the decay counted from step 0: the peak is never held"),
    Mutant("warm_up_one_step_long", "train.py",
           "    warmup = max(1, round(args.warmup * run.total_steps))",
           "    warmup = round(args.warmup * run.total_steps) + 1",
           (OPTIONS + "::test_warmup_sets_the_logged_learning_rates",), "one warm-up step too many"),
    Mutant("accumulation_averaged_per_micro_batch", "train.py", "            (loss_sum * world / total).backward()",
           "            (loss_sum * world / count(labels).clamp(min=1) / len(batches)).backward()",
           (RECIPE + "::test_accumulated_micro_batches_equal_one_large_batch",),
           "the mean of micro-batch means: a token of a short micro-batch weighs more"),
    Mutant("accumulation_ignored_by_the_data_plan", "support/options.py",
           "    per_step = args.batch_size * args.grad_accum            # samples per process per optimizer step",
           "    per_step = args.batch_size                              # samples per process per optimizer step",
           (OPTIONS + "::test_grad_accum_equals_a_larger_batch",),
           "the micro-batches of one step overlap the next step's samples"),
    Mutant("evaluation_restores_train_mode_everywhere", "support/training.py",
           "        for m, mode in zip(core.modules(), modes):\n            m.training = mode\n",
           "        core.train()\n", (RECIPE + "::test_evaluation_leaves_the_model_bit_identical",),
           "after evaluation the frozen LLM (and the eval-mode BatchNorms) train"),
    Mutant("evaluation_in_train_mode", "support/training.py", "    core.eval()\n    try:\n", "    try:\n",
           (RECIPE + "::test_evaluation_leaves_the_model_bit_identical",),
           "evaluation moves the BatchNorm running statistics"),
    Mutant("evaluation_keeps_its_cache", "support/training.py",
           "        core.llm.drop_cache()                       # the cache is inference's; training runs without one\n",
           "", (RECIPE + "::test_evaluation_leaves_the_model_bit_identical",),
           "the next training forward writes into the answers' KV cache"),
    Mutant("first_folder_for_every_data_file", "support/llava_data.py",
           "    folders = image_folders * len(data_paths) if len(image_folders) == 1 else image_folders",
           "    folders = image_folders[:1] * len(data_paths)",
           ("tests/test_train_data.py::test_llava_data_as_published",), "--images DIR_A DIR_B: DIR_B never used"),
    Mutant("eval_images_ignored", "support/training.py",
           "load_datasets(args.eval_data, [args.eval_images or args.images[0]])[0]",
           "load_datasets(args.eval_data, [args.images[0]])[0]",
           (OPTIONS + "::test_eval_images_is_where_held_out_images_are_read",), "--eval-images ignored"),
    Mutant("clip_fixed_at_one", "train.py",
           "grad_norm = torch.nn.utils.clip_grad_norm_(run.params, args.clip)",
           "grad_norm = torch.nn.utils.clip_grad_norm_(run.params, 1.0)",
           (OPTIONS + "::test_clip_changes_the_training",), "--clip ignored"),
    Mutant("loss_average_ignored", "train.py", "loss = step_loss(model, batches, args.loss_average, world)",
           'loss = step_loss(model, batches, "token", world)',
           (OPTIONS + "::test_loss_average_weighs_the_samples",), "--loss-average ignored"),
    Mutant("epochs_rounded_down", "support/options.py", "    total_steps = args.steps or max(1, int(args.epochs * steps_per_epoch))",
           "    total_steps = args.steps or max(1, int(args.epochs)) * steps_per_epoch",
           (OPTIONS + "::test_epochs_set_the_number_of_steps",), "--epochs 0.5 trains a whole epoch"),
    Mutant("save_every_off_by_one", "support/training.py",
           "if args.save_every and step % args.save_every == 0 and step < self.stop_at:",
           "if args.save_every and (step + 1) % args.save_every == 0 and step < self.stop_at:",
           (OPTIONS + "::test_save_every_keeps_a_checkpoint_before_a_failure",), "--save-every N saves a step early"),
    Mutant("random_state_fixed", "support/training.py", "    torch.manual_seed(args.seed)\n", "    torch.manual_seed(0)\n",
           (OPTIONS + "::test_random_state_option",), "--seed only moves the data order, never the initial weights"),
    Mutant("state_saved_by_path", "support/training.py",
           '        with open(tmp / STATE, "wb") as f:   # through a Python file, whose failed write keeps its errno\n'
           "            torch.save(state, f)\n", "        torch.save(state, tmp / STATE)\n",
           (OPTIONS + "::test_file_size_limit_at_a_resumed_save_keeps_the_checkpoint",),
           "torch.save's own writer loses the errno of a full disk: a traceback"),
    Mutant("resumed_log_keeps_unsaved_steps", "support/training.py",
           'isinstance(row.get("global_step"), int) and row["global_step"] > last):',
           'isinstance(row.get("global_step"), int) and row["global_step"] > last + 1):',
           (OPTIONS + "::test_file_size_limit_at_a_resumed_save_keeps_the_checkpoint",),
           "a step logged but not saved is logged twice after --resume"),
    Mutant("equal_image_sizes_allowed", "support/options.py", "    if any(b <= a for a, b in zip(sizes, sizes[1:])):",
           "    if any(b < a for a, b in zip(sizes, sizes[1:])):",
           (OPTIONS + "::test_counts_and_sizes_have_upper_bounds",), "--image-sizes 128,128 accepted"),
    Mutant("decode_failure_named_by_its_item", "support/llava_data.py", "                skipped.append(i)",
           "                skipped.append(k)", (OPTIONS + "::test_skipped_records_are_counted_once_each",),
           "a record that fails to decode is counted again each time it comes round"),
]

# --- loading: config fields, shapes before allocation, Hub names and caches, conversion, question size ---
LOADING = "tests/test_loading.py"
LAYOUTS = "tests/test_layouts.py"

MUTANTS += [
    # Mutant(name, file, before (exactly once in file), after, tests (pytest node ids), why)
    Mutant("config_json_missing_called_bad_json", "support/loading.py",
           "    except CheckpointError:        # a ValueError too, but not one of the JSON parser's\n        raise\n",
           "", (LOADING + "::test_a_folder_without_config_json_says_so",),
           "a folder without config.json is reported as invalid JSON, to be re-downloaded"),
    Mutant("hf_home_before_hub_cache", "support/loading.py",
           'hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")',
           'hub = os.path.join(home, "hub") if os.environ.get("HF_HOME") else os.environ.get("HF_HUB_CACHE") '
           'or os.path.join(home, "hub")',
           (LAYOUTS + "::test_hub_cache_is_found_as_huggingface_hub_finds_it",),
           "HF_HOME wins over HF_HUB_CACHE: the model is looked for where huggingface_hub never put it"),
    Mutant("download_into_the_default_cache", "support/loading.py",
           "return Path(snapshot_download(repo, cache_dir=hub,", "return Path(snapshot_download(repo,",
           (LAYOUTS + "::test_hub_cache_is_found_as_huggingface_hub_finds_it",),
           "a download lands in huggingface_hub's import-time cache, not where the lookup searched"),
    Mutant("typo_in_a_path_looked_up_on_the_hub", "support/loading.py",
           '        return not Path(text.split("/")[0]).exists()', "        return True",
           (LAYOUTS + "::test_a_path_is_never_looked_up_on_the_hub",),
           "`--model models/fastvlm-tiy` is looked up on the Hub and fails as a network error"),
    Mutant("offline_taken_for_not_found", "support/loading.py",
           'if kinds & {"RepositoryNotFoundError", "RevisionNotFoundError"}:',
           'if kinds & {"RepositoryNotFoundError", "RevisionNotFoundError", "EntryNotFoundError"}:',
           (LAYOUTS + "::test_what_the_hub_answered_is_told_apart",),
           "no network is reported as 'no such repo', without the `hf download` hint"),
    Mutant("tied_as_the_config_says", "support/loading.py",
           '"tie_word_embeddings": "lm_head.weight" not in names}',
           '"tie_word_embeddings": cfg.tie_word_embeddings}',
           (LOADING + "::test_the_file_decides_whether_the_head_is_tied",),
           "a config that says untied beside a file without lm_head.weight fails to load (Apple's warning)"),
    Mutant("allocated_before_shapes_compared", "support/loading.py",
           "    load_exact(model, by_our_names(stored.items()), where=part_of, file_names=shown)\n",
           "",
           (LOADING + "::test_a_config_of_a_far_larger_model_is_named_before_anything_is_allocated",), "the stored shapes are first compared while the tensors are copied, after allocating"),
    Mutant("memory_counted_in_float32", "support/loading.py",
           "width = torch.empty((), dtype=dtype).element_size() if dtype is not None else None", "width = None",
           (LOADING + "::test_weights_too_big_for_the_memory_are_refused_in_one_line",),
           "a bfloat16 load is refused for the memory its float32 file would need"),
    Mutant("memory_check_needs_a_spare_byte", "support/loading.py", "if free is not None and need > free:",
           "if free is not None and need >= free:",
           (LOADING + "::test_weights_too_big_for_the_memory_are_refused_in_one_line",),
           "a model that fits exactly is refused"),
    Mutant("question_limit_one_byte_per_token", "support/chat.py",
           "        limit = left * longest_token_bytes(self.tokenizer)\n", "        limit = left\n",
           (LOADING + "::test_the_size_limit_is_exact_and_comes_before_the_image_and_the_tokens",),
           "questions that would fit are refused: the bound assumes a token is one byte"),
    Mutant("nfc_assumed_to_keep_the_length", "support/chat.py", "NFC_MAX_SHRINK = 3", "NFC_MAX_SHRINK = 1",
           (LOADING + "::test_nfc_never_shortens_utf8_more_than_the_limit_assumes",
            LOADING + "::test_the_size_limit_is_exact_and_comes_before_the_image_and_the_tokens"),
           "decomposed text that NFC shortens into the context is refused from its raw length"),
    Mutant("system_prompt_not_counted", "support/chat.py",
           "            if text is question or not self.history:", "            if text is question:",
           (LOADING + "::test_the_size_limit_is_exact_and_comes_before_the_image_and_the_tokens",),
           "a first turn is measured without its system prompt: one that cannot fit is tokenized"),
    Mutant("image_token_index_unchecked", "support/loading.py",
           "    if index is not None and index != tokenizer.token_id(FV.IMAGE):",
           "    if index is not None and tokenizer.token_id(FV.IMAGE) is None:",
           (LOADING + "::test_image_token_index_must_be_the_tokenizers",), "a config whose image_token_index is not the tokenizer's <image> id loads"),
    Mutant("fast_vlm_tower_width_unread", "support/loading.py",
           'hidden, what = vision.get("hidden_size", cfg.out_channels), "vision_config hidden_size"',
           'hidden, what = cfg.out_channels, "vision_config hidden_size"',
           (LOADING + "::test_a_vision_or_layout_field_changes_the_model_or_is_refused",),
           "transformers' vision_config hidden_size is never compared with the tower"),
    Mutant("untied_head_not_padded", "tools/convert.py",
           'if rows and ours in ("llm.embed_tokens.weight", "llm.lm_head.weight"):',
           'if rows and ours == "llm.embed_tokens.weight":',
           (LAYOUTS + "::test_an_untied_head_is_padded_like_the_embedding_and_converts_back",),
           "an untied head is not padded with the embedding: the converted folder does not load"),
    Mutant("weights_written_owner_only", "support/checkpoint.py", "    os.chmod(path, new_file_mode())\n", "",
           (LAYOUTS + "::test_converted_files_respect_the_umask_and_to_names_the_layout",
            "tests/test_train.py::test_checkpoint_loads_and_answers_through_infer"),
           "model.safetensors keeps safetensors' 0600 beside 0644 files"),
]

# --- config fields of the model files, the top-p boundary, stop tokens, the speed step's conditions ---
Q2, RM, SP = QWEN2 + "::", REPMIXER + "::", SPEEDUPS + "::"
ODD_LLM = Q2 + "test_every_config_field_at_another_value_matches_transformers"
RMS = Q2 + "test_rms_norm_takes_eps_inside_the_square_root_as_transformers"
TOP_P = Q2 + "test_top_p_keeps_and_samples_what_transformers_does"
EXACT_P = Q2 + "test_a_run_summing_to_exactly_top_p_is_the_nucleus"
ODD_VIT = RM + "test_every_config_field_is_read_where_it_belongs"
PLAIN_ONLY = SP + "test_convs_the_fused_kernels_cannot_compute_give_their_own_result"

MUTANTS += [
    # --- config fields ------------------------------------------------------------------------------
    Mutant("rms_eps_outside_the_root", "qwen2.py",
           "x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)",
           "x32 = x32 / (x32.pow(2).mean(-1, keepdim=True).sqrt() + self.eps)", (RMS,),
           "RMSNorm with eps added after the square root, as LayerNorm-style code does"),
    Mutant("norm_eps_of_the_release", "qwen2.py",
           "self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)",
           "self.post_attention_layernorm = RMSNorm(cfg.hidden_size, 1e-6)", (ODD_LLM,),
           "one RMSNorm built with Qwen2's 1e-6 instead of the config's rms_norm_eps"),
    Mutant("rope_theta_of_the_release", "qwen2.py",
           "cos, sin = rope_tables(self.cfg.head_dim, length, self.cfg.rope_theta, device)",
           "cos, sin = rope_tables(self.cfg.head_dim, length, 1_000_000.0, device)", (ODD_LLM,),
           "RoPE base hard-coded to Qwen2's 1e6, the config's rope_theta ignored"),
    Mutant("context_of_the_release", "qwen2.py", "if max_len > self.cfg.max_position_embeddings:",
           "if max_len > 32768:", (Q2 + "test_the_cache_is_bounded_by_max_position_embeddings",),
           "the cache bounded by the release's context, not the config's max_position_embeddings"),
    Mutant("cpe_kernel_of_the_ffn", "repmixer.py", "self.cpe = RepCPE(dim, cfg.cpe_kernel, fused)",
           "self.cpe = RepCPE(dim, cfg.ffn_kernel, fused)", (ODD_VIT,),
           "positional encoding sized by the FFN's kernel (both 7 in the release)"),
    Mutant("downsample_kernel_of_the_ffn", "repmixer.py",
           "Downsample(cfg.widths[index - 1], dim, cfg.downsample_kernel, fused)",
           "Downsample(cfg.widths[index - 1], dim, cfg.ffn_kernel, fused)", (ODD_VIT,),
           "downsampling conv sized by the FFN's kernel (both 7 in the release)"),
    Mutant("head_dim_of_the_release", "repmixer.py", "self.token_mixer = MHSA(dim, cfg.head_dim)",
           "self.token_mixer = MHSA(dim, 32)", (ODD_VIT,), "attention heads of the release's 32 channels"),
    Mutant("attention_ffn_ratio_of_the_release", "repmixer.py",
           "self.token_mixer = MHSA(dim, cfg.head_dim)\n        self.convffn = ConvFFN(dim, int(dim * cfg.mlp_ratio), cfg.ffn_kernel)",
           "self.token_mixer = MHSA(dim, cfg.head_dim)\n        self.convffn = ConvFFN(dim, 4 * dim, cfg.ffn_kernel)",
           (ODD_VIT,), "attention blocks' FFN 4x wide whatever mlp_ratio says"),
    Mutant("se_ratio_of_the_release", "repmixer.py", "se_ratio=cfg.se_ratio, fused=fused)",
           "se_ratio=1 / 16, fused=fused)", (ODD_VIT,), "squeeze-excite bottleneck of the release's 1/16"),
    Mutant("tokens_at_the_release_size", "repmixer.py", "height = height or self.image_size",
           "height = height or 1024", (ODD_VIT,), "num_tokens() of a 1024 px image whatever image_size says"),
    # --- sampling and generation --------------------------------------------------------------------
    Mutant("top_p_boundary_token_kept", "qwen2.py", "drop = sorted_probs.cumsum(-1) <= 1 - top_p",
           "drop = sorted_probs.cumsum(-1) < 1 - top_p", (EXACT_P, TOP_P),
           "a run summing to exactly top_p keeps one token more than transformers does"),
    Mutant("least_likely_token_kept", "qwen2.py", "drop[-1] = False", "drop[0] = False", (TOP_P,),
           "min_tokens_to_keep applied to the wrong end of the ascending order"),
    Mutant("sampling_without_temperature", "qwen2.py", "    scores = logits.float() / temperature\n",
           "    scores = logits.float()\n", (TOP_P,),
           "the nucleus chosen on the untempered logits (temperature ignored when sampling)"),
    Mutant("infinite_logit_answered", "qwen2.py", "if not torch.isfinite(logits).all():",
           "if torch.isnan(logits).any():", (Q2 + "test_an_infinite_logit_without_nan_is_refused",),
           "only NaN refused: an overflowed +inf logit becomes the answer"),
    Mutant("stop_token_in_the_answer", "qwen2.py",
           "        if token in stop_ids:\n            break\n        out.append(token)\n",
           "        out.append(token)\n        if token in stop_ids:\n            break\n",
           (Q2 + "test_an_answer_ends_at_either_stop_token_and_leaves_it_out",),
           "the stop token kept in the answer's ids and the history"),
    # --- the speed path -----------------------------------------------------------------------------
    Mutant("fused_kernels_in_any_float", "support/speedups.py",
           "            and given[0].dtype in FAST_DTYPES and (given[0].dtype == torch.float32 or BF16_KERNELS)\n",
           "", (SP + "test_the_fused_kernels_run_in_float32_and_bfloat16_only",),
           "the float32/bfloat16 oneDNN kernels run for float64 and float16 too"),
    Mutant("fused_kernels_float32_only", "support/speedups.py", "FAST_DTYPES = (torch.float32, torch.bfloat16)",
           "FAST_DTYPES = (torch.float32,)", (PRECISION + "test_the_fused_kernels_run_in_bfloat16_and_agree_with_the_plain_ops",),
           "bfloat16 left to the plain ops: the encoder and prefill lose oneDNN's fused kernels"),
    Mutant("fused_conv_any_padding_mode", "support/speedups.py",
           'and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))',
           'and not isinstance(conv.padding, str))', (PLAIN_ONLY,),
           "a reflect- or circular-padded conv fused with zero padding"),
    Mutant("fused_conv_string_padding", "support/speedups.py",
           'and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))',
           'and conv.padding_mode == "zeros")', (PLAIN_ONLY,), 'padding="same" handed to oneDNN as a list'),
    Mutant("grouped_1x1_as_matmul", "support/speedups.py",
           "return (conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1",
           "return (conv.kernel_size == (1, 1) and conv.stride == (1, 1)", (PLAIN_ONLY,),
           "a grouped 1x1 conv on a small map run as a full matmul"),
    Mutant("image_not_channels_last", "support/speedups.py",
           "return super().forward(images.contiguous(memory_format=torch.channels_last), return_stages)",
           "return super().forward(images, return_stages)",
           (SP + "test_the_swapped_encoder_takes_its_image_channels_last",),
           "the encoder fed NCHW: every channels-last conv converts layouts"),
    Mutant("plain_ops_turns_kernels_on", "support/speedups.py", "        enabled = before\n", "        enabled = True\n",
           (SP + "test_plain_ops_puts_back_the_switch_it_found",),
           "leaving plain_ops() switches the fused kernels on, whatever they were"),
]
MUTANTS += [
    Mutant("endoftext_not_a_stop", "fastvlm.py", 'STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")',
           'STOP_TOKENS = ("<|im_end|>",)', (Q2 + "test_an_answer_ends_at_either_stop_token_and_leaves_it_out",),
           "an answer runs on past <|endoftext|>"),
]

# --- infer.py and batch mode: options, the --out lock, input that is not JSON lines, failed writes ---
B = "tests/test_batch.py::"
I = "tests/test_infer.py::"
BATCH_OPTIONS = (B + "test_batch_options_reach_every_answer",)
FULL_OUT = (B + "test_a_full_disk_stops_with_one_line_and_the_rerun_answers_the_rest[out]",)
FULL_STDOUT = (B + "test_a_full_disk_stops_with_one_line_and_the_rerun_answers_the_rest[stdout]",)
LOCK = (B + "test_a_second_run_on_the_same_out_is_refused",)

MUTANTS += [
    # --- options that must reach every batch answer -------------------------------------------------------
    Mutant("batch_system_ignored", "support/batch.py",
           "    system = SYSTEM_PROMPT if args.system is None else args.system\n",
           "    system = SYSTEM_PROMPT\n",
           BATCH_OPTIONS, "--system ignored in batch mode"),
    Mutant("batch_top_p_ignored", "support/batch.py",
           "options = dict(temperature=args.temperature, top_p=args.top_p, seed=args.seed)",
           "options = dict(temperature=args.temperature, seed=args.seed)", BATCH_OPTIONS, "--top-p ignored in batch mode"),
    Mutant("batch_seed_ignored", "support/batch.py",
           "options = dict(temperature=args.temperature, top_p=args.top_p, seed=args.seed)",
           "options = dict(temperature=args.temperature, top_p=args.top_p)", BATCH_OPTIONS, "--seed ignored in batch mode"),
    Mutant("batch_temperature_ignored", "support/batch.py",
           "options = dict(temperature=args.temperature, top_p=args.top_p, seed=args.seed)",
           "options = dict(top_p=args.top_p, seed=args.seed)", BATCH_OPTIONS, "--temperature ignored in batch mode"),
    Mutant("batch_run_limit_ignored", "support/batch.py",
           'max_new_tokens=item.get("max_new_tokens", args.max_new_tokens)',
           'max_new_tokens=item.get("max_new_tokens", 256)', BATCH_OPTIONS,
           "a line without max_new_tokens gets the default, not the run's --max-new-tokens"),
    Mutant("line_limit_ignored", "support/batch.py",
           "text = chat.ask(entry[\"question\"], max_new_tokens=entry[\"max_new_tokens\"], limit=limit,",
           "text = chat.ask(entry[\"question\"], max_new_tokens=args.max_new_tokens, limit=limit,",
           (B + "test_batch_equals_single_questions",), "a line's own max_new_tokens ignored"),
    Mutant("chat_continued_across_images", "support/batch.py",
           'last["error"] is None and last["image"] == entry["image"]:', 'last["error"] is None:',
           (B + "test_chat_lines_about_another_image_start_a_new_conversation",),
           "a chat line about another image continues the previous conversation"),
    Mutant("run_limit_check_inverted", "support/batch.py",
           'any(e["error"] is None and not e["own_limit"] for g in todo for e in g)',
           'any(e["error"] is None and e["own_limit"] for g in todo for e in g)',
           (B + "test_max_new_tokens_beyond_the_context",),
           "the context check looks at the lines with their own limit instead of those using --max-new-tokens"),
    Mutant("timing_on_a_gpu_only", "infer.py",
           "        if args.timing:\n            print_timing(chat, device, startup)",
           "        if args.timing and device.type != \"cpu\":\n            print_timing(chat, device, startup)",
           (B + "test_timing_adds_its_lines_on_stderr_only",), "--timing prints nothing on a CPU"),
    Mutant("plain_ignored", "support/options.py", "fast=not args.plain", "fast=True",
           (I + "test_plain_model_gives_the_same_answer",), "--plain still applies the speed step"),
    Mutant("dtype_not_passed", "support/options.py",
           "                                          dtype=dtype, fast=not args.plain, progress=True, quantize=quantize,",
           "                                          fast=not args.plain, progress=True, quantize=quantize,",
           (I + "test_bfloat16_on_cpu_runs",), "--dtype bfloat16 loads float32 weights"),
    Mutant("help_without_default", "support/options.py", "in (0, 1] (default: %(default)s, every token)", "in (0, 1]",
           (I + "test_every_option_says_what_it_does_and_its_default",), "--top-p's help without its default"),
    # --- input that is not questions, a shared --out, a full disk ----------------------------------------------
    Mutant("json_lines_threshold", "support/batch.py", "FIRST_LINES = 5\n", "FIRST_LINES = 6\n",
           (B + "test_a_few_bad_lines_before_good_ones_are_answered",),
           "the refusal looks at one line more than it says"),
    Mutant("nul_escaped_twice", "support/batch.py", r'if b"\0" in f.peek(SNIFF_BYTES)', r'if b"\\0" in f.peek(SNIFF_BYTES)',
           (B + "test_a_file_that_is_not_json_lines_is_refused_whole",),
           "the binary check looks for the two characters \\0 instead of a NUL byte"),
    Mutant("lock_shared", "support/batch.py", "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)",
           "fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)", LOCK, "two runs share --out's lock: both answer every id"),
    Mutant("lock_holder_field", "support/batch.py", 'return f" (pid {fields[4]})"', 'return f" (pid {fields[3]})"', LOCK,
           "the refusal names the lock's mode instead of its holder's pid"),
    Mutant("cut_write_kept", "support/batch.py", "            os.ftruncate(fd, start)\n", "            pass\n", FULL_OUT,
           "a write cut by a full disk leaves half an answer in --out"),
    Mutant("short_write_taken_whole", "support/batch.py", "data = data[os.write(fd, data):]",
           "data = data[len(data) if os.write(fd, data) else 0:]", FULL_OUT,
           "a short write taken for a whole one: the rest of the answer is lost, half a line stays"),
    Mutant("efbig_not_a_full_disk", "support/batch.py", "full = e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)",
           "full = e.errno in (errno.ENOSPC, errno.EDQUOT)", FULL_STDOUT,
           "a file-size limit (ulimit -f) not told as a full disk: no hint to pass --out"),
    Mutant("interrupted_conversation_kept", "support/batch.py", "        os.ftruncate(fd, last[0][1])\n", "",
           (B + "test_an_interrupted_chat_is_answered_again_whole",),
           "the rerun keeps a cut conversation's first answers: their ids end up twice in --out"),
]
MUTANTS += [
    Mutant("tilde_not_expanded", "support/loading.py", "    path = Path(name).expanduser()",
           "    path = Path(name)", (LAYOUTS + "::test_a_path_is_never_looked_up_on_the_hub",),
           "`--model=~/folder` (no shell expands it) is not found"),
    Mutant("folder_to_be_hint_dropped", "support/loading.py",
           'f"a folder, download a release into it first (`hf download apple/FastVLM-0.5B --local-dir {repo}`)")',
           'f"a folder, check the path")', (LAYOUTS + "::test_a_path_is_never_looked_up_on_the_hub",),
           "the README's own folder, not downloaded yet, gets only the hint of a Hub repo id"),
    Mutant("convert_failed_write_by_its_text", "tools/convert.py", "        number = write_errno(e)\n",
           '        number = write_errno(e) if "No space left" in str(e) else None\n',
           (LAYOUTS + "::test_a_file_size_limit_while_converting_is_one_line_and_leaves_nothing",),
           "convert.py under `ulimit -f`: safetensors' error as a traceback"),
]

# --- training, after a review: the log's trim on resume, --seed's bound, options checked before loading, sample averaging, the order of optimizer and scheduler, the sampler's epochs
BOUNDS = OPTIONS + "::test_counts_and_sizes_have_upper_bounds"

MUTANTS += [
    Mutant("trim_log_leaves_its_temporary_file", "support/training.py",
           "            tmp.unlink(missing_ok=True)\n", "",
           (OPTIONS + "::test_full_disk_while_trimming_the_log_on_resume",),
           "a failed log rewrite leaves log.jsonl.tmp beside the log"),
    Mutant("leftover_log_tmp_not_cleaned", "support/training.py",
           '    (out / "log.jsonl.tmp").unlink(missing_ok=True)\n', "",
           (OPTIONS + "::test_full_disk_while_trimming_the_log_on_resume",),
           "a log.jsonl.tmp left by a kill stays in the run folder for good"),
    Mutant("seed_bound_ignores_the_epochs", "support/options.py",
           "MAX_SEED = 2**64 - 1 - MAX_STEPS   #", "MAX_SEED = 2**64 - 1              #",
           (OPTIONS + "::test_the_largest_seed_lasts_the_longest_run", BOUNDS),
           "the largest accepted seed overflows at the second epoch (seed + epoch)"),
    Mutant("image_sizes_checked_after_the_model_loads", "support/options.py",
           "        read_sizes(args.image_sizes)              # the stride check waits for the model (parse_sizes)",
           "        args.image_sizes.split(\",\")              # the stride check waits for the model (parse_sizes)",
           (BOUNDS,),
           "--image-sizes 64000 or falling sizes refused only after the data and the model have loaded"),
    Mutant("sample_average_counts_tokens", "train.py",
           'return valid.sum() if average == "token" else (valid.sum(1) > 0).sum()',
           "return valid.sum()",
           (RECIPE + "::test_every_learnt_label_is_the_next_token_across_the_image_splice",),
           "--loss-average sample divides by the step's tokens: a token mean with another scale"),
    Mutant("scheduler_stepped_before_the_optimizer", "train.py",
           "            optimizer.step()\n            optimizer.zero_grad(set_to_none=True)\n            scheduler.step()\n",
           "            scheduler.step()\n            optimizer.step()\n            optimizer.zero_grad(set_to_none=True)\n",
           (OPTIONS + "::test_warmup_sets_the_logged_learning_rates",), "each step trains at the next step's lr while the log shows its own"),
    Mutant("sampler_never_told_the_epoch", "support/llava_data.py",
           "            self.sampler.set_epoch(epoch)", "            pass",
           (OPTIONS + "::test_each_epoch_reads_the_data_in_the_distributed_samplers_order",),
           "every epoch repeats the first epoch's order"),
    Mutant("sampler_does_not_shuffle", "support/training.py",
           "self.sampler = torch.utils.data.DistributedSampler(self.dataset, num_replicas=world, rank=rank, shuffle=True,",
           "self.sampler = torch.utils.data.DistributedSampler(self.dataset, num_replicas=world, rank=rank, shuffle=False,",
           (OPTIONS + "::test_each_epoch_reads_the_data_in_the_distributed_samplers_order",), "the data is read in file order every epoch"),
]

# --- infer.py, after a red team: stdout that fails, huge integers, an over-long --system, a last answer without its newline, a FIFO, blank lines
STDOUT = (I + "test_a_failed_write_to_stdout_is_one_line",)
NULL = (I + "test_after_a_failed_write_stdout_goes_nowhere",)

MUTANTS += [
    Mutant("stdout_not_sent_to_null", "support/batch.py",
           "        os.dup2(null, sys.stdout.fileno())\n", "", NULL,
           "stdout left as it was after a failed write: Python's flush at exit fails again"),
    Mutant("single_catches_broken_pipe_only", "infer.py",
           "        except OSError as e:                  # stdout is a full disk",
           "        except BrokenPipeError as e:          # stdout is a full disk", STDOUT,
           "a full disk behind stdout still gives a traceback"),
    Mutant("huge_int_line_not_caught", "support/batch.py",
           "    except (ValueError, RecursionError) as e:   # ValueError: bad UTF-8 or JSON, an int of > 4300 digits",
           "    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:   # ValueError: bad UTF-8 or JSON, an int of > 4300 digits",
           (B + "test_a_huge_integer_is_a_bad_line",), "a 5001-digit integer in a line is a traceback"),
    Mutant("batch_checks_the_default_system", "support/batch.py",
           "        Chat(model, tokenizer, None, config, system=system).check_system()",
           "        Chat(model, tokenizer, None, config).check_system()",
           (B + "test_a_system_prompt_too_long_is_refused_before_any_answer",), "batch checks the default system prompt, not --system"),
    Mutant("single_system_not_checked", "infer.py",
           "    chat.check_system()\n",
           "",
           (I + "test_a_system_prompt_too_long_for_any_question_is_named",), "single mode blames the question for a too-long --system"),
    Mutant("system_byte_bound_without_image", "support/chat.py",
           "size > NFC_MAX_SHRINK * room * longest_token_bytes(self.tokenizer)",
           "size > NFC_MAX_SHRINK * self.context * longest_token_bytes(self.tokenizer)",
           (I + "test_a_system_prompt_too_long_for_any_question_is_named",), "the byte bound forgets the image's tokens, so a just-too-long huge prompt is tokenized"),
    Mutant("whole_last_answer_truncated", "support/batch.py",
           "            if key is not None or tail.isspace():",
           "            if tail.isspace():",
           (B + "test_a_last_answer_without_its_newline_is_kept",),
           "a whole last answer without its newline is cut away and asked again"),
    Mutant("whole_last_answer_not_counted", "support/batch.py",
           "        if key is not None:\n            done.append((key, offset))\n", "",
           (B + "test_a_last_answer_without_its_newline_is_kept",),
           "a kept last answer is not counted as answered (asked twice)"),
    Mutant("batch_fifo_opened", "support/batch.py",
           "        if not stat.S_ISREG(os.stat(path).st_mode):",
           "        if stat.S_ISDIR(os.stat(path).st_mode):",
           (B + "test_a_question_file_that_is_a_pipe_is_refused",), "--batch on a FIFO hangs"),
    Mutant("blank_out_line_with_spaces_refused", "support/batch.py",
           "        if not line.isspace():\n            key = answer_key(line)",
           "        if line != b\"\\n\":\n            key = answer_key(line)",
           (B + "test_blank_lines_in_out_are_skipped_and_a_foreign_line_is_named",),
           "a blank line of spaces in --out is refused"),
    Mutant("out_line_number_off_by_one", "support/batch.py",
           "enumerate(whole.splitlines(keepends=True), 1)", "enumerate(whole.splitlines(keepends=True))",
           (B + "test_blank_lines_in_out_are_skipped_and_a_foreign_line_is_named",),
           "the foreign line of --out named one line too early"),
    Mutant("own_limit_message_inverted", "support/batch.py",
           "limit = 'the line\\'s \"max_new_tokens\"' if entry[\"own_limit\"] else \"--max-new-tokens\"",
           "limit = 'the line\\'s \"max_new_tokens\"' if not entry[\"own_limit\"] else \"--max-new-tokens\"",
           (B + "test_max_new_tokens_beyond_the_context",), "a line's own too-large max_new_tokens is told to lower --max-new-tokens"),
]

# --- the split's one of each: the prompt renderer of chat and training, config limits beside their fields,
# --- the options' one bounds table -------------------------------------------------------------------------
CONFIG = I + "test_config_sizes_one_past_their_bound_are_refused"
MUTANTS += [
    Mutant("encoder_config_limit_dropped", "repmixer.py",
           'ok, wanted = whole and 0 < value <= top, f"a whole number from 1 to {top:,}"',
           'ok, wanted = whole and 0 < value, f"a whole number from 1 to {top:,}"', (CONFIG,),
           "a FastViTHD config past its bounds is built (10**8 blocks would exhaust the memory)"),
    Mutant("decoder_config_limit_dropped", "qwen2.py",
           'ok, wanted = whole and 0 < value <= top, f"a whole number from 1 to {top:,}"',
           'ok, wanted = whole and 0 < value, f"a whole number from 1 to {top:,}"', (CONFIG,),
           "a Qwen2 config past its bounds is built (10**9 layers would exhaust the memory)"),
    Mutant("option_lower_bounds_off_by_one", "support/options.py", "        if value is not None and value < low:",
           "        if value is not None and value < low - 1:",
           ("tests/test_train_data.py::test_bad_options", I + "test_bad_numbers"),
           "--batch-size 0 or --seed -1 let through by the one bounds check"),
    Mutant("infer_seed_unbounded", "support/options.py",
           '("--seed", args.seed, 0, MAX_SAMPLING_SEED, "the range of torch\'s generator")',
           '("--seed", None, 0, MAX_SAMPLING_SEED, "the range of torch\'s generator")', (I + "test_bad_numbers",),
           "infer.py's --seed left out of the bounds table: torch's generator raises a traceback"),
    Mutant("image_marker_kept_in_the_first_question", "support/llava_data.py",
           '        questions[0] = questions[0].replace(FV.IMAGE, "").strip()',
           "        questions[0] = questions[0].strip()",
           ("tests/test_train.py::test_labels_cover_only_the_answers_and_their_end_marker",),
           "LLaVA's <image> marker left in the question text beside the renderer's placeholder"),
    Mutant("tied_head_allocated_twice", "support/loading.py",
           "            m.lm_head.weight = None                                      # for the 0.5B model)\n",
           "            pass\n", (LOADING + "::test_allocation_makes_each_tensor_once_a_tied_heads_too",),
           "a tied model's shared embedding allocated twice: loading on a GPU peaks at twice the model"),
    Mutant("cache_grown_unaligned", "support/speedups.py", "    return min(context, max(-(-2 * needed // 64) * 64, 1024))",
           "    return min(context, max(2 * needed, 1024))",
           (FASTVLM + "::test_warm_up_pays_the_first_call_and_leaves_the_chat_as_it_was",),
           "the KV cache grown to a length that is not a multiple of 64"),
    # --- precision: bf16 where the CPU has the units, int8 weights ---------------------------------------
    Mutant("auto_ignores_bf16_units", "support/options.py",
           "return (torch.bfloat16 if units else torch.float32), f\"--dtype auto: {why}\"",
           "return torch.float32, f\"--dtype auto: {why}\"",
           (PRECISION + "test_auto_picks_bfloat16_where_the_cpu_has_bf16_units",
            PRECISION + "test_auto_runs_bfloat16_and_says_why"), "auto stays float32 on a CPU with bf16 units"),
    Mutant("bf16_flags_any_avx512", "support/speedups.py",
           'BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")', 'BF16_FLAGS = ("amx_bf16", "avx512_bf16", "avx512f", "bf16")',
           (PRECISION + "test_bf16_units_are_read_from_the_cpu_flags",),
           "any AVX-512 CPU taken for one with bf16 units (AVX-512 alone converts bf16 in software: slower than fp32)"),
    Mutant("bf16_flags_from_the_bugs_line", "support/speedups.py",
           'if line.split(":")[0].strip() in ("flags", "Features"):', 'if ":" in line:',
           (PRECISION + "test_bf16_units_are_read_from_the_cpu_flags",), "flags read from any line of /proc/cpuinfo"),
    Mutant("precision_not_reported", "support/chat.py", "        lines.append(precision.line())\n", "        pass\n",
           (B + "test_timing_adds_its_lines_on_stderr_only", PRECISION + "test_auto_runs_bfloat16_and_says_why"),
           "--timing does not say which dtype ran"),
    Mutant("int8_scale_255", "support/speedups.py", "scale = (w.abs().amax(dim=1) / 127)", "scale = (w.abs().amax(dim=1) / 255)",
           (PRECISION + "test_int8_weights_are_within_half_a_step_of_the_float_ones",
            PRECISION + "test_fidelity_of_each_variant_is_bounded"), "the int8 range taken as 255 steps: weights clipped"),
    Mutant("int8_scale_per_tensor", "support/speedups.py", "scale = (w.abs().amax(dim=1) / 127)",
           "scale = (w.abs().amax().expand(w.shape[0]) / 127)",
           (PRECISION + "test_int8_weights_are_within_half_a_step_of_the_float_ones",),
           "one scale for a slice of rows: small rows lose their precision"),
    Mutant("int8_scale_transposed", "support/speedups.py",
           "y = linear(h.contiguous(), self.weight.to(h.dtype)) * self.scales.to(h.dtype)",
           "y = linear(h.contiguous() * self.scales.to(h.dtype)[:h.shape[1]], self.weight.to(h.dtype))",
           (PRECISION + "test_int8_linear_is_the_linear_of_its_dequantized_weights",),
           "the prompt path scales the inputs (columns) instead of the outputs (rows)"),
    Mutant("int8_bias_dropped", "support/speedups.py", "        return y if self.bias is None else y + self.bias\n",
           "        return y\n", (PRECISION + "test_int8_linear_is_the_linear_of_its_dequantized_weights",
                                  PRECISION + "test_fidelity_of_each_variant_is_bounded"), "Qwen2's q/k/v biases lost"),
    Mutant("int8_rounds_down", "support/speedups.py", "q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127)",
           "q = torch.trunc(w / scale.float()[:, None]).clamp_(-127, 127)",
           (PRECISION + "test_int8_weights_are_within_half_a_step_of_the_float_ones",),
           "truncation: weights off by up to a whole step"),
    Mutant("int8_kernel_unscaled", "support/speedups.py",
           "self.weight, self.scales.to(torch.bfloat16))",
           "self.weight, torch.ones_like(self.scales, dtype=torch.bfloat16))",
           (PRECISION + "test_int8_linear_is_the_linear_of_its_dequantized_weights",),
           "the decode kernel handed no scales (the prompt path right, every decoded token wrong)"),
    Mutant("int8_head_left_float", "support/speedups.py", "                   if isinstance(child, nn.Linear)]",
           "                   if isinstance(child, nn.Linear) and name != \"lm_head\"]",
           (PRECISION + "test_quantize_int8_converts_the_decoder_and_a_copy_of_the_tied_head",),
           "the output head, the largest single read of a decode step, left in float"),
    Mutant("int8_quantize_not_applied", "support/speedups.py", "        quantize_int8(model)\n", "",
           (PRECISION + "test_quantize_int8_converts_the_decoder_and_a_copy_of_the_tied_head",
            PRECISION + "test_int8_in_chat_and_batch_answers_as_the_api"), "--quantize int8 accepted and ignored"),
    Mutant("int8_not_passed_to_the_loader", "support/options.py", "progress=True, quantize=quantize,", "progress=True,",
           (PRECISION + "test_int8_in_chat_and_batch_answers_as_the_api",), "--quantize lost between the options and the loader"),
    Mutant("fidelity_stop_not_counted", "tools/fidelity.py", "    tokens = tokens + [STOPPED] * (len(tokens) < limit)\n", "",
           (PRECISION + "test_fidelity_figures_are_computed_as_documented",),
           "an answer that goes on where float32's stopped counted as equal"),
    Mutant("fidelity_dlogit_unscaled", "tools/fidelity.py", '"dlogit": float((ref_logits - logits).abs().max() / ref_logits.std()),',
           '"dlogit": float((ref_logits - logits).abs().max()),', (PRECISION + "test_fidelity_figures_are_computed_as_documented",),
           "the logit difference not relative to the spread"),
    Mutant("decode_bytes_count_the_table", "tools/bench.py",
           "return read if llm.lm_head.weight is table else read - table[1:].numel() * table.element_size()", "return read",
           (PRECISION + "test_decode_bytes_count_what_one_token_reads",),
           "int8's bytes per token counting the embedding table that a step reads one row of"),
    # --- serve.py ----------------------------------------------------------------------------------------
    Mutant("serve_cache_not_reused", "support/serving.py",
           "        found = self.kept.pop(self.key(request, request.exchanges), None)",
           "        found = None", (SERVE + "test_a_follow_up_prefills_only_its_own_turn",),
           "every follow-up replays the whole conversation"),
    Mutant("serve_cache_key_ignores_the_image", "support/serving.py",
           "        return (request.image_digest, request.system, tuple(exchanges))",
           "        return (request.system, tuple(exchanges))", (SERVE + "test_a_follow_up_prefills_only_its_own_turn",
                                                                 SERVE + "test_fifty_clients_at_once_each_get_their_own_answer"),
           "another image's conversation continued: the answer is about the wrong picture"),
    Mutant("serve_caches_not_swapped", "support/serving.py", "            self._install(caches, max_len)\n",
           "            pass\n", (SERVE + "test_a_follow_up_prefills_only_its_own_turn",),
           "a kept conversation continued on the cache of the last one answered"),
    Mutant("serve_queue_unbounded", "serve.py", '        if state["admitted"] >= queue:', "        if False:",
           (SERVE + "test_a_full_queue_answers_429_at_once",), "no 429: a flood of requests queues without end"),
    Mutant("serve_key_not_checked", "serve.py", "        if api_key is None:\n            return True",
           "        if True:\n            return True", (SERVE + "test_an_api_key_is_required_when_set",),
           "--api-key accepted and not enforced"),
    Mutant("serve_any_host_without_key", "serve.py", "    if args.host not in LOCAL and not args.api_key:",
           "    if False:", (SERVE + "test_bad_options_are_one_line",), "the server opened to the network without a key"),
    Mutant("serve_hangup_ignored", "serve.py", "                gone[\"flag\"] = gone[\"flag\"] or not future.done()      # the client left mid-stream: stop",
           "                pass", (SERVE + "test_a_client_that_hangs_up_mid_stream_frees_the_model",),
           "a client gone mid-stream: its answer runs on and holds the model"),
    Mutant("serve_body_unbounded", "serve.py", "                if total > max_body:", "                if False:",
           (SERVE + "test_a_huge_body_is_413_before_it_is_read",), "a chunked body of any size read into memory"),
    Mutant("serve_no_read_timeout", "serve.py", "            await asyncio.wait_for(read(), timeout)", "            await read()",
           (SERVE + "test_a_stalled_client_times_out_without_holding_the_model",), "a stalled client holds its slot forever"),
    Mutant("serve_stop_shown", "support/serving.py", "            self.stopped, self.final = True, full[:cut].rstrip()",
           "            self.stopped, self.final = True, full.rstrip()",
           (SERVE + "test_stop_strings_cut_the_answer_across_tokens", SERVE + "test_text_stream_holds_back_a_possible_stop_and_half_characters"),
           "the stop string (and what follows it) shown to the client"),
    Mutant("serve_stop_not_held_back", "support/serving.py",
           "        hold = max((k for s in self.stops for k in range(1, len(s)) if full.endswith(s[:k])), default=0)",
           "        hold = 0", (SERVE + "test_text_stream_holds_back_a_possible_stop_and_half_characters",),
           "the start of a stop string streamed before it is known to be one"),
    Mutant("serve_second_image_taken", "support/serving.py", "            if request.image_bytes is not None:\n                raise",
           "            if False:\n                raise", (SERVE + "test_refusals_are_openai_errors_with_their_status",),
           "a second image silently replaces the first"),
    Mutant("serve_remote_url_accepted", "support/serving.py", '    if not url.startswith("data:"):', "    if False:",
           (SERVE + "test_refusals_are_openai_errors_with_their_status",), "a remote URL taken for a data URL"),
    Mutant("serve_usage_without_image", "support/serving.py", "        prompt = len(chat.history) - (tokens if kept else 0) + max(image_tokens - 1, 0)",
           "        prompt = len(chat.history) - (tokens if kept else 0)",
           (SERVE + "test_an_answer_is_infer_pys_with_usage_and_timing",), "usage counts the image as one token"),
    Mutant("serve_length_reported_as_stop", "support/serving.py",
           '        finish = "stop" if stream.stopped or tokens < request.max_tokens else "length"', '        finish = "stop"',
           (SERVE + "test_length_limit_sampling_seed_and_system",), "a cut answer reported as finished"),
    Mutant("serve_system_ignored", "support/serving.py", '        request.system = "\\n".join(systems)', "        pass",
           (SERVE + "test_length_limit_sampling_seed_and_system",), "the client's system message dropped"),
    Mutant("serve_replay_keeps_the_last_end", "support/chat.py",
           "        ids = ids[:len(ids) - len(self.tokenizer.encode(END))]     # ask() puts the last <|im_end|> back",
           "        ids = ids", (SERVE + "test_with_nothing_kept_the_history_is_replayed_to_the_same_answer",),
           "a replayed history ends with <|im_end|> twice"),
    Mutant("page_forgets_the_conversation", "support/page.html",
           '    messages = [...asked, {role: "assistant", content: text}];', "    messages = [];",
           (PAGE + "test_a_follow_up_continues_the_conversation",), "a follow-up on the page starts over"),
    Mutant("page_no_chart", "support/page.html", "        if (chunk.timing) timing = chunk.timing;\n", "",
           (PAGE + "test_the_page_answers_a_question_about_an_uploaded_image_and_shows_the_time_split",),
           "the time split never drawn"),
    Mutant("page_hides_errors", "support/page.html", "    if (!r.ok) { showError(await errorText(r)); turn.remove(); return; }",
           "    if (!r.ok) { turn.remove(); return; }", (PAGE + "test_server_errors_are_shown_as_messages",),
           "a refused question leaves the page silent"),
    Mutant("page_swaps_encoder_and_prefill", "support/page.html",
           '["vision encoder", timing.encoder_ms, "#2a6"]', '["vision encoder", timing.prefill_ms, "#2a6"]',
           (PAGE + "test_the_page_answers_a_question_about_an_uploaded_image_and_shows_the_time_split",),
           "the encoder's bar shows the prefill's time"),
    Mutant("int8_keeps_float_layers", "support/speedups.py", "            child = getattr(parent, name)\n",
           "            child = getattr(parent, name)\n            places.append((child, name))\n",
           (PRECISION + "test_quantize_int8_frees_each_float_layer",),
           "the replaced float layers kept alive: loading int8 peaks at the float and the int8 model together"),
    Mutant("serve_slot_leaked_on_hangup", "serve.py",
           "        except ClientDisconnect:        # the client hung up while sending: its place in the queue is freed\n            release()\n            return Response(status_code=499)",
           "        except ClientDisconnect:\n            return Response(status_code=499)", (SERVE + "test_a_client_that_hangs_up_while_sending_frees_its_place",),
           "a client gone mid-body keeps its place: after --queue of them every request gets 429"),
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


# --- LoRA (#30): the layer, what a --lora run trains and writes, adapter files, the recipe's options ---
L = "tests/test_lora.py::"
LORA_ONE_LINE = L + "test_lora_options_that_cannot_work_get_one_line"
MUTANTS += [
    Mutant("lora_B_starts_random", "fastvlm.py", "        nn.init.zeros_(self.lora_B.weight)",
           "        nn.init.normal_(self.lora_B.weight, std=0.02)", (L + "test_a_new_adapter_starts_as_the_base_layer",),
           "a new adapter changes the model before any training"),
    Mutant("lora_A_starts_at_zero", "fastvlm.py", "        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))",
           "        nn.init.zeros_(self.lora_A.weight)", (L + "test_a_new_adapter_starts_as_the_base_layer",),
           "A and B both zero: no gradient ever reaches B"),
    Mutant("lora_scaling_alpha_alone", "fastvlm.py",
           "self.base_layer, self.r, self.alpha, self.scaling = base, r, alpha, alpha / r",
           "self.base_layer, self.r, self.alpha, self.scaling = base, r, alpha, alpha",
           (L + "test_the_update_is_alpha_over_r_times_B_A_and_merges_exactly",), "the update scaled by alpha, not alpha / r"),
    Mutant("lora_merge_unscaled", "fastvlm.py",
           "        delta = self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())   # (out, r) @ (r, in)",
           "        delta = self.lora_B.weight.float() @ self.lora_A.weight.float()",
           (L + "test_the_update_is_alpha_over_r_times_B_A_and_merges_exactly",), "merging forgets alpha / r"),
    Mutant("lora_rank_unchecked", "support/adapters.py",
           "        if not 0 < r <= min(layer.in_features, layer.out_features):",
           "        if not 0 < r:", (L + "test_targets_and_ranks_that_cannot_work_are_named", LORA_ONE_LINE),
           "a rank larger than the layer reaches the layer's constructor"),
    Mutant("lora_name_substring", "support/adapters.py", '    return name == wanted or name.endswith("." + wanted)',
           "    return wanted in name", (LORA_ONE_LINE,), "a layer name matches inside a name ('attn' adapts every projection)"),
    Mutant("lora_base_weights_learn", "train.py", "        module.requires_grad_(learn and not lora)",
           "        module.requires_grad_(learn)", (L + "test_only_the_adapters_and_the_projector_learn",),
           "the decoder learns in full beside its adapters"),
    Mutant("lora_freeze_ignored", "train.py", "        learn = name in parts and name not in freeze",
           "        learn = name in parts", (L + "test_only_the_adapters_and_the_projector_learn",),
           "--freeze vision_tower trains the encoder anyway"),
    Mutant("lora_lr_ignored", "train.py", '{"params": run.adapter_params, "lr": args.lora_lr}',
           '{"params": run.adapter_params, "lr": lr}', (L + "test_the_run_logs_the_two_learning_rates_and_evaluates",),
           "the adapters train at the projector's learning rate"),
    Mutant("lora_alpha_default_r", "support/options.py", "        args.lora_alpha = 2.0 * args.lora",
           "        args.lora_alpha = float(args.lora)", (L + "test_adapter_files_are_peft_s_layout_and_name_their_base",),
           "alpha defaults to r, not LLaVA-1.5's 2 r"),
    Mutant("lora_dropout_one_allowed", "support/options.py", "    if not 0 <= args.lora_dropout < 1:",
           "    if not 0 <= args.lora_dropout <= 1:", (LORA_ONE_LINE,), "dropout 1 drops every adapter input"),
    Mutant("lora_fsdp_allowed", "support/options.py", "    if args.fsdp:\n        raise DataError(\"--fsdp with --lora",
           "    if False:\n        raise DataError(\"--fsdp with --lora", (LORA_ONE_LINE,), "FSDP with adapters, untested"),
    Mutant("lora_idle_adapters_allowed", "support/training.py", "            if idle:",
           "            if False:", (LORA_ONE_LINE,), "adapters in a part the stage freezes: a run that learns nothing"),
    Mutant("lora_trainable_cast_to_bf16", "support/training.py",
           "                if not p.requires_grad:\n                    p.data = p.data.to(torch.bfloat16)",
           "                if True:\n                    p.data = p.data.to(torch.bfloat16)",
           (L + "test_bfloat16_keeps_the_base_in_bf16_and_what_learns_in_fp32",), "the adapters learn in bf16"),
    Mutant("lora_auto_bf16_for_full_training", "support/training.py",
           'fast = self.device.type == "cuda" or (self.lora is not None and speedups.bf16_units())',
           'fast = self.device.type == "cuda" or speedups.bf16_units()',
           (L + "test_auto_dtype_is_bf16_only_for_lora_on_a_cpu_with_bf16_units",), "full CPU training switches to bf16"),
    Mutant("lora_state_holds_everything", "support/training.py",
           "            model_state = {n: p.detach().clone() for n, p in core.named_parameters() if p.requires_grad}",
           "            model_state = None", (L + "test_only_the_adapters_and_the_projector_learn",),
           "a LoRA run's state copies the whole frozen base"),
    Mutant("lora_resume_forgets_adapters", "support/training.py", "            base.load_state_dict(trained, strict=False)",
           "            base.load_state_dict({}, strict=False)", (L + "test_resumed_lora_run_equals_the_run_straight_through",),
           "--resume restarts the adapters from random"),
    Mutant("lora_resume_base_unchecked", "support/training.py",
           '        if adapters.fingerprint(lora["base"]["folder"]) != lora["base"]["sha256"]:',
           "        if False:", (L + "test_resume_asks_for_the_same_lora_and_the_same_base",),
           "a run resumed on a base that changed"),
    Mutant("lora_merge_export_unscaled", "support/training.py",
           "                    delta = m.scaling * (m.lora_B.weight.detach().float() @ m.lora_A.weight.detach().float())",
           "                    delta = m.lora_B.weight.detach().float() @ m.lora_A.weight.detach().float()",
           (L + "test_merge_writes_the_base_s_layout_with_the_adapters_folded_in",), "--merge forgets alpha / r"),
    Mutant("lora_merge_drops_full_parts", "support/training.py",
           '                elif key is not None and key.split(".")[0] in trained:', "                elif False:",
           (L + "test_merge_writes_the_base_s_layout_with_the_adapters_folded_in",),
           "--merge writes the base's projector, not the trained one"),
    Mutant("lora_full_parts_not_saved", "support/training.py", '                                   lora["dropout"], full_parts(model))',
           '                                   lora["dropout"], [])', (L + "test_saved_adapters_give_the_trained_model_s_logits",),
           "the adapter files lose the projector trained beside them"),
    Mutant("lora_peft_prefix", "support/adapters.py", 'PREFIX = "base_model.model."', 'PREFIX = "base_model."',
           (L + "test_adapter_files_are_peft_s_layout_and_name_their_base",), "keys PEFT cannot place"),
    Mutant("lora_layers_always_whole_names", "support/adapters.py",
           '    return sorted(short) + sorted(n for n in chosen if n.rsplit(".", 1)[-1] not in short)',
           "    return sorted(chosen)", (L + "test_adapter_files_are_peft_s_layout_and_name_their_base",),
           "target_modules lists every layer by its whole name"),
    Mutant("lora_A_B_swapped_on_write", "support/adapters.py",
           '        tensors[key + ".lora_A.weight"] = m.lora_A.weight.detach().float().contiguous().clone()',
           '        tensors[key + ".lora_A.weight"] = m.lora_B.weight.detach().float().contiguous().clone()',
           (L + "test_saved_adapters_give_the_trained_model_s_logits",), "B written as A"),
    Mutant("lora_base_sha_unchecked", "support/adapters.py", "        if fingerprint(base_folder) != recorded:",
           "        if False:", (L + "test_an_adapter_for_other_weights_is_refused_in_one_line",),
           "an adapter applied to weights it was not trained on"),
    Mutant("lora_missing_matrix_allowed", "support/adapters.py", '            if f"{name}.{kind}.weight" not in filled:',
           "            if False:", (L + "test_a_damaged_adapter_is_refused_in_one_line",),
           "a layer the config names keeps a random A and a zero B"),
    Mutant("lora_alpha_read_as_r", "support/adapters.py",
           '        add_lora(model, config["r"], config["lora_alpha"], 0.0, config["target_modules"],',
           '        add_lora(model, config["r"], config["r"], 0.0, config["target_modules"],',
           (L + "test_saved_adapters_give_the_trained_model_s_logits",), "lora_alpha ignored when loading"),
    Mutant("lora_hub_blob_hashed", "support/adapters.py", '        if real.parent.name == "blobs" and',
           '        if real.parent.name == "blob" and', (L + "test_a_file_in_the_hub_cache_is_named_by_its_blob",),
           "every load of a Hub model hashes gigabytes again"),
    Mutant("lora_int8_unmerged", "support/loading.py",
           "        if quantize is not None:\n            adapters.merge_lora(model)",
           "        if False:\n            adapters.merge_lora(model)", (L + "test_int8_with_an_adapter_merges_it_first",),
           "int8 quantizes the adapters' small matrices and the base apart"),
    Mutant("lora_graph_key_without_base_layer", "support/speedups.py",
           '                   getattr(q_proj, "base_layer", q_proj).weight.data_ptr())',
           "                   q_proj.weight.data_ptr())", (L + "test_the_graphed_decoder_answers_with_adapters_as_the_plain_one",),
           "a GPU's graphed decoder crashes on an adapter"),
    Mutant("lora_saved_modules_empty_name", "support/adapters.py",
           "    if prefix and not any(name.startswith(prefix + \".\") for name in others):",
           "    if True:", (L + "test_a_decoder_trained_in_full_beside_projector_adapters_round_trips",),
           'modules_to_save "" for the decoder: PEFT would match every module'),
    Mutant("lora_resume_options_unchecked", "support/training.py", "                if changed:",
           "                if False:", (L + "test_resume_refuses_other_lora_options_or_freeze",),
           "a resumed run silently keeps the saved alpha, dropout and layers"),
    Mutant("lora_init_adapter_folder", "support/training.py",
           '    if args.init and (folder / adapters.CONFIG).is_file() and not (folder / "config.json").is_file():',
           "    if False:", (L + "test_a_lora_run_as_init_or_model",), "--init of an adapter folder: not a model"),
    Mutant("lora_rank_true_accepted", "support/adapters.py", "    if isinstance(x, bool) or not isinstance(x, int if whole else (int, float)):",
           "    if not isinstance(x, int if whole else (int, float)):", (L + "test_a_damaged_adapter_is_refused_in_one_line",),
           "JSON's true read as rank 1, then a traceback"),
    Mutant("lora_nan_matrix_accepted", "support/adapters.py", "        if value.is_floating_point() and not torch.isfinite(value).all():",
           "        if False:", (L + "test_a_damaged_adapter_is_refused_in_one_line",),
           "a diverged adapter blamed on the dtype at the first answer"),
    Mutant("lora_pissa_accepted", "support/adapters.py", '"init_lora_weights": (True, False, "gaussian", None)',
           '"init_lora_weights": (True, False, "gaussian", "pissa", None)', (L + "test_a_damaged_adapter_is_refused_in_one_line",),
           "a PiSSA adapter (whose base was rewritten) applied to the original base"),
    Mutant("lora_resume_other_init", "support/training.py",
           '            if lora and args.init and Path(loading.resolve_model(args.init)).resolve() != Path(lora["base"]["folder"]):',
           "            if False:", (L + "test_resume_refuses_another_base",), "--resume --init OTHER silently keeps the old base"),
    Mutant("lora_adapter_option_dropped", "support/options.py", "                                          adapter=args.adapter)",
           "                                          adapter=None)", (L + "test_serve_and_batch_take_the_adapter",),
           "--adapter parsed and ignored"),
]


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

"""The curated mutants of `python -m tools.mutation`: one plausible one-line bug each, the tests that must
catch it, and why it matters. A mutant is an exact text snippet of one file and its replacement (or tuples of
variants of the same edit, for successive versions of a file being restructured); the harness requires one
variant to occur exactly once (otherwise the mutant is an ERROR: the code moved, update the snippet), applies
it to a temporary copy of the repository and runs the tests with -x.

Tests are pytest arguments relative to the repository root (node ids, files, `-k` expressions); put the
cheapest test that should fail first: a killed mutant stops at its first failure.
"""

from typing import NamedTuple, Tuple, Union


class Mutant(NamedTuple):
    name: str
    path: str
    old: Union[str, Tuple[str, ...]]
    new: Union[str, Tuple[str, ...]]
    tests: Tuple[str, ...]
    reason: str


KERNEL = "kernels/triton_forward.py"
KERNEL_COMMON = "kernels/triton_common.py"
KERNEL_LAUNCH = "kernels/launch.py"
KERNEL_BACKWARD = "kernels/triton_backward.py"
FWD = "tests/test_triton_forward.py"
BWD = "tests/test_triton_backward.py"
ROWS = "tests/test_triton_backward_rows.py"
FUSED_BWD = "tests/test_triton_backward_fused.py"


# what follows the MASKED line in the statistics and dq kernels, which open alike on a block of query rows
QUERY_BLOCK_OPENING = (
    "  # the shift mask: in shifted windows on the border\n"
    "    # [BLOCK_M] query rows\n"
    "    pair, o_m, m_m = _block_of(i_pid, NUM_M, BLOCK_M, N, NUM_WINDOWS, NUM_WX, WINDOW_SET)\n"
    "    i_b, i_w, i_w2 = pair\n"
    "    cols = _channels(HEAD_DIM, BLOCK_D)  # [BLOCK_D] channel offsets, real-channel mask\n"
)


def _border_unmasked(name: str, before: str, after: str, tests: Tuple[str, ...], reason: str) -> Mutant:
    """A kernel whose border windows of a shifted grid lose the shift mask: its MASKED line (between `before` and
    `after`) true for window set 0 (every window) only."""
    line = "MASKED: tl.constexpr = SHIFTED and WINDOW_SET "
    return Mutant(name, KERNEL_BACKWARD, before + line + "!= 1" + after, before + line + "== 0" + after, tests, reason)


MUTANTS = [
    # ------------------------------------------------------------------------------------------ wiring
    Mutant(
        "op-forward-forced-reference",
        "kernels/op.py",
        "    if _runs_kernels(qkv):\n        return window_attention_triton_forward(",
        "    if False:\n        return window_attention_triton_forward(",
        (f"{FWD}::test_gradients_through_the_fused_op_match_the_reference",),
        "the fused op's forward silently computes the reference: only a launch proof tells",
    ),
    Mutant(
        "patch-transformers-forced-eager",
        "swinv2_fast/patch/transformers.py",
        "        attn.dropout.p if self.training else 0.0,\n        implementation,\n",
        '        attn.dropout.p if self.training else 0.0,\n        "eager",\n',
        ("tests/test_patch.py", "-k", "test_patched_matches_unpatched and triton and Swinv2Model"),
        "patch(model, 'triton') on a transformers model runs eager: same numbers, no kernels",
    ),
    Mutant(
        "patch-transformers-roll-then-pad",
        "swinv2_fast/patch/transformers.py",
        "        _RULES.pad_order,\n        _RULES.mask_value,\n        attn.dropout.p",
        '        "roll_then_pad",\n        _RULES.mask_value,\n        attn.dropout.p',
        ("tests/test_patch.py", "-k", "test_patched_matches_unpatched and eager and Swinv2Model"),
        "transformers pads then rolls; timm's order differs on padded, shifted grids",
    ),
    Mutant(
        "patch-transformers-mask-minus-100",
        "swinv2_fast/patch/transformers.py",
        "        _RULES.pad_order,\n        _RULES.mask_value,\n        attn.dropout.p",
        "        _RULES.pad_order,\n        -100.0,\n        attn.dropout.p",
        ("tests/test_wiring.py", "-k", "test_patched_transformers_block_adds_the_doubled_mask"),
        "transformers adds its -100 shift mask twice; -100 differs only at large logit scales",
    ),
    Mutant(
        "patch-timm-forced-eager",
        "swinv2_fast/patch/timm.py",
        "        attn.attn_drop.p if self.training else 0.0,\n        implementation,\n",
        '        attn.attn_drop.p if self.training else 0.0,\n        "eager",\n',
        ("tests/test_patch.py", "-k", "test_patched_matches_unpatched and triton and timm-head"),
        "patch(model, 'triton') on a timm model runs eager",
    ),
    Mutant(
        "model-mask-minus-100",
        "swinv2_fast/modeling.py",
        "self.mask_value = rules.mask_value",
        "self.mask_value = -100.0",
        ("tests/test_wiring.py", "-k", "test_our_block_adds_transformers_doubled_mask"),
        "our transformers-semantics model must add transformers' doubled mask",
    ),
    Mutant(
        "config-attention-dropout-from-hidden",
        "swinv2_fast/modeling.py",
        "        self.value = nn.Linear(dim, dim, bias=config.qkv_bias)\n"
        "        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)",
        "        self.value = nn.Linear(dim, dim, bias=config.qkv_bias)\n"
        "        self.dropout = nn.Dropout(config.hidden_dropout_prob)",
        ("tests/test_wiring.py", "-k", "dropout"),
        "attention dropout built from hidden_dropout_prob, its neighbour",
    ),
    Mutant(
        "config-layer-norm-eps-default",
        "swinv2_fast/modeling.py",
        "self.layernorm_after = nn.LayerNorm(dim, eps=config.layer_norm_eps)",
        "self.layernorm_after = nn.LayerNorm(dim)",
        ("tests/test_wiring.py", "-k", "layer_norm_eps"),
        "layer_norm_eps ignored by one norm",
    ),
    Mutant(
        "config-qkv-bias-always",
        "swinv2_fast/modeling.py",
        "self.value = nn.Linear(dim, dim, bias=config.qkv_bias)",
        "self.value = nn.Linear(dim, dim, bias=True)",
        ("tests/test_wiring.py", "-k", "qkv_bias"),
        "qkv_bias=False still builds a value bias",
    ),
    Mutant(
        "config-pretrained-window-ignored",
        "swinv2_fast/modeling.py",
        "pretrained_window_size=config.pretrained_window_sizes[i],",
        "pretrained_window_size=0,",
        ("tests/test_wiring.py", "-k", "pretrained_window_sizes"),
        "pretrained_window_sizes scale the CPB coordinates of fine-tuned checkpoints",
    ),
    Mutant(
        "config-hidden-act-ignored",
        "swinv2_fast/modeling.py",
        "self.intermediate_act_fn = _activation(config.hidden_act)",
        'self.intermediate_act_fn = _activation("gelu")',
        ("tests/test_wiring.py", "-k", "hidden_act"),
        "hidden_act ignored: gelu always",
    ),
    Mutant(
        "config-drop-path-from-hidden-dropout",
        "swinv2_fast/modeling.py",
        "torch.linspace(0, config.drop_path_rate,",
        "torch.linspace(0, config.hidden_dropout_prob,",
        ("tests/test_wiring.py", "-k", "drop_path"),
        "stochastic depth read from a neighbouring field",
    ),
    # ------------------------------------------------------------------------------------ conversions
    Mutant(
        "convert-timm-v-bias-to-q",
        "swinv2_fast/convert.py",
        '("attn.v_bias", "attention.self.value.bias"),',
        '("attn.v_bias", "attention.self.query.bias"),',
        ("tests/test_convert.py", "-x"),
        "timm's v bias converted onto the query bias",
    ),
    # ------------------------------------------------------------------------------- forward kernel
    Mutant(
        "kernel-window-row-uses-wh",
        KERNEL_COMMON,
        "o_py = i_wy * WH + o_pos // WW",
        "o_py = i_wy * WH + o_pos // WH",
        (f"{FWD}::test_forward_matches_reference_fp32", "-k", "w3x5 or w6x4 or w4x5"),
        "per-axis windows: the row of a window position divides by the window's width",
    ),
    Mutant(
        "kernel-shift-region-wrong-axis",
        KERNEL_COMMON,
        "(o_py >= HP - SH).to(tl.int32)",
        "(o_py >= HP - SW).to(tl.int32)",
        (f"{FWD}::test_forward_matches_reference_fp32", "-k", "w3x5 or w6x4"),
        "shift-mask regions along y must use the y shift",
    ),
    Mutant(
        "kernel-mask-value-hard-coded",
        KERNEL_COMMON,
        "b_s += tl.where(o_reg_m[:, None] != o_reg_n[None, :], mask_value, 0.0)",
        "b_s += tl.where(o_reg_m[:, None] != o_reg_n[None, :], -100.0, 0.0)",
        (f"{FWD}::test_mask_value_minus_100_and_minus_200_are_told_apart",),
        "the kernel must add the mask value it is given (-200 for transformers)",
    ),
    Mutant(
        "kernel-no-shift-mask",
        KERNEL_COMMON,
        "b_s += tl.where(o_reg_m[:, None] != o_reg_n[None, :], mask_value, 0.0)",
        "b_s += tl.where(o_reg_m[:, None] != o_reg_n[None, :], 0.0, 0.0)",
        (f"{FWD}::test_forward_matches_reference_fp32", "-k", "w4s2 or w7s3"),
        "the shifted-window mask is what separates wrapped-around regions",
    ),
    Mutant(
        "kernel-border-windows-unmasked",
        KERNEL,
        "MASKED: tl.constexpr = SHIFTED and WINDOW_SET != 1",
        "MASKED: tl.constexpr = SHIFTED and WINDOW_SET == 0",
        (f"{FWD}::test_forward_matches_reference_fp32", "-k", "w4s2 or w7s3"),
        "the forward's launch over the shifted border's windows must add the shift mask",
    ),
    Mutant(
        "kernel-border-windows-misplaced",
        KERNEL,
        "i_wx = in_last_row * i_k + (1 - in_last_row) * (NUM_WX - 1)",
        "i_wx = in_last_row * i_k + (1 - in_last_row) * (NUM_WX - 2)",
        (f"{FWD}::test_forward_matches_reference_fp32", "-k", "w4s2 or w7s3"),
        "the border launch covers the last window column (and row): every window runs exactly once",
    ),
    Mutant(
        "kernel-pad-order-swapped",
        KERNEL_LAUNCH,
        ("ROLL_THEN_PAD=padded and pad_order == ROLL_THEN_PAD,", "ROLL_THEN_PAD=pad_order == ROLL_THEN_PAD,"),
        ("ROLL_THEN_PAD=padded and pad_order != ROLL_THEN_PAD,", "ROLL_THEN_PAD=pad_order != ROLL_THEN_PAD,"),
        (f"{FWD}::test_forward_matches_reference_fp32", "-k", "padded"),
        "transformers pads then rolls, timm rolls then pads",
    ),
    Mutant(
        "kernel-logit-scale-unclamped",
        KERNEL_LAUNCH,
        "torch.clamp(logit_scale.detach().reshape(num_heads).to(cdt), max=LOGIT_SCALE_MAX).exp()",
        "logit_scale.detach().reshape(num_heads).to(cdt).exp()",
        (f"{FWD}::test_logit_scale_above_the_clamp",),
        "exp(min(logit_scale, log 100)): the clamp",
    ),
    Mutant(
        "kernel-position-bias-transposed",
        KERNEL_COMMON,
        ("p_bias = P_BIAS_H + o_m[:, None] * N + o_n[None, :]", "tl.load(P_BIAS_H + o_m[:, None] * N + o_n[None, :]"),
        ("p_bias = P_BIAS_H + o_n[None, :] * N + o_m[:, None]", "tl.load(P_BIAS_H + o_n[None, :] * N + o_m[:, None]"),
        (f"{BWD}::test_fp32_gradients_match_reference", "-k", "B2-8x8-h2d16"),
        "the bias tile is (query, key), not its transpose (the backward kernels' tile)",
    ),
    Mutant(
        "kernel-online-softmax-no-rescale",
        KERNEL,
        "b_acc = b_acc * b_alpha[:, None] + _dot(b_p.to(DDT), b_v.to(DDT), FULL_DOT)",
        "b_acc = b_acc + _dot(b_p.to(DDT), b_v.to(DDT), FULL_DOT)",
        (f"{FWD}::test_forward_matches_reference_fp32", "-k", "w7s3 or w12"),
        "the online softmax rescales what was accumulated under an older row max (several key blocks)",
    ),
    Mutant(
        "kernel-padded-rows-read-zero",
        KERNEL_COMMON,
        "p_rows = tl.where(m_pad[:, None], P_BIAS + o_d[None, :], p_rows)\n"
        "        return tl.load(p_rows, mask=_tile_mask(m_rows, m_d), other=0.0)",
        "return tl.load(p_rows, mask=_tile_mask(m_rows & ~m_pad, m_d), other=0.0)",
        (f"{BWD}::test_fp32_gradients_match_reference", "-k", "padded"),
        "padded positions hold the projection of a zero token: the q/k/v bias, not zero (backward's loads)",
    ),
    Mutant(
        "kernel-forward-padded-kv-read-zero",
        KERNEL,
        "p_rows = tl.where(m_pad[:, None], P_BIAS + o_d[None, :], p_rows)\n"
        '        return tl.load(p_rows, mask=_tile_mask(m_rows, m_d), other=0.0, eviction_policy="evict_first")',
        'return tl.load(p_rows, mask=_tile_mask(m_rows & ~m_pad, m_d), other=0.0, eviction_policy="evict_first")',
        (f"{FWD}::test_forward_matches_reference_fp32", "-k", "padded"),
        "padded keys and values in the forward are the q/k/v bias, not zero",
    ),
    Mutant(
        "kernel-window-loop-first-only",
        KERNEL,
        "    for i_bw in range(i_first, tl.minimum(i_first + WINDOWS_PER_PROGRAM, NUM_BW)):\n"
        "        i_b, _i_w, i_w2 = _window_in_set(i_bw, NUM_WINDOWS, NUM_WX, WINDOW_SET)\n"
        "        p_qkv = p_qkv_h + i_b * stride_qkv_b\n"
        "        p_bias_w = p_bias_m\n",
        "    for i_bw in range(i_first, tl.minimum(i_first + 1, NUM_BW)):\n"
        "        i_b, _i_w, i_w2 = _window_in_set(i_bw, NUM_WINDOWS, NUM_WX, WINDOW_SET)\n"
        "        p_qkv = p_qkv_h + i_b * stride_qkv_b\n"
        "        p_bias_w = p_bias_m\n",
        (f"{FWD}::test_several_windows_per_program", "-k", "not fp16"),
        "a program runs every window of its group, not the first only",
    ),
    Mutant(
        "kernel-forward-bias-rows-unstrided",
        KERNEL,
        "p_bias_m = POSITION_BIAS + i_h * N * N + o_m[:, None] * N",
        "p_bias_m = POSITION_BIAS + i_h * N * N + o_m[:, None]",
        (f"{FWD}::test_forward_matches_reference_fp32", "-k", "B2-8x8-h2d16"),
        "the forward's bias rows are N apart",
    ),
    Mutant(
        "kernel-forward-bias-first-key-block",
        KERNEL,
        "b_bias = _fwd_bias_tile(p_bias_w, o_n, m_m, m_n, EVEN)",
        "b_bias = _fwd_bias_tile(p_bias_w, o_n - start_n, m_m, m_n, EVEN)",
        (f"{FWD}::test_forward_matches_reference_fp32", "-k", "w7s3 or w12"),
        "each key block reads its own bias columns",
    ),
    # ------------------------------------------------------------------------------ backward kernels
    Mutant(
        "kernel-dq-without-scale",
        KERNEL_BACKWARD,
        "b_dq = _l2_normalize_backward(b_qn, b_rq, b_dqs * b_scale)",
        "b_dq = _l2_normalize_backward(b_qn, b_rq, b_dqs)",
        (f"{BWD}::test_fp32_gradients_match_reference", "-k", "B2-8x8-h2d16"),
        "dq carries the logit scale",
    ),
    Mutant(
        "kernel-dk-from-unscaled-q",
        KERNEL_BACKWARD,
        "    return b_dv, _dot(tl.trans(b_ds.to(DDT)), b_qs, FULL_DOT)",
        "    return b_dv, _dot(tl.trans(b_ds.to(DDT)), _b_qn.to(DDT), FULL_DOT)",
        (f"{BWD}::test_fp32_gradients_match_reference", "-k", "B2-8x8-h2d16"),
        "dk is dS^T times the scaled q",
    ),
    Mutant(
        "kernel-dv-stores-dk",
        KERNEL_BACKWARD,
        "tl.store(p_dk + C, b_dv.to(DQKV.dtype.element_ty), mask=_tile_mask(m_real_n, m_d))",
        "tl.store(p_dk + C, b_dk.to(DQKV.dtype.element_ty), mask=_tile_mask(m_real_n, m_d))",
        (f"{BWD}::test_fp32_gradients_match_reference", "-k", "B2-8x8-h2d16"),
        "dv is P^T dO, stored in the v part",
    ),
    Mutant(
        "kernel-padded-key-v-bias-gradient",
        KERNEL_BACKWARD,
        "tl.store(p_dpad + C, b_dv.to(DPAD.dtype.element_ty), mask=_tile_mask(m_padded_n, m_d))",
        "tl.store(p_dpad + C, b_dk.to(DPAD.dtype.element_ty), mask=_tile_mask(m_padded_n, m_d))",
        (f"{BWD}::test_padded_keys_reach_the_biases",),
        "padded keys' dv reaches the v bias",
    ),
    Mutant(
        "kernel-table-gradient-from-p",
        KERNEL_BACKWARD,
        "b_dbias += b_ds\n        # d scale = sum dS * cos(q, k)",
        "b_dbias += b_p\n        # d scale = sum dS * cos(q, k)",
        (f"{BWD}::test_fp32_gradients_match_reference", "-k", "B2-8x8-h2d16"),
        "the bias table's gradient is dS, summed over windows",
    ),
    Mutant(
        "kernel-scale-gradient-not-divided",
        KERNEL_BACKWARD,
        "NUM_TILES + i_tile, tl.sum(b_dscale, axis=0) / b_scale)",
        "NUM_TILES + i_tile, tl.sum(b_dscale, axis=0))",
        (f"{BWD}::test_fp32_gradients_match_reference", "-k", "B2-8x8-h2d16"),
        "d scale = sum dS * cos(q, k) = sum dS * (qs . kn) / scale",
    ),
    Mutant(
        "kernel-delta-not-normalised",
        KERNEL_BACKWARD,
        "b_pdp / b_l, mask=m_real_m)",
        "b_pdp, mask=m_real_m)",
        (f"{BWD}::test_fp32_gradients_match_reference", "-k", "B2-8x8-h2d16"),
        "delta = rowsum(P * dP) needs the softmax's normalisation",
    ),
    Mutant(
        "kernel-padded-channels-unmasked",
        KERNEL_COMMON,
        "    return o_d, o_d < HEAD_DIM\n",
        "    return o_d, o_d < HEAD_DIM + 1\n",  # one channel too many: in bounds, no crash
        (f"{FWD}::test_forward_any_head_dim", "-k", "h2d10"),
        "a head dim below its channel tile reads and writes the next head's channels",
    ),
    Mutant(
        "kernel-padded-channels-unmasked-in-stores",
        KERNEL_BACKWARD,
        "tl.store(p_dk, b_dk.to(DQKV.dtype.element_ty), mask=_tile_mask(m_real_n, m_d))",
        "tl.store(p_dk, b_dk.to(DQKV.dtype.element_ty), mask=m_real_n[:, None])",  # the dk stores stay in bounds
        (f"{BWD}::test_gradients_any_head_dim", "-k", "h2d10"),
        "dk of the padded channels (zeros) overwrites the next head's dk or the first head's dv",
    ),
    Mutant(
        "kernel-clamp-gradient-passes",
        KERNEL_BACKWARD,
        "bound = torch.tensor(LOGIT_SCALE_MAX, dtype=x.dtype, device=x.device)",
        "bound = torch.tensor(2 * LOGIT_SCALE_MAX, dtype=x.dtype, device=x.device)",
        (f"{BWD}::test_logit_scale_gradient_is_zero_where_clamped",),
        "no gradient through the clamp above log 100",
    ),
    Mutant(
        "kernel-fused-scale-gradient-from-scaled-q",
        KERNEL_BACKWARD,
        "b_dscale += tl.sum(b_qn * b_dqs, axis=1)",
        "b_dscale += tl.sum(b_qs.to(CDT) * b_dqs, axis=1)",
        (
            "tests/test_triton_backward_fused.py::test_fused_backward_arithmetic_at_fp32_tolerance",
            "-k",
            "B2-8x8-h2d16-w4s2 and pad_then_roll",
        ),
        "the scale gradient is sum qn . dqs (the normalised q, unscaled)",
    ),
    Mutant(
        "kernel-fused-ds-without-delta",
        KERNEL_BACKWARD,
        "b_ds = b_p * (b_dp - tl.sum(b_p * b_dp, axis=1)[:, None])",
        "b_ds = b_p * b_dp",
        (
            "tests/test_triton_backward_fused.py::test_fused_backward_arithmetic_at_fp32_tolerance",
            "-k",
            "B2-8x8-h2d16-w4s2 and pad_then_roll",
        ),
        "dS = P (dP - delta)",
    ),
    Mutant(
        "kernel-fused-table-gradient-from-p",
        KERNEL_BACKWARD,
        "b_dbias = b_dbias + b_ds  # [BLOCK, BLOCK]",
        "b_dbias = b_dbias + b_p  # [BLOCK, BLOCK]",
        (
            "tests/test_triton_backward_fused.py::test_fused_backward_arithmetic_at_fp32_tolerance",
            "-k",
            "B2-8x8-h2d16-w4s2 and pad_then_roll",
        ),
        "the table gradient sums dS, not P",
    ),
    Mutant(
        "kernel-fused-dq-without-scale",
        KERNEL_BACKWARD,
        "b_scale * b_dqs)\n                tl.store(DQKV + o_dst",
        "b_dqs)\n                tl.store(DQKV + o_dst",
        (
            "tests/test_triton_backward_fused.py::test_fused_backward_arithmetic_at_fp32_tolerance",
            "-k",
            "B2-8x8-h2d16-w4s2 and pad_then_roll",
        ),
        "dq carries the logit scale",
    ),
    Mutant(
        "kernel-fused-padded-keys-dropped",
        KERNEL_BACKWARD,
        "PAD_GRADS: tl.constexpr = NEED_PAD and HAS_BIAS and PADDED",
        "PAD_GRADS: tl.constexpr = False",
        (
            "tests/test_triton_backward_fused.py::test_fused_backward_arithmetic_at_fp32_tolerance",
            "-k",
            "B1-7x8-h1d32-w3s1-padded and pad_then_roll",
        ),
        "padded keys carry the k/v bias gradient",
    ),
    # ----------------------------------------------------------------------------------------- dispatch
    Mutant(
        "dispatch-auto-ignores-head-dim",
        "swinv2_fast/functional.py",
        "usable = qkv.is_cuda and triton_available() and tiles.head_dim_supported(head_dim)",
        "usable = qkv.is_cuda and triton_available()",
        ("tests/test_dispatch.py",),
        "'auto' must not send head dims without a kernel build to the kernels",
    ),
    Mutant(
        "dispatch-fp64-served-on-gpu",
        "swinv2_fast/functional.py",
        "    if qkv.dtype == torch.float64:\n        return False\n",
        "",
        ("tests/test_dispatch.py",),
        "fp64 runs eager on a GPU (no fp64 build)",
    ),
    # ------------------------------------------------------------------------------------ CPU eager path
    Mutant(
        "cpu-permutation-backward-forward-index",
        "kernels/reference.py",
        "        return grad.index_select(ctx.dim, ctx.inverse), None, None, None",
        "        return grad.index_select(ctx.dim, ctx.inverse.flip(0)), None, None, None",
        ("tests/test_reference.py", "-k", "test_the_permutation_backward_equals_autograds"),
        "the gather's gradient lands on the wrong tokens in every training step on an unpadded grid",
    ),
    Mutant(
        "cpu-bf16-inference-leaves-sdpa",
        "kernels/reference.py",
        '    return device.type != "cpu" or dtype != torch.bfloat16 or not differentiated',
        '    return device.type != "cpu" or dtype != torch.bfloat16',
        ("tests/test_reference.py", "-k", "test_the_cpu_eager_path_takes_sdpa_but_in_bf16_training"),
        "bf16 inference on a CPU leaves SDPA for the explicit chain (measured slower there)",
    ),
    Mutant(
        "cpu-sdpa-mask-rounded-to-bf16",
        "kernels/reference.py",
        "        return torch.promote_types(q.dtype, position_bias.dtype)\n",
        "        return q.dtype\n",
        ("tests/test_reference.py", "-k", "test_bf16_on_a_cpu_is_as_accurate_as_the_peers_chain and table-fp32"),
        "bf16 inference on a CPU rounds autocast's fp32 bias and shift mask to bf16 (2-4x the peers' error)",
    ),
    Mutant(
        "cpu-autocast-linear-in-fp32",
        "swinv2_fast/linear.py",
        "        return torch.bfloat16 if operands <= {torch.float32, torch.bfloat16} else None",
        "        return torch.float32 if operands <= {torch.float32, torch.bfloat16} else None",
        ("tests/test_linear.py", "-k", "test_which_bf16_calls_go_to_onednn"),
        "linears under CPU autocast computed in fp32, ignoring autocast",
    ),
    # ----------------------------------------------------------------------------------------- timm Cr patch
    Mutant(
        "patch-cr-pad-then-roll",
        "swinv2_fast/patch/timm_cr.py",
        "        [sh, sw],\n        _RULES.pad_order,\n        _RULES.mask_value,\n        0.0,\n",
        '        [sh, sw],\n        "pad_then_roll",\n        _RULES.mask_value,\n        0.0,\n',
        ("tests/test_patch_families.py", "-k", "test_patched_matches_unpatched and eager and cr-head-nonsquare-padded"),
        "timm's Cr rolls then pads; the other order differs on padded, shifted grids",
    ),
    Mutant(
        "patch-cr-bias-mlp-without-dropout",
        "swinv2_fast/patch/timm_cr.py",
        "        attn.meta_mlp, attn.relative_coordinates_log, attn.num_heads, wh * ww, sigmoid=False",
        "        lambda c: attn.meta_mlp.fc2(attn.meta_mlp.act(attn.meta_mlp.fc1(c))),\n"
        "        attn.relative_coordinates_log,\n        attn.num_heads,\n        wh * ww,\n        sigmoid=False,",
        ("tests/test_patch_families.py", "-k", "test_cr_bias_mlp_dropout_runs_in_training"),
        "the Cr bias MLP's dropout (0.125) silently dropped in training",
    ),
    Mutant(
        "patch-cr-forced-eager",
        "swinv2_fast/patch/timm_cr.py",
        "        _RULES.mask_value,\n        0.0,\n        implementation,\n",
        '        _RULES.mask_value,\n        0.0,\n        "eager",\n',
        (
            "tests/test_patch_families.py",
            "-k",
            "test_patched_matches_unpatched and triton and cr-head-nonsquare-padded",
        ),
        "patch(model, 'triton') on a timm Cr model runs eager",
    ),
    # the rows backward (N = 129 to 256: the rows kernel, then the dk/dv kernel)
    Mutant(
        "tiles-rows-four-warps-on-padded-grids",
        "kernels/tiles.py",
        "    if head_dim == 32 and n == block_n and not padded:",
        "    if head_dim == 32 and n == block_n:",
        (f"{ROWS}::test_rows_kernel_tiles",),
        "the rows kernel over 4 warps on padded grids at N = 256, where its build spills with Triton 3.6",
    ),
    Mutant(
        "kernel-rows-tail-max-dropped",
        KERNEL_BACKWARD,
        "            b_rmax = tl.maximum(b_rmax, tl.max(b_s_t, axis=1))\n",
        "",
        (f"{ROWS}::test_rows_backward_one_hot_rows_cancel_exactly",),
        "window 12's row maximum leaves out its last 16 keys: a +100 score there overflows exp",
    ),
    Mutant(
        "kernel-rows-tail-row-sum-dropped",
        KERNEL_BACKWARD,
        "            b_l += tl.sum(b_e_t, axis=1)\n",
        "",
        (f"{ROWS}::test_rows_backward_arithmetic_at_fp32_tolerance", "-k", "B1-12x12-h1d32-w12s6 and pad_then_roll"),
        "window 12's softmax normalises by the main tile's sum alone",
    ),
    Mutant(
        "kernel-rows-tail-scale-gradient-dropped",
        KERNEL_BACKWARD,
        "                b_dscale += tl.sum(b_ds_t * b_qk_t, axis=1)\n",
        "",
        (f"{ROWS}::test_rows_backward_arithmetic_at_fp32_tolerance", "-k", "B1-12x12-h1d32-w12s6 and pad_then_roll"),
        "window 12's logit-scale gradient leaves out its last 16 keys",
    ),
    Mutant(
        "kernel-rows-tail-table-gradient-overwritten",
        KERNEL_BACKWARD,
        "                b_dbias_t += b_ds_t\n",
        "                b_dbias_t = b_ds_t\n",
        (f"{ROWS}::test_rows_backward_groups_windows_deterministically",),
        "window 12's tail table gradient keeps the last window of its group only",
    ),
    Mutant(
        "kernel-rows-tail-delta-dropped",
        KERNEL_BACKWARD,
        "            b_delta += tl.sum(b_p_t * b_dp_t, axis=1)\n",
        "            b_delta += 0.0 * tl.sum(b_p_t * b_dp_t, axis=1)\n",
        (f"{ROWS}::test_rows_backward_arithmetic_at_fp32_tolerance", "-k", "B1-12x12-h1d32-w12s6 and pad_then_roll"),
        "window 12's delta = rowsum(P dP) leaves out its last 16 keys (the tail tile)",
    ),
    Mutant(
        "kernel-rows-tail-dq-dropped",
        KERNEL_BACKWARD,
        "            if TAIL:\n                b_dqs += _dot(b_ds_t.to(DDT), b_kn_t_d, FULL_DOT)\n",
        "",
        (f"{ROWS}::test_rows_backward_arithmetic_at_fp32_tolerance", "-k", "B1-12x12-h1d32-w12s6 and pad_then_roll"),
        "window 12's dq leaves out the tail tile's keys",
    ),
    Mutant(
        "kernel-rows-tail-table-gradient-dropped",
        KERNEL_BACKWARD,
        "                b_dbias_t += b_ds_t\n",
        "",
        (f"{ROWS}::test_rows_backward_arithmetic_at_fp32_tolerance", "-k", "B1-12x12-h1d32-w12s6 and pad_then_roll"),
        "window 12's table gradient of its last 16 keys stays zero",
    ),
    Mutant(
        "kernel-rows-table-gradient-from-p",
        KERNEL_BACKWARD,
        "b_dbias += b_ds\n            # d scale = sum_ij dS_ij cos_ij",
        "b_dbias += b_p\n            # d scale = sum_ij dS_ij cos_ij",
        (
            f"{ROWS}::test_rows_backward_arithmetic_at_fp32_tolerance",
            "-k",
            "B1-13x14-h2d24-w12s6-padded and pad_then_roll",
        ),
        "the table gradient sums dS, not P",
    ),
    Mutant(
        "kernel-rows-scale-gradient-not-divided",
        KERNEL_BACKWARD,
        "NUM_M + i_blk, tl.sum(b_dscale, axis=0) / b_scale)",
        "NUM_M + i_blk, tl.sum(b_dscale, axis=0))",
        (
            f"{ROWS}::test_rows_backward_arithmetic_at_fp32_tolerance",
            "-k",
            "B1-13x14-h2d24-w12s6-padded and pad_then_roll",
        ),
        "d scale = sum dS * cos(q, k) = sum dS * (qs . kn) / scale",
    ),
    Mutant(
        "kernel-rows-dq-without-scale",
        KERNEL_BACKWARD,
        "b_scale * b_dqs)\n            p_dq = DQKV",
        "b_dqs)\n            p_dq = DQKV",
        (
            f"{ROWS}::test_rows_backward_arithmetic_at_fp32_tolerance",
            "-k",
            "B1-13x14-h2d24-w12s6-padded and pad_then_roll",
        ),
        "dq carries the logit scale",
    ),
    Mutant(
        "kernel-rows-log-sum-not-stored",
        KERNEL_BACKWARD,
        "tl.store(p_stats + 1, tl.log(b_l), mask=m_m)\n        b_p = b_e",
        "tl.store(p_stats + 1, b_l, mask=m_m)\n        b_p = b_e",
        (
            f"{ROWS}::test_rows_backward_arithmetic_at_fp32_tolerance",
            "-k",
            "B1-13x14-h2d24-w12s6-padded and pad_then_roll",
        ),
        "the dk/dv kernel recomputes P from the log of the row sum the rows kernel stores",
    ),
    _border_unmasked(
        "kernel-rows-border-unmasked",
        "(no masked key in either)\n    tl.static_assert((N <= BLOCK_N) if not TAIL else (N == BLOCK_N + BLOCK_T))\n"
        "    tl.static_assert((WINDOW_SET == 0) | SHIFTED)\n    ",
        "",
        (
            f"{ROWS}::test_rows_backward_arithmetic_at_fp32_tolerance",
            "-k",
            "B1-13x14-h2d24-w12s6-padded and pad_then_roll",
        ),
        "the border windows of a shifted grid carry the shift mask (only the interior launch drops it)",
    ),
    _border_unmasked(
        "kernel-dkdv-border-unmasked",
        "    ",
        "  # the shift mask: in shifted windows on the border\n    # [BLOCK_N] key rows",
        (f"{BWD}::test_fp32_gradients_match_reference", "-k", "B2-8x8-h2d16"),
        "the dk/dv kernel's border windows of a shifted grid carry the shift mask",
    ),
    Mutant(
        "host-table-grid-of-shared-tiles",
        KERNEL_BACKWARD,
        "            num_tiles = triton.cdiv(dims.N, block_m) * triton.cdiv(dims.N, block_n)",
        '            num_tiles = triton.cdiv(dims.N, flags["BLOCK_M"]) * triton.cdiv(dims.N, flags["BLOCK_N"])',
        (f"{BWD}::test_sm80_table_tiles_give_the_same_gradients",),
        "sm_80's table kernel at window 7 runs half-width key tiles: a grid of the shared tiles leaves half the "
        "table gradient unwritten",
    ),
    _border_unmasked(
        "kernel-stats-border-unmasked",
        "    ",
        QUERY_BLOCK_OPENING + "    proj = (",
        (f"{BWD}::test_fp32_gradients_match_reference", "-k", "B2-8x8-h2d16"),
        "the statistics kernel's border windows of a shifted grid carry the shift mask",
    ),
    _border_unmasked(
        "kernel-table-border-unmasked",
        '    launches, so the reduction is deterministic."""\n    tl.static_assert((WINDOW_SET == 0) | SHIFTED)\n    ',
        "",
        (f"{BWD}::test_fp32_gradients_match_reference", "-k", "B2-8x8-h2d16"),
        "the table kernel's border windows of a shifted grid carry the shift mask",
    ),
    _border_unmasked(
        "kernel-dq-border-unmasked",
        "    ",
        QUERY_BLOCK_OPENING + "    o_d, m_d = cols",
        (f"{BWD}::test_fp32_gradients_match_reference", "-k", "B2-8x8-h2d16"),
        "the dq kernel's border windows of a shifted grid carry the shift mask",
    ),
    _border_unmasked(
        "kernel-fused-border-unmasked",
        'instead of a select per score."""\n    tl.static_assert((WINDOW_SET == 0) | SHIFTED)\n    ',
        "",
        (f"{FUSED_BWD}::test_fused_backward_arithmetic_at_fp32_tolerance", "-k", "B2-8x8-h2d16-w4s2"),
        "the fused backward's border windows of a shifted grid carry the shift mask",
    ),
    Mutant(
        "kernel-table-every-window",
        KERNEL_BACKWARD,
        "        i_b, i_w, i_w2 = _window_in_set(i_bw, NUM_WINDOWS, NUM_WX, WINDOW_SET)\n"
        "        proj = (QKV + i_b * stride_qkv_b + i_h * HEAD_DIM, p_bias, stride_qkv_t, C)\n"
        "        rows_m = _window_rows(o_m, i_w2, grid, layout, MASKED)\n"
        "        o_tok_m, m_pad_m, o_reg_m = rows_m\n"
        "        _b_qn, _b_rq, b_qs = _query_rows(",
        "        i_b, i_w, i_w2 = _window_in_set(i_bw, NUM_WINDOWS, NUM_WX, 0)\n"
        "        proj = (QKV + i_b * stride_qkv_b + i_h * HEAD_DIM, p_bias, stride_qkv_t, C)\n"
        "        rows_m = _window_rows(o_m, i_w2, grid, layout, MASKED)\n"
        "        o_tok_m, m_pad_m, o_reg_m = rows_m\n"
        "        _b_qn, _b_rq, b_qs = _query_rows(",
        (f"{BWD}::test_fp32_gradients_match_reference", "-k", "B2-8x8-h2d16"),
        "the table kernel's launches each take the first windows of the grid, not their set's",
    ),
    Mutant(
        "host-fused-groups-per-launch",
        KERNEL_BACKWARD,
        "        per_group, groups = window_groups(B * dims.NUM_WINDOWS, pairs, num_heads, FUSED_PROGRAMS)",
        "        per_group, groups = window_groups(pairs, pairs, num_heads, FUSED_PROGRAMS)",
        ("tests/test_kernel_cost.py::test_reference_launches_record_the_backward_the_launcher_runs",),
        "each launch of a shifted grid sized its own groups: the border's store twice the partial sums",
    ),
    Mutant(
        "host-padded-table-rows-inf",
        KERNEL_BACKWARD,
        '    return F.pad(F.pad(table, (0, block - n), value=float("-inf")), (0, 0, 0, block - n))',
        '    return F.pad(table, (0, block - n, 0, block - n), value=float("-inf"))',
        (f"{FUSED_BWD}::test_padded_table_leaves_keys_outside_the_window_no_weight",),
        "the padded table's rows beyond the window all -inf: their softmax is NaN, and NaN reaches dk and dv",
    ),
    Mutant(
        "tiles-fused-fp32-window7-padded-grid",
        "kernels/tiles.py",
        "        return served and not (padded and fused_pads_table(n, dtype))",
        "        return served",
        (f"{FUSED_BWD}::test_which_windows_take_the_fused_backward",),
        "fp32 window 7 on a padded grid takes the fused backward, whose build spills there",
    ),
    Mutant(
        "kernel-fused-padded-table-row-stride",
        KERNEL_BACKWARD,
        "b_bias = _bias_tile(POSITION_BIAS + i_h * TABLE_N * TABLE_N, o_n, o_n, m_n, m_n, TABLE_N, EVEN)",
        "b_bias = _bias_tile(POSITION_BIAS + i_h * TABLE_N * TABLE_N, o_n, o_n, m_n, m_n, N, EVEN)",
        (f"{FUSED_BWD}::test_fp32_window7_reads_the_table_padded", "-k", "B1-14x14-h2d32-w7s3"),
        "the fused kernel reads the padded table with the window's row stride: every bias after the first row shifts",
    ),
    Mutant(
        "tiles-fused-window7-any-head-dim",
        "kernels/tiles.py",
        "    return n in _FUSED_MASKED_N and head_dim == 32 and _triton_release() >= _FUSED_MASKED_TRITON",
        "    return n in _FUSED_MASKED_N and _triton_release() >= _FUSED_MASKED_TRITON",
        (f"{FUSED_BWD}::test_which_windows_take_the_fused_backward",),
        "window 7 at masked channel tiles (head_dim 24, 30) takes the fused backward, whose build spills there",
    ),
    Mutant(
        "tiles-fused-fp32-any-head-dim",
        "kernels/tiles.py",
        "        served = n in _FUSED_FP32_N and head_dim in _FUSED_FP32_HEAD_DIMS",
        "        served = n in _FUSED_FP32_N",
        (f"{FUSED_BWD}::test_which_windows_take_the_fused_backward",),
        "fp32 window 8 at masked channel tiles (head_dim 10, 30) takes the fused backward, whose build spills there",
    ),
    Mutant(
        "tiles-fused-fp32-over-8-warps",
        "kernels/tiles.py",
        "    return _FUSED_FP32_WARPS if dtype in (torch.float32, torch.float64) else 8",
        "    return 8",
        (f"{FUSED_BWD}::test_which_windows_take_the_fused_backward",),
        "fp32's 64-token block runs over 8 warps, where its IEEE dots' operands spill about 1 KB",
    ),
    Mutant(
        "tiles-rows-16-channel-tiles",
        "kernels/tiles.py",
        "    return max(channel_block(head_dim), _ROWS_MIN_BLOCK_D)",
        "    return channel_block(head_dim)",
        (f"{ROWS}::test_rows_kernel_tiles",),
        "the rows kernel runs head dims up to 16 in 16-channel tiles, where it spills 4-8 KB",
    ),
    Mutant(
        "kernel-rows-dq-store-every-channel",
        KERNEL_BACKWARD,
        "            tl.store(p_dq, b_dq.to(DQKV.dtype.element_ty), mask=_tile_mask(m_real_m, m_d))",
        "            tl.store(p_dq, b_dq.to(DQKV.dtype.element_ty), mask=m_real_m[:, None])",
        (f"{ROWS}::test_rows_kernel_stores_only_the_real_channels",),
        "the rows kernel stores dq's masked channels too: zeros over the next head's dq, the last head's over k",
    ),
    Mutant(
        "kernel-dkdv-tail-block-dropped",
        KERNEL_BACKWARD,
        "        b_dv += b_dv_t\n        b_dkn += b_dkn_t\n",
        "        b_dkn += b_dkn_t\n",
        (f"{ROWS}::test_rows_dkdv_query_tail_at_fp32_tolerance",),
        "the dk/dv kernel drops the tail rows' P^T dO: dv misses window 12's last 16 queries",
    ),
    Mutant(
        "tiles-dkdv-no-query-tail",
        "kernels/tiles.py",
        "    return tail if served and tail >= 16 and tail & (tail - 1) == 0 else 0",
        "    return 0",
        (f"{ROWS}::test_rows_kernel_tiles",),
        "window 12's dk/dv kernel runs 3 x 64 query rows, 48 of them masked",
    ),
    Mutant(
        "kernel-fused-keys-beyond-window",
        KERNEL_BACKWARD,
        "    MASK_N: tl.constexpr = (N != BLOCK) and not PAD_TABLE  # keys beyond the window set to -inf here\n",
        "    MASK_N: tl.constexpr = False  # keys beyond the window set to -inf here\n",
        (f"{FUSED_BWD}::test_fused_backward_table_as_it_arrives_at_fp32_tolerance", "-k", "w7s3"),
        "window 7's 15 empty key columns of its 64-token block (fp16/bf16: the table as it is) take part in the "
        "fused backward's softmax",
    ),
    Mutant(
        "kernel-fwd-window-tail-keys-out-of-the-sum",
        KERNEL,
        "        b_l += tl.sum(b_pt, axis=1)\n",
        "",
        (f"{FWD}::test_whole_window_programs_match_the_oracle_fp32",),
        "window 12's whole-window forward leaves its 16 tail keys out of the softmax's denominator",
    ),
    Mutant(
        "kernel-fwd-window-tail-rows-skipped",
        KERNEL,
        "            for start_m in range(0, N - M_TAIL, BLOCK_M):\n                _fwd_window_rows(",
        "            for start_m in range(M_TAIL, N - M_TAIL, BLOCK_M):\n                _fwd_window_rows(",
        (f"{FWD}::test_whole_window_programs_match_the_oracle_fp32",),
        "the whole-window forward's blocks start after the tail's width: rows 0-15 unwritten, the others shifted",
    ),
    Mutant(
        "kernel-fwd-window-merged-tail-unrescaled",
        KERNEL,
        "        b_acc = b_acc * b_alpha[:, None] + _dot(b_pt.to(DDT), b_vt, FULL_DOT)",
        "        b_acc = b_acc + _dot(b_pt.to(DDT), b_vt, FULL_DOT)",
        (f"{FWD}::test_whole_window_programs_match_the_oracle_fp32", "-k", "w16"),
        "window 16's whole-window forward joins its second 128 keys without rescaling the first tile's output",
    ),
    Mutant(
        "kernel-fwd-window-border-kind-swapped",
        KERNEL,
        "        kind = last_row.to(tl.int32) + 2 * last_column.to(tl.int32) - 1",
        "        kind = 2 * last_row.to(tl.int32) + last_column.to(tl.int32) - 1",
        (f"{FWD}::test_whole_window_programs_match_the_oracle_fp32", "-k", "w12s6-wpp2 and not padded"),
        "a border window in the last row reads the last column's mask, and the other way round",
    ),
    Mutant(
        "kernel-fwd-rows-border-one-kind",
        KERNEL,
        "_head_table(POSITION_BIAS, i_h, i_w2, NUM_WINDOWS, NUM_WX, NUM_HEADS, N, True)",
        "_head_table(POSITION_BIAS, i_h, i_w2, NUM_WINDOWS, NUM_WX, NUM_HEADS, N, False)",
        (f"{FWD}::test_forward_matches_reference_fp32", "-k", "w7s3"),
        "the row-block programs' border windows read the last row's mask whatever their kind",
    ),
    Mutant(
        "kernel-fwd-mask-twice",
        KERNEL,
        "    MASK_HERE: tl.constexpr = MASKED and not MASK_IN_TABLE",
        "    MASK_HERE: tl.constexpr = MASKED",
        (f"{FWD}::test_mask_value_minus_100_and_minus_200_are_told_apart", "-k", "mask-in-table"),
        "a border window that reads the mask from the table computes it too: -200 where the model says -100",
    ),
    Mutant(
        "host-fwd-mask-in-table-one-key-block",
        KERNEL,
        'return flags["SHIFTED"] and window_set != INTERIOR_WINDOWS and (whole or n > flags["BLOCK_N"])',
        'return flags["SHIFTED"] and window_set != INTERIOR_WINDOWS',
        (f"{FWD}::test_forward_matches_reference_fp32", "-k", "w4s2"),
        "one key block holds its bias tile across windows of every kind: it cannot read the tables by kind",
    ),
    Mutant(
        "host-fwd-masked-table-fp16-overflow",
        KERNEL,
        "    if abs(mask_value) > torch.finfo(dtype).max / 2:",
        "    if abs(mask_value) > float('inf'):",
        (f"{FWD}::test_whole_window_mask_beyond_the_table_dtype",),
        "an fp16 table takes a mask value beyond its range: -inf in the first key tile's rows, NaN out",
    ),
    Mutant(
        "host-fwd-masked-table-corner-one-way",
        KERNEL,
        "    different = torch.stack([split_rows, split_columns, split_rows | split_columns])",
        "    different = torch.stack([split_rows, split_columns, split_rows])",
        ("tests/test_dispatch.py::test_shift_masked_tables_are_the_table_plus_the_reference_mask",),
        "the corner window's table masks across the row split only",
    ),
]

"""Patches 4 and 5 in bf16 through vllm-omni's own NPU attention backend.

In bf16 (what ERNIE-Image runs in on Ascend) vllm-omni's Attention layer no longer forces SDPA (it
does for fp32), so with MindIE-SD importable the layers get the NPU platform's default backend,
FLASH_ATTN (vllm-omni's own NPU platform chooses it), whose `forward_npu` calls the real
`mindiesd.attention_forward(..., op_type="fused_attn_score")`, which MindIE-SD runs as
`torch_npu.npu_fusion_attention` (a stand-in, tests/sp/npu_kernels.py, that refuses every mask shape
the real kernel refuses). The same tiny CFG batch as the
fp32 tests runs at SP=1, 2 and 4; the kernels count their calls, so a run that did not take the
NPU backend (or that took it with a mask) fails here.

MindIE-SD's switch MINDIE_SD_FA_TYPE=ascend_laser_attention makes every such call ask for laser
attention, which MindIE-SD itself sends back to fused_attn_score below 2048 tokens (the tiny model's
sequence): the runs show that fallback, every call unmasked. Laser attention proper (4133 tokens) is
exercised in the numerics tier.

Bars, relative error = max abs error / max |reference output|, u = 2^-8 (bf16 unit roundoff):
- SP=N vs SP=1, both bf16: u per layer, 2u = 7.8e-3 for the two-layer model. Sequence parallelism
  changes no arithmetic: projections, norms and RoPE act per token, the all-to-alls and the gather
  only move data, and each rank's attention computes whole heads over the whole gathered
  sequence. What may differ is the blocking (summation order) a kernel picks for another number
  of rows or heads; the sums are accumulated in fp32, so a reordering changes at most where a
  result is rounded to bf16: counted as one bf16 rounding (u relative to the output's magnitude)
  per layer on the residual stream, accumulated over the layers. The fp32 runs (bar 1e-5) are what
  catch sequence-parallel logic errors; this bar proves the bf16 path (a deliberately wrong
  variant that shifts the values by one position at SP > 1 differs by 1.0e-2 and fails it).
- The NPU backend vs vllm-omni's SDPA backend, both bf16 at SP=1: 2u per layer, 4u = 1.6e-2. The
  runs differ only in the attention kernel; both accumulate in fp32 and round the attention output
  to bf16 once, and that output feeds the out-projection, whose bf16 result may round differently
  in turn. This is the check on the kernel contract (layout, softmax scale, which keys): a
  softmax scale of 1 in place of 1/sqrt(head_dim) gives 2.8e-2 and fails it, while the fp32
  comparison below would let it pass (7.3u).
- bf16 NPU path vs the unpatched fp32 output: 16u, the bar of the diffusers tier's bf16 model
  figures (a dozen or more bf16 roundings per layer: weights, activations, q/k/v, attention
  output, norms, the feed-forward).
"""
from __future__ import annotations

from typing import Any

import pytest

from tests.sp.tiny import TEXT_LENS, TINY_CONFIG, expected_attention_calls, padded_tokens

LAYERS = TINY_CONFIG["num_layers"]
UNIT_ROUNDOFF = 2.0**-8
SP_BAR = LAYERS * UNIT_ROUNDOFF
BACKEND_BAR = 2 * LAYERS * UNIT_ROUNDOFF
FP32_BAR = 16 * UNIT_ROUNDOFF
RUNS = [("patched-sp1", 1), ("patched-sp2", 2), ("patched-sp4", 4)]
KERNELS = {
    "npu-bf16": lambda n: {"fused_attn_score": n, "npu_fusion_attention": n},
    # MINDIE_SD_FA_TYPE=ascend_laser_attention: MindIE-SD's manual dispatch sends calls below 2048 tokens (the tiny
    # model's 42-token sequence) back to fused_attn_score, unmasked as the patched path hands them over.
    "npu-laser": lambda n: {"fused_attn_score": n, "npu_fusion_attention": n},
}


def errors(output: Any, reference: Any) -> tuple[float, float]:
    """(max abs error, relative error = max abs error / max |reference|)."""
    max_abs = float((output - reference).abs().max())
    return max_abs, max_abs / float(reference.abs().max())


@pytest.mark.parametrize("mode", sorted(KERNELS))
@pytest.mark.parametrize("run_name,sp_size", RUNS)
def test_bf16_runs_through_the_npu_attention_backend(runs, figures, mode: str, run_name: str, sp_size: int) -> None:
    calls_per_forward = LAYERS * len(TEXT_LENS)
    for rank in runs(run_name):
        bf16 = rank[mode]
        assert bf16["dtype"] == "torch.bfloat16"
        assert bf16["attention_backend"] == ["FlashAttentionImpl"], "the NPU platform's default backend with MindIE-SD"
        assert bf16["kernel_calls"] == KERNELS[mode](calls_per_forward)
        assert bf16["attention_calls"] == expected_attention_calls(sp_size)
        assert bf16["processor_calls"] == [(layer, padded_tokens(sp_size) // sp_size) for layer in range(LAYERS)]
    figures[f"{mode}-{run_name}-kernel-calls"] = bf16["kernel_calls"]


@pytest.mark.parametrize("mode", sorted(KERNELS))
@pytest.mark.parametrize("run_name", ["patched-sp2", "patched-sp4"])
def test_bf16_sequence_parallel_equals_single_device(runs, figures, mode: str, run_name: str) -> None:
    single = runs("patched-sp1")[0][mode]["output"]
    measured = [errors(rank[mode]["output"], single) for rank in runs(run_name)]
    max_abs, relative = max(e[0] for e in measured), max(e[1] for e in measured)
    print(f"{mode} {run_name} vs SP=1: max abs {max_abs:.3g}, relative {relative:.3g} (bar {SP_BAR:.3g})")
    figures[f"{mode}-{run_name}"] = max_abs
    figures[f"{mode}-{run_name}-relative"] = relative
    assert relative <= SP_BAR


@pytest.mark.parametrize("mode", sorted(KERNELS))
def test_npu_backend_equals_the_sdpa_backend_in_bf16(runs, figures, mode: str) -> None:
    single = runs("patched-sp1")[0]
    max_abs, relative = errors(single[mode]["output"], single["npu-sdpa-bf16"]["output"])
    assert single["npu-sdpa-bf16"]["attention_backend"] == ["SDPAImpl"]
    print(f"{mode} vs SDPA, bf16, SP=1: max abs {max_abs:.3g}, relative {relative:.3g} "
          f"({relative / UNIT_ROUNDOFF:.1f} u; bar {BACKEND_BAR:.3g})")
    figures[f"{mode}-vs-sdpa-bf16"] = max_abs
    figures[f"{mode}-vs-sdpa-bf16-relative"] = relative
    assert relative <= BACKEND_BAR


@pytest.mark.parametrize("mode", sorted(KERNELS))
@pytest.mark.parametrize("run_name", [name for name, _ in RUNS])
def test_bf16_npu_path_is_close_to_fp32(runs, figures, mode: str, run_name: str) -> None:
    reference = runs("pristine-sp1")[0]["cuda"]["output"]
    measured = [errors(rank[mode]["output"], reference) for rank in runs(run_name)]
    max_abs, relative = max(e[0] for e in measured), max(e[1] for e in measured)
    print(f"{mode} {run_name} vs unpatched fp32: max abs {max_abs:.3g}, relative {relative:.3g} "
          f"({relative / UNIT_ROUNDOFF:.1f} u; bar {FP32_BAR:.3g})")
    figures[f"{mode}-vs-fp32-{run_name}"] = max_abs
    figures[f"{mode}-vs-fp32-{run_name}-relative"] = relative
    assert relative <= FP32_BAR

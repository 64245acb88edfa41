"""One process of a sequence-parallel run of vllm-omni's ERNIE-Image code on CPU (gloo).

conftest.launch() starts WORLD_SIZE copies with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT
set and the vllm-omni tree under test first on PYTHONPATH. Each copy sets vllm-omni up the
way its diffusion worker does (vllm config, forward context, init_distributed_environment,
initialize_model_parallel), runs the requested checks and saves what it saw to
OUT/rank<RANK>.pt; the tests compare those files.

Transformer runs (--modes, MODES below): the platform reporting NPU or CUDA, fp32 on vllm-omni's
SDPA backend, and bf16 on SDPA or through vllm-omni's NPU attention backend (chosen by vllm-omni's own
NPU platform) with the real mindiesd over the kernel stand-ins of tests/sp/npu_kernels.py (MindIE-SD's
fused_attn_score, or MINDIE_SD_FA_TYPE=ascend_laser_attention, which MindIE-SD itself sends back to
fused_attn_score below 2048 tokens). Runs on the NPU backend come last: they swap the backend.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType, SimpleNamespace
from typing import Any, NamedTuple

import torch

import npu_kernels
from ernie_patcher.selftest.runtime import cpu_platform
from ernie_patcher.selftest.runtime.sp_worker import fixed_weights
from tiny import GRID, JOINT_TOKENS, TEXT_LENS, TINY_CONFIG

PLATFORM = cpu_platform.install()

from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config  # noqa: E402

import vllm_omni  # noqa: E402
from vllm_omni.diffusion.data import DiffusionParallelConfig, OmniDiffusionConfig  # noqa: E402
from vllm_omni.diffusion.distributed import parallel_state  # noqa: E402
from vllm_omni.diffusion.forward_context import set_forward_context  # noqa: E402
from vllm_omni.diffusion import registry as model_registry  # noqa: E402
from vllm_omni.diffusion.models.ernie_image import pipeline_ernie_image  # noqa: E402
from vllm_omni.diffusion.models.ernie_image.ernie_image_transformer import (  # noqa: E402
    ErnieImageTransformer2DModel,
)

ULYSSES_MODULE = "vllm_omni.diffusion.models.ernie_image.ulysses_attention"
CACHE_DIT_STEPS = 8
# vllm-omni's default residual-diff threshold (DiffusionCacheConfig / CacheDiTConfig.residual_diff_threshold). A
# threshold >= 1.0 would take cache-dit's shortcut (always similar: no residual compared, no all-reduce).
# Under SP every rank compares the residual of its own tokens; cache-dit (1.3.0 and later) treats the blocks as
# parallelized whenever the world size is > 1 and all-reduces the residual means (AVG) before deciding, so the
# ranks take one decision. --cache-dit-threshold sets another (tests/sp/test_sp_cache_dit.py picks one between two
# ranks' local diffs).
CACHE_DIT_DEFAULT_THRESHOLD = 0.24
CACHE_DIT_CONFIG = {
    "Fn_compute_blocks": 1,
    "Bn_compute_blocks": 0,
    "max_warmup_steps": 2,
    "max_continuous_cached_steps": 2,
}
CACHE_DIT_MODULATION_SCALE = 0.05
"""fixed_weights() draws the timestep modulation (adaLN_modulation) at random like every weight: the sinusoids of
consecutive timesteps then give unrelated shift/scale/gate, consecutive residuals differ by 97-205 % (measured) and
vllm-omni's default 0.24 never caches. Scaled down 20x, the modulation drifts from step to step (as a trained
model's does), consecutive residuals differ by 21-33 %, and 0.24 caches 2 of the 6 compared steps."""
SP_HOOK_PREFIXES = ("sp_input---", "sp_output---")


class Mode(NamedTuple):
    """How one transformer run is set up."""

    npu: bool
    """The platform reports NPU (else CUDA)."""
    npu_backend: bool
    """Attention through vllm-omni's NPU backend and the MindIE-SD reference (else SDPA)."""
    dtype: torch.dtype
    fa_type: str | None = None
    """MINDIE_SD_FA_TYPE during the run: MindIE-SD's switch that overrides the op_type callers ask for."""


MODES = {
    "npu": Mode(True, False, torch.float32),
    "cuda": Mode(False, False, torch.float32),
    "npu-sdpa-bf16": Mode(True, False, torch.bfloat16),
    "npu-bf16": Mode(True, True, torch.bfloat16),
    "npu-laser": Mode(True, True, torch.bfloat16, "ascend_laser_attention"),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sp", type=int, required=True, help="sequence_parallel_size (= ulysses_degree)")
    parser.add_argument("--cfg", type=int, default=1, help="cfg_parallel_size")
    parser.add_argument("--modes", default="", help=f"comma list of transformer runs: {','.join(MODES)}")
    parser.add_argument("--mask-cases", action="store_true", help="what key_padding makes of a few key masks")
    parser.add_argument("--latents", action="store_true", help="check the SP latent broadcast")
    parser.add_argument("--pipeline", action="store_true", help="run one ErnieImagePipeline step (NPU)")
    parser.add_argument("--cache-dit", action="store_true", help="run the pipeline with cache-dit enabled (NPU)")
    parser.add_argument("--cache-dit-threshold", type=float, default=CACHE_DIT_DEFAULT_THRESHOLD,
                        help="cache-dit's residual-diff threshold (default: vllm-omni's, %(default)s)")
    parser.add_argument("--out", required=True)
    return parser.parse_args()


def make_configs(sp: int, cfg: int) -> tuple[VllmConfig, OmniDiffusionConfig]:
    vllm_config = VllmConfig(device_config=DeviceConfig(device="cpu"))
    parallel = DiffusionParallelConfig(sequence_parallel_size=sp, ulysses_degree=sp, cfg_parallel_size=cfg)
    return vllm_config, OmniDiffusionConfig(parallel_config=parallel, dtype=torch.float32)


@contextmanager
def omni_context(vllm_config: VllmConfig, od_config: OmniDiffusionConfig) -> Iterator[None]:
    """The contexts vllm-omni's diffusion worker wraps around loading and each request."""
    with set_current_vllm_config(vllm_config), set_forward_context(
        vllm_config=vllm_config, omni_diffusion_config=od_config
    ):
        yield


def init_parallel(rank: int, world_size: int, sp: int, cfg: int) -> None:
    parallel_state.init_distributed_environment(
        world_size=world_size,
        rank=rank,
        distributed_init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
        local_rank=rank,
        backend="gloo",
    )
    parallel_state.initialize_model_parallel(
        cfg_parallel_size=cfg, sequence_parallel_size=sp, ulysses_degree=sp, backend="gloo"
    )


def tiny_text() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    lens = torch.tensor(TEXT_LENS)
    text = torch.zeros(len(TEXT_LENS), max(TEXT_LENS), TINY_CONFIG["text_in_dim"])
    for row, length in enumerate(TEXT_LENS):
        text[row, :length] = torch.randn(length, TINY_CONFIG["text_in_dim"], generator=generator)
    return text, lens


def tiny_inputs(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The tiny CFG batch, in DTYPE as the pipeline hands it over (latents, timesteps and text
    in the transformer's dtype; text lengths as int64)."""
    generator = torch.Generator().manual_seed(42)
    latents = torch.randn(len(TEXT_LENS), TINY_CONFIG["in_channels"], *GRID, generator=generator)
    text, lens = tiny_text()
    return {
        "hidden_states": latents.to(dtype),
        "timestep": torch.full((len(TEXT_LENS),), 500.0, dtype=dtype),
        "text_bth": text.to(dtype),
        "text_lens": lens,
    }


def sp_hooks(model: torch.nn.Module) -> list[str]:
    """'<module path>:<hook name>' of every _sp_plan split/gather hook registered on the model."""
    found = []
    for path, module in model.named_modules():
        registry = getattr(module, "_hook_registry", None)
        for name in getattr(registry, "_hooks", {}):
            if name.startswith(SP_HOOK_PREFIXES):
                found.append(f"{path}:{name}")
    return found


def optional_module(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        return None


@contextmanager
def patched_attr(owner: Any, name: str, wrap: Callable[[Callable], Callable]) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, wrap(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


@contextmanager
def recording(trace: dict[str, Any]) -> Iterator[None]:
    """Count Ulysses processor calls (per attention module) and all-to-all collectives, and note
    what each vllm-omni Attention layer call gets: (batch, query length, key length, mask shape)."""
    from vllm_omni.diffusion.attention.layer import Attention

    trace.update(processor_calls=[], all_to_all=0, attention_calls=[])
    ulysses = optional_module(ULYSSES_MODULE)

    def record_attention(original: Callable) -> Callable:
        def wrapper(self: Any, query: torch.Tensor, key: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            metadata = args[1] if len(args) > 1 else kwargs.get("attn_metadata")
            mask = getattr(metadata, "attn_mask", None)
            shape = None if mask is None else list(mask.shape)
            trace["attention_calls"].append((query.shape[0], query.shape[1], key.shape[1], shape))
            return original(self, query, key, *args, **kwargs)

        return wrapper

    def count_all_to_all(original: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            trace["all_to_all"] += 1
            return original(*args, **kwargs)

        return wrapper

    def record_call(original: Callable) -> Callable:
        def wrapper(self: Any, attn: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            trace["processor_calls"].append((id(attn), hidden_states.shape[1]))
            return original(self, attn, hidden_states, *args, **kwargs)

        return wrapper

    with patched_attr(torch.distributed, "all_to_all_single", count_all_to_all), patched_attr(
        Attention, "forward", record_attention
    ):
        if ulysses is None:
            yield
            return
        with patched_attr(ulysses.ErnieImageUlyssesAttnProcessor, "__call__", record_call):
            yield


def build_transformer(vllm_config: VllmConfig, od_config: OmniDiffusionConfig) -> ErnieImageTransformer2DModel:
    """Construct the model and enable SP with the model loader's own step (it reads the
    transformer's `_sp_plan` and installs the split/gather hooks), inside a loading context."""
    with omni_context(vllm_config, od_config):
        model = ErnieImageTransformer2DModel(od_config=od_config, **TINY_CONFIG)
        fixed_weights(model)
        model_registry._apply_sequence_parallel_if_enabled(SimpleNamespace(transformer=model), od_config)
    return model.eval()


def run_transformer(mode: str, vllm_config: VllmConfig, od_config: OmniDiffusionConfig) -> dict[str, Any]:
    npu, npu_backend, dtype, fa_type = MODES[mode]
    cpu_platform.set_npu(PLATFORM, npu, npu_attention_backend=npu_backend)
    kernels = npu_kernels.installed() if npu_backend else contextlib.nullcontext(None)
    with kernels as torch_npu, environment("MINDIE_SD_FA_TYPE", fa_type):
        model = build_transformer(vllm_config, od_config).to(dtype)
        layer_of = {id(layer.self_attention): index for index, layer in enumerate(model.layers)}
        trace: dict[str, Any] = {}
        with omni_context(vllm_config, od_config), recording(trace), torch.no_grad():
            output = model(**tiny_inputs(dtype), return_dict=False)[0]
    calls = [(layer_of.get(attn, -1), seq_len) for attn, seq_len in trace["processor_calls"]]
    return {
        "output": output.float(),
        "dtype": str(output.dtype),
        "sp_hooks": sp_hooks(model),
        "processor_calls": calls,
        "all_to_all": trace["all_to_all"],
        "attention_calls": trace["attention_calls"],
        "attention_backend": sorted({type(layer.self_attention.attn.attention).__name__ for layer in model.layers}),
        "kernel_calls": {} if torch_npu is None else npu_kernels.kernel_calls(torch_npu),
        "attention_skips_sp": [layer.self_attention.attn.skip_sequence_parallel for layer in model.layers],
    }


@contextmanager
def environment(name: str, value: str | None) -> Iterator[None]:
    """Environment variable NAME set to VALUE (left alone when None) while the context lasts."""
    if value is None:
        yield
        return
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            del os.environ[name]
        else:
            os.environ[name] = saved


def key_padding_cases() -> dict[str, Any]:
    """What the Ulysses module's key_padding makes of a few [B, S] key masks: runs, None, or refusal."""
    ulysses = optional_module(ULYSSES_MODULE)
    if ulysses is None or not hasattr(ulysses, "key_padding"):
        return {"missing": True}
    valid, pad = True, False
    masks = {
        "all-valid": [[valid] * 6] * 2,
        "cfg-text-lengths": [[valid] * 4 + [pad] * 2, [valid] * 6],
        "sp-padding-only": [[valid] * 5 + [pad]] * 2,
        "two-images-per-prompt": [[valid] * 4 + [pad] * 2] * 2 + [[valid] * 6] * 2,
        "not-a-prefix": [[valid, pad] + [valid] * 4, [valid] * 6],
    }
    found: dict[str, Any] = {"missing": False}
    for name, rows in masks.items():
        try:
            padding = ulysses.key_padding(torch.tensor(rows))
        except ValueError as refusal:
            found[name] = f"ValueError: {refusal}"
            continue
        found[name] = None if padding is None else [list(run) for run in padding.runs]
    return found


def latent_sync(rank: int) -> dict[str, Any]:
    """Rank-specific latents through the pipeline's broadcast; what came out."""
    broadcast = getattr(pipeline_ernie_image, "broadcast_latents_in_sp_group", None)
    if broadcast is None:
        return {"missing": True}
    generator = torch.Generator().manual_seed(100 + rank)
    latents = torch.randn(1, 4, 3, 5, generator=generator)
    before = latents.clone()
    synced = broadcast(latents)
    return {"missing": False, "input": before, "output": synced, "input_untouched": torch.equal(latents, before)}


def latent_noop_without_distributed() -> dict[str, Any]:
    broadcast = getattr(pipeline_ernie_image, "broadcast_latents_in_sp_group", None)
    if broadcast is None:
        return {"missing": True}
    latents = torch.randn(1, 4, 3, 5)
    return {"missing": False, "same_object": broadcast(latents) is latents}


def tiny_pipeline(vllm_config: VllmConfig, od_config: OmniDiffusionConfig) -> Any:
    """An ErnieImagePipeline assembled around the tiny transformer on the NPU path (no text
    encoder or VAE to load); encode_prompt returns fixed embeddings: "" (negative) 3 tokens,
    "tiny" 6 tokens."""
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler

    cpu_platform.set_npu(PLATFORM, True)
    pipeline = pipeline_ernie_image.ErnieImagePipeline.__new__(pipeline_ernie_image.ErnieImagePipeline)
    torch.nn.Module.__init__(pipeline)
    pipeline.transformer = build_transformer(vllm_config, od_config)
    pipeline.scheduler = FlowMatchEulerDiscreteScheduler()
    pipeline.vae_scale_factor = 16
    pipeline.is_distilled = False
    pipeline._execution_device = torch.device("cpu")
    pipeline.set_progress_bar_config(disable=True)
    text, lens = tiny_text()
    embeddings = {"": text[0, : int(lens[0])], "tiny": text[1, : int(lens[1])]}
    pipeline.encode_prompt = lambda prompts, *args, **kwargs: [embeddings[p] for p in prompts]
    return pipeline


def denoise(
    pipeline: Any, vllm_config: VllmConfig, od_config: OmniDiffusionConfig, steps: int, generator: Any
) -> torch.Tensor:
    """The latents ErnieImagePipeline.forward returns after STEPS steps (CFG, guidance 4)."""
    sampling = SimpleNamespace(
        height=GRID[0] * 16,
        width=GRID[1] * 16,
        num_inference_steps=steps,
        guidance_scale=4.0,
        generator=generator,
        num_outputs_per_prompt=1,
        extra_args={},
    )
    with omni_context(vllm_config, od_config), torch.no_grad():
        result = pipeline.forward(
            SimpleNamespace(prompts=["tiny"], sampling_params=sampling), negative_prompt="", output_type="latent"
        )
    return result.output


def pipeline_step(rank: int, vllm_config: VllmConfig, od_config: OmniDiffusionConfig) -> torch.Tensor:
    """Latents after one ErnieImagePipeline.forward step, with no seed: each rank draws its own noise."""
    pipeline = tiny_pipeline(vllm_config, od_config)
    torch.manual_seed(1000 + rank)
    return denoise(pipeline, vllm_config, od_config, steps=1, generator=None)


@contextmanager
def residual_diffs(trace: list[dict[str, Any]]) -> Iterator[None]:
    """Record each cache-dit residual comparison of this rank: its local diff (mean |t1 - t2| / mean |t1| over
    this rank's tokens, what cache-dit computes before its all-reduce); "parts": those two means, and the two
    sums over this rank's tokens that are not SP padding (the test combines the ranks' parts into the diff
    cache-dit decides on and the diff one device computes); whether cache-dit treated the comparison as
    parallelized; and the decision (similar: the step reuses the cached residual). Recording communicates
    nothing: it adds no collective to the run under test."""
    from cache_dit.caching.cache_contexts.cache_manager import CachedContextManager

    group = parallel_state.get_sp_group()

    def record(original: Callable) -> Callable:
        def wrapper(self: Any, t1: torch.Tensor, t2: torch.Tensor, *, threshold: float, parallelized: bool = False,
                    **kwargs: Any) -> bool:
            similar = original(self, t1, t2, threshold=threshold, parallelized=parallelized, **kwargs)
            diff, base = (t1 - t2).abs().double(), t1.abs().double()
            real = max(0, min(t1.shape[0], JOINT_TOKENS - group.rank_in_group * t1.shape[0]))  # [S_local, B, C]
            trace.append({
                "local": float(diff.mean() / base.mean()),
                "parts": (float(diff.mean()), float(base.mean()), float(diff[:real].sum()), float(base[:real].sum())),
                "parallelized": parallelized,
                "similar": bool(similar),
            })
            return similar

        return wrapper

    with patched_attr(CachedContextManager, "similarity", record):
        yield


def cached_denoise(vllm_config: VllmConfig, od_config: OmniDiffusionConfig, threshold: float) -> dict[str, Any]:
    """CACHE_DIT_STEPS steps with cache-dit enabled the way vllm-omni's model runner does it
    (the cache backend's enable() on the pipeline, which reads the transformer's
    _cache_dit_adapter_config, then refresh() per request; once per process, as in a vllm-omni
    worker: cache-dit 1.3.0 marks its stand-in pipeline class as cached, so a second enable() in
    the same process finds no cache context), from the same seeded noise on every rank, at
    residual-diff THRESHOLD, with the modulation scaled by CACHE_DIT_MODULATION_SCALE.
    Returns the final latents, per layer how often its attention ran (with Fn_compute_blocks=1 the
    first layer runs every step and the last one only when cache-dit does not reuse its residual,
    so fewer calls there show that caching took place) and each residual comparison
    (residual_diffs); {"supported": False} for a release without ERNIE-Image's cache-dit adapter."""
    from vllm_omni.diffusion.cache.selector import get_cache_backend

    if getattr(ErnieImageTransformer2DModel, "_cache_dit_adapter_config", None) is None:
        return {"supported": False}
    pipeline = tiny_pipeline(vllm_config, od_config)
    with torch.no_grad():
        pipeline.transformer.adaLN_modulation[-1].weight.mul_(CACHE_DIT_MODULATION_SCALE)
    backend = get_cache_backend("cache_dit", dict(CACHE_DIT_CONFIG, residual_diff_threshold=threshold))
    layer_of = {id(layer.self_attention): index for index, layer in enumerate(pipeline.transformer.layers)}
    trace: dict[str, Any] = {}
    comparisons: list[dict[str, Any]] = []
    with omni_context(vllm_config, od_config):
        backend.enable(pipeline)
        backend.refresh(pipeline, CACHE_DIT_STEPS, verbose=False)
    with recording(trace), residual_diffs(comparisons):
        latents = denoise(pipeline, vllm_config, od_config, CACHE_DIT_STEPS, torch.Generator().manual_seed(2024))
    calls = [0] * len(layer_of)
    for attn, _ in trace["processor_calls"]:
        calls[layer_of[attn]] += 1
    return {"supported": True, "threshold": threshold, "latents": latents, "layer_calls": calls,
            "comparisons": comparisons}


def main() -> None:
    args = parse_args()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    vllm_config, od_config = make_configs(args.sp, args.cfg)
    result: dict[str, Any] = {"rank": rank, "vllm_omni_file": vllm_omni.__file__}
    if args.latents:
        result["latents_without_distributed"] = latent_noop_without_distributed()
    with omni_context(vllm_config, od_config):
        init_parallel(rank, world_size, args.sp, args.cfg)
    result["sp_ranks"] = list(parallel_state.get_sp_group().ranks)
    if args.latents:
        result["latents"] = latent_sync(rank)
    if args.mask_cases:
        result["key_padding_cases"] = key_padding_cases()
    modes = [mode for mode in args.modes.split(",") if mode]
    for mode in (m for m in modes if not MODES[m].npu_backend):
        result[mode] = run_transformer(mode, vllm_config, od_config)
    if args.pipeline:
        result["pipeline_latents"] = pipeline_step(rank, vllm_config, od_config)
    if args.cache_dit:
        result["cache_dit"] = cached_denoise(vllm_config, od_config, args.cache_dit_threshold)
    for mode in (m for m in modes if MODES[m].npu_backend):  # last: it swaps the attention backend
        result[mode] = run_transformer(mode, vllm_config, od_config)
    torch.save(result, os.path.join(args.out, f"rank{rank}.pt"))
    torch.distributed.barrier()
    parallel_state.destroy_model_parallel()
    parallel_state.destroy_distributed_environment()


if __name__ == "__main__":
    main()

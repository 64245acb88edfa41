"""One rank of the selftest's sequence-parallel run of vllm-omni's ERNIE-Image transformer.

Started by sp.py with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set and one JSON argument
{"device": "npu" | "cpu", "out": DIR}. It sets vllm-omni up as its diffusion worker does (vllm config,
forward context, init_distributed_environment, initialize_model_parallel, the loader's sequence-parallel
step), runs one forward of a tiny transformer with fixed weights and saves the output to
DIR/sp<WORLD>-rank<RANK>.pt. On the CPU a stand-in platform reports Ascend NPU (so the patched NPU code
paths run) and uses gloo; on an NPU vllm-omni's own platform and HCCL are used, one device per rank.
"""
from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace
from typing import Any

import torch

TINY_CONFIG: dict[str, Any] = {"in_channels": 8, "num_layers": 2, "num_attention_heads": 4, "ffn_hidden_size": 128,
                               "hidden_size": 64, "text_in_dim": 32, "rope_axes_dim": (4, 6, 6)}
GRID = (5, 7)  # 35 image tokens + 6 text tokens = 41: not divisible by 2 or 4, so SP must pad
TEXT_LENS = (3, 6)  # a CFG batch: the shorter prompt is padded and masked


def fixed_weights(model: torch.nn.Module) -> None:
    """The same weights on every rank, none zero (upstream zero-initialises adaLN and final_linear)."""
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                param.copy_(1.0 + 0.1 * noise)
            elif param.dim() >= 2:
                param.copy_(noise / param[0].numel() ** 0.5)
            else:
                param.copy_(0.1 * noise)


def _inputs(device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    text = torch.zeros(len(TEXT_LENS), max(TEXT_LENS), TINY_CONFIG["text_in_dim"])
    for row, length in enumerate(TEXT_LENS):
        text[row, :length] = torch.randn(length, TINY_CONFIG["text_in_dim"], generator=generator)
    latents = torch.randn(len(TEXT_LENS), TINY_CONFIG["in_channels"], *GRID, generator=generator)
    inputs = {"hidden_states": latents, "timestep": torch.full((len(TEXT_LENS),), 500.0), "text_bth": text,
              "text_lens": torch.tensor(TEXT_LENS)}
    return {name: value.to(device) for name, value in inputs.items()}


def _counting_all_to_all(counter: list[int]) -> None:
    """torch.distributed.all_to_all_single counted into COUNTER[0]: the patched NPU path's Ulysses
    attention exchanges heads and tokens with it (the upstream _sp_plan hooks are not used there)."""
    original = torch.distributed.all_to_all_single

    def counted(*args: Any, **kwargs: Any) -> Any:
        counter[0] += 1
        return original(*args, **kwargs)

    torch.distributed.all_to_all_single = counted


def main(argv: list[str]) -> int:
    options = json.loads(argv[0])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    npu = options["device"] == "npu"
    if npu:
        import torch_npu  # noqa: F401  (registers torch.npu)

        torch.npu.set_device(rank)
        device, backend = torch.device("npu", rank), "hccl"
    else:
        from .cpu_platform import install, set_npu

        set_npu(install(), True)  # the patched NPU code paths, on vllm-omni's SDPA backend
        device, backend = torch.device("cpu"), "gloo"
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm_omni.diffusion import registry
    from vllm_omni.diffusion.data import DiffusionParallelConfig, OmniDiffusionConfig
    from vllm_omni.diffusion.distributed import parallel_state
    from vllm_omni.diffusion.forward_context import set_forward_context
    from vllm_omni.diffusion.models.ernie_image.ernie_image_transformer import ErnieImageTransformer2DModel

    vllm_config = VllmConfig(device_config=DeviceConfig(device=device.type))
    parallel = DiffusionParallelConfig(sequence_parallel_size=world, ulysses_degree=world, cfg_parallel_size=1)
    od_config = OmniDiffusionConfig(parallel_config=parallel, dtype=torch.float32)
    with set_current_vllm_config(vllm_config), set_forward_context(vllm_config=vllm_config,
                                                                   omni_diffusion_config=od_config):
        parallel_state.init_distributed_environment(
            world_size=world, rank=rank, local_rank=rank, backend=backend,
            distributed_init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}")
        parallel_state.initialize_model_parallel(cfg_parallel_size=1, sequence_parallel_size=world,
                                                 ulysses_degree=world, backend=backend)
        model = ErnieImageTransformer2DModel(od_config=od_config, **TINY_CONFIG)
        fixed_weights(model)
        registry._apply_sequence_parallel_if_enabled(SimpleNamespace(transformer=model), od_config)
        model = model.to(device).eval()
        all_to_all = [0]
        _counting_all_to_all(all_to_all)
        with torch.no_grad():
            output = model(**_inputs(device), return_dict=False)[0]
    torch.save({"output": output.float().cpu(), "all_to_all": all_to_all[0]},
               os.path.join(options["out"], f"sp{world}-rank{rank}.pt"))
    torch.distributed.barrier()
    parallel_state.destroy_model_parallel()
    parallel_state.destroy_distributed_environment()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

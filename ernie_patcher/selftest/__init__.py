"""`ernie-patch selftest`: numeric checks of the applied patches, run in the target interpreter.

`launch` runs in the ernie-patch process (standard library only, never torch); `runtime` is the code
the target interpreter runs (torch, torch_npu, mindiesd, diffusers, vllm-omni: whatever it has). This
module imports neither, so importing the package costs nothing.
"""

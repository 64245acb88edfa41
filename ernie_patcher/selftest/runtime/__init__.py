"""Code run inside the target interpreter by `ernie-patch selftest`, and by the numerics tests.

Self-contained: it imports torch and the target packages but nothing else of ernie_patcher (relative
imports only), so the launcher can copy this directory to a private temp dir and run it with `-I` in an
interpreter where ernie-patcher is not installed. The torch_npu stand-in (torch_npu_ref),
the loader of the interpreter's own mindiesd over it (mindiesd_ops) and the fake NPU device (fake_npu) are the
ones the numerics tests use.
"""

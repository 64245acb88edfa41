"""ernie-patcher: apply, verify and revert the ERNIE-Image Ascend NPU source patches."""

__version__ = "0.1.0"

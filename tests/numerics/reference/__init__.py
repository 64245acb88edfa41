"""CPU reference implementations of the Ascend kernels the patches call, written from the vendors' documents.

They are test doubles with the documented semantics: they compute on whatever device the tensors' data
lives on (CPU here), check the documented argument contracts, count their calls, and by default refuse
tensors that do not report an NPU device, as the real kernels would.
"""

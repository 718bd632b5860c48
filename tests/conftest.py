import os

# Without a GPU, Triton kernels run in Triton's interpreter; it must be chosen before
# real_megatron.kernels (and triton) are imported.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass

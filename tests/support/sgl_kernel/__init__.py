"""Stand-in for SGLang's CPU `sgl_kernel` ops, which PyPI does not ship (its wheel holds CUDA code).

Why it exists: with SGLANG_USE_CPU_ENGINE=1, SGLang imports a few names from `sgl_kernel`
unconditionally; for a small dense model only `assign_req_to_token_pool_cpu` is ever called, and
every other op falls back to SGLang's own pure-torch paths. This package goes first on the
PYTHONPATH of the test servers only (never the trainer's). Any other name imports fine but raises
NotImplementedError when called, so a new dependency shows up as a clear error, not a wrong result.
"""


def assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc, batch_size):
    """For request i: req_to_token[req_pool_indices[i], start_offset[i]:end_offset[i]] = the next
    (end - start) entries of out_cache_loc."""
    position = 0
    for i in range(int(batch_size)):
        start, end = int(start_offset[i]), int(end_offset[i])
        length = end - start
        req_to_token[int(req_pool_indices[i]), start:end] = out_cache_loc[position : position + length].to(req_to_token.dtype)
        position += length


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)

    def missing(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name} is not provided by the CPU test stand-in (tests/support/sgl_kernel)")

    missing.__name__ = name
    return missing


__version__ = "0.0.0+cpu-test-stand-in"

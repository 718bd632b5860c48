"""The policy on megatron-core. Importing this package first quiets megatron-core's import-time
warnings that only say a CUDA extension is absent, on machines without CUDA (see cpu_compat)."""

from .cpu_compat import quiet_known_warnings

quiet_known_warnings()

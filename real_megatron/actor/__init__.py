"""The policy on megatron-core.

megatron-core warns at import that CUDA extensions are absent, which on a machine without CUDA says
nothing: those warnings are quieted (see cpu_compat) just before megatron-core is first imported,
not when this package is, so the config can read the actor's settings (settings.py) without torch.
"""

import sys
from importlib.abc import MetaPathFinder


class _QuietMegatronImport(MetaPathFinder):
    """Finds nothing itself: on the first import of megatron it quiets the known warnings, then
    steps aside."""

    def find_spec(self, name, path=None, target=None):
        if name == "megatron" or name.startswith("megatron."):
            sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _QuietMegatronImport)]
            from .cpu_compat import quiet_known_warnings

            quiet_known_warnings()
        return None


if "megatron" in sys.modules:
    from .cpu_compat import quiet_known_warnings

    quiet_known_warnings()
elif not any(isinstance(f, _QuietMegatronImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _QuietMegatronImport())

"""kvfree: fixed-memory sequence mixers against KV-cached attention.

The public surface is small:

- ``kvfree.state_bytes(state)``: bytes actually carried between decode steps;
- ``kvfree.clone_state(state)``: a deep copy of a decode state;
- ``kvfree.mixers.build_mixer(name, d_model, **options)`` and ``kvfree.mixers.available()``;
- ``kvfree.models.LanguageModel`` / ``kvfree.models.ModelConfig`` / ``kvfree.models.preset``.
"""

from kvfree.state import State, clone_state, state_bytes
from kvfree.utils import default_device, environment

__version__ = "0.1.0"
__all__ = ["State", "clone_state", "state_bytes", "default_device", "environment", "__version__"]

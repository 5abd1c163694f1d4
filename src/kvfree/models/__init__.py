"""Language models built from a layer list, and named presets."""

from kvfree.models.config import ModelConfig
from kvfree.models.lm import LanguageModel, ModelState, sample
from kvfree.models.presets import preset, preset_names

__all__ = ["LanguageModel", "ModelConfig", "ModelState", "preset", "preset_names", "sample"]

"""miaotui (秒推): a small, fast LLM inference engine on PyTorch."""

from miaotui.config import CacheConfig, EngineConfig
from miaotui.errors import MiaotuiError
from miaotui.llm import LLM, Completion, GenerationResult
from miaotui.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "CacheConfig",
    "Completion",
    "EngineConfig",
    "GenerationResult",
    "MiaotuiError",
    "SamplingParams",
]

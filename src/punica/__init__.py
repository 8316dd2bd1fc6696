"""Punica: serve many LoRA finetunes of one base LLM at nearly the cost of the base model alone."""

from punica.config import CacheConfig, EngineConfig, LoRAConfig, SchedulerConfig, engine_config
from punica.engine.engine import Engine
from punica.engine.llm import LLM
from punica.engine.request import RequestOutput, SamplingParams, TokenLogprobs
from punica.errors import (
    AdapterError,
    BadRequestError,
    CapacityError,
    ConfigError,
    ModelLoadError,
    PunicaError,
    UnknownModelError,
)

__all__ = [
    "LLM", "Engine", "SamplingParams", "RequestOutput", "TokenLogprobs", "EngineConfig", "CacheConfig",
    "SchedulerConfig", "LoRAConfig", "engine_config", "PunicaError", "AdapterError", "BadRequestError", "CapacityError",
    "ConfigError", "ModelLoadError", "UnknownModelError",
]
__version__ = "0.1.0"

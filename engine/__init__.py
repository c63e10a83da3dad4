from .config import EngineConfig
from .llm import LLM, RequestStream
from .sampling_params import SamplingParams
from .sequence import Logprob, RequestOutput

__all__ = ["LLM", "EngineConfig", "SamplingParams", "RequestOutput", "RequestStream", "Logprob"]

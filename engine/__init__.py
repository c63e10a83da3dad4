from .llm import LLM
from .sampling_params import SamplingParams
from .sequence import Logprob, RequestOutput

__all__ = ["LLM", "SamplingParams", "RequestOutput", "Logprob"]

"""Request bodies of the OpenAI API (and vLLM's extensions), as pydantic models with OpenAI's field names.

Strict types: a string where a number belongs is refused (400), as OpenAI does, rather than converted. Fields that
are not listed are ignored, so that clients sending newer OpenAI fields still work. Ranges that SamplingParams
checks itself (temperature, top_p, penalties, ...) are left to it: one place says what is allowed."""
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

TokenIds = list[StrictInt]
Number = StrictFloat  # strict, yet takes an integer (as JSON numbers are)


class Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(Body):
    include_usage: StrictBool = False


class Sampling(Body):
    """The sampling fields both endpoints take."""
    model: StrictStr | None = None
    temperature: Number | None = None  # None: the checkpoint's default (generation_config.json), else 1
    top_p: Number | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    n: StrictInt = 1
    presence_penalty: Number = 0.0
    frequency_penalty: Number = 0.0
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    # vLLM's extensions
    top_k: StrictInt | None = None
    min_p: Number | None = None
    repetition_penalty: Number | None = None
    ignore_eos: StrictBool = False
    stop_token_ids: list[StrictInt] | None = None
    skip_special_tokens: StrictBool = True


class CompletionRequest(Sampling):
    prompt: StrictStr | list[StrictStr] | TokenIds | list[TokenIds]
    max_tokens: StrictInt | None = 16
    logprobs: StrictInt | None = None  # top-N per token, completions style
    echo: StrictBool = False


class TextPart(Body):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None


class TokenizeRequest(Body):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the chat template."""
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True


class DetokenizeRequest(Body):
    model: StrictStr | None = None
    tokens: TokenIds


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}

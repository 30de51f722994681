"""Each provider's options as one pydantic model, chosen by the provider's name (a discriminated union).

:func:`parse` validates the options a model is registered with (``--option KEY=VALUE``,
whose values the CLI reads as JSON when they parse, else as text): lax coercion where
it is sensible (``"3"`` for a number), no ``true``/``false`` for a number, and a refusal
as one :class:`~segue.embedding.providers.base.OptionsError` line that names the
option and what it takes. The models hold no defaults that depend on the source (an
API model's key variable and prices: see ``openai``), and dump exactly the keys and
values the registry has always stored, so configs and fingerprints stay as they were.

This module imports no model code: the CLI validates options without loading torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from segue.embedding.providers.base import OptionsError


def _refuse_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a number cannot be true or false")
    return value


def one_of(*values: str) -> Any:
    """A field type that takes one of ``values``."""
    return Annotated[Literal[values], Field(description=f"one of {', '.join(values)}")]


NOT_BOOL = BeforeValidator(_refuse_bool)
PositiveNumber = Annotated[Annotated[int | float, Field(gt=0)], NOT_BOOL, Field(description="a positive number")]
PositiveInteger = Annotated[Annotated[int, Field(gt=0)], NOT_BOOL, Field(description="a positive integer")]
OptionalPositiveInteger = Annotated[Annotated[int, Field(gt=0)] | None, NOT_BOOL,
                                    Field(description="a positive integer")]
Price = Annotated[Annotated[int | float, Field(ge=0)] | None, NOT_BOOL, Field(description="a price in USD, 0 or more")]
Text = Annotated[str, Field(description="text")]
DTYPES = ("float32", "float16", "bfloat16")
Dtype = one_of(*DTYPES)
Attention = one_of("sdpa", "eager")
EncodingFormat = one_of("float", "base64")
Truncation = one_of("end", "refuse")


class _Options(BaseModel):
    """What every provider's options share: unknown keys are refused; a number where text is expected is its text."""

    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)


class TransformerOptions(_Options):
    """Provider ``transformer``: each option is part of the model's identity (see ``transformer``)."""

    provider: Literal["transformer"] = Field("transformer", exclude=True)
    dtype: Dtype = "float32"
    attention: Attention = "sdpa"
    prefix: Text = ""


class StaticOptions(_Options):
    """Provider ``static``: no options."""

    provider: Literal["static"] = Field("static", exclude=True)


class OpenAIOptions(_Options):
    """Provider ``openai``: the endpoint's model and how it is asked, counted, paced and priced (see ``openai``)."""

    provider: Literal["openai"] = Field("openai", exclude=True)
    model: Annotated[str, Field(min_length=1, description="the endpoint's model name (--model), "
                                                          "e.g. text-embedding-3-small")]
    dimensions: OptionalPositiveInteger = None
    # Never echoed in a refusal: a key pasted here instead of its variable's name stays unprinted.
    api_key_env: Annotated[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None,
                           Field(description="the name of an environment variable (--api-key-env)", repr=False)] = None
    encoding_format: EncodingFormat = "base64"
    tokenizer: Annotated[str, Field(description="tiktoken:<encoding>, a tokenizer folder or a cached hub id")] = (
        "tiktoken:cl100k_base")
    max_tokens_per_input: PositiveInteger = 8191
    truncate: Truncation = "end"
    max_inputs_per_request: PositiveInteger = 2048
    max_tokens_per_request: PositiveInteger = 300_000
    requests_per_minute: PositiveNumber = 3000
    tokens_per_minute: PositiveNumber = 1_000_000
    concurrency: PositiveInteger = 4
    timeout_s: PositiveNumber = 60.0
    outage_after_s: PositiveNumber = 60.0
    price_per_million_tokens: Price = None
    batch_price_per_million_tokens: Price = None
    canary_every_s: PositiveNumber = 3600.0

    @model_validator(mode="after")
    def _input_fits_a_request(self) -> OpenAIOptions:
        if self.max_tokens_per_input > self.max_tokens_per_request:
            raise ValueError(f"option max_tokens_per_input ({self.max_tokens_per_input}) cannot exceed "
                             f"max_tokens_per_request ({self.max_tokens_per_request})")
        return self


AnyOptions = TransformerOptions | StaticOptions | OpenAIOptions  # one model per provider
ProviderOptions = Annotated[AnyOptions, Field(discriminator="provider")]
BY_PROVIDER: dict[str, type[_Options]] = {
    model.model_fields["provider"].default: model for model in get_args(AnyOptions)}
_ADAPTER = TypeAdapter(ProviderOptions)


def parse(provider: str, options: Mapping[str, Any]) -> AnyOptions:
    """``options`` validated as ``provider``'s; a refusal is an :class:`OptionsError` of one line."""
    model = BY_PROVIDER[provider]
    accepted = sorted(name for name in model.model_fields if name != "provider")
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise OptionsError(f"provider {provider!r} takes no option {', '.join(unknown)} "
                           f"(it takes: {', '.join(accepted) or 'none'})")
    try:
        return _ADAPTER.validate_python({**options, "provider": provider})
    except ValidationError as error:
        raise OptionsError(_refusal(model, provider, error.errors()[0])) from None


def from_config(provider: str, config: Mapping[str, Any]) -> AnyOptions:
    """The options a registered model's ``config`` holds (besides what its provider recorded about it)."""
    fields = BY_PROVIDER[provider].model_fields
    return parse(provider, {key: value for key, value in config.items() if key in fields})


def _refusal(model: type[_Options], provider: str, error: Mapping[str, Any]) -> str:
    """One line for the first thing pydantic refused: the option, what it takes, and what it was given."""
    if len(error["loc"]) < 2:  # a rule between options
        return str(error["ctx"]["error"])
    name = error["loc"][1]
    field = model.model_fields[name]
    if error["type"] == "missing":
        return f"provider {provider!r} needs option {name}: {field.description}"
    given = f", not {error['input']!r}" if field.repr else ""
    return f"option {name}: must be {field.description}{given}"

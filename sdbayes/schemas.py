"""What the files sdbayes imports hold: pydantic schemas of a GuideLLM benchmark and a
``vllm bench serve`` result, and their validation errors as one line per field.

A schema states which fields a file must have and what each must be; it says nothing of
what they mean (that is :mod:`sdbayes.importers`). Fields the schemas do not name are
ignored, so newer files with more fields still read. Numbers may be JSON numbers or strings
of one (vLLM writes ``"inf"``); a JSON ``null`` counts as missing. A problem reads
``missing field 'request_latency.successful.count'`` or ``field 'completed': not a number:
True``, the field's path as in the file.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, StrictFloat, ValidationError
from pydantic import model_validator as _model_validator
from pydantic_core import PydanticCustomError

MAX_TOKENS = 10**9
"""More tokens than any request holds: a larger count in a file is junk."""


def _number(value) -> float:
    if value is None:
        raise PydanticCustomError("missing", "Field required")
    try:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError
        return float(value)
    except (ValueError, OverflowError):
        raise PydanticCustomError("not_a_number", "not a number: {value}",
                                  {"value": repr(value)}) from None


def _count(value) -> int:
    number = _number(value)
    if not (math.isfinite(number) and number >= 0 and number.is_integer()):
        raise PydanticCustomError("not_a_count", "not a count: {value}", {"value": repr(value)})
    return int(number)


def _token_count(value) -> float:
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not (0 <= value <= MAX_TOKENS and float(value).is_integer())):
        raise PydanticCustomError("not_a_token_count", "{value} is not a token count",
                                  {"value": repr(value)})
    return float(value)


def _optional(check):
    """``check``, with a missing or null field read as None."""
    return lambda value: None if value is None else check(value)


Number = Annotated[float, BeforeValidator(_number)]
"""A number, or a string of one (``"inf"``); required."""
Count = Annotated[int, BeforeValidator(_count)]
"""A whole number at least 0; required."""
MaybeNumber = Annotated[float | None, BeforeValidator(_optional(_number))]
MaybeCount = Annotated[int | None, BeforeValidator(_optional(_count))]
TokenCount = Annotated[float, BeforeValidator(_token_count)]


class _Schema(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


def problems(error: ValidationError, where: str) -> list[str]:
    """One line per field of a validation error, each starting with ``where``."""
    lines = []
    for item in error.errors(include_url=False):
        field = "".join(f"[{key}]" if isinstance(key, int) else f".{key}"
                        for key in item["loc"]).lstrip(".")
        if item["type"] == "missing":
            lines.append(f"{where}: missing field '{field}'")
        else:
            lines.append(f"{where}: " + (f"field '{field}': " if field else "")
                         + _message(item))
    return lines


def _message(item: dict) -> str:
    """A validation message in the importers' words: pydantic's own ("Input should be a
    valid list") with the value it got, and without the schema's class names."""
    message = item["msg"]
    if not message.startswith("Input should"):
        return message  # one of ours, which names the value
    message = re.sub(r" or instance of \w+$", "", message).replace("Input should", "should")
    value = repr(item["input"])
    return f"{message}, got {value if len(value) <= 40 else value[:37] + '...'}"


# --- GuideLLM: a benchmark's ``metrics`` and its run settings ---------------------------

class _Tail(_Schema):
    p90: Number
    p99: Number


class _MaybeTail(_Schema):
    p90: MaybeNumber = None
    p99: MaybeNumber = None


class _LatencySummary(_Schema):
    count: Count
    mean: Number
    std_dev: Number
    median: Number
    percentiles: _Tail


class _Counted(_Schema):
    count: Count


class _RequestLatency(_Schema):
    successful: _LatencySummary
    errored: _Counted
    incomplete: _Counted


class _TimingSummary(_Schema):
    mean: Number
    std_dev: Number
    median: MaybeNumber = None
    percentiles: _MaybeTail | None = None


class _Timing(_Schema):
    successful: _TimingSummary


class _TokenSummary(_Schema):
    mean: Number
    std_dev: MaybeNumber = None


class _Tokens(_Schema):
    successful: _TokenSummary


class _Mean(_Schema):
    mean: Number


class _Successful(_Schema):
    successful: _Mean


class _Total(_Schema):
    total: _Mean


class GuideLLMMetrics(_Schema):
    """A GuideLLM benchmark's ``metrics``: each a summary per request status
    (``successful``, ``errored``, ...). Latencies in seconds, TTFT and ITL in ms.
    ``requests_per_second`` is needed where the benchmark states no ``duration``, and
    ``request_concurrency`` for a throughput benchmark."""

    request_latency: _RequestLatency
    time_to_first_token_ms: _Timing
    inter_token_latency_ms: _Timing
    prompt_token_count: _Tokens
    output_token_count: _Tokens
    requests_per_second: _Successful | None = None
    request_concurrency: _Total | None = None


STRATEGIES = ("synchronous", "concurrent", "throughput", "constant", "poisson")


class GuideLLMStrategy(_Schema):
    """How GuideLLM scheduled a benchmark's requests."""

    type_: Literal[STRATEGIES]
    streams: MaybeCount = None  # concurrent
    rate: MaybeNumber = None  # constant and poisson: requests started per second


class _StrategyHolder(_Schema):
    strategy: GuideLLMStrategy | None = None


class GuideLLMRun(_Schema):
    """A benchmark's run settings: its strategy, in ``config`` (GuideLLM 0.5 and later) or
    ``args`` (earlier), and its measured window ``duration`` [s]. The source study's bare
    lists of metrics have none of these."""

    config: _StrategyHolder | None = None
    args: _StrategyHolder | None = None
    duration: MaybeNumber = None

    @property
    def strategy(self) -> GuideLLMStrategy | None:
        for holder in (self.config, self.args):
            if holder is not None and holder.strategy is not None:
                return holder.strategy
        return None


# --- vLLM: a ``vllm bench serve`` / ``benchmark_serving.py`` result ----------------------

class VllmResult(_Schema):
    """A ``vllm bench serve`` result (or ``benchmark_serving.py``'s, or one run of
    ``vllm bench sweep``): counts, rates, latency statistics in ms, and with
    ``--save-detailed`` one entry per request in each of ``input_lens``, ``output_lens``,
    ``ttfts`` [s], ``itls`` [s], ``errors`` (empty where the request completed) and, in
    newer versions, ``start_times`` [s]."""

    completed: Count
    failed: MaybeCount = None
    num_prompts: MaybeCount = None
    request_rate: Number  # "inf": every request sent at once
    request_throughput: Number
    total_input_tokens: Number
    total_output_tokens: Number
    duration: MaybeNumber = None
    burstiness: MaybeNumber = None  # gamma-distributed gaps of this shape; 1 is Poisson
    max_concurrency: MaybeCount = None
    run_number: MaybeCount = None  # vllm bench sweep's repeats

    mean_e2el_ms: MaybeNumber = None
    std_e2el_ms: MaybeNumber = None
    p50_e2el_ms: MaybeNumber = None
    p90_e2el_ms: MaybeNumber = None
    p99_e2el_ms: MaybeNumber = None
    mean_ttft_ms: MaybeNumber = None
    median_ttft_ms: MaybeNumber = None
    p90_ttft_ms: MaybeNumber = None
    p99_ttft_ms: MaybeNumber = None
    mean_tpot_ms: MaybeNumber = None
    median_tpot_ms: MaybeNumber = None
    p90_tpot_ms: MaybeNumber = None
    p99_tpot_ms: MaybeNumber = None

    input_lens: list[TokenCount] | None = None
    output_lens: list[TokenCount] | None = None
    ttfts: list[StrictFloat] | None = None
    itls: list[list[StrictFloat]] | None = None
    errors: list[str | None] | None = None
    start_times: list[StrictFloat] | None = None  # when each request was sent [s], newer vLLM

    spec_decode_num_drafts: MaybeNumber = None
    spec_decode_draft_tokens: MaybeNumber = None
    spec_decode_per_position_acceptance_rates: list[MaybeNumber] | None = None
    spec_decode_acceptance_length: MaybeNumber = None

    @_model_validator(mode="after")
    def _one_entry_per_request(self) -> VllmResult:
        if self.completed < 1:
            raise PydanticCustomError(
                "nothing", "no request completed{failed}: nothing to import",
                {"failed": f" ({self.failed} failed)" if self.failed else ""})
        arrays = {name: len(getattr(self, name)) for name in
                  ("input_lens", "output_lens", "ttfts", "itls", "errors", "start_times")
                  if getattr(self, name) is not None}
        if len(set(arrays.values())) > 1:
            raise PydanticCustomError("arrays", "per-request arrays of different lengths "
                                      "{lengths}", {"lengths": arrays})
        if self.errors is not None and self.completed_requests != self.completed:
            raise PydanticCustomError(
                "errors", "field 'errors': {ok} requests without an error, but 'completed' "
                "is {completed}", {"ok": self.completed_requests, "completed": self.completed})
        return self

    @property
    def completed_requests(self) -> int | None:
        """Requests without an error in ``errors`` (``--save-detailed``), else None."""
        return None if self.errors is None else sum(1 for error in self.errors if not error)

    def per_request(self, values: list) -> list:
        """The completed requests' entries of a per-request array."""
        errors = self.errors or [""] * len(values)
        return [value for value, error in zip(values, errors, strict=True) if not error]

"""Validation of what callers hand us, and the retry policy's delays."""

from datetime import timedelta

import pytest

from pydantic import ValidationError

from dynwf_ray import InvalidInputError, NonRetryableError, NotSerializableError, PayloadTooLargeError
from dynwf_ray.errors import invalid
from dynwf_ray.sandbox.policy import SandboxLimits
from dynwf_ray.step import retry_delay
from dynwf_ray.types import (
    RetryConfig,
    StepConfig,
    parse_duration,
    to_json,
    validate_event_type,
    validate_id,
    validate_step_name,
)


@pytest.mark.parametrize(
    "value, seconds",
    [("10 seconds", 10), ("2 minutes", 120), ("1 day", 86400), ("500 milliseconds", 0.5),
     ("1 hour", 3600), (7, 7), (1.5, 1.5), (timedelta(minutes=3), 180), ("3 weeks", 3 * 604800)],
)
def test_durations_parse(value, seconds):
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["soon", "10 parsecs", "-1 seconds", -5, None, True, "1.2.3 days",
                                 float("inf"), 10 ** 400, "9" * 400 + " seconds"])
def test_bad_durations_are_rejected_naming_the_argument(bad):
    with pytest.raises(InvalidInputError, match="retries.delay"):
        parse_duration(bad, "retries.delay")


def test_instance_ids():
    assert validate_id("order-1") == "order-1"
    assert validate_id("a" * 100)
    for bad in ["", "a" * 101, "-leading-dash", "has space", "slash/y", "ünï", "trailing-newline\n"]:
        with pytest.raises(InvalidInputError, match="instance id"):
            validate_id(bad)
    with pytest.raises(InvalidInputError, match="must be a string"):
        validate_id(42)


def test_step_names():
    assert validate_step_name("charge card #1 (retry-safe)")
    assert validate_step_name("x" * 256)
    with pytest.raises(InvalidInputError, match="limit is 256"):
        validate_step_name("x" * 257)
    with pytest.raises(InvalidInputError, match="control characters"):
        validate_step_name("bad\nname")
    with pytest.raises(InvalidInputError, match="non-empty"):
        validate_step_name("")
    with pytest.raises(InvalidInputError, match="lone surrogate"):
        validate_step_name("bad\ud800name")


def test_event_types():
    assert validate_event_type("approval_2-b")
    for bad in ["", "-x", "a b", "a" * 101, "é"]:
        with pytest.raises(InvalidInputError, match="event type"):
            validate_event_type(bad)


def test_step_config_defaults_match_the_contract():
    config = StepConfig()
    assert config.retries.limit == 5
    assert config.retries.delay == 10
    assert config.retries.backoff.value == "exponential"
    assert config.timeout == 600


def test_json_limits():
    assert to_json({"a": [1, 2]}, "x") == '{"a":[1,2]}'
    with pytest.raises(PayloadTooLargeError, match="result of step 'big'.*1 MiB"):
        to_json("x" * (1024 * 1024 + 1), "result of step 'big'")
    with pytest.raises(InvalidInputError, match="not JSON-serializable"):
        to_json({1, 2}, "result of step 's'")


def test_json_nesting_and_lone_surrogates_are_refused_at_write():
    """What the journal could store but not give back (the HTTP API's encoder stops short
    of 256 levels, and a lone surrogate is not Unicode) is refused when written."""
    assert to_json(eval("[" * 128 + "]" * 128), "x")
    assert to_json("\U0001F600", "x") == '"\\ud83d\\ude00"'  # a pair is a character
    assert to_json("a\\ud800", "x")  # a backslash and letters are text
    deep: list = []
    cur = deep
    for _ in range(100_000):
        cur.append([])
        cur = cur[0]
    for bad, words in ((eval("[" * 129 + "]" * 129), "nested more than 128"),
                       (deep, "nested more than 128"), ({"a": {"b": "x\udcff"}}, "lone surrogate"),
                       ("\ud800", "lone surrogate")):
        with pytest.raises(NotSerializableError, match=words):
            to_json(bad, "params")


def test_retry_delays_and_sandbox_limits_are_bounded():
    with pytest.raises(ValidationError, match="retries.delay: .* longer than 365 days"):
        RetryConfig(delay="999999 weeks")
    forever = RetryConfig(limit=None, delay="300 days")
    assert retry_delay(forever, 40, RuntimeError()) == 365 * 86400  # backoff stops at a year
    for bad in ({"cpu_seconds": float("inf")}, {"memory_mb": 10 ** 30}, {"file_size_mb": 2 ** 44}):
        with pytest.raises(ValidationError):
            SandboxLimits(**bad)
    try:
        StepConfig(retries={"limit": -1, "delay": "soon"})
    except ValidationError as exc:
        message = str(invalid("step 'charge': invalid options", exc))
    assert message.startswith("step 'charge': invalid options: retries.limit: Input should be")
    assert "retries.delay: cannot parse 'soon'" in message and "errors.pydantic.dev" not in message


@pytest.mark.parametrize(
    "backoff, delays",
    [("constant", [2, 2, 2]), ("linear", [2, 4, 6]), ("exponential", [2, 4, 8])],
)
def test_backoff_delays(backoff, delays):
    config = RetryConfig(limit=3, delay="2 seconds", backoff=backoff)
    got = [retry_delay(config, attempt, RuntimeError("x")) for attempt in (1, 2, 3)]
    assert got == delays
    assert retry_delay(config, 4, RuntimeError("x")) is None  # limit 3 retries = 4 attempts


def test_non_retryable_stops_at_once():
    config = RetryConfig(limit=5, delay=1)
    assert retry_delay(config, 1, NonRetryableError("no")) is None

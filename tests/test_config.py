"""Validation of generation options (GenerateParams) and engine options (EngineConfig)."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest

import mii
from mii.config import EngineConfig, GenerateParams
from mii.errors import InvalidRequestError

# ----- GenerateParams ------------------------------------------------------------------


def test_defaults():
    p = GenerateParams.parse()
    assert p.max_length is None
    assert p.min_new_tokens == 0
    assert p.max_new_tokens is None
    assert p.ignore_eos is False
    assert p.top_p == 0.9
    assert p.top_k is None
    assert p.temperature is None
    assert p.do_sample is True
    assert p.return_full_text is False
    assert p.stop == ()
    assert p.seed is None
    assert p.greedy is False


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": -0.1}, "top_p"),
        ({"top_p": 1.0000001}, "top_p"),
        ({"top_p": 2}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_p": math.inf}, "top_p"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": -math.inf}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": 3.5e38}, "temperature"),  # inf as a 32-bit float: a 500
        ({"repetition_penalty": 1e-46}, "repetition_penalty"),  # 0 as a 32-bit float
        ({"repetition_penalty": 1e21}, "repetition_penalty"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"min_new_tokens": -1}, "min_new_tokens"),
        ({"max_new_tokens": True}, "max_new_tokens"),  # pydantic read it as 1
        ({"seed": False}, "seed"),
        ({"min_new_tokens": 5, "max_new_tokens": 2}, "max_new_tokens"),  # was accepted
        ({"max_length": 0}, "max_length"),
        ({"max_length": -5}, "max_length"),
        ({"top_k": -2}, "top_k"),  # -1 and 0 mean no limit (vLLM's)
        ({"top_k": -3}, "top_k"),
        ({"stop": ""}, "stop"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop": ("",)}, "stop"),
        ({"stop": ["x"] * 17}, "stop"),
        ({"stop": ["x"] * 300_000}, "stop"),
        ({"stop": "a" * 257}, "stop"),
        ({"stop": ["ok", "b" * 10_000]}, "stop"),
        ({"top_k": 2**63}, "top_k"),
        ({"max_new_tokens": 2**70}, "max_new_tokens"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"max_new_tokens": "many"}, "max_new_tokens"),
        ({"do_sample": "perhaps"}, "do_sample"),
        ({"stop_token_ids": [True]}, "stop_token_ids"),  # token ids 1 and 0 to pydantic
        ({"allowed_token_ids": True}, "allowed_token_ids"),
        ({"logit_bias": {True: 5.0}}, "logit_bias"),
        ({"logit_bias": {"7": False}}, "logit_bias"),
        ({"min_p": True}, "min_p"),  # 1.0: a greedy request
        ({"temperature": True}, "temperature"),
        ({"top_p": True}, "top_p"),
        ({"repetition_penalty": True}, "repetition_penalty"),
        ({"presence_penalty": False}, "presence_penalty"),
        ({"stop": True}, "stop"),
        ({"min_p": np.True_}, "min_p"),  # numpy's booleans too (a pandas row's values)
    ],
)
def test_invalid_values_name_the_field(options, field):
    with pytest.raises(InvalidRequestError) as info:
        GenerateParams.parse(**options)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.field == field
    assert repr(field) in str(err)  # the message names the field, quoted
    assert "generation option" in str(err)


@pytest.mark.parametrize(
    "field", ["frequency_penalty", "presence_penalty", "min_p", "top_p", "temperature"]
)
def test_nan_is_named_as_nan(field):
    """NaN of any number option: "not NaN", where the penalties' first bound spoke
    ("should be less than or equal to 2 (got nan)", a user trial)."""
    with pytest.raises(InvalidRequestError) as info:
        GenerateParams.parse(**{field: math.nan})
    assert info.value.field == field and "finite number" in str(info.value)


def test_numpy_booleans_are_booleans():
    """numpy's booleans (a pandas or numpy row's values) are True and False for the
    true/false options, plain ``bool`` once parsed; never a number (min_p above)."""
    params = GenerateParams.parse(do_sample=np.False_, ignore_eos=np.True_)
    assert params.do_sample is False and params.ignore_eos is True
    # ... and JSON's other spellings of a boolean keep pydantic's reading (REST clients)
    assert GenerateParams.parse(do_sample="false", ignore_eos=1).ignore_eos is True
    assert GenerateParams.parse(top_k=np.int64(5), temperature=np.float32(0.5)).top_k == 5


def test_stop_strings_are_capped():
    """At most 16 stop strings of at most 256 characters each (README's table)."""
    most = tuple(chr(ord("a") + i) * 256 for i in range(16))
    assert GenerateParams.parse(stop=list(most)).stop == most
    with pytest.raises(InvalidRequestError, match="at most 16 stop strings") as info:
        GenerateParams.parse(stop=[str(i) for i in range(300_000)])
    assert info.value.field == "stop" and len(str(info.value)) < 400
    with pytest.raises(InvalidRequestError, match="at most 256 characters"):
        GenerateParams.parse(stop="a" * 257)


def test_first_bad_field_is_reported_among_good_ones():
    with pytest.raises(InvalidRequestError) as info:
        GenerateParams.parse(max_new_tokens=5, top_p=0.5, temperature=-1.0, seed=3)
    assert info.value.field == "temperature"


@pytest.mark.parametrize("name", ["max_tokens", "topp", "Temperature", "stop_sequences"])
def test_unknown_option_names_the_option(name):
    with pytest.raises(InvalidRequestError) as info:
        GenerateParams.parse(**{name: 1})
    assert info.value.field == name
    assert repr(name) in str(info.value)
    assert "unknown" in str(info.value)


def test_invalid_value_message_shows_the_bad_value():
    with pytest.raises(InvalidRequestError) as info:
        GenerateParams.parse(top_p=1.5)
    assert "1.5" in str(info.value)


@pytest.mark.parametrize(
    "options",
    [
        {"top_p": 1.0},
        {"top_p": 1e-9},
        {"temperature": 0.0},
        {"temperature": 3.5},
        {"max_new_tokens": 0},
        {"min_new_tokens": 0},
        {"max_length": 1},
        {"top_k": 1},
        {"seed": 0},
        {"seed": 2**63 - 1},
        {"stop": None},
        {"stop": ["a", "bc"]},
    ],
)
def test_boundary_values_are_accepted(options):
    params = GenerateParams.parse(**options)
    for key, value in options.items():
        if key != "stop":
            assert getattr(params, key) == value


def test_stop_as_string_becomes_a_tuple():
    assert GenerateParams.parse(stop="###").stop == ("###",)
    assert GenerateParams.parse(stop=["a", "b"]).stop == ("a", "b")
    assert GenerateParams.parse(stop=None).stop == ()
    # A string is one stop string, not a sequence of one-character stop strings.
    assert GenerateParams.parse(stop="abc").stop != ("a", "b", "c")


def test_params_are_frozen():
    params = GenerateParams.parse(top_p=0.5)
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen-instance error
        params.top_p = 0.7  # type: ignore[misc]
    assert params.top_p == 0.5


@pytest.mark.parametrize(
    ("options", "greedy"),
    [
        ({}, False),
        ({"do_sample": False}, True),
        ({"temperature": 0.0}, True),
        ({"temperature": 0.7}, False),
        ({"do_sample": False, "temperature": 0.7}, True),
    ],
)
def test_greedy(options, greedy):
    assert GenerateParams.parse(**options).greedy is greedy


# ----- EngineConfig --------------------------------------------------------------------


def test_engine_defaults_are_valid():
    cfg = EngineConfig.parse("some/model")
    assert cfg.model == "some/model"
    for device in ("cuda", "cpu"):
        resolved = cfg.with_device_defaults(device)
        assert resolved.token_budget >= resolved.max_num_seqs


@pytest.mark.parametrize("name", ["block_size", "max_batch_size", "tokenizer_path"])
def test_engine_unknown_option(name):
    with pytest.raises(InvalidRequestError) as info:
        EngineConfig.parse("m", **{name: 4})
    assert info.value.field == name
    assert repr(name) in str(info.value)
    assert "engine option" in str(info.value)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"kv_block_size": 0}, "kv_block_size"),
        ({"kv_block_size": 2048}, "kv_block_size"),
        ({"num_kv_blocks": 0}, "num_kv_blocks"),
        ({"kv_cache_memory_fraction": 0.0}, "kv_cache_memory_fraction"),
        ({"kv_cache_memory_fraction": 1.5}, "kv_cache_memory_fraction"),
        ({"token_budget": 0}, "token_budget"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"dtype": "float64"}, "dtype"),
        ({"load_format": "gguf"}, "load_format"),
        ({"max_length": 0}, "max_length"),
    ],
)
def test_engine_invalid_values_name_the_field(options, field):
    with pytest.raises(InvalidRequestError) as info:
        EngineConfig.parse("m", **options)
    assert info.value.field == field
    assert repr(field) in str(info.value)


def test_a_torch_dtype_is_taken_by_name(tmp_path):
    """dtype=torch.bfloat16, as vLLM and transformers take it (it was refused), also
    through mii.serve, whose options travel as JSON."""
    import torch

    from mii.rpc.deployment_config import DeploymentConfig

    for dtype, name in ((torch.bfloat16, "bfloat16"), (torch.float16, "float16")):
        assert EngineConfig.parse("m", dtype=dtype).dtype == name
        config = DeploymentConfig.parse(str(tmp_path), dtype=dtype)
        assert config.engine_options["dtype"] == name and name in config.model_dump_json()
    with pytest.raises(InvalidRequestError, match="int8") as info:
        EngineConfig.parse("m", dtype=torch.int8)
    assert info.value.field == "dtype"


@pytest.mark.parametrize(("budget", "max_seqs"), [(8, 16), (15, 16), (1, 2)])
def test_token_budget_below_max_num_seqs_names_both(budget, max_seqs):
    with pytest.raises(InvalidRequestError) as info:
        EngineConfig.parse("m", token_budget=budget, max_num_seqs=max_seqs)
    message = str(info.value)
    assert "token_budget" in message
    assert "max_num_seqs" in message
    assert f"({budget})" in message and f"({max_seqs})" in message


def test_token_budget_equal_to_max_num_seqs_is_accepted():
    cfg = EngineConfig.parse("m", token_budget=16, max_num_seqs=16)
    assert cfg.token_budget == cfg.max_num_seqs == 16


def test_cross_field_error_does_not_print_none_as_the_option_name():
    # The budget rule is a whole-model check: pydantic gives it no field location.
    # The message must still read as a sentence about the two options, not
    # "invalid engine option None: ...".
    with pytest.raises(InvalidRequestError) as info:
        EngineConfig.parse("m", token_budget=8, max_num_seqs=16)
    assert "option None" not in str(info.value)


@pytest.mark.parametrize(
    ("device", "options", "expected"),
    [
        ("cuda", {}, (4096, 256)),
        ("cpu", {}, (1024, 128)),
        ("cuda", {"token_budget": 64}, (64, 64)),  # an unset cap never exceeds a given budget
        ("cuda", {"max_num_seqs": 512}, (4096, 512)),
        ("cpu", {"token_budget": 2048, "max_num_seqs": 16}, (2048, 16)),
    ],
)
def test_scheduling_defaults_follow_the_device(device, options, expected):
    resolved = EngineConfig.parse("m", **options).with_device_defaults(device)
    assert (resolved.token_budget, resolved.max_num_seqs) == expected


def test_engine_reports_the_scheduling_it_runs_with(llama, tmp_path, monkeypatch):
    monkeypatch.setenv("MII_CACHE_DIR", str(tmp_path))
    engine = mii.AsyncEngine(llama, device="cpu", token_budget=256)
    assert (engine.config.token_budget, engine.config.max_num_seqs) == (256, 128)
    assert engine.core.scheduler.token_budget == 256


@pytest.mark.parametrize(("given", "expected"), [(None, "none"), ("none", "none"), ("fp8", "fp8")])
def test_quantization_none_means_unquantized(given, expected):
    """vLLM users pass quantization=None; bad names still get the field named."""
    assert EngineConfig.parse("m", quantization=given).quantization == expected


def test_unknown_quantization_is_refused_naming_the_field():
    with pytest.raises(InvalidRequestError) as info:
        EngineConfig.parse("m", quantization="int3")
    assert info.value.field == "quantization"


def test_deepspeed_mii_option_names_say_what_to_write_instead():
    """Ported DeepSpeed-MII code passes mii_config / model_config dicts and port_number:
    the error says what mii takes instead (it said only "unknown engine option")."""
    named = [("port_number", "port=..."), ("mii_config", "keyword arguments")]
    # the engine options of the migration guide's table (they had no hint: user trial)
    named += [("inference_engine_config", "token_budget"), ("max_ragged_batch_size", "token")]
    named += [("task", "remove it"), ("zmq_port_number", "chosen by mii")]
    for name, hint in named:
        with pytest.raises(InvalidRequestError) as err:
            EngineConfig.parse("m", **{name: 1})
        assert err.value.field == name and hint in str(err.value), err.value
    # DeepSpeed-MII's legacy entry points: a bare AttributeError before
    import mii
    from mii.errors import UnknownArgument

    assert UnknownArgument is InvalidRequestError
    with pytest.raises(AttributeError, match=r"mii\.serve\(model, deployment_name"):
        mii.deploy  # noqa: B018
    with pytest.raises(AttributeError, match=r"mii\.client\(name\)\.generate"):
        mii.mii_query_handle  # noqa: B018
    with pytest.raises(AttributeError, match=r"has no attribute 'nothing'$"):
        mii.nothing  # noqa: B018


@pytest.mark.parametrize(
    ("parse", "name", "hint"),
    [
        (GenerateParams.parse, "max_new_token", "did you mean 'max_new_tokens'?"),
        (GenerateParams.parse, "temprature", "did you mean 'temperature'?"),
        (GenerateParams.parse, "max_tokens", "vLLM's max_tokens is max_new_tokens here"),
        (GenerateParams.parse, "stream", "AsyncEngine.stream"),
        (GenerateParams.parse, "n", "pass it several times"),
        (partial(EngineConfig.parse, "m"), "max_model_len", "is max_length here"),
        (partial(EngineConfig.parse, "m"), "gpu_memory_utilization", "kv_cache_memory_fraction"),
        (partial(EngineConfig.parse, "m"), "tensor_parallel_size", "is tensor_parallel here"),
        (partial(EngineConfig.parse, "m"), "max_num_seqz", "did you mean 'max_num_seqs'?"),
        # generation options given to the engine: they go with each request
        (partial(EngineConfig.parse, "m"), "max_new_tokens", "pipe(prompts, max_new_tokens="),
        (partial(EngineConfig.parse, "m"), "temperature", "a generation option"),
        (partial(EngineConfig.parse, "m"), "max_tokens", "is max_new_tokens here, a generation"),
    ],
)
def test_unknown_option_names_say_which_name_is_meant(parse, name, hint):
    """A typo or vLLM's name for an option gets the option meant (it said only
    "unknown generation option 'temprature'")."""
    with pytest.raises(InvalidRequestError) as err:
        parse(**{name: 1})
    assert err.value.field == name and hint in str(err.value), err.value


def test_an_unknown_name_far_from_every_option_gets_no_guess():
    with pytest.raises(InvalidRequestError) as err:
        GenerateParams.parse(frobnicate=1)
    assert str(err.value) == "unknown generation option 'frobnicate'"


@pytest.mark.parametrize("name", ["max_length", "num_kv_blocks", "token_budget", "seed"])
def test_an_engine_count_is_never_a_boolean(name):
    """`num_kv_blocks=True` was a KV cache of one block (pydantic reads True as 1), as
    generation options refuse it; true/false options still take booleans."""
    with pytest.raises(InvalidRequestError, match="not a boolean") as caught:
        EngineConfig.parse("m", **{name: True})
    assert caught.value.field == name
    assert EngineConfig.parse("m", compile=False).compile is False


def test_none_is_every_options_default():
    """As in transformers' generate(): top_p=None was refused where temperature=None
    was taken (a user trial)."""
    names = ("top_p", "do_sample", "ignore_eos", "min_new_tokens", "presence_penalty", "stop")
    given = dict.fromkeys((*names, "temperature", "top_k"))
    assert GenerateParams.parse(**given) == GenerateParams.parse()
    # an alias set to None is not given (it was "another name of min_new_tokens")
    assert GenerateParams.parse(min_tokens=None, min_new_tokens=3).min_new_tokens == 3
    assert GenerateParams.parse(min_tokens=2, min_new_tokens=None).min_new_tokens == 2
    # Engine options keep None apart: an engine's seed=None is no seed to pick silently
    with pytest.raises(mii.InvalidRequestError):
        EngineConfig.parse(model="m", seed=None)


def test_a_stop_of_the_wrong_type_says_what_it_takes():
    """It said "Input should be a valid tuple": nobody passes a tuple (a trial)."""
    for wrong in (5, {"a": 1}, 1.5):
        with pytest.raises(InvalidRequestError, match="must be a string or a list of strings"):
            GenerateParams.parse(stop=wrong)

"""No malformed request gets a 500 (issue 14, items 6 and 11).

One deployment with the REST API takes a sweep of malformed requests: wrong JSON
types for every field, missing fields, bodies that are not JSON or not UTF-8,
huge integers, NaN and Infinity, nested garbage, wrong content types, bodies
over the size limit; raw gRPC messages that are not valid protobuf; and bad
arguments to the Python client. Each gets a 4xx naming the field (where there
is one), INVALID_ARGUMENT, or InvalidRequestError; afterwards the deployment
still serves. Bodies over ``max_request_bytes`` are refused with 413 without
being read (the process does not grow by the body's size), and a request body
between grpc's 4 MiB default and the limit reaches the replica.
"""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from pathlib import Path
from types import SimpleNamespace

import grpc
import httpx
import pytest

import mii
from helpers import replica_token
from mii.errors import InvalidRequestError
from mii.rpc import auth, mii_pb2, registry
from mii.rpc.deployment import free_port
from mii.rpc.deployment_config import DEFAULT_MAX_REQUEST_BYTES

BIG = 2**70
OK_OPTIONS = {"max_new_tokens": 2}
JSON = {"content-type": "application/json"}

INTS = ["max_length", "min_new_tokens", "max_new_tokens", "top_k", "seed"]
FLOATS = ["top_p", "temperature"]
BOOLS = ["ignore_eos", "do_sample", "return_full_text"]
BAD_INTS = ["abc", BIG, -5, [1], {"a": 1}, 1.5]
BAD_FLOATS = ["abc", [1], {"a": 1}, -1, "NaN-literal", "Infinity-literal"]
BAD_BOOLS = ["abc", [1], {"a": 1}, 5, BIG]
BAD_STOPS = [5, [5], {"a": 1}, [["a"]], BIG, ["\ud800"], ["x"] * 17]
BAD_PROMPTS = [
    *[None, 5, [], [-5], [None], {"a": 1}, True, [["a"]], "a\ud800", BIG, ["a"] * 1025],
    *[[BIG], [[]], [1.5], [True], ["a", [5]]],  # [5] is a token-id prompt
]


@pytest.fixture(scope="module")
def served(checkpoints, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MII_CACHE_DIR", str(tmp_path_factory.mktemp("mii-cache")))
        name = f"malformed-{uuid.uuid4().hex[:8]}"
        rest_port = free_port()
        client = mii.serve(
            str(checkpoints("llama")[0]),
            deployment_name=name,
            port=free_port(),
            enable_restful_api=True,
            restful_api_port=rest_port,
        )
        info = registry.lookup(name)
        http = httpx.Client(base_url=f"http://127.0.0.1:{rest_port}", timeout=60)
        try:
            yield SimpleNamespace(client=client, info=info, http=http, name=name)
        finally:
            http.close()
            client.terminate_server()


def _encode(body) -> bytes:
    """JSON with NaN / Infinity literals where the placeholders ask for them."""
    text = json.dumps(body)
    return text.replace('"NaN-literal"', "NaN").replace('"Infinity-literal"', "Infinity").encode()


def _rest_cases(name: str) -> list[tuple[str, bytes, dict, str | None]]:
    """(path, body, headers, the field the error must name or None)."""
    mii_url, comp, chat = f"/mii/{name}", "/v1/completions", "/v1/chat/completions"
    ok_comp = {"prompt": "hi", "max_tokens": 2}
    ok_chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = []
    for field, values in [
        *[(f, BAD_INTS) for f in INTS],
        *[(f, BAD_FLOATS) for f in FLOATS],
        *[(f, BAD_BOOLS) for f in BOOLS],
        ("stop", BAD_STOPS),
        ("repetition_penalty", BAD_FLOATS),
        ("min_p", [*BAD_FLOATS, 1.5]),
        ("presence_penalty", ["abc", [1], {"a": 1}, 3, "NaN-literal"]),
        ("logit_bias", ["a", {"a": 1}, {"1": 101}, {"-1": 1}, {str(BIG): 1}, {"1": True}]),
        ("stop_token_ids", ["a", [-1], ["a"], [BIG], [True]]),
        ("skip_special_tokens", BAD_BOOLS),
    ]:
        for value in values:
            body = {"prompts": "hi", **OK_OPTIONS, field: value}
            cases.append((mii_url, _encode(body), JSON, field.split(".")[0]))
    for value in BAD_PROMPTS:
        want = "prompt" if value == "a\ud800" else "prompts"
        cases.append((mii_url, _encode({"prompts": value, **OK_OPTIONS}), JSON, want))
    openai_fields = {
        "max_tokens": ["a", -1, BIG, 1.5],
        "temperature": ["a", -1, [1], "NaN-literal"],
        "top_p": ["a", 2, "NaN-literal", "Infinity-literal"],
        "n": [0, -1, "a", BIG, 1025],  # (1,025: past the 1,024 choices of a request)
        "stop": [5, [5], [["a"]], ["y"] * 17],
        "seed": ["a", [1]],  # any integer is a seed (hashed per choice)
        "stream": ["a", 5, [1]],
        "stream_options": ["a", 5],
        "presence_penalty": ["a", 3, "NaN-literal"],
        "frequency_penalty": ["a", -3],
        "repetition_penalty": ["a", 0, -1, "Infinity-literal"],
        "min_p": ["a", 2, -1],
        "logit_bias": [
            "a",
            {"a": "b"},
            {"a": 1},
            {"1": 101},
            {"-1": 1},
            {str(BIG): 1},
            {"1_0": 1},
            {" 28": 1},
            {"٣": 1},
        ],
        "stop_token_ids": ["a", [-1], ["a"], [BIG]],
        "skip_special_tokens": ["a", [1]],
        "user": [5],
        "ignore_eos": ["a"],
        "top_k": ["a", BIG],
        "min_tokens": ["a", -1, BIG],
        "model": [5, [1]],
    }
    for field, values in openai_fields.items():
        for value in values:
            cases.append((comp, _encode({**ok_comp, field: value}), JSON, field))
            cases.append((chat, _encode({**ok_chat, field: value}), JSON, field))
    for value in [5, [], [-5], None, {"a": 1}, "a\ud800", [[]], [BIG], ["a", [5]]]:
        cases.append((comp, _encode({**ok_comp, "prompt": value}), JSON, "prompt"))
    for field, value in [("echo", "a"), ("logprobs", "a"), ("best_of", "a"), ("suffix", 5)]:
        cases.append((comp, _encode({**ok_comp, field: value}), JSON, field))
    for messages, want in [
        ("a", "messages"),
        ([], "messages"),
        ([5], "messages.0"),
        ([{"role": 5}], "messages.0.role"),
        ([{"content": "x"}], "messages.0.role"),
        ([{"role": "user", "content": 5}], "messages.0.content"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "messages.0.content"),
        ([{"role": "user", "content": [5]}], "messages.0.content"),
        # a user's or a tool's message without content reached the template as None
        ([{"role": "user"}], "messages.0.content"),
        ([{"role": "user", "content": []}], "messages.0.content"),  # an empty turn (a trial)
        (
            [{"role": "user", "content": "x"}, {"role": "tool", "content": None}],
            "messages.1.content",
        ),
        ([{"role": "user", "content": "a\ud800"}], "messages"),
    ]:
        cases.append((chat, _encode({**ok_chat, "messages": messages}), JSON, want))
    for field, value in [
        ("max_completion_tokens", -1),
        ("max_completion_tokens", 0),  # an empty answer: 400, as OpenAI and vLLM say
        ("max_tokens", 0),
        ("max_completion_tokens", BIG),
        ("response_format", "a"),
        ("tools", "a"),
        ("tools", [5]),
        ("tool_choice", 5),
        ("chat_template_kwargs", "a"),
        ("chat_template_kwargs", {"tokenize": False}),
        ("add_generation_prompt", "a"),
        ("continue_final_message", "a"),
    ]:
        cases.append((chat, _encode({**ok_chat, field: value}), JSON, field))
    cases.append((chat, _encode({"max_tokens": 2}), JSON, "messages"))
    # Streamed requests are checked before the first event.
    for field, value in [("top_p", 2), ("max_tokens", -1), ("n", 0), ("stop", [5])]:
        cases.append((comp, _encode({**ok_comp, "stream": True, field: value}), JSON, field))
        cases.append((chat, _encode({**ok_chat, "stream": True, field: value}), JSON, field))
    # Bodies that are not a JSON object of the route's fields.
    for path in (mii_url, comp, chat):
        for raw, headers in [
            (b"{oops", JSON),
            (b"[]", JSON),
            (b'"text"', JSON),
            (b"null", JSON),
            (b"", JSON),
            (b'{"prompts": "\xff\xfe", "prompt": "\xff", "messages": "\xff"}', JSON),
            (b"[" * 100_000 + b"]" * 100_000, JSON),  # deeper than any parser recurses
            (b'{"prompts": "hi", "prompt": "hi"}', {"content-type": "text/plain"}),
            (b"\x00\x01\x02", {"content-type": "application/octet-stream"}),
            (b'{"max_tokens": 1e999, "max_new_tokens": 1e999}', JSON),
        ]:
            cases.append((path, raw, headers, None))
    return cases


def _named_field(path: str, response: httpx.Response) -> str | None:
    error = response.json()["error"]
    assert error["message"], response.text
    return error["param"] if path.startswith("/v1/") else error["field"]


def test_malformed_rest_requests_get_4xx_naming_the_field(served):
    cases = _rest_cases(served.name)
    assert len(cases) > 200
    failures = []
    for path, body, headers, want in cases:
        response = served.http.post(path, content=body, headers=headers)
        if not 400 <= response.status_code < 500:
            failures.append((path, body[:80], response.status_code, response.text[:200]))
            continue
        if want is not None:
            field = _named_field(path, response)
            if not (field or "").startswith(want):
                failures.append((path, body[:80], field, response.text[:200]))
    for method in ("GET", "PUT", "DELETE", "PATCH"):
        for path in (f"/mii/{served.name}", "/v1/completions", "/v1/chat/completions"):
            response = served.http.request(method, path, content=b"{}", headers=JSON)
            if not 400 <= response.status_code < 500:
                failures.append((method, path, response.status_code, response.text[:200]))
    assert not failures, "\n".join(map(repr, failures))
    assert still_serves(served)


def test_bodies_over_the_limit_get_413(served):
    over = b'{"prompts": "' + b"a" * DEFAULT_MAX_REQUEST_BYTES + b'"}'
    for path in (f"/mii/{served.name}", "/v1/completions", "/v1/chat/completions"):
        response = served.http.post(path, content=over, headers=JSON)
        assert response.status_code == 413, response.text
        assert "max_request_bytes" in response.json()["error"]["message"]

    # A client that sends the whole body before it reads (httpx's async one, under the
    # openai SDK's AsyncOpenAI) got a reset connection (httpx.ReadError), not the 413.
    async def async_post():
        async with httpx.AsyncClient(base_url=served.http.base_url, timeout=60) as client:
            return await client.post("/v1/completions", content=over, headers=JSON)

    response = asyncio.run(async_post())
    assert response.status_code == 413 and "max_request_bytes" in response.text
    # ... but a client that waits for "100 Continue" is refused before it sends a byte
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        f"expect: 100-continue\r\ncontent-length: {len(over)}\r\n\r\n"
    ).encode()
    answer = _raw_post(int(served.http.base_url.port), head)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # Between grpc's 4 MiB default and the limit: the replica gets it and refuses the
    # prompt as too long (400), nothing in between fails.
    six_mib = "a" * (6 << 20)
    response = served.http.post(f"/mii/{served.name}", json={"prompts": six_mib, **OK_OPTIONS})
    assert response.status_code == 400 and response.json()["error"]["field"] == "prompts"
    with pytest.raises(InvalidRequestError) as err:
        served.client.generate(six_mib, max_new_tokens=2)
    assert err.value.field == "prompt" and err.value.code == "context_length_exceeded"
    # ... and OpenAI's code for it on the OpenAI routes (it was null), whether the
    # gateway (by characters) or the engine (by tokens) refuses it
    for prompt in (six_mib, "word " * 300):
        response = served.http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
        assert response.json()["error"]["code"] == "context_length_exceeded", response.text
    # A gRPC message over the limit: grpc's own RESOURCE_EXHAUSTED, read no further.
    request = mii_pb2.GenerateRequest(prompts=["a" * (DEFAULT_MAX_REQUEST_BYTES + 1)])
    with (
        grpc.insecure_channel(served.client.address) as channel,
        pytest.raises(grpc.RpcError) as err,
    ):
        channel.unary_unary("/mii.Mii/Generate")(request.SerializeToString(), timeout=60)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The client raises InvalidRequestError for it, naming prompts.
    with pytest.raises(InvalidRequestError) as err:
        served.client.generate("a" * (DEFAULT_MAX_REQUEST_BYTES + 1), max_new_tokens=2)
    assert err.value.field == "prompts" and "max_request_bytes" in str(err.value)


def still_serves(served) -> bool:
    """The deployment answers a good request whole (EOS ignored: sampled, it could
    come first)."""
    [answer] = served.client.generate("DeepSpeed is", max_new_tokens=2, ignore_eos=True)
    return answer.generated_length == 2


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _raw_post(port: int, head: bytes, body_chunks=()) -> bytes:
    """Send ``head`` and as many body chunks as the server takes; return what it answers
    (b"" if it closed without an answer we could read)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        try:
            for chunk in body_chunks:
                sock.sendall(chunk)
        except OSError:  # the server stopped reading and closed: what we want
            pass
        try:
            sock.shutdown(socket.SHUT_WR)
            return sock.recv(1 << 16)
        except OSError:
            return b""


def test_huge_body_is_refused_without_being_read(served):
    port = int(served.http.base_url.port)
    pid = served.info["pid"]
    before = _rss_kib(pid)
    size = 100 * 1024 * 1024
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "content-type: application/json\r\n"
        f"content-length: {size}\r\n\r\n"
    ).encode()
    answer = _raw_post(port, head)  # refused from its Content-Length alone
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # Chunked: the gateway stops reading at the limit and closes the connection.
    head = (
        f"POST /mii/{served.name} HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        "transfer-encoding: chunked\r\n\r\n"
    ).encode()
    chunk = b"%x\r\n" % (1 << 20) + b"a" * (1 << 20) + b"\r\n"
    sent = []

    def chunks():
        for _ in range(100):
            sent.append(1)
            yield chunk

    answer = _raw_post(port, head, chunks())
    assert answer == b"" or answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert len(sent) < 100, "the gateway read the whole 100 MB body"
    grown_mib = (_rss_kib(pid) - before) / 1024
    assert grown_mib < 40, f"the deployment grew by {grown_mib:.0f} MiB"
    assert still_serves(served)


def _replica_port(pid: int) -> int:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return json.loads(argv[argv.index(b"mii.rpc.replica") + 1])["port"]


# Not a message of any type (the empty request types skip unknown fields, so only
# broken framing counts for them).
MALFORMED = [
    b"\xff",
    b"\x08",  # a varint cut short
    b"\x0a\xff\xff\xff\xff\x0f",  # a length far past the end
    b"\x12\x05\x08",  # a field cut short
]
NOT_UTF8 = b"\x0a\x02\xc3\x28"  # GenerateRequest.prompts[0] is not UTF-8


def test_malformed_grpc_messages_get_invalid_argument(served):
    # (address, the secret its port requires): the balancer has no api_key here
    addresses = [(f"127.0.0.1:{served.client.address.rsplit(':', 1)[1]}", None)]
    addresses += [
        (f"127.0.0.1:{_replica_port(pid)}", replica_token(pid))
        for pid in served.info["replica_pids"]
    ]
    for address, secret in addresses:
        # a replica's port takes proofs of its token (the balancer's: nothing here)
        with auth.channel(address, secret, proof=secret is not None) as channel:
            for method in ("Generate", "ModelInfo", "Stats", "Terminate"):
                call = channel.unary_unary(f"/mii.Mii/{method}")
                for data in MALFORMED + ([NOT_UTF8] if method == "Generate" else []):
                    with pytest.raises(grpc.RpcError) as err:
                        call(data, timeout=30)
                    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (address, data)
                    assert "not a valid mii." in err.value.details()
            stream = channel.unary_stream("/mii.Mii/GenerateStream")
            for data in [*MALFORMED, NOT_UTF8]:
                with pytest.raises(grpc.RpcError) as err:
                    list(stream(data, timeout=30))
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (address, data)
    # Well-formed but no prompts, or options out of range. (An empty prompt is one
    # BOS token for this tokenizer: a valid request.)
    with grpc.insecure_channel(addresses[0][0]) as channel:
        generate = channel.unary_unary(
            "/mii.Mii/Generate",
            request_serializer=mii_pb2.GenerateRequest.SerializeToString,
            response_deserializer=mii_pb2.GenerateReply.FromString,
        )
        stream = channel.unary_stream(
            "/mii.Mii/GenerateStream",
            request_serializer=mii_pb2.GenerateRequest.SerializeToString,
            response_deserializer=mii_pb2.Piece.FromString,
        )
        nan = mii_pb2.GenerationOptions(temperature=float("nan"), max_new_tokens=2)
        for request in [
            mii_pb2.GenerateRequest(),
            mii_pb2.GenerateRequest(prompts=["hi"] * 1025),
            mii_pb2.GenerateRequest(prompts=["hi"], options=nan),
            mii_pb2.GenerateRequest(prompts=["hi"], options=mii_pb2.GenerationOptions(top_p=2)),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                generate(request, timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
            with pytest.raises(grpc.RpcError) as err:
                list(stream(request, timeout=30))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
    assert still_serves(served)


CLIENT_CASES = [
    ((None,), {}, "prompts"),
    ((5,), {}, "prompts"),
    ((b"hi",), {}, "prompts"),
    (([1, -2],), {}, "prompts"),  # [1, 2] is a token-id prompt
    (([[]],), {}, "prompts"),
    ((["a", [1]],), {}, "prompts"),
    (([None],), {}, "prompts"),
    (([],), {}, "prompts"),
    ((["a"] * 1025,), {}, "prompts"),
    (("a\ud800",), {}, "prompt"),
    (("hi",), {"stop": 5}, "stop"),
    (("hi",), {"stop": ["\ud800"]}, "stop"),
    (("hi",), {"stop": "\ud800"}, "stop"),
    (("hi",), {"max_new_tokens": "abc"}, "max_new_tokens"),
    (("hi",), {"max_new_tokens": BIG}, "max_new_tokens"),
    (("hi",), {"temperature": [1]}, "temperature"),
    (("hi",), {"top_p": float("nan")}, "top_p"),
    (("hi",), {"do_sample": "maybe"}, "do_sample"),
    (("hi",), {"bogus": 1}, "bogus"),
]


def test_python_client_raises_invalid_request_error(served):
    for args, kwargs, field in CLIENT_CASES:
        for call in _client_calls(served.client):
            with pytest.raises(InvalidRequestError) as err:
                call(*args, **kwargs)
            assert (err.value.field or "").startswith(field), (args, kwargs, err.value)
    assert still_serves(served)


def _client_calls(client):
    """The client's four ways to generate, each run to its end."""

    async def astream(*args, **kwargs):
        return [piece async for piece in client.astream(*args, **kwargs)]

    return [
        client.generate,
        lambda *args, **kwargs: list(client.stream(*args, **kwargs)),
        lambda *args, **kwargs: asyncio.run(client.agenerate(*args, **kwargs)),
        lambda *args, **kwargs: asyncio.run(astream(*args, **kwargs)),
    ]


def test_deployment_serves_after_the_sweep(served):
    response = served.http.post(
        f"/mii/{served.name}", json={"prompts": "DeepSpeed is", **OK_OPTIONS}
    )
    assert response.status_code == 200, response.text
    assert still_serves(served)
    assert all(registry.pid_alive(p) for p in [served.info["pid"], *served.info["replica_pids"]])

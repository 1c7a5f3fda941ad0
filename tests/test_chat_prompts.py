"""Chat prompts exact (issue 15, item 3): the chat route sends the engine exactly
the ids of ``apply_chat_template(messages, add_generation_prompt=True, tokenize=True)``,
token-id prompts pass through the load balancer, ``return_full_text`` decodes a
token-id prompt without its special tokens, and a stop string that begins before
``min_new_tokens`` and ends after it stops generation.

Tokenizers in the styles of real chat models are built locally (chat_tokenizers);
one deployment (one replica) serves a tiny Llama whose tokenizer adds BOS and
whose ChatML template has none. Sampled answers of a Llama-2-style byte-fallback
tokenizer decode as the tokenizer does.
"""

from __future__ import annotations

import grpc
import pytest

import mii
from chat_tokenizers import (
    CHATML_TEMPLATE,
    LLAMA2_TEMPLATE,
    MISTRAL_TEMPLATE,
    chatml_tokenizer,
    llama3_tokenizer,
    metaspace_tokenizer,
)
from helpers import save_checkpoint, served_deployment, tiny_config
from mii.errors import InvalidRequestError
from mii.rpc import mii_pb2, mii_pb2_grpc
from mii.rpc.convert import options_to_proto, prompts_from_proto, request_for
from mii.rpc.http.chat import chat_prompt_ids

NEW = 8
SYSTEM_TURNS = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "DeepSpeed is"},
]
MULTI_TURN = [
    {"role": "user", "content": "DeepSpeed is"},
    {"role": "assistant", "content": "a library"},
    {"role": "user", "content": "Seattle is"},
]


def template_ids(tok, messages) -> list[int]:
    encoded = tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


def retokenized(tok, messages) -> list[int]:
    """The ids the engine got before: the rendered text less the template's BOS,
    tokenized again with special tokens added (BOS first)."""
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok(text.removeprefix(tok.bos_token)).input_ids


def _styled(style: str):
    if style == "chatml":
        return chatml_tokenizer()
    if style == "llama3":
        return llama3_tokenizer()
    tok = metaspace_tokenizer(add_bos=True)
    tok.chat_template = LLAMA2_TEMPLATE if style == "llama2" else MISTRAL_TEMPLATE
    return tok


@pytest.mark.parametrize("style", ["chatml", "llama2", "mistral", "llama3"])
def test_chat_prompt_ids_equal_apply_chat_template(style):
    tok = _styled(style)
    conversations = [MULTI_TURN] if style == "mistral" else [SYSTEM_TURNS, MULTI_TURN]
    for messages in conversations:
        ids = template_ids(tok, messages)
        assert chat_prompt_ids(tok, messages) == ids
        old = retokenized(tok, messages)
        if style == "chatml":  # (a) the tokenizer's BOS on a template without one
            assert old == [tok.bos_token_id, *ids]
        elif style in ("llama2", "mistral"):  # (b) a "▁" after the template's BOS
            assert ids[0] == tok.bos_token_id
            assert old[:2] == [tok.bos_token_id, tok.convert_tokens_to_ids("▁")]
            assert old[2:] == ids[1:]


def test_chat_prompt_without_template_and_refused_messages(caplog):
    tok = chatml_tokenizer()
    tok.chat_template = None
    tok.name_or_path = "no-template-model"
    messages = [{"role": "user", "content": "hi"}]
    # The fallback text is a text prompt like any other: special tokens added; the
    # first time for a tokenizer, a warning says so and how to give the template.
    with caplog.at_level("WARNING", logger="mii.rpc.http.chat"):
        assert chat_prompt_ids(tok, messages) == tok("user: hi\nassistant:").input_ids
        chat_prompt_ids(tok, messages)
    warned = [r.getMessage() for r in caplog.records if "no chat template" in r.getMessage()]
    assert len(warned) == 1 and "no-template-model" in warned[0] and "chat_template" in warned[0]
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(InvalidRequestError, match="roles must alternate") as err:
        chat_prompt_ids(tok, messages)
    assert err.value.field == "messages"
    # A lone surrogate (JSON allows "\\ud800") is refused before any tokenizer sees it.
    for template in (None, chatml_tokenizer().chat_template):
        tok.chat_template = template
        with pytest.raises(InvalidRequestError, match="not valid Unicode") as err:
            chat_prompt_ids(tok, [{"role": "user", "content": "a\ud800"}])
        assert err.value.field == "messages"


# A template in the style of Qwen's: a system prompt only first, any other role refused.
STRICT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and not loop.first %}"
    "{{ raise_exception('System message must be at the beginning.') }}"
    "{% elif message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unexpected message role.') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_developer_messages_reach_templates_that_do_not_know_the_role():
    """OpenAI's ``developer`` role (newer clients send it for ``system``): a template
    without it gets a system message in its place; where the template refuses that
    (a late system prompt), every system message merged into the first; a template
    naming the role (quoted, not in prose) gets it as sent."""
    tok = chatml_tokenizer()
    tok.chat_template = STRICT_TEMPLATE
    user = {"role": "user", "content": "hi"}
    developer = {"role": "developer", "content": "Be brief."}
    assert chat_prompt_ids(tok, [developer, user]) == template_ids(
        tok, [{"role": "system", "content": "Be brief."}, user]
    )
    both = [developer, user, {"role": "system", "content": "Use French."}]
    assert chat_prompt_ids(tok, both) == template_ids(
        tok, [{"role": "system", "content": "Be brief.\n\nUse French."}, user]
    )
    # Without a developer message nothing is rearranged: the template's error stands.
    with pytest.raises(InvalidRequestError, match="System message must be at the beginning"):
        chat_prompt_ids(tok, [user, {"role": "system", "content": "late"}])
    # A template that takes system messages anywhere keeps the conversation's order;
    # "developer" in its prose is not the role.
    tok.chat_template = "{# for a software developer #}" + CHATML_TEMPLATE
    answer = {"role": "assistant", "content": "hello"}
    late = [user, answer, developer]
    assert chat_prompt_ids(tok, late) == template_ids(
        tok, [user, answer, {"role": "system", "content": "Be brief."}]
    )
    tok.chat_template = CHATML_TEMPLATE.replace("{% for", "{# role 'developer' #}{% for", 1)
    assert chat_prompt_ids(tok, [developer, user]) == template_ids(tok, [developer, user])
    assert "<|im_start|>developer" in tok.decode(chat_prompt_ids(tok, [developer, user]))


def test_token_id_prompts_on_the_wire():
    request = request_for([[1, 2, 3], [4]], {"max_new_tokens": 2})
    assert list(request.prompts) == [] and request.options.max_new_tokens == 2
    assert prompts_from_proto(request) == [[1, 2, 3], [4]]
    texts = request_for(["a", "b"], {})  # what every client sends: unchanged
    assert list(texts.prompts) == ["a", "b"] and not texts.prompt_ids
    assert prompts_from_proto(texts) == ["a", "b"]
    both = mii_pb2.GenerateRequest(prompts=["a"], prompt_ids=[mii_pb2.TokenIds(ids=[1])])
    with pytest.raises(InvalidRequestError, match="not both"):
        prompts_from_proto(both)
    for bad in ([[1, True]], [[1, "2"]], [[2**64]], [[1], "text"]):
        with pytest.raises(InvalidRequestError, match="token"):
            request_for(bad, {})


# ----- one deployment -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return chatml_tokenizer()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("chatml-llama")
    save_checkpoint(path, tiny_config("llama", tok), tok)
    return str(path)


@pytest.fixture(scope="module")
def pipe(model_path):
    with mii.pipeline(model_path, max_num_seqs=4) as p:
        yield p


@pytest.fixture(scope="module")
def served(model_path, tmp_path_factory):
    cache = tmp_path_factory.mktemp("mii-cache")
    with served_deployment(model_path, cache, "chat-prompts", max_num_seqs=4) as deployment:
        yield deployment


def greedy(pipe, prompt, **options) -> mii.Response:
    return pipe([prompt], do_sample=False, **options)[0]


def test_chat_route_sends_the_template_ids(served, pipe, tok):
    oai, model = served.oai, served.model
    ids = template_ids(tok, SYSTEM_TURNS)
    assert retokenized(tok, SYSTEM_TURNS) == [tok.bos_token_id, *ids]  # the old extra BOS
    ref = greedy(pipe, ids, max_new_tokens=NEW)
    assert ref.prompt_length == len(ids)
    chat = oai.chat.completions.create(
        model=model, messages=SYSTEM_TURNS, max_tokens=NEW, temperature=0
    )
    assert chat.usage.prompt_tokens == len(ids)
    assert chat.choices[0].message.content == ref.generated_text
    assert chat.usage.completion_tokens == ref.generated_length
    chunks = list(
        oai.chat.completions.create(
            model=model,
            messages=SYSTEM_TURNS,
            max_tokens=NEW,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == ref.generated_text
    assert chunks[-1].usage.prompt_tokens == len(ids)


def test_token_id_prompts_through_the_balancer(served, pipe, tok):
    client = served.client
    ids = tok("DeepSpeed is").input_ids
    assert ids[0] == tok.bos_token_id
    ref = greedy(pipe, ids, max_new_tokens=NEW)
    options = options_to_proto({"do_sample": False, "max_new_tokens": NEW})
    request = mii_pb2.GenerateRequest(prompt_ids=[mii_pb2.TokenIds(ids=ids)], options=options)
    with grpc.insecure_channel(client.address) as channel:
        stub = mii_pb2_grpc.MiiStub(channel)
        [whole] = stub.Generate(request, timeout=60).responses
        assert (whole.generated_text, whole.prompt_length) == (ref.generated_text, len(ids))
        pieces = list(stub.GenerateStream(request, timeout=60))
        assert "".join(p.generated_text for p in pieces) == ref.generated_text
        assert [t for p in pieces for t in p.token_ids] == ref.token_ids
        both = mii_pb2.GenerateRequest(prompts=["x"], prompt_ids=request.prompt_ids)
        for call in (
            stub.Generate,
            lambda r, timeout: list(stub.GenerateStream(r, timeout=timeout)),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call(both, timeout=60)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not both" in err.value.details()
    # Old clients (text prompts) are served as before.
    [text] = client.generate("DeepSpeed is", do_sample=False, max_new_tokens=NEW)
    assert text.generated_text == ref.generated_text


def test_return_full_text_with_token_id_prompts(served, pipe, tok):
    client = served.client
    ids = tok("DeepSpeed is").input_ids  # begins with BOS "<s>"
    plain = greedy(pipe, ids, max_new_tokens=NEW)
    full = greedy(pipe, ids, max_new_tokens=NEW, return_full_text=True)
    # Decoded as the answer is: special tokens skipped.
    assert full.generated_text == "DeepSpeed is" + plain.generated_text
    options = options_to_proto(
        {"do_sample": False, "max_new_tokens": NEW, "return_full_text": True}
    )
    request = mii_pb2.GenerateRequest(prompt_ids=[mii_pb2.TokenIds(ids=ids)], options=options)
    with grpc.insecure_channel(client.address) as channel:
        [whole] = mii_pb2_grpc.MiiStub(channel).Generate(request, timeout=60).responses
    assert whole.generated_text == full.generated_text


def test_stop_string_straddling_min_new_tokens(served, pipe):
    client = served.client
    prompt = "Seattle is"
    free = list(client.stream(prompt, do_sample=False, max_new_tokens=16, ignore_eos=True))
    texts = [""]  # the answer's text after k tokens
    for piece in free:
        texts.append(texts[-1] + piece.generated_text)
    full = texts[-1]
    assert len(free) == 16
    # A two-character stop string: its first character comes with token m - 1 (before
    # min_new_tokens=m), its second with token m (where stop strings are looked for).
    for m in range(2, 16):
        cut = len(texts[m - 1])
        stop = full[cut - 1 : cut + 1]
        if cut and len(texts[m]) > cut and stop.isprintable() and full.find(stop) == cut - 1:
            break
    else:
        pytest.fail(f"no token boundary in {full!r} suits a two-character stop string")
    options = dict(max_new_tokens=16, ignore_eos=True, min_new_tokens=m)
    stopped = greedy(pipe, prompt, stop=stop, **options)
    assert (stopped.generated_text, stopped.finish_reason) == (full[: cut - 1], "stop")
    assert stopped.generated_length == m
    pieces = list(client.stream(prompt, stop=[stop], do_sample=False, **options))
    assert "".join(p.generated_text for p in pieces) == stopped.generated_text
    assert pieces[-1].finish_reason == "stop"


def test_sampled_byte_fallback_text_equals_decode(tmp_path):
    # A Llama-2-style byte-fallback tokenizer and hot sampling: random byte tokens,
    # invalid UTF-8 runs in every answer. Each answer's text is the tokenizer's
    # decode of its ids; only a first "▁word" keeps its space (as in context).
    tok = metaspace_tokenizer(add_bos=True)
    save_checkpoint(tmp_path, tiny_config("llama", tok, pad_token_id=None), tok)
    prompts = ["crab: " + "é€😀"[i % 3] for i in range(24)]
    with mii.pipeline(str(tmp_path), max_num_seqs=8) as byte_pipe:
        responses = byte_pipe(
            prompts, max_new_tokens=24, temperature=3.0, top_p=1.0, seed=7, ignore_eos=True
        )
    invalid = 0
    for r in responses:
        expected = tok.decode(r.token_ids, skip_special_tokens=True)
        invalid += "\ufffd" in expected
        first = next(t for t in tok.convert_ids_to_tokens(r.token_ids) if t not in ("<s>", "</s>"))
        lead = " " if first.startswith("▁") else ""
        assert r.generated_text == lead + expected, r.token_ids
    assert invalid >= len(prompts) // 2


def test_a_long_conversation_cut_to_its_last_characters_keeps_its_last_tokens():
    """keep_last_chars (truncate_prompt_tokens on the chat route): only the rendered
    prompt's last characters are tokenized, and the ids they give end as the whole
    conversation's ids do; with or without a template."""
    tok = chatml_tokenizer()
    words = " ".join(f"word{i} and more" for i in range(400))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": words}]
    for template in (tok.chat_template, None):
        tok.chat_template = template
        whole = chat_prompt_ids(tok, messages)
        cut = chat_prompt_ids(tok, messages, keep_last_chars=1000)
        assert len(cut) < len(whole) and cut[-100:] == whole[-100:]
        assert chat_prompt_ids(tok, messages, keep_last_chars=10**6) == whole

"""Chat messages to a prompt, as token ids.

With a chat template the prompt is exactly the ids of
``tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)``,
and the engine takes them as they are. Rendering the template to text and
letting the engine tokenize that text again would not give them: the engine
adds the tokenizer's special tokens (a second BOS after a template's own, or a
BOS that a ChatML template has none of), and a SentencePiece-style tokenizer
(Metaspace, ``prepend_scheme="first"``) puts a ``▁`` before the text that
follows the template's BOS.

When the tokenizer has no chat template, the fallback renders each message as
``"{role}: {content}\\n"``, ends with ``"assistant:"``, and tokenizes that text
as any text prompt (special tokens added). Only text content is accepted.

vLLM's request options shape the template's output (``template_options``):
``add_generation_prompt`` (default true), ``continue_final_message`` (the
answer continues the last message, which stays open; only without a generation
prompt) and ``chat_template_kwargs`` (more template variables, such as
``enable_thinking``). The fallback honours the first two.

A request's ``tools`` go to the template as ``apply_chat_template(..., tools=...)``
(the fallback puts them first, as a ``"tools: [...]"`` line). Assistant messages
with ``tool_calls`` and ``tool`` messages (results) go to it as they came, except
that a call's ``function.arguments``, JSON text in OpenAI's API, is given as the
object it encodes: the templates of tool-calling models (Qwen2.5, Hermes, Llama
3.1) write ``arguments | tojson``, which would quote the text again (vLLM does
the same).

OpenAI's ``developer`` role (what its newer clients, Codex CLI among them, send
instead of ``system``) reaches a template that names it as it is; a template that
does not (most open models': some refuse any role they do not know) gets it as
``system`` in its place, and, only if the template refuses that, every system
message merged into one first message, the one place strict templates take a
system prompt (as vLLM does).
"""

from __future__ import annotations

import inspect
import json
import logging
from typing import Any

from mii.errors import InvalidRequestError
from mii.rpc.http.errors import ApiError
from mii.rpc.http.protocol import ChatMessage, ContentPart

log = logging.getLogger(__name__)


def chat_prompt(tokenizer, messages: list[ChatMessage], **template: Any) -> list[int]:
    """The prompt's token ids for a chat request's ``messages`` (their content as plain
    text); ``template``: the options of :func:`chat_prompt_ids`."""
    return chat_prompt_ids(tokenizer, chat_items(messages), **template)


def content_chars(messages: list[ChatMessage]) -> int:
    """Characters of the messages' text (their content, strings or text parts)."""
    total = 0
    for message in messages:
        if isinstance(message.content, str):
            total += len(message.content)
        elif message.content:
            total += sum(len(part.text or "") for part in message.content)
    return total


def generation_prompt(add_generation_prompt: bool | None, continue_final_message: bool) -> bool:
    """Whether the template adds the assistant's turn: as asked, or when unset the
    opposite of ``continue_final_message`` (vLLM's default). Both true raises
    InvalidRequestError naming ``continue_final_message``."""
    if add_generation_prompt is None:
        add_generation_prompt = not continue_final_message
    if add_generation_prompt and continue_final_message:
        raise InvalidRequestError(
            "continue_final_message and add_generation_prompt cannot both be true "
            "(set add_generation_prompt to false to continue the final message)",
            field="continue_final_message",
        )
    return add_generation_prompt


def template_options(
    add_generation_prompt: bool | None,
    continue_final_message: bool,
    chat_template_kwargs: dict[str, Any] | None,
) -> dict[str, Any]:
    """The keyword options of :func:`chat_prompt_ids` for a request's fields (see
    :func:`generation_prompt`); both true is a 400 naming ``continue_final_message``."""
    try:
        add_generation_prompt = generation_prompt(add_generation_prompt, continue_final_message)
    except InvalidRequestError as err:
        raise ApiError(400, str(err), err.field) from None
    return {
        "add_generation_prompt": add_generation_prompt,
        "continue_final_message": continue_final_message,
        "chat_template_kwargs": chat_template_kwargs,
    }


def chat_items(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """``messages`` as the dicts a chat template reads (content as plain text)."""
    items = []
    for i, message in enumerate(messages):
        item = message.model_dump(exclude_none=True)
        item["content"] = _text_content(message.content, i)
        if isinstance(item.get("tool_calls"), list):
            item["tool_calls"] = [_with_decoded_arguments(c) for c in item["tool_calls"]]
        items.append(item)
    return items


def conversation_items(messages: Any) -> list[list[dict[str, Any]]]:
    """The Python API's chat input (one conversation, a list of message dicts, or a
    list of conversations) as template-ready conversations; a malformed one is
    InvalidRequestError naming ``messages`` (and where in them)."""
    from pydantic import TypeAdapter, ValidationError

    from mii.rpc.http.protocol import ChatMessage

    if isinstance(messages, (list, tuple)) and messages and isinstance(messages[0], dict):
        messages = [messages]  # one conversation
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidRequestError(
            "messages must be a conversation (a non-empty list of {'role', 'content'} "
            "dicts) or a non-empty list of conversations",
            field="messages",
        )
    conversations = []
    for c, conversation in enumerate(messages):
        where = f"messages.{c}" if len(messages) > 1 else "messages"
        if not isinstance(conversation, (list, tuple)) or not conversation:
            raise InvalidRequestError(
                f"{where} must be a non-empty list of {{'role', 'content'}} dicts",
                field=where,
            )
        _refuse_misspelt_keys(conversation, where)
        try:
            parsed = TypeAdapter(list[ChatMessage]).validate_python(conversation)
        except ValidationError as err:
            first = err.errors()[0]  # its loc: the message's index, then its field
            at = ".".join(str(part) for part in (where, *first["loc"]))
            raise InvalidRequestError(f"{at}: {first['msg']}", field=at) from None
        try:
            conversations.append(chat_items(parsed))
        except ApiError as err:  # a content part it cannot read (named within one conversation)
            raise InvalidRequestError(err.message, field=where) from None
    return conversations


def _refuse_misspelt_keys(conversation: Any, where: str) -> None:
    """InvalidRequestError for a message key that is a near miss of a message field
    the message lacks (``{"role": "user", "contnet": "hi"}`` was an empty user turn:
    other keys go to the template as they are, and a message that has the field may
    carry a key of its template's beside it, such as ``context``)."""
    import difflib

    from mii.rpc.http.protocol import ChatMessage

    fields = ChatMessage.model_fields
    for index, message in enumerate(conversation):
        keys = message if isinstance(message, dict) else {}
        missing = [field for field in fields if field not in keys]
        for key in keys:
            if key in fields:  # (tool_calls is a near miss of tool_call_id, and both are fields)
                continue
            near = difflib.get_close_matches(str(key), missing, 1, 0.8)
            if near:
                raise InvalidRequestError(
                    f"{where}.{index}: unknown key {key!r} (did you mean {near[0]!r}?)",
                    field=f"{where}.{index}.{key}",
                )


def _with_decoded_arguments(call: Any) -> Any:
    """A tool call whose ``function.arguments`` JSON text is replaced by the object
    it encodes (text that is not a JSON object stays text)."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except ValueError:
        return call
    if not isinstance(arguments, dict):
        return call
    return {**call, "function": {**function, "arguments": arguments}}


def chat_prompt_ids(
    tokenizer,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    chat_template_kwargs: dict[str, Any] | None = None,
    tools: list[dict[str, Any]] | None = None,
    keep_last_chars: int | None = None,
) -> list[int]:
    """The prompt's token ids for ``messages``: those of the tokenizer's chat
    template (``apply_chat_template(..., add_generation_prompt=True, tokenize=True)``),
    or of the fallback text ``"{role}: {content}\\n" ... "assistant:"``.

    ``add_generation_prompt``, ``continue_final_message`` and ``chat_template_kwargs``
    (extra template variables) are passed to the template; without one, the first
    ends the text with ``"assistant:"`` and the second leaves off the last ``"\\n"``.
    ``tools`` (OpenAI tool definitions) go to the template as its ``tools``.

    ``keep_last_chars``: only the prompt's last tokens are wanted (truncate_prompt_tokens),
    and a prompt text longer than this is cut to its last ``keep_last_chars``
    characters before it is tokenized (mii.prompts.max_prompt_chars: they hold more
    tokens than truncation keeps), so a huge conversation costs no more to read
    than one that fits."""
    check_messages(messages)
    variables = template_variables(tokenizer, chat_template_kwargs)  # checked either way
    if not getattr(tokenizer, "chat_template", None):
        _warn_no_template(tokenizer)
        text = "".join(f"{m['role']}: {m.get('content') or ''}\n" for m in messages)
        if tools:
            text = f"tools: {json.dumps(tools, ensure_ascii=False)}\n{text}"
        if continue_final_message:
            text = text.removesuffix("\n")
        if add_generation_prompt:
            text += "assistant:"
        if keep_last_chars is not None:
            text = text[-keep_last_chars:]
        return list(tokenizer(text).input_ids)
    options = dict(
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        tokenize=True,
        # return_dict: the same answer on transformers 4 (ids by default) and 5
        # (a BatchEncoding by default).
        return_dict=True,
        **({"tools": tools} if tools else {}),
        **variables,
    )
    if keep_last_chars is not None:  # the template's text, its end tokenized as
        options.update(tokenize=False, return_dict=False)  # apply_chat_template does
    mapped = developer_as_system(tokenizer.chat_template, messages)
    try:
        encoded = apply_template(tokenizer, mapped, **options)
    except InvalidRequestError:
        merged = merged_system(mapped)
        if mapped is messages or merged == mapped:
            raise
        encoded = apply_template(tokenizer, merged, **options)
    if keep_last_chars is not None:
        return list(tokenizer(encoded[-keep_last_chars:], add_special_tokens=False).input_ids)
    return list(encoded["input_ids"])


_warned_no_template: set[str] = set()  # tokenizers (by name) warned of already


def _warn_no_template(tokenizer) -> None:
    """Once per tokenizer: chat falls back to plain text (vLLM refuses instead). A
    base model without a template answers such text poorly, and nothing else says so."""
    name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    if name not in _warned_no_template:
        _warned_no_template.add(name)
        log.warning(
            "the tokenizer of %s has no chat template: chat messages are sent as plain "
            "'role: content' lines ending with 'assistant:'; give the model's template "
            "for its real format: mii.serve(chat_template=...) / mii serve --chat-template, "
            "or set the tokenizer's chat_template (pipe.tokenizer.chat_template = ...)",
            name,
        )


def apply_template(tokenizer, messages: list[dict[str, Any]], **options: Any) -> Any:
    """``tokenizer.apply_chat_template(messages, **options)``; a conversation the
    template refuses is InvalidRequestError naming ``messages``."""
    try:
        return tokenizer.apply_chat_template(messages, **options)
    except Exception as err:  # jinja raises for conversations the template refuses
        raise InvalidRequestError(
            f"the model's chat template rejected the messages: {err}", field="messages"
        ) from None


def template_variables(tokenizer, variables: dict[str, Any] | None) -> dict[str, Any]:
    """``variables`` (chat_template_kwargs) as keyword arguments of apply_chat_template;
    InvalidRequestError naming ``chat_template_kwargs`` for a name of its own options
    (it would not reach the template, and ``tokenize=False`` would break the answer)."""
    variables = variables or {}
    if not isinstance(variables, dict) or not all(isinstance(k, str) for k in variables):
        raise InvalidRequestError(  # (the Python API's; the HTTP body's is typed)
            "chat_template_kwargs must be a dict of template variables by name "
            f"(got {variables!r:.80})",
            field="chat_template_kwargs",
        )
    own = inspect.signature(tokenizer.apply_chat_template).parameters
    for name in variables:
        if name in own or name == "messages":
            raise InvalidRequestError(
                f"chat_template_kwargs may not set {name!r} (an option of its own)",
                field="chat_template_kwargs",
            )
    return variables


def check_messages(messages: list[dict[str, Any]]) -> None:
    """InvalidRequestError naming ``messages`` for a text that is not valid Unicode
    (JSON lets a lone surrogate, ``"\\ud800"``, through; tokenizers refuse it)."""
    for i, message in enumerate(messages):
        for key, value in message.items():
            if not isinstance(value, str):
                continue
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as err:
                raise InvalidRequestError(
                    f"messages[{i}].{key} is not valid Unicode ({err.reason} at position "
                    f"{err.start})",
                    field="messages",
                ) from None


def _text_content(content: str | list[ContentPart] | None, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for at, part in enumerate(content):
        # A refusal part (OpenAI's assistant messages carry one when the model
        # declined) is its text, as vLLM reads it: a history saved from OpenAI replays.
        key = "refusal" if part.type == "refusal" else "text"
        if part.type not in ("text", "refusal"):
            raise ApiError(
                400,
                f"only text content is supported (got a {part.type!r} part)",
                f"messages.{index}.content",
            )
        text = getattr(part, key)
        if text is None:
            raise ApiError(
                400,
                f'a {part.type} part needs its {key!r}: {{"type": "{part.type}", "{key}": "..."}}',
                f"messages.{index}.content.{at}.{key}",
            )
        texts.append(text)
    # A line break between parts, as vLLM renders list content for templates that
    # take a string: parts written as separate blocks do not run together.
    return "\n".join(texts)


def developer_as_system(template: Any, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` with developer messages as system messages, in their places, for
    a chat ``template`` (its source, or named ones: the default's) that does not name
    the ``developer`` role as a quoted string; ``messages`` itself otherwise."""
    if isinstance(template, dict):
        template = template.get("default", "")
    if all(m.get("role") != "developer" for m in messages) or any(
        quoted in str(template) for quoted in ("'developer'", '"developer"')
    ):
        return messages
    return [{**m, "role": "system"} if m.get("role") == "developer" else m for m in messages]


def merged_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` with every system message merged into one first message (their
    non-empty texts joined by a blank line, in order), for templates that take a
    system prompt only first."""
    system = [m for m in messages if m.get("role") == "system"]
    if not system:
        return messages
    text = "\n\n".join(m["content"] for m in system if m.get("content"))
    rest = [m for m in messages if m.get("role") != "system"]
    return [{"role": "system", "content": text}, *rest]

"""Logprobs in OpenAI's shapes.

- ``/v1/completions`` (``logprobs: k``): ``{"tokens", "token_logprobs",
  "top_logprobs", "text_offset"}``, four parallel lists; with ``echo`` the
  prompt's tokens come first, the very first with ``null`` logprob and
  ``null`` top logprobs. Each ``top_logprobs`` entry maps token text to
  logprob for the k most likely tokens plus the chosen one (as vLLM does, so
  that ``logprobs: 0`` still names the chosen token).
- vLLM's ``prompt_logprobs: k`` (both routes, not streamed): a list with one entry
  per prompt token, ``null`` for the first, else ``{token id: {"logprob", "rank",
  "decoded_token"}}`` for the prompt token and the k most likely (ranks 1..k); on a
  completions choice, at the top of a chat answer (as vLLM places them).
- ``/v1/chat/completions`` (``logprobs: true``, ``top_logprobs: k``):
  ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}],
  "refusal": null}``; ``bytes`` are the token's own (part of a character's too:
  :mod:`mii.rpc.http.token_bytes`), so that the bytes of the tokens, joined, are
  the text's UTF-8.

vLLM's ``return_tokens_as_token_ids: true`` names each token (``tokens``, the
``top_logprobs`` keys, chat's ``token``) ``"token_id:N"``: tokens that decode to the
same text, as byte-fallback pieces of one character all decode to U+FFFD, then stay
apart. ``text_offset`` still counts the text's characters, and chat's ``bytes`` stay
the token's own bytes (where vLLM gives the bytes of ``"token_id:N"``).

JSON has no -inf: a logprob of a token the sampling settings exclude
(``logprobs_mode: "processed"``) is sent as -9999.0, OpenAI's own floor.
"""

from __future__ import annotations

from typing import Any

from mii.response import Response, TokenLogprob
from mii.rpc.http.token_bytes import token_bytes

LOGPROB_FLOOR = -9999.0


def json_logprob(value: float) -> float:
    """``value`` as JSON can carry it: -inf (and NaN) become LOGPROB_FLOOR."""
    return value if value >= LOGPROB_FLOOR else LOGPROB_FLOOR


class LogprobFormatter:
    """Turns a choice's TokenLogprobs into OpenAI's JSON (token ids become text)."""

    def __init__(
        self, tokenizer: Any, chat: bool, echo: bool = False, token_ids: bool = False
    ) -> None:
        self.tokenizer = tokenizer
        self.chat = chat
        self.echo = echo  # completions echo: the prompt's entries lead a choice's logprobs
        self.token_ids = token_ids  # return_tokens_as_token_ids: tokens named "token_id:N"
        # special tokens, which the text leaves out (skip_special_tokens) but the
        # token list names: they take no characters of text_offset then
        self.special_ids = frozenset(getattr(tokenizer, "all_special_ids", None) or ())

    def _texts(self, entries: list[TokenLogprob | None], first_id: int | None) -> dict[int, str]:
        """Each token id that the entries mention, as text (one batched decode)."""
        ids = {first_id} if first_id is not None else set()
        for e in entries:
            if e is not None:
                ids.add(e.token_id)
                ids.update(t for t, _ in e.top)
        ordered = sorted(ids)
        texts = self.tokenizer.batch_decode([[i] for i in ordered])
        return dict(zip(ordered, texts))

    def _bytes(self, texts: dict[int, str]) -> dict[int, list[int]]:
        """Each token's own bytes (a part of a character's too: token_bytes)."""
        ids = list(texts)
        return dict(zip(ids, token_bytes(self.tokenizer, ids, [texts[i] for i in ids])))

    def choice_logprobs(
        self,
        logprobs: list[TokenLogprob] | None,
        prompt_logprobs: list[TokenLogprob | None] | None = None,
        prompt_token_ids: list[int] | None = None,
        text_offset: int = 0,
        text: str | None = None,
    ) -> dict[str, Any] | None:
        """A choice's (or a stream chunk's) ``logprobs`` object; None when the
        request asked for none. ``prompt_logprobs`` go first (completions echo);
        ``text_offset`` is where the first token's text starts in the choice, and
        ``text`` the choice's (or chunk's) text that these tokens wrote."""
        chunk = self.chunk_logprobs(logprobs, prompt_logprobs, prompt_token_ids, text_offset, text)
        return chunk[0]

    def chunk_logprobs(
        self,
        logprobs: list[TokenLogprob] | None,
        prompt_logprobs: list[TokenLogprob | None] | None,
        prompt_token_ids: list[int] | None,
        text_offset: int,
        text: str | None,
    ) -> tuple[dict[str, Any] | None, int]:
        """:meth:`choice_logprobs`, and the ``text_offset`` of the token after these:
        a stream's next chunk starts there, counted as the whole answer counts (each
        token's decoded text: a character split over tokens counts one U+FFFD per
        piece, more than the one character the chunk's text holds)."""
        if logprobs is None and prompt_logprobs is None:
            return None, text_offset
        entries: list[TokenLogprob | None] = [*(prompt_logprobs or ()), *(logprobs or ())]
        first_id = prompt_token_ids[0] if prompt_logprobs and prompt_token_ids else None
        texts = self._texts(entries, first_id)
        if self.chat:
            raw = self._bytes(texts)
            content = [self._chat_entry(e, texts, raw) for e in entries if e]
            return {"content": content, "refusal": None}, text_offset
        return self._completion(entries, texts, first_id, text_offset, text)

    def _name(self, token_id: int, text: str) -> str:
        """How the answer names a token: its text, or "token_id:N" when asked."""
        return f"token_id:{token_id}" if self.token_ids else text

    def _chat_entry(
        self, entry: TokenLogprob, texts: dict[int, str], raw: dict[int, list[int]]
    ) -> dict[str, Any]:
        def item(token_id: int, logprob: float) -> dict[str, Any]:
            name = self._name(token_id, texts[token_id])
            return {"token": name, "logprob": json_logprob(logprob), "bytes": raw[token_id]}

        return {
            **item(entry.token_id, entry.logprob),
            "top_logprobs": [item(t, lp) for t, lp in entry.top],
        }

    def _completion(
        self,
        entries: list[TokenLogprob | None],
        texts: dict[int, str],
        first_id: int | None,
        text_offset: int,
        written: str | None,
    ) -> tuple[dict[str, Any], int]:
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        at = 0  # where the next token's text starts in ``written``
        for entry in entries:
            token_id = first_id if entry is None else entry.token_id
            if entry is None:  # the first prompt token: nothing before it to score it
                text, chosen, top = texts.get(first_id, ""), None, None
            else:
                text, chosen = texts[entry.token_id], json_logprob(entry.logprob)
                top = {self._name(t, texts[t]): json_logprob(lp) for t, lp in entry.top}
                top.setdefault(self._name(entry.token_id, text), chosen)
            tokens.append(text if token_id is None else self._name(token_id, text))
            token_logprobs.append(chosen)
            top_logprobs.append(top)
            offsets.append(text_offset + at)
            skipped = (
                written is not None
                and token_id in self.special_ids
                and not written.startswith(text, at)
            )
            if not skipped:  # a special token the text left out takes no characters
                at += len(text)
        answer = {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": offsets,
        }
        return answer, text_offset + at

    def of_response(self, response: Response) -> dict[str, Any] | None:
        """The ``logprobs`` of a whole choice (the prompt's first, with echo)."""
        prompt = response.prompt_logprobs if self.echo else None
        return self.choice_logprobs(
            response.logprobs, prompt, response.prompt_token_ids, text=response.generated_text
        )

    def vllm_prompt_logprobs(self, response: Response) -> list[dict[str, Any] | None] | None:
        """vLLM's ``prompt_logprobs`` list of a response (see the module's docstring)."""
        entries = response.prompt_logprobs
        if entries is None:
            return None
        texts = self._texts(entries, None)

        def item(token_id: int, logprob: float, rank: int | None) -> dict[str, Any]:
            return {
                "logprob": json_logprob(logprob),
                "rank": rank,
                "decoded_token": texts[token_id],
            }

        listed: list[dict[str, Any] | None] = []
        for entry in entries:
            if entry is None:  # the first prompt token: nothing before it to score it
                listed.append(None)
                continue
            position = {str(entry.token_id): item(entry.token_id, entry.logprob, entry.rank)}
            for rank, (token_id, logprob) in enumerate(entry.top, start=1):
                position.setdefault(str(token_id), item(token_id, logprob, rank))
            listed.append(position)
        return listed

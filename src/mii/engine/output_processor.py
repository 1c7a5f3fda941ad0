"""Output processing: each request's sampled tokens become streamed text pieces.

``OutputProcessor`` owns everything on the text side of a request: its
incremental detokenizer, its stop strings, the prompt echoed by
``return_full_text``, and the decision that a token ends the request
(end-of-sequence, the length limit, a stop string). It keeps that state per
request id from ``start`` to ``end``; sequences and the scheduler know nothing
of it (a sequence keeps only its prompt text, ``Sequence.prompt_text``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mii.engine import grammar_mask
from mii.engine.detokenizer import (
    ByteRuns,
    IncrementalDetokenizer,
    StopStringMatcher,
    fast_decoder,
)
from mii.engine.logprobs import LogprobTensors
from mii.engine.sequence import Sequence
from mii.response import Response, TokenLogprob


@dataclass
class _RequestText:
    """The text side of one request."""

    detokenizer: IncrementalDetokenizer
    stops: StopStringMatcher
    prefix: str  # the prompt text when return_full_text, sent with the first piece
    unsent_ids: list[int] = field(default_factory=list)  # token ids not yet in a piece
    # prompt_logprobs: filled as prefill chunks are scored, sent with the first piece
    prompt_logprobs: list[TokenLogprob | None] | None = None


class OutputProcessor:
    """Turns sampled tokens into response pieces, one request at a time."""

    def __init__(self, tokenizer, eos_token_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids  # every id that ends generation
        self._decode = fast_decoder(tokenizer)
        self._decode_special = None  # skip_special_tokens=False: made on first use
        self._byte_runs = ByteRuns.of(tokenizer)
        self._requests: dict[str, _RequestText] = {}

    def full_text_prefix(self, seq: Sequence) -> str:
        """What ``return_full_text`` puts before the answer: the prompt as given, or
        a token-id prompt decoded as the answer is (special tokens such as BOS
        skipped unless ``skip_special_tokens=False``), so that a chat or
        pre-tokenized prompt does not begin with ``<s>``."""
        if not seq.params.return_full_text:
            return ""
        if seq.prompt_text is not None:
            return seq.prompt_text
        return self._decoder(seq)(seq.prompt_token_ids)

    def _decoder(self, seq: Sequence):
        """The decode of ``seq``'s text: special tokens kept when it asked (vLLM's)."""
        if seq.params.skip_special_tokens:
            return self._decode
        if self._decode_special is None:
            self._decode_special = fast_decoder(self.tokenizer, skip_special_tokens=False)
        return self._decode_special

    def start(self, seq: Sequence) -> None:
        """Begin the text of a request that has just been queued."""
        decode = self._decoder(seq)
        # Under a structured-output constraint the grammar decides where the answer
        # ends, as it does for end-of-sequence and stop tokens: a stop string found
        # inside it cut JSON or a tool call's arguments short, ended as "stop".
        stops = () if seq.params.constraint is not None else seq.params.stop
        self._requests[seq.request_id] = _RequestText(
            IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, decode, self._byte_runs),
            StopStringMatcher(stops, seq.params.include_stop_str_in_output),
            self.full_text_prefix(seq),
            prompt_logprobs=[None] if seq.params.prompt_logprobs is not None else None,
        )

    def add_prompt_logprobs(
        self, spans: list[tuple[Sequence, range]], logprobs: LogprobTensors
    ) -> None:
        """Record the logprobs of the prompt tokens a pass scored (``spans``: per
        sequence, the tokens its rows score, in row order)."""
        rows = logprobs.as_lists()
        row = 0
        for seq, span in spans:
            # An ended request's scores are dropped: its id may already name a new
            # request (aborted while the pass ran, then reused).
            state = None if seq.is_finished else self._requests.get(seq.request_id)
            if state is not None and state.prompt_logprobs is not None:
                k = seq.params.prompt_logprobs
                state.prompt_logprobs.extend(
                    rows.entry(row + i, seq.token_ids[j], k) for i, j in enumerate(span)
                )
            row += len(span)

    def end(self, request_id: str) -> None:
        """Forget a request that finished, failed or was aborted (if it was started)."""
        self._requests.pop(request_id, None)

    def process_token(
        self,
        seq: Sequence,
        token: int,
        slot: int,
        logprob: TokenLogprob | None = None,
        grammar_done: bool = False,
    ) -> Response:
        """Detokenize the new token at ``seq.token_ids[slot]``, check every end
        condition (setting ``seq.finish_reason``), and build the piece to stream
        (its text may be empty while characters are held back). ``logprob``: the
        token's, when the request asked for logprobs. ``grammar_done``: the token
        completed the request's structured-output grammar (its end-of-sequence)."""
        state = self._requests[seq.request_id]
        params = seq.params
        prompt_logprobs, state.prompt_logprobs = state.prompt_logprobs, None
        if seq.score_only:  # the prompt's logprobs were all it asked for
            seq.finish_reason = "length"
            return Response(
                state.prefix,
                seq.prompt_len,
                0,
                "length",
                seq.request_id,
                prompt_logprobs=prompt_logprobs,
                # OpenAI's echo shows these tokens' texts (with max_tokens 0 too).
                prompt_token_ids=list(seq.prompt_token_ids),
            )
        generated = slot + 1 - seq.prompt_len  # later tokens may already be pending
        state.unsent_ids.append(token)
        finish = None
        stop_reason: str | int | None = None
        eos = grammar_done or (token in self.eos_token_ids and not params.ignore_eos)
        # Under a constraint the grammar decides where the answer ends (as for stop
        # strings): a stop token it allows cut JSON or a tool call's arguments short.
        stop_token = params.constraint is None and token in params.stop_token_ids
        if eos or stop_token:  # ends like EOS: not in the text
            finish = "stop"
            stop_reason = None if eos else token
            if stop_token and params.include_stop_str_in_output:  # vLLM's: its text too
                delta = state.detokenizer.add(token, final=True)
            else:
                delta = state.detokenizer.flush()
        else:
            at_limit = generated >= seq.max_new_tokens
            delta = state.detokenizer.add(token, final=at_limit)
            if at_limit:  # a constrained answer may be complete there: then it stopped
                complete = seq.grammar is not None and grammar_mask.only_its_end_left(seq)
                finish = "stop" if complete else "length"
        text, hit_stop = state.stops.feed(delta, check=generated >= params.min_new_tokens)
        if hit_stop:
            finish, stop_reason = "stop", state.stops.matched
        elif finish is not None:
            text += state.stops.flush()
        seq.finish_reason = finish
        if state.prefix:
            text, state.prefix = state.prefix + text, ""
        # Every new token makes a piece, even when its text is still held back (a
        # split character, a possible stop string): consumers see token timing
        # as it happens, and the pieces' text still concatenates to the answer.
        ids, state.unsent_ids = state.unsent_ids, []
        return Response(
            text,
            seq.prompt_len,
            generated,
            finish,
            seq.request_id,
            ids,
            [logprob] if logprob is not None else None,
            prompt_logprobs,
            list(seq.prompt_token_ids) if prompt_logprobs is not None else None,
            seq.num_cached_tokens,
            stop_reason,
        )

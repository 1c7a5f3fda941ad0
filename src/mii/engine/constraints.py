"""Compiling structured-output constraints into grammars (xgrammar), with a cache.

A request's constraint (``json_schema``, ``regex``, ``choice``, ``grammar``,
``json_object``: ``mii.constraint_options``) becomes an xgrammar
``CompiledGrammar`` for the engine's tokenizer: the token-level automaton that
``engine/grammar_mask.py`` walks as tokens are sampled. Compiling a large schema
takes milliseconds to seconds, so ``AsyncEngine`` runs it in a worker thread
(never on the event loop), and compiled grammars are kept in a bounded LRU: one
``GrammarCache`` per engine, i.e. per tokenizer, keyed by (kind, spec text).

Anything that does not compile, and any JSON-schema keyword or regex construct
that xgrammar would silently ignore (so that the output could break the schema),
is an ``InvalidRequestError`` naming the option: HTTP 400, gRPC INVALID_ARGUMENT.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from collections import OrderedDict
from typing import Any

from mii.engine.json_patterns import spliced, with_placeholders
from mii.engine.one_of import with_required_tags
from mii.engine.regex_groups import as_xgrammar_reads_it, without_group_names
from mii.engine.regex_sets import check_reads_the_same, parse
from mii.engine.schema_support import (
    NESTED_TOO_DEEPLY,
    UNSUPPORTED_REGEX,
    check_json_schema,
    schema_problem,
)
from mii.engine.schema_walk import in_2020_12_terms, rebuilt
from mii.engine.utf8_guard import Utf8Guard
from mii.errors import InvalidRequestError

log = logging.getLogger(__name__)

# Compiled grammars kept per engine (each holds per-token tables: ~KBs to MBs).
CACHE_ENTRIES = 256


def _xgrammar():
    try:
        import xgrammar
    except ImportError:  # an optional dependency: mii[structured]
        return None
    return xgrammar


def structured_output_available() -> bool:
    """True when the grammar engine (xgrammar: ``pip install mii[structured]``) is installed."""
    return _xgrammar() is not None


def _as_xgrammar_reads_it(schema: Any) -> Any:
    """``schema`` with each array without ``items`` or ``prefixItems`` given
    ``"items": {}`` (what JSON Schema means by leaving it out): xgrammar (0.2.x)
    reads it so for a bare array but as "no items" once ``minItems`` is given (and
    refuses it); and draft-04's boolean ``exclusiveMinimum`` / ``exclusiveMaximum``
    in the numeric form of later drafts, the only one xgrammar reads."""
    return rebuilt(schema, _readable)


def _readable(out: dict, path: str) -> dict:
    """One schema object of :func:`_as_xgrammar_reads_it` (its own schemas done)."""
    # xgrammar reads 2020-12's forms only: draft-04's boolean exclusive bounds failed
    # ("Value must be a number"), draft-07's tuples were refused.
    in_2020_12_terms(out, path)
    kind = out.get("type")
    if kind == "integer":
        _whole_bounds(out)
    is_array = kind == "array" or (isinstance(kind, list) and "array" in kind)
    if is_array and "items" not in out and "prefixItems" not in out:
        out["items"] = {}
    return out


def _whole_bounds(schema: dict) -> None:
    """An integer schema's fractional bounds as the whole numbers they allow
    (xgrammar refused ``"minimum": 1.5``: "Integer constraint must be a whole number")."""
    for key, rounded in (
        ("minimum", math.ceil),
        ("maximum", math.floor),
        ("exclusiveMinimum", lambda x: math.floor(x) + 1),
        ("exclusiveMaximum", lambda x: math.ceil(x) - 1),
    ):
        bound = schema.get(key)
        if isinstance(bound, float) and math.isfinite(bound) and not bound.is_integer():
            del schema[key]
            inclusive = key.removeprefix("exclusive").lower()
            tighter = max if inclusive == "minimum" else min  # (both bounds may be given)
            given = schema.get(inclusive)
            whole = rounded(bound)
            schema[inclusive] = whole if given is None else tighter(given, whole)


# The character class xgrammar (0.2.x) writes for each character of a length-bounded
# JSON string (``minLength``/``maxLength``): no quote, no backslash (so no escapes),
# no CR or LF, but every other control character, which JSON forbids raw in a string.
_BOUNDED_STRING_CHARACTER = r"[^\"\\\r\n]"
# The same class without any control character (nor a surrogate's code points; the
# UTF-8 guard masks their bytes too).
_JSON_STRING_CHARACTER = r"[^\"\\\0-\x1f\ud800-\udfff]"


def _without_special_text(info: Any, special: list[int]) -> Any:
    """``info`` (an xgrammar ``TokenizerInfo``) with the ``special`` tokens' bytes
    blanked, which makes them xgrammar's special tokens: never text, and a stop
    token only where the grammar ends. Read as their literal text, "<|im_end|>"
    (a stop token) ended a choice of that text with nothing of it in the answer,
    and "<|endoftext|>" satisfied a choice of its text while the answer's text
    dropped it (user trials)."""
    xgr = _xgrammar()
    blank = set(special)
    vocab = [b"" if i in blank else text for i, text in enumerate(info.decoded_vocab)]
    return xgr.TokenizerInfo(
        vocab,
        xgr.VocabType.RAW,  # the bytes as decoded for this tokenizer's own vocabulary type
        vocab_size=info.vocab_size,
        stop_token_ids=list(info.stop_token_ids),
        add_prefix_space=info.add_prefix_space,
    )


def _json_schema_grammar(schema: str, patterns: dict[str, str]) -> Any:
    """xgrammar's grammar of ``schema`` (no free whitespace: a model may not pad
    forever; one space after each ``,`` and ``:``), with its length-bounded
    strings' characters limited to what JSON allows raw in a string. The grammar
    is rewritten, not the schema: spelling each bounded string as an equivalent
    ``pattern`` compiled into an automaton of one state per allowed character, 15 s
    for a ``maxLength`` of 5,000 and seconds for a tool list of bounded fields,
    against milliseconds for xgrammar's own repetition. ``patterns``: the EBNF of
    each placeholder of a pattern compiled here (:mod:`mii.engine.json_patterns`)."""
    xgr = _xgrammar()
    grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=False)
    text = str(grammar)
    if _BOUNDED_STRING_CHARACTER not in text and not patterns:
        return grammar
    text = text.replace(_BOUNDED_STRING_CHARACTER, _JSON_STRING_CHARACTER)
    return xgr.Grammar.from_ebnf(spliced(text, patterns))


def _choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose only sentences are ``choices`` (JSON string escapes
    are EBNF string escapes). Characters stay as they are: an escaped one beyond the
    BMP is two surrogate halves, each of which xgrammar read as a character of its
    own ("😀" came out as six bytes of invalid UTF-8)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class GrammarCache:
    """Compiles constraints for one tokenizer, keeping the last ``CACHE_ENTRIES``.

    Thread-safe: compiles run in worker threads, lookups on the event loop or the
    engine's thread."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: list[int],
        entries: int = CACHE_ENTRIES,
    ) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size  # the model's logits width (may exceed the tokenizer's)
        self._stop_token_ids = list(stop_token_ids)
        self._entries = entries
        self._compiled: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()
        self._compiling: dict[tuple[str, str], threading.Lock] = {}  # key -> its compile
        self._compiler = None  # built on first use: only engines that see a constraint pay
        self._utf8_guard: Utf8Guard | None = None  # built with it, from the same vocabulary
        self.compile_seconds = 0.0  # total time spent compiling (benchmarks report it)
        self.compiles = 0

    def _get_compiler(self):
        with self._lock:
            if self._compiler is None:
                xgr = _xgrammar()
                specials = getattr(self._tokenizer, "all_special_ids", None) or []
                info = _without_special_text(
                    xgr.TokenizerInfo.from_huggingface(
                        self._tokenizer,
                        vocab_size=self._vocab_size,
                        stop_token_ids=self._stop_token_ids,
                    ),
                    [*specials, *self._stop_token_ids],
                )
                self._compiler = xgr.GrammarCompiler(
                    info, max_threads=min(8, os.cpu_count() or 1), cache_enabled=False
                )
                self._utf8_guard = Utf8Guard(info.decoded_vocab, self._vocab_size)
            return self._compiler

    @property
    def utf8_guard(self) -> Utf8Guard:
        """The well-formed-UTF-8 masks of this tokenizer (``engine/utf8_guard.py``), which
        every matcher of its grammars needs (``grammar_mask.new_matcher``); built
        with the compiler, once per engine."""
        self._get_compiler()
        return self._utf8_guard

    def cached(self, key: tuple[str, str]) -> Any | None:
        """The compiled grammar of ``key`` if it is in the cache (marked recently used)."""
        with self._lock:
            grammar = self._compiled.get(key)
            if grammar is not None:
                self._compiled.move_to_end(key)
            return grammar

    def get(self, key: tuple[str, str]) -> Any:
        """The compiled grammar of constraint ``key`` = (option name, spec text), as
        ``ConstraintOptions.constraint`` gives it; compiled now unless cached.
        InvalidRequestError naming the option when it cannot be compiled or uses a
        feature the grammar engine would not enforce."""
        grammar = self.cached(key)
        if grammar is not None:
            return grammar
        field = key[0]
        if _xgrammar() is None:
            raise InvalidRequestError(
                f"invalid generation option {field!r}: structured output needs the xgrammar "
                "package on the server (pip install 'mii[structured]')",
                field=field,
            )
        with self._lock:  # one compile per key: concurrent requests wait for it
            key_lock = self._compiling.setdefault(key, threading.Lock())
        with key_lock:
            try:
                grammar = self.cached(key)
                if grammar is None:
                    grammar = self._timed_compile(key)
            finally:
                with self._lock:
                    if self._compiling.get(key) is key_lock:
                        del self._compiling[key]
        return grammar

    def _timed_compile(self, key: tuple[str, str]) -> Any:
        start = time.perf_counter()
        grammar = self._compile(*key)
        elapsed = time.perf_counter() - start
        if not self._admits_a_first_token(grammar):
            # (sampling would have nothing to choose from: this was a 500)
            raise InvalidRequestError(
                f"invalid generation option {key[0]!r}: the constraint matches no text at "
                "all (e.g. a pattern no string matches, or a rule that never ends); change it",
                field=key[0],
            )
        with self._lock:
            self.compile_seconds += elapsed
            self.compiles += 1
            self._compiled[key] = grammar
            self._compiled.move_to_end(key)
            while len(self._compiled) > self._entries:
                self._compiled.popitem(last=False)
        return grammar

    def _admits_a_first_token(self, grammar: Any) -> bool:
        """Whether ``grammar`` allows some first token (its end included, where the
        empty text matches)."""
        xgr = _xgrammar()
        bitmask = xgr.allocate_token_bitmask(1, self._vocab_size)
        xgr.GrammarMatcher(grammar).fill_next_token_bitmask(bitmask, 0)
        return bool(bitmask.any())

    def _compile(self, kind: str, spec: str) -> Any:
        compiler = self._get_compiler()
        schema = json.loads(spec) if kind == "json_schema" else None
        if kind == "json_schema":
            # (here, once per schema and off the event loop: the meta-schema check of
            # a large schema takes a third of a second)
            try:
                check_json_schema(schema)
                problem = schema_problem(schema)
            except ValueError as err:
                problem = str(err)
            except RecursionError:
                problem = NESTED_TOO_DEEPLY
            if problem:
                # (a problem that says its own way out gets no second, contrary one)
                advice = "; remove it from the schema" if problem.endswith("not supported") else ""
                raise InvalidRequestError(
                    f"invalid generation option 'json_schema': {problem}{advice}",
                    field="json_schema",
                )
        # (Octal escapes, "\\101", are rewritten first: Python reads them as characters.)
        if kind == "regex" and UNSUPPORTED_REGEX.search(as_xgrammar_reads_it(spec)):
            raise InvalidRequestError(
                "invalid generation option 'regex': lookaround and backreferences are not "
                "supported",
                field="regex",
            )
        try:
            if kind == "json_schema":
                tagged = with_required_tags(schema)
                readable, patterns = with_placeholders(_as_xgrammar_reads_it(tagged))
                grammar = _json_schema_grammar(json.dumps(readable), patterns)
                return compiler.compile_grammar(grammar)
            if kind == "json_object":  # any object, any keys (OpenAI's json_object)
                return compiler.compile_json_schema(
                    '{"type": "object"}', any_whitespace=False, strict_mode=False
                )
            if kind == "regex":
                plain = without_group_names(spec)
                check_reads_the_same(plain)  # (before compiling: a count of 10**9 is refused)
                compiled = compiler.compile_regex(as_xgrammar_reads_it(spec))
                # What xgrammar read but Python cannot ("\\z", "\\G" as letters) is refused
                # after xgrammar's own errors ("parenthesis is not closed") had their say.
                parse(plain)
                return compiled
            if kind == "choice":
                return compiler.compile_grammar(_choice_grammar(json.loads(spec)))
            if kind == "grammar":
                return compiler.compile_grammar(spec)
        except (RuntimeError, ValueError, TypeError) as err:
            # xgrammar's messages start with "[time] /path/file.cc:line: "
            message = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", str(err).strip())
            # Its range checks read "Check failed: (val >= MIN_INT64_AS_DOUBLE) is
            # false: Integer exceeds minimum limit": keep the words, drop the code.
            message = re.sub(r"^Check failed: \(.*?\) is false:\s*", "", message)
            if "INT64" in str(err) or "64-bit" in str(err):
                message += " (integer bounds must lie within the 64-bit signed range)"
            if kind == "grammar" and "::=" not in spec:  # Lark's "rule: ..." (vLLM reads it)
                message += (
                    " (a grammar is EBNF in GBNF's form, as llama.cpp and xgrammar write it: "
                    '\'root ::= "a" ("b" | "c")+\'; Lark\'s \'start: ...\' rules are not read)'
                )
            raise InvalidRequestError(
                f"invalid generation option {kind!r}: {message}", field=kind
            ) from None
        raise InvalidRequestError(f"unknown constraint {kind!r}", field=kind)

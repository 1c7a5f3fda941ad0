"""The words of a ``%mii`` / ``%%mii`` line: shell-like quoting, the generation
options before (or after) the prompt, and the prompt itself with its own spacing."""

from __future__ import annotations

import difflib
import re
import shlex

from IPython.core.error import UsageError

# A shell word: unquoted characters and quoted runs, up to unquoted whitespace (an
# unclosed quote: the rest of the non-blank characters, refused by _unquoted).
_SHELL_WORD = re.compile(r"""(?:[^\s'"]+|'[^']*'|"(?:\\.|[^"\\])*")+(?!\S)|\S+""")


def _unquoted(word: str) -> str:
    if "'" not in word and '"' not in word:
        return word  # as typed: backslashes stay (--stop \n is not "n")
    try:
        [value] = shlex.split(word)
    except ValueError as err:  # e.g. an unclosed quote
        raise UsageError(f"%mii: {err} in {word!r}") from None
    return value


# Read as options only before the prompt: after it they are text ("Explain grep --help").
HELP_OPTIONS = {"-h": False, "--help": False}


def _read_options(words: list[str], known: dict[str, bool]) -> tuple[list[str], int, bool]:
    """The known generation options that open ``words``, each with its value: their
    tokens (unquoted), how many words they took, and whether the last one still
    waits for its value."""
    tokens: list[str] = []
    expect_value = False
    for taken, word in enumerate(words):
        name = word.split("=", 1)[0]
        if expect_value:
            tokens.append(_unquoted(word))
            expect_value = False
        elif word.startswith("-") and name in known:
            tokens.append(_unquoted(word))
            expect_value = known[name] and "=" not in word
        else:
            return tokens, taken, False
    return tokens, len(words), expect_value


def split_line(line: str, known: dict[str, bool]) -> tuple[list[str], str]:
    """Split ``%mii [options] [--] PROMPT`` into option tokens and the prompt, which
    keeps its own spacing and quotes. Option values may be quoted as in a shell
    (``--stop 'answer is'``, ``--json-schema '{"type": "object"}'``), as ``%%mii``'s.
    ``known``: the options, and whether each takes a value."""
    words = list(_SHELL_WORD.finditer(line))
    leading = {**known, **HELP_OPTIONS}
    tokens, taken, expect_value = _read_options([word.group() for word in words], leading)
    if expect_value:
        raise UsageError(f"%mii: option {tokens[-1]!r} needs a value")
    if taken == len(words):
        return tokens, ""
    first = words[taken]
    if first.group() == "--":
        return tokens, line[first.end() :].strip()
    if first.group().startswith("--"):
        name = first.group().split("=", 1)[0]
        raise UsageError(
            f"%mii: unknown option {name!r}{_meant(name, known, prefix=True)} (put `--` before "
            "a prompt that starts with --)"
        )
    prompt, trailing = _trailing_options(line[first.start() :].strip(), known)
    return tokens + trailing, prompt


def _trailing_options(prompt: str, known: dict[str, bool]) -> tuple[str, list[str]]:
    """``prompt`` without the generation options that end it, and those options:
    ``%mii DeepSpeed is --max-new-tokens 8`` as ``mii generate`` reads its options
    after the prompts (a user trial's prompt carried them as text). Only a tail of
    known options, each with its value, counts; anything else stays prompt text."""
    words = list(_SHELL_WORD.finditer(prompt))
    texts = [word.group() for word in words]
    for first in range(1, len(words)):  # the first word is prompt text, whatever it is
        tokens, taken, expect_value = _read_options(texts[first:], known)
        if taken and first + taken == len(words):
            if expect_value:  # "%mii hello --max-new-tokens": not a prompt of two words
                raise UsageError(
                    f"%mii: option {tokens[-1]!r} needs a value (put `--` before a prompt "
                    "to keep its words as text)"
                )
            return prompt[: words[first].start()].rstrip(), tokens
        if taken and first + taken < len(words):
            _refuse_unknown_after_options(texts[first + taken], known)
    for text in texts[1:]:
        _refuse_misspelt(text, known)
    return prompt, []


def _refuse_misspelt(word: str, known: dict[str, bool]) -> None:
    """UsageError for a word of the prompt that is an option's name misspelt
    (``--max-new-token 6``: it was read as prompt text, with the options beside it).
    Not for the start of one (``git add --all``, ``pip install --pre``: text)."""
    name = word.split("=", 1)[0]
    if not name.startswith("--") or name in known:
        return
    meant = _meant(name, known)
    if meant:
        raise UsageError(
            f"%mii: unknown option {name!r}{meant} (put `--` before a prompt to keep its "
            "words as text)"
        )


def _refuse_unknown_after_options(word: str, known: dict[str, bool]) -> None:
    """UsageError for an option-like word right after options that follow the prompt
    (``%mii Tell a joke --max-new-tokens 5 --temp 0.5``, ``... -t 0.5``): the prompt's
    text has ended there, so it is an option this line does not have. Otherwise it
    took the known options before it into the prompt as text."""
    name = word.split("=", 1)[0]
    option_like = (name.startswith("--") and name != "--") or re.fullmatch(r"-[A-Za-z]", name)
    if not option_like or name in known:
        return
    raise UsageError(
        f"%mii: unknown option {name!r}{_meant(name, known, prefix=True)} (put `--` before a "
        "prompt to keep its words as text; %mii --help lists the options)"
    )


def _meant(name: str, known: dict[str, bool], prefix: bool = False) -> str:
    """``: did you mean '--temperature'?`` for a near miss of a known option's name,
    or with ``prefix`` the beginning of exactly one (argparse's abbreviations), else ""."""
    starting = [option for option in known if option.startswith(name) and len(name) > 3]
    if prefix and len(starting) == 1:
        return f": did you mean {starting[0]!r}?"
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
    return f": did you mean {close[0]!r}?" if close else ""


def split_args(text: str) -> list[str]:
    """Words as a shell splits them, but an unquoted backslash stays (``--stop \\n``
    is a line break, as in the line magic, not "n")."""
    return [_unquoted(match.group()) for match in _SHELL_WORD.finditer(text)]

"""The ``chat_template`` option of a deployment: read from a file or given as the
template itself, and checked to be Jinja before anything starts."""

from __future__ import annotations

from mii.errors import InvalidRequestError


def chat_template_text(template: str) -> str:
    """A chat template given as a file path (read here) or as the template itself
    (backslash escapes such as ``\\n`` interpreted, as vLLM does). A name that
    looks like a path but cannot be read is an error."""
    try:
        with open(template, encoding="utf-8") as f:
            return f.read()
    except (OSError, ValueError) as err:  # ValueError: a NUL in the text
        if not any(c in template for c in "{}\n"):
            raise InvalidRequestError(
                f"chat_template {template!r} looks like a file path, but it cannot be read "
                f"({getattr(err, 'strerror', None) or err}); give a readable file or the "
                "template itself",
                field="chat_template",
            ) from None
    # Non-ASCII characters survive (as \uXXXX escapes) the decoding of "\n" etc.
    return template.encode("latin-1", "backslashreplace").decode("unicode_escape")


def checked_template(text: str) -> str:
    """``text`` if it is a valid Jinja template, else an error naming chat_template."""
    import jinja2

    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as err:
        raise InvalidRequestError(
            f"chat_template is not a valid Jinja template: {err.message} (line {err.lineno})",
            field="chat_template",
        ) from None
    return text

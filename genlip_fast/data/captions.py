"""Caption rules: where a sample's caption is found (``data.caption``, and each ``[[data.sources]]``'s ``caption``).

A rule is a ``;``-separated list of places tried in order; the first that gives a non-empty text is the caption
(as open_clip's list of text keys)::

    auto                      txt;conv;json:caption;json:text  (the default: every layout below without options)
    txt                       the sample's .txt member (UTF-8): img2dataset, BLIP3o, the demo, genlip's converter
    json:PATH                 a string in the sample's .json member (a Parquet row's columns); PATH is dotted keys,
                              where an integer indexes a list (negative from the end): json:caption,
                              json:meta.caption, json:conversations.-1.value
    conv                      the last assistant turn of the .json's conversation (its "conversations",
                              "conversation" or "messages" list)
    conv:PATH                 the same for the conversation at PATH (json:PATH's syntax)
    conv+prompt[:PATH]        the same, and the user turn before it becomes the sample's prompt (text between
                              image and caption that carries no loss), as the authors' stage-2 template

A conversation is a list of turns, each ``{"from": ROLE, "value": TEXT}`` (LLaVA / ShareGPT), ``{"role": ROLE,
"content": TEXT}`` (chat format; ``content`` may be a list of ``{"type": "text", "text": ...}`` parts) or
``{ROLE: TEXT}``; assistant roles are ``gpt``, ``assistant`` and ``model`` (Gemini's), user roles ``human`` and
``user``. ``<image>`` placeholders and the whitespace around them are removed from the turns taken.

``auto`` tries the conversation before ``json:caption`` because the authors' stage-2 records carry a conversation,
"else caption". A value that is not a string where the path ends (a number, a list, an object) is no caption: the
sample is skipped under "missing caption" with what was found, never turned into the list's Python text.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

AUTO = "txt;conv;json:caption;json:text"
CONVERSATION_KEYS = ("conversations", "conversation", "messages")
ASSISTANT_ROLES = ("gpt", "assistant", "model")
USER_ROLES = ("human", "user")
_PLACEHOLDER = re.compile(r"\s*<image>\s*")
_INDEX = re.compile(r"-?\d+")


class RuleError(ValueError):
    """A caption rule that does not parse; the message names the rule and what is wrong."""


class MissingCaption(Exception):  # noqa: N818 - a sample's outcome, not a program error
    """No alternative of the rule gave a caption. ``reason`` is the skip counter's key ("missing caption", "empty
    caption" or "bad json"), ``detail`` what each alternative found."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason} ({detail})")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Caption:
    text: str
    """The caption, stripped."""
    prompt: str | None = None
    """The conversation's user turn when the rule keeps it (``conv+prompt``), placeholders removed; else None."""


@dataclass(frozen=True)
class _Alt:
    kind: str  # "txt" | "json" | "conv"
    path: tuple[str, ...] = ()
    prompt: bool = False

    def describe(self) -> str:
        if self.kind == "txt":
            return "txt"
        where = ".".join(self.path)
        if self.kind == "json":
            return f"json {where}"
        return (f"json {where or 'conversations'} (last assistant turn"
                + (" and its prompt" if self.prompt else "") + ")")


class _Bad(Exception):  # noqa: N818 - one alternative's miss, collected into MissingCaption
    def __init__(self, why: str, kind: str = "missing"):
        super().__init__(why)
        self.why, self.kind = why, kind


def _parse_path(path: str, rule: str, alt: str) -> tuple[str, ...]:
    parts = tuple(path.split("."))
    if any(p == "" for p in parts):
        raise RuleError(f"caption rule {rule!r}: {alt!r} has an empty key in its path {path!r} (keys are separated "
                        "by single dots, e.g. json:conversations.-1.value)")
    return parts


@functools.lru_cache(maxsize=64)
def parse_rule(text: str) -> CaptionRule:
    """Parse a caption rule (the module doc gives the syntax); :class:`RuleError` names what is wrong."""
    rule = str(text).strip()
    if not rule:
        raise RuleError("caption rule '' is empty; 'auto' finds the caption in the usual layouts")
    alts: list[_Alt] = []
    for raw in rule.split(";"):
        alt = raw.strip()
        if not alt:
            raise RuleError(f"caption rule {rule!r} has an empty alternative (two ';' in a row, or one at an end)")
        head, colon, path = alt.partition(":")
        head = head.strip()
        path = path.strip()
        if alt == "auto":
            alts += parse_rule(AUTO).alternatives
        elif head == "txt" and not colon:
            alts.append(_Alt("txt"))
        elif head == "json":
            if not path:
                raise RuleError(f"caption rule {rule!r}: {alt!r} names no field; write json:FIELD (e.g. "
                                "json:caption, json:meta.caption)")
            alts.append(_Alt("json", _parse_path(path, rule, alt)))
        elif head in ("conv", "conv+prompt"):
            if colon and not path:
                raise RuleError(f"caption rule {rule!r}: {alt!r} names no path after ':' (write {head} to find "
                                "the conversation by itself)")
            alts.append(_Alt("conv", _parse_path(path, rule, alt) if path else (), head == "conv+prompt"))
        else:
            hint = f"; did you mean json:{alt}?" if re.fullmatch(r"[\w.-]+", alt) else ""
            raise RuleError(f"caption rule {rule!r}: unknown alternative {alt!r}; each alternative is auto, txt, "
                            f"json:PATH, conv, conv:PATH or conv+prompt[:PATH]{hint}")
    return CaptionRule(rule, tuple(alts))


def _walk(value, path: tuple[str, ...], where: str):
    for i, key in enumerate(path):
        at = ".".join(path[:i + 1])
        if isinstance(value, Mapping):
            if key not in value:
                raise _Bad(f"no {at!r} in the {where}")
            value = value[key]
        elif isinstance(value, list) and _INDEX.fullmatch(key):
            k = int(key)
            if not -len(value) <= k < len(value):
                raise _Bad(f"{at!r}: index {k} is outside a list of {len(value)}")
            value = value[k]
        else:
            raise _Bad(f"{'.'.join(path[:i]) or 'the ' + where} is {_kind(value)}, so it has no {key!r}")
    return value


def _kind(value) -> str:
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if value is None:
        return "null"
    if isinstance(value, (bool, int, float)):
        return json.dumps(value)
    return f"a {type(value).__name__}"


def _turn(turn) -> tuple[str, object]:
    """``(role, content)`` of one conversation turn in any of the three shapes."""
    if isinstance(turn, Mapping):
        role = turn.get("from", turn.get("role"))
        if role is not None:
            return str(role).lower(), turn.get("value", turn.get("content"))
        if len(turn) == 1:
            (role, content), = turn.items()
            return str(role).lower(), content
    return "", None


def _turn_text(content) -> str | None:
    if isinstance(content, list):  # chat format: [{"type": "text", "text": ...}, {"type": "image"}, ...]
        texts = [p.get("text") for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str)]
        content = " ".join(texts) if texts else None
    if not isinstance(content, str):
        return None
    return _PLACEHOLDER.sub(" ", content).strip()


class CaptionRule:
    """A parsed caption rule: :meth:`caption` finds a sample's caption (and prompt) in its fields.

    ``fields``: a sample's members by extension, ``{"jpg": bytes, "txt": bytes, "json": bytes}`` (a tar's), where
    ``json`` may also be an already parsed object (a Parquet row's columns arrive as ``{"json": {column: value}}``).
    """

    def __init__(self, text: str, alternatives: tuple[_Alt, ...]):
        self.text, self.alternatives = text, alternatives

    def __repr__(self) -> str:
        return f"CaptionRule({self.text!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, CaptionRule) and other.alternatives == self.alternatives

    def __hash__(self) -> int:
        return hash(self.alternatives)

    def describe(self) -> str:
        """What the rule looks for, for messages: ``"txt, json conversations (last assistant turn), json caption"``."""
        return ", ".join(a.describe() for a in self.alternatives)

    def caption(self, fields: Mapping[str, bytes | dict]) -> Caption:
        """The caption of a sample, or :class:`MissingCaption` saying what each alternative found."""
        misses: dict[tuple[str, str], list[str]] = {}  # (why, kind) -> the alternatives that found it
        parsed: list = []  # the .json member, parsed once
        for alt in self.alternatives:
            try:
                found = self._one(alt, fields, parsed)
            except _Bad as e:
                misses.setdefault((e.why, e.kind), []).append(alt.describe())
                continue
            if found.text:
                return found
            misses.setdefault(("empty", "empty"), []).append(alt.describe())
        kinds = {kind for _, kind in misses}
        reason = "bad json" if "bad json" in kinds else "empty caption" if "empty" in kinds else "missing caption"
        raise MissingCaption(reason, "; ".join(f"{', '.join(alts)}: {why}" for (why, _), alts in misses.items()))

    def extract(self, fields: Mapping[str, bytes | dict]) -> str | None:
        """The caption text, or None when the rule finds none."""
        try:
            return self.caption(fields).text
        except MissingCaption:
            return None

    def _json(self, fields, parsed: list):
        if not parsed:
            if "json" not in fields:
                raise _Bad("no .json member")
            raw = fields["json"]
            if isinstance(raw, (bytes, bytearray, str)):
                try:
                    raw = json.loads(raw)
                except ValueError as e:  # also a UnicodeDecodeError
                    parsed.append(_Bad(f"the .json member is not valid JSON ({e})", "bad json"))
                    raise parsed[0] from None
            parsed.append(raw)
        if isinstance(parsed[0], _Bad):
            raise parsed[0]
        return parsed[0]

    def _one(self, alt: _Alt, fields, parsed: list) -> Caption:
        if alt.kind == "txt":
            if "txt" not in fields:
                raise _Bad("no .txt member")
            raw = fields["txt"]
            text = raw.decode("utf-8", errors="replace") if isinstance(raw, (bytes, bytearray)) else raw
            if not isinstance(text, str):
                raise _Bad(f"txt is {_kind(text)}, not text")
            return Caption(text.strip())
        doc = self._json(fields, parsed)
        if alt.kind == "json":
            value = _walk(doc, alt.path, ".json")
            if not isinstance(value, str):
                raise _Bad(f"is {_kind(value)}, not text")
            return Caption(value.strip())
        return self._conversation(alt, doc)

    def _conversation(self, alt: _Alt, doc) -> Caption:
        if alt.path:
            turns = _walk(doc, alt.path, ".json")
        else:
            key = next((k for k in CONVERSATION_KEYS if isinstance(doc, Mapping) and k in doc), None)
            if key is None:
                raise _Bad(f"no {' / '.join(CONVERSATION_KEYS)} in the .json")
            turns = doc[key]
        return _reply(turns, alt.prompt)


def _reply(turns, prompt: bool) -> Caption:
    if not isinstance(turns, list):
        raise _Bad(f"the conversation is {_kind(turns)}, not a list of turns")
    roles = [_turn(t) for t in turns]
    last = next((i for i in range(len(roles) - 1, -1, -1) if roles[i][0] in ASSISTANT_ROLES), None)
    if last is None:
        raise _Bad(f"no assistant turn (roles {', '.join(ASSISTANT_ROLES)}) among {len(turns)} turns")
    text = _turn_text(roles[last][1])
    if text is None:
        raise _Bad(f"the last assistant turn holds {_kind(roles[last][1])}, not text")
    question = None
    if prompt:
        user = next((i for i in range(last - 1, -1, -1) if roles[i][0] in USER_ROLES), None)
        question = _turn_text(roles[user][1]) if user is not None else None
    return Caption(text, question or None)


def conversation_reply(turns) -> Caption:
    """The caption the ``conv`` rule takes from a conversation (a list of turns in any of the shapes the module doc
    names): its last assistant turn, placeholders removed (the text may be empty); :class:`MissingCaption` ("missing
    caption") saying what the turns hold otherwise. For readers of conversations outside a sample's ``.json`` (the
    converter's listings)."""
    try:
        return _reply(turns, False)
    except _Bad as e:
        raise MissingCaption("missing caption", e.why) from None


__all__ = ["AUTO", "Caption", "CaptionRule", "MissingCaption", "RuleError", "conversation_reply", "parse_rule"]

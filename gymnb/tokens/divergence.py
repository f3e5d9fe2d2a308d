"""Where two token sequences that should agree part ways, and why (stage: continuity).

`expected` is the ground truth (the ids the model generated, with the prompt it saw); `actual` is what someone
built from it: the next call's prompt (continuity check) or a naive re-rendering of the conversation (drift
audit). The first mismatch is classified from the decoded text on both sides:

- truncated history: earlier context is missing (the prompt was cut, or old turns dropped);
- dropped separator: an end-of-turn / special token of the expected side is missing;
- BPE merge: the text is identical, only its tokenization differs (`" Sk"+"in"+"ny"` vs `" Sk"+"inny"`);
- stripped reasoning: a `<think>` block was removed (templates drop reasoning of earlier turns);
- tool-call re-render: the mismatch sits inside a tool call re-serialized from parsed JSON;
- whitespace: the texts differ only in whitespace;
- other: anything else (a changed token, a different template).

Order matters: each test assumes the earlier ones failed (e.g. a re-rendered tool call whose text is unchanged
is a BPE merge, not a tool-call re-render).

The fix (`fix_for`) depends on the evidence of who dropped the generated ids. A conversation sent back with
every assistant turn's token fields (layer 04's probes do this) that still diverges convicts the server: it
ignored the fields. A rollout alone cannot say whether its client sent them; layer 04 compares the two.
"""

from __future__ import annotations

import dataclasses
import os
import re

BPE_MERGE = "bpe_merge"
WHITESPACE = "whitespace"
TOOL_CALL = "tool_call_rerender"
REASONING = "stripped_reasoning"
SEPARATOR = "dropped_separator"
TRUNCATED = "truncated_history"
OTHER = "other"
KIND_LABELS = {BPE_MERGE: "BPE merge", WHITESPACE: "whitespace", TOOL_CALL: "tool-call re-render",
               REASONING: "stripped reasoning", SEPARATOR: "dropped separator", TRUNCATED: "truncated history",
               OTHER: "other", "missing_token_fields": "missing token fields",
               "malformed_token_fields": "malformed token fields", "not_a_rollout": "not a /run result"}

WINDOW = 8  # tokens shown on each side of a divergence
REASONING_TAGS = ("<think>", "<thinking>", "<reasoning>")
TOOL_CALL_TAGS = (("<tool_call>", "</tool_call>"), ("<function=", "</function>"), ("[TOOL_CALLS]", None),
                  ("<|python_tag|>", None))
SPLICE_RULE = ("build the next prompt from the last assistant message's prompt_token_ids + "
               "generation_token_ids, then the template's rendering of what came after it (the on-policy splice, "
               "docs/protocol.md)")
SERVER_FIX = ("Server at fault: the history was sent with each assistant turn's token fields unchanged, and the "
              f"server's prompt does not continue them, so it ignored them and re-tokenized the text. Fix the "
              f"server: {SPLICE_RULE}.")
CLIENT_FIX = ("Client at fault: the server splices histories that carry token fields (the probes stay continuous), "
              "so the client re-sent these turns without them. Fix the client: send each earlier assistant message "
              "back with prompt_token_ids, generation_token_ids and generation_log_probs unchanged (NeMo Gym's model "
              "server does this when the policy's responses carry them).")
UNKNOWN_FIX = ("Either the client re-sent the earlier assistant turn without its token fields, or the server "
               "ignored them. Layer 04's probes, which always send the fields, tell which; the fix is on that side: "
               f"the client must send the three fields back unchanged, the server must {SPLICE_RULE}.")
TRUNCATED_FIX = ("Fix: keep the whole history in every call (raise the server's max_model_len, or stop the client "
                 "from dropping turns).")
SEPARATOR_FIX = ("Fix: keep the end-of-turn token between turns (the splice keeps the generated ids whole, "
                 "including a trailing eos; a client must not strip it).")


def fix_for(kind: str, sent_token_fields: bool | None) -> str:
    """The fix for a continuity divergence of `kind`, given whether the client is known to have sent the
    earlier turns' token fields (True: a probe; False: the probes passed, so the client did not; None: unknown)."""
    if kind == TRUNCATED:
        return TRUNCATED_FIX
    if kind == SEPARATOR:
        return SEPARATOR_FIX
    if sent_token_fields is None:
        return UNKNOWN_FIX
    return SERVER_FIX if sent_token_fields else CLIENT_FIX


@dataclasses.dataclass
class Divergence:
    """The first token where `actual` stops continuing `expected`, with a decoded window of both sides."""

    kind: str
    token_index: int  # position of the first mismatch, the same in both sequences
    in_generation: bool  # the mismatch falls inside the latest generation (else earlier history)
    explanation: str
    window_start: int
    expected_ids: list[int]  # expected[window_start : token_index + WINDOW]
    actual_ids: list[int]
    expected_length: int
    actual_length: int
    expected_text: str | None = None
    actual_text: str | None = None
    expected_pieces: list[str] | None = None  # one decoded string per id of the window
    actual_pieces: list[str] | None = None
    model_call: int | None = None
    rollout_index: int | None = None
    fix: str = ""  # who is at fault and what to change (`fix_for`); empty outside a continuity check

    def describe(self) -> str:
        where = "the latest generation" if self.in_generation else "earlier history"
        head = f"token {self.token_index} ({where})"
        if self.model_call is not None:
            head = f"model call {self.model_call}, " + head
        lines = [f"{head}: {KIND_LABELS.get(self.kind, self.kind)}", f"  {self.explanation}"]
        if self.expected_pieces is not None:
            # pieces, not one string: in a BPE merge both sides decode to the same text
            lines.append(f"  expected: {self.split_at_mismatch(self.expected_pieces)}")
            lines.append(f"  actual:   {self.split_at_mismatch(self.actual_pieces)}")
        else:
            lines.append(f"  expected ids: {self.expected_ids}")
            lines.append(f"  actual ids:   {self.actual_ids}")
        if self.fix:
            lines.append(f"  {self.fix}")
        return "\n".join(lines)

    def split_at_mismatch(self, pieces: list[str]) -> str:
        """Token pieces joined by `|`, the first mismatching one in [brackets]: `'Sk'|['inny']|' jeans'`."""
        mismatch = self.token_index - self.window_start
        shown = [f"[{piece!r}]" if i == mismatch else repr(piece) for i, piece in enumerate(pieces)]
        return "|".join(shown) if shown else "(nothing: the sequence ends here)"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def find_divergence(expected: list[int], actual: list[int], tokenizer=None, *,
                    generation_start: int = 0) -> Divergence | None:
    """None when `actual` starts with `expected`; else the first divergence, classified.

    `generation_start` is where the latest generation begins inside `expected` (the previous prompt's length).
    """
    if actual[:len(expected)] == expected:
        return None
    shared = min(len(expected), len(actual))
    index = next((i for i in range(shared) if expected[i] != actual[i]), shared)
    kind, explanation = classify(expected, actual, index, tokenizer, generation_start)
    start = max(0, index - WINDOW)
    div = Divergence(kind=kind, token_index=index, in_generation=index >= generation_start,
                     explanation=explanation, window_start=start, expected_ids=expected[start:index + WINDOW],
                     actual_ids=actual[start:index + WINDOW], expected_length=len(expected),
                     actual_length=len(actual))
    if tokenizer is not None:
        div.expected_text = decode(tokenizer, div.expected_ids)
        div.actual_text = decode(tokenizer, div.actual_ids)
        div.expected_pieces = [decode(tokenizer, [i]) for i in div.expected_ids]
        div.actual_pieces = [decode(tokenizer, [i]) for i in div.actual_ids]
    return div


def classify(expected: list[int], actual: list[int], index: int, tokenizer,
             generation_start: int) -> tuple[str, str]:
    """(kind, explanation) of the mismatch at `index`; see the module docstring for the kinds and their order."""
    if index >= len(actual):
        return TRUNCATED, (f"the sequence ends after {len(actual)} tokens, before the {len(expected)} it must "
                           "continue: the history was cut (context limit or a client dropping turns)")
    if tokenizer is None:
        return OTHER, "ids differ (pass a tokenizer to decode and classify the divergence)"
    separator = _dropped_separator(expected, actual, index, tokenizer)
    if separator:
        return SEPARATOR, separator
    text_e, text_a = decode(tokenizer, expected), decode(tokenizer, actual)
    if text_a.startswith(text_e):
        return BPE_MERGE, _explain_merge(expected, actual, index, tokenizer)
    # compare from the first differing token's start (tokens before it agree, so their text does)
    char = min(len(decode(tokenizer, expected[:index])), len(os.path.commonprefix([text_e, text_a])))
    gen_char = len(decode(tokenizer, expected[:generation_start]))
    rest_e, rest_a = text_e[char:], text_a[char:]
    near = _tag_near(text_e, char, REASONING_TAGS)
    if near and not text_a[min(near[1], char):].lstrip().startswith(near[0]):
        tag = near[0]
        return REASONING, (f"a {tag} block present in the generated ids is missing: the chat template (or the "
                           f"client) stripped the reasoning of an earlier turn")
    if _in_tool_call(text_e, char) or _in_tool_call(text_a, char):
        return TOOL_CALL, (f"inside a tool call: generated {rest_e[:40]!r}, re-rendered {rest_a[:40]!r} "
                           f"(the call was re-serialized from parsed JSON)")
    removed = _removed_history(text_e, text_a, char, gen_char, tokenizer)
    if removed:
        return TRUNCATED, (f"{len(removed)} characters of earlier context are missing, starting "
                           f"{removed[:60]!r}: old turns were dropped or the prompt was cut on the left")
    if _squash(rest_a).startswith(_squash(rest_e)):
        return WHITESPACE, (f"only whitespace differs: generated {rest_e[:30]!r}, re-rendered {rest_a[:30]!r} "
                            "(content stripped or re-joined)")
    return OTHER, f"the texts differ: expected {rest_e[:40]!r}, got {rest_a[:40]!r}"


def _dropped_separator(expected, actual, index, tokenizer) -> str | None:
    special = set(tokenizer.all_special_ids)
    missing = expected[index]
    if missing not in special or actual[index] in special:
        return None
    after = expected[index + 1:index + 17]
    if actual[index:index + len(after)] != after:
        return None
    name = decode(tokenizer, [missing])
    return (f"the special token {name!r} (id {missing}) at position {index} is missing: the end-of-turn token was "
            "dropped between turns (a splice cutting one token too many, or a client stripping the eos)")


def _explain_merge(expected, actual, index, tokenizer) -> str:
    """Show the differing stretch as pieces, up to where both tokenizations realign on a character boundary."""
    pieces_e = [decode(tokenizer, [i]) for i in expected[index:index + 32]]
    pieces_a = [decode(tokenizer, [i]) for i in actual[index:index + 32]]
    ends_e = _cumulative(pieces_e)
    ends_a = _cumulative(pieces_a)
    common = sorted(set(ends_e) & set(ends_a))
    stop = common[0] if common else max(ends_e[-1:] or [0])
    left = [p for p, e in zip(pieces_e, ends_e) if e <= stop] or pieces_e[:1]
    right = [p for p, e in zip(pieces_a, ends_a) if e <= stop] or pieces_a[:1]
    return (f"the same text, tokenized differently: generated {'|'.join(map(repr, left))}, re-tokenized "
            f"{'|'.join(map(repr, right))}")


def _cumulative(pieces: list[str]) -> list[int]:
    out, total = [], 0
    for piece in pieces:
        total += len(piece)
        out.append(total)
    return out


def _tag_near(text: str, char: int, tags: tuple[str, ...]) -> tuple[str, int] | None:
    """A tag starting at `char` (after whitespace), or one the common prefix ends inside ("<t" of "<think>")."""
    ahead = len(text[char:]) - len(text[char:].lstrip())
    for tag in tags:
        found = text.find(tag, max(0, char - len(tag) + 1), char + ahead + len(tag))
        if found >= 0:
            return tag, found
    return None


def _in_tool_call(text: str, char: int) -> bool:
    """Is `char` inside a tool call, counting the whitespace that separates the call from what precedes it?"""
    for open_tag, close_tag in TOOL_CALL_TAGS:
        for match in re.finditer(re.escape(open_tag), text):
            lead = len(text[:match.start()].rstrip())
            close = text.find(close_tag, match.start()) if close_tag else -1
            end = close + len(close_tag) if close >= 0 else len(text)
            if lead <= char < end:
                return True
    return False


def _removed_history(text_e: str, text_a: str, char: int, gen_char: int, tokenizer) -> str | None:
    """The stretch of history missing from `text_a`, when the mismatch lies before the generation and the end of
    the expected text reappears earlier in `text_a`, past a message boundary."""
    if char >= gen_char:
        return None
    # the end of the latest generation: it must reappear in `text_a`, earlier than in `text_e`
    tail = text_e[max(gen_char, len(text_e) - 32):] or text_e[-16:]
    found = text_a.find(tail, char)
    expected_at = len(text_e) - len(tail)
    if found < 0 or found >= expected_at:
        return None
    removed = text_e[char:char + expected_at - found]
    markers = [t for t in tokenizer.all_special_tokens if t]
    if any(marker in removed for marker in markers) or len(removed) > 200:
        return removed
    return None


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)

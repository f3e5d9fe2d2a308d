"""Validation layer 02, token round-trip: encode -> decode -> re-encode gives the same ids.

Over the seed's strings plus code, unicode and whitespace cases, two checks: the ids are stable (the seed's
test) and decoding gives back the exact text (a tokenizer that "cleans up" spaces on decode breaks this).
Also shown, as information rather than a check: model-generated ids need not be the canonical encoding of
their text, so decode -> re-encode can change them. That is why multi-turn training needs the splice.
"""

from __future__ import annotations

import html

from gymnb.validation.checks.plots import plot_bars
from gymnb.validation.checks.result import LayerResult, check_mark

ROUNDTRIP_CASES = [
    # the seed's strings
    ("seed: greeting", "Hello, world!"),
    ("seed: answer", "The answer is 42."),
    ("seed: code fence", "```python\nprint('hello')\n```"),
    ("seed: multi-line", "Multi\nline\ntext"),
    ("seed: short", "Hello!"),
    ("seed: inline code", "```code```"),
    # code
    ("code: python", "def add(a, b):\n    \"\"\"Sum.\"\"\"\n    return a + b  # noqa\n"),
    ("code: json", '{"name": "email_send", "arguments": {"to": "a@b.com", "ids": [1, 2]}}'),
    ("code: tool call", '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'),
    ("code: latex", "\\boxed{\\frac{1}{2} + \\sqrt{3}}"),
    ("code: special token text", "done<|im_end|>"),
    # unicode
    ("unicode: accents", "naïve café, Ångström, Straße"),
    ("unicode: CJK", "日本語のテキストと中文"),
    ("unicode: emoji", "👍🏽 family: 👨‍👩‍👧 🚀"),
    ("unicode: math", "Ω ≈ ∑ xᵢ² ≤ ∞"),
    ("unicode: combining", "e\u0301 vs \u00e9"),
    ("unicode: RTL", "مرحبا بالعالم"),
    # whitespace
    ("whitespace: leading", "   three leading spaces"),
    ("whitespace: trailing", "trailing spaces   "),
    ("whitespace: tabs", "col1\tcol2\t\tcol3"),
    ("whitespace: blank lines", "\n\nblank lines around\n\n"),
    ("whitespace: CRLF", "windows\r\nline endings\r\n"),
    ("whitespace: nbsp", "non\u00a0breaking space"),
    ("whitespace: space before punctuation", "Hello , world ! ( x )"),
]


def roundtrip_one(tokenizer, text: str) -> dict:
    """encode -> decode -> re-encode for one string, without special tokens (the seed's convention)."""
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    decoded = tokenizer.decode(token_ids)
    re_encoded = tokenizer.encode(decoded, add_special_tokens=False)
    return {"text": text, "token_ids": token_ids, "decoded": decoded, "re_encoded": re_encoded,
            "ids_stable": token_ids == re_encoded, "text_exact": decoded == text}


def noncanonical_ids(tokenizer, text: str) -> list[int] | None:
    """A valid token sequence for `text` that is not its canonical encoding (fewest tokens), or None."""
    canonical = tokenizer.encode(text, add_special_tokens=False)
    splits = [tokenizer.encode(text[:cut], add_special_tokens=False)
              + tokenizer.encode(text[cut:], add_special_tokens=False) for cut in range(1, len(text))]
    candidates = [ids for ids in splits if ids != canonical and tokenizer.decode(ids) == text]
    return min(candidates, key=len) if candidates else None  # the most plausible generation: fewest tokens


def find_noncanonical_example(tokenizer, word: str = " Skinny") -> dict | None:
    """A non-canonical split of `word` and what re-encoding turns it into."""
    pieces = noncanonical_ids(tokenizer, word)
    if pieces is None:
        return None
    canonical = tokenizer.encode(word, add_special_tokens=False)
    return {"text": word, "generated_ids": pieces, "re_encoded": canonical,
            "generated_tokens": tokenizer.convert_ids_to_tokens(pieces),
            "re_encoded_tokens": tokenizer.convert_ids_to_tokens(canonical)}


def check_token_roundtrip(tokenizer, *, extra_strings=(), cases: list[tuple[str, str]] | None = None,
                          output_dir=".") -> LayerResult:
    """Layer 02: run every case (default ROUNDTRIP_CASES, plus `extra_strings`) through the tokenizer."""
    cases = list(cases if cases is not None else ROUNDTRIP_CASES)
    cases += [(f"extra {i}", text) for i, text in enumerate(extra_strings)]
    result = LayerResult("token_roundtrip", output_dir=str(output_dir))
    rows = [(name, roundtrip_one(tokenizer, text)) for name, text in cases]
    unstable = [name for name, r in rows if not r["ids_stable"]]
    inexact = [name for name, r in rows if not r["text_exact"]]
    result.add("ids stable (encode -> decode -> re-encode)", not unstable,
               f"{len(unstable)} of {len(rows)} cases changed ids: {unstable}" if unstable else f"{len(rows)} cases")
    result.add("decode gives back the exact text", not inexact,
               f"{len(inexact)} of {len(rows)} cases decode differently: {inexact}" if inexact
               else f"{len(rows)} cases")
    result.figures.update(num_cases=len(rows), num_ids_unstable=len(unstable), num_text_inexact=len(inexact),
                          num_tokens_total=sum(len(r["token_ids"]) for _, r in rows))
    plot = plot_bars([name for name, _ in rows], [len(r["token_ids"]) for _, r in rows],
                     [r["ids_stable"] and r["text_exact"] for _, r in rows], output_dir, "roundtrip",
                     title="Tokens per case (red = round trip failed)", xlabel="tokens")
    result.plots.append(plot.name)
    result.details_html = render_roundtrip_table(rows) + render_noncanonical(find_noncanonical_example(tokenizer))
    return result


def render_roundtrip_table(rows: list[tuple[str, dict]]) -> str:
    """Failing cases first, each with its ids before and after the round trip."""
    ordered = sorted(rows, key=lambda item: item[1]["ids_stable"] and item[1]["text_exact"])
    body = []
    for name, r in ordered:
        ok = r["ids_stable"] and r["text_exact"]
        after = "" if ok else f"<br>decoded: <code>{html.escape(repr(r['decoded']))}</code><br>" \
                              f"re-encoded: <code>{r['re_encoded']}</code>"
        body.append(f"<tr><td>{check_mark(ok)}</td><td>{html.escape(name)}</td>"
                    f"<td><code>{html.escape(repr(r['text']))}</code></td>"
                    f"<td><code>{r['token_ids']}</code>{after}</td></tr>")
    return ("<h4>Round trips</h4><table><tr><th></th><th>case</th><th>text</th><th>ids</th></tr>"
            + "".join(body) + "</table>")


def render_noncanonical(example: dict | None) -> str:
    if example is None:
        return ""
    return (
        "<h4>Why round trips are not enough (information)</h4><p>A model may generate a valid but non-canonical "
        f"token sequence: <code>{html.escape(repr(example['text']))}</code> generated as "
        f"<code>{html.escape(str(example['generated_tokens']))}</code> {example['generated_ids']} re-encodes as "
        f"<code>{html.escape(str(example['re_encoded_tokens']))}</code> {example['re_encoded']}. Training on "
        "re-tokenized text would then score ids the model never sampled; layer 04 checks that the integration "
        "splices the generated ids instead.</p>"
    )

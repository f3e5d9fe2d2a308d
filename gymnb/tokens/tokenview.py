"""Looking at tokens (stage: continuity, in notebooks): HTML views of a rollout's ids and an ipywidgets explorer.

Every token is one `<span>`: context the model read (grey), tokens it generated (green, paler the less likely
the sampled token was), tool calls and tool responses (orange underline), special tokens (boxed) and the first
divergence of a broken rollout (red). Hovering a token shows its id, the model call it belongs to and, for
generated tokens, its log-prob. Long stretches of context are folded to keep notebooks light.

    show_rollout(rollout, tokenizer)             # IPython HTML, the whole rollout (or each call when broken)
    explore_rollouts(rollouts, tokenizer)        # pick a rollout and a model call, see the alignment
"""

from __future__ import annotations

import functools
import html
import math

from gymnb.tokens.continuity import check_continuity, extract_trainable_turns
from gymnb.tokens.divergence import KIND_LABELS, Divergence, decode, find_divergence, fix_for

TOOL_TAGS = (("<tool_call>", "</tool_call>"), ("<tool_response>", "</tool_response>"))
FOLD_HEAD, FOLD_TAIL = 48, 160  # context tokens kept before / after a fold

STYLE = """<style>
.gnb-tv{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;line-height:1.7;white-space:pre-wrap;
  word-break:break-all;border:1px solid #ddd;padding:8px;border-radius:4px;background:#fff;color:#222}
.gnb-tv span{border-radius:2px;margin:0 0.5px}
.gnb-tv .ctx{background:#eee;color:#555}
.gnb-tv .gen{background:rgba(46,160,67,var(--p,0.6))}
.gnb-tv .tool{border-bottom:2px solid #e8912d}
.gnb-tv .special{outline:1px solid #888;color:#000;font-weight:600}
.gnb-tv .div{background:#f85149 !important;color:#fff;outline:2px solid #a40e26}
.gnb-tv .fold{color:#888;font-style:italic}
.gnb-legend span{font-family:ui-monospace,monospace;font-size:11px;padding:1px 6px;margin-right:6px;
  border-radius:2px}
.gnb-head{font-family:sans-serif;font-size:13px;margin:6px 0}
.gnb-fix{font-family:sans-serif;font-size:13px;margin:6px 0;padding:6px 8px;border-left:4px solid #a40e26;
  background:#fff5f5}
</style>"""
LEGEND = ('<div class="gnb-legend"><span style="background:#eee">context</span>'
          '<span style="background:rgba(46,160,67,0.6)">generated (paler = less likely)</span>'
          '<span style="border-bottom:2px solid #e8912d">tool call / response</span>'
          '<span style="outline:1px solid #888">special</span>'
          '<span style="background:#f85149;color:#fff">divergence</span></div>')


def tool_mask(pieces: list[str]) -> list[bool]:
    """Per token: does it overlap a tool call or tool response (tags included)?"""
    text = "".join(pieces)
    inside = [False] * (len(text) + 1)
    for open_tag, close_tag in TOOL_TAGS:
        start = text.find(open_tag)
        while start >= 0:
            end = text.find(close_tag, start)
            end = len(text) if end < 0 else end + len(close_tag)
            inside[start:end] = [True] * (end - start)
            start = text.find(open_tag, end)
    mask, pos = [], 0
    for piece in pieces:
        mask.append(any(inside[pos:pos + max(1, len(piece))]))
        pos += len(piece)
    return mask


def render_tokens(tokenizer, ids: list[int], *, call_of: list[int] | None = None,
                  log_probs: dict[int, float] | None = None, mark: set[int] = frozenset(),
                  start: int = 0, fold: bool = True) -> str:
    """Spans for `ids` (positions `start`..), folding long runs of context. `log_probs` maps a position to the
    log-prob of a generated token; positions absent from it are context."""
    log_probs = log_probs or {}
    pieces = [decode(tokenizer, [i]) for i in ids]
    tools = tool_mask(pieces)
    special = set(tokenizer.all_special_ids)
    hidden = folded_positions(len(ids), start, log_probs, mark) if fold else {}
    out = []
    for offset, (token, piece) in enumerate(zip(ids, pieces)):
        pos = start + offset
        if pos in hidden:
            if hidden[pos]:  # first hidden position of a fold
                out.append(f'<span class="fold">… {hidden[pos]} context tokens folded …</span>\n')
            continue
        out.append(_span(token, piece, pos, call_of, log_probs.get(pos), tools[offset], token in special,
                         pos in mark))
    return "".join(out)


def folded_positions(length: int, start: int, log_probs, mark) -> dict[int, int]:
    """{hidden position: size of its fold if it is the fold's first position, else 0} for the middle of each run
    of context longer than FOLD_HEAD + FOLD_TAIL (+ some slack, so a fold always hides a real stretch)."""
    hidden, pos, end = {}, start, start + length
    while pos < end:
        if pos in log_probs or pos in mark:
            pos += 1
            continue
        run_end = pos
        while run_end < end and run_end not in log_probs and run_end not in mark:
            run_end += 1
        first, last = pos + FOLD_HEAD, run_end - FOLD_TAIL
        if last - first > 16:
            hidden.update({p: 0 for p in range(first, last)})
            hidden[first] = last - first
        pos = run_end
    return hidden


def _span(token: int, piece: str, pos: int, call_of, log_prob, is_tool: bool, is_special: bool,
          marked: bool) -> str:
    classes = ["ctx" if log_prob is None else "gen"]
    if is_tool:
        classes.append("tool")
    if is_special:
        classes.append("special")
    if marked:
        classes.append("div")
    title = f"#{pos} id {token}"
    if call_of is not None and pos < len(call_of) and call_of[pos] >= 0:
        title += f" · call {call_of[pos]}"
    style = ""
    if log_prob is not None:
        title += f" · logp {log_prob:.3f}"
        style = f' style="--p:{max(0.2, min(1.0, math.exp(log_prob))):.2f}"'
    text = html.escape(piece).replace("\n", "↵\n")
    return f'<span class="{" ".join(classes)}" title="{html.escape(title)}"{style}>{text}</span>'


def _generation_positions(turns: list[dict]) -> tuple[dict[int, float], list[int]]:
    """For a continuous rollout: position -> log-prob of each generated token, and position -> model call."""
    last = turns[-1]
    total = len(last["prompt_token_ids"]) + len(last["generation_token_ids"])
    log_probs, call_of = {}, [-1] * total
    for call, turn in enumerate(turns):
        begin = len(turn["prompt_token_ids"])
        for j, lp in enumerate(turn["generation_log_probs"]):
            log_probs[begin + j] = lp
            call_of[begin + j] = call
    return log_probs, call_of


def render_divergence_html(div: Divergence, *, fix: str | None = None) -> str:
    """The two sides of a divergence as token pieces, the first mismatch marked, and the fix (`fix`, else the
    divergence's own)."""
    def side(ids, pieces):
        spans = []
        for offset, (token, piece) in enumerate(zip(ids, pieces or [str(i) for i in ids])):
            pos = div.window_start + offset
            cls = "div" if pos == div.token_index else "ctx"
            text = html.escape(piece).replace("\n", "↵")
            spans.append(f'<span class="{cls}" title="#{pos} id {token}">{text}</span>')
        return "".join(spans)

    where = f"model call {div.model_call}, " if div.model_call is not None else ""
    return (f'<div class="gnb-head"><b style="color:#a40e26">{html.escape(KIND_LABELS.get(div.kind, div.kind))}'
            f"</b> at {where}token {div.token_index}: {html.escape(div.explanation)}</div>"
            f'<div class="gnb-tv"><b>expected</b> {side(div.expected_ids, div.expected_pieces)}\n'
            f"<b>actual&nbsp;&nbsp;</b> {side(div.actual_ids, div.actual_pieces)}</div>"
            + (f'<div class="gnb-fix">{html.escape(fix or div.fix)}</div>' if fix or div.fix else ""))


def render_rollout_html(rollout: dict, tokenizer, *, fold: bool = True, fix: str | None = None) -> str:
    """The whole rollout as one token sequence when it is continuous; else the breaking call, the divergence
    and its fix (`fix` overrides the divergence's own, e.g. with layer 04's verdict on who is at fault)."""
    result = check_continuity(rollout, tokenizer)
    reward = rollout.get("reward")
    reward = f"reward {reward:g}, " if isinstance(reward, (int, float)) else ""  # probes have none
    head = (f'<div class="gnb-head">{result.num_calls} model call(s), {reward}'
            f'{"continuous" if result.ok else "<b style=color:#a40e26>broken</b>"}</div>')
    if result.problem:
        return STYLE + head + f'<div class="gnb-head">{html.escape(result.problem)}</div>'
    turns = extract_trainable_turns(rollout)
    if result.ok:
        last = turns[-1]
        log_probs, call_of = _generation_positions(turns)
        body = render_tokens(tokenizer, last["prompt_token_ids"] + last["generation_token_ids"], call_of=call_of,
                             log_probs=log_probs, fold=fold)
        return STYLE + LEGEND + head + f'<div class="gnb-tv">{body}</div>'
    div = result.divergence
    call = render_call_html(rollout, tokenizer, div.model_call, fold=fold, _styled=False)
    return STYLE + LEGEND + head + render_divergence_html(div, fix=fix) + call


def render_call_html(rollout: dict, tokenizer, call: int, *, fold: bool = True, _styled: bool = True) -> str:
    """One model call: the history it shares with the previous call (folded), what came in since (tool
    responses, the next turn header) and what it generated; a divergence at this call is marked."""
    turns = extract_trainable_turns(rollout)
    if not 0 <= call < len(turns):
        raise IndexError(f"the rollout has {len(turns)} model calls; call {call} does not exist")
    turn = turns[call]
    prompt, gen = turn["prompt_token_ids"], turn["generation_token_ids"]
    mark, status = set(), "first call"
    if call > 0:
        before = turns[call - 1]
        expected = before["prompt_token_ids"] + before["generation_token_ids"]
        div = find_divergence(expected, prompt, tokenizer, generation_start=len(before["prompt_token_ids"]))
        status = f"continues call {call - 1}'s {len(expected)} tokens"
        if div is not None:
            mark = {div.token_index}
            status = "<b style=color:#a40e26>breaks continuity</b>: " + html.escape(div.explanation)
    log_probs = {len(prompt) + j: lp for j, lp in enumerate(turn["generation_log_probs"])}
    finish = "ended with eos" if gen and gen[-1] == tokenizer.eos_token_id else "cut (no eos)"
    head = (f'<div class="gnb-head">call {call} of {len(turns)}: {len(prompt)} prompt + {len(gen)} generated '
            f"tokens, {finish}; {status}</div>")
    body = render_tokens(tokenizer, prompt + gen, log_probs=log_probs, mark=mark, fold=fold,
                         call_of=[-1] * len(prompt) + [call] * len(gen))
    return (STYLE + LEGEND if _styled else "") + head + f'<div class="gnb-tv">{body}</div>'


def show_rollout(rollout: dict, tokenizer, **kwargs):
    """`render_rollout_html` as an IPython display object."""
    from IPython.display import HTML

    return HTML(render_rollout_html(rollout, tokenizer, **kwargs))


PROBE_TITLES = {"live": "live multi-turn chat", "splice_bpe": "BPE merge", "splice_tool_call": "tool call in compact JSON"}


def rollout_label(index: int, rollout: dict, tokenizer) -> str:
    """`probe: BPE merge Sk|inny · 2 call(s) · BPE merge` or `rollout 3 · reward 1 · 3 call(s) · continuous`."""
    result = check_continuity(rollout, tokenizer)
    if result.ok:
        state = "continuous"
    else:
        kind = result.divergence.kind if result.divergence else result.problem_kind
        state = "broken: " + KIND_LABELS.get(kind, kind)
    if "probe" in rollout:
        head = "probe: " + rollout.get("title", PROBE_TITLES.get(rollout["probe"], rollout["probe"]))
    else:
        reward = rollout.get("reward")
        head = f"rollout {index}" + (f" · reward {reward:g}" if isinstance(reward, (int, float)) else "")
    return f"{head} · {result.num_calls} call(s) · {state}"


def divergence_stops(sequences: list[dict], tokenizer) -> list[tuple[int, int, Divergence]]:
    """Every (sequence, model call, divergence) where a call's prompt does not continue the previous call."""
    stops = []
    for index, rollout in enumerate(sequences):
        if check_continuity(rollout).problem:
            continue
        turns = extract_trainable_turns(rollout)
        for call in range(1, len(turns)):
            before = turns[call - 1]
            div = find_divergence(before["prompt_token_ids"] + before["generation_token_ids"],
                                  turns[call]["prompt_token_ids"], tokenizer,
                                  generation_start=len(before["prompt_token_ids"]))
            if div is not None:
                div.model_call = call
                stops.append((index, call, div))
    return stops


class RolloutExplorer:
    """State and controls of `explore_rollouts`: which sequence and model call is shown, and the stepping."""

    def __init__(self, sequences: list[dict], tokenizer, *, fold: bool = True):
        import ipywidgets as widgets

        self.sequences, self.tokenizer, self.fold = sequences, tokenizer, fold
        probes = [s for s in sequences if "probe" in s]
        # the probes send the token fields back: if they stay continuous the server splices (a broken rollout
        # is the client's doing); if one breaks, the server ignores fields it was sent
        self.rollouts_sent = None if not probes else not all(check_continuity(p).ok for p in probes)
        self.num_calls = [check_continuity(s).num_calls for s in sequences]
        self.stops = divergence_stops(sequences, tokenizer)
        self.picker = widgets.Dropdown(options=[(rollout_label(i, s, tokenizer), i) for i, s in enumerate(sequences)],
                                       description="sequence", layout=widgets.Layout(width="420px"))
        self.call = widgets.IntSlider(min=0, max=0, description="model call")
        self.buttons = {}
        for name, text, step in (("prev-divergence", "◀ divergence", lambda: self.step_divergence(-1)),
                                 ("next-divergence", "divergence ▶", lambda: self.step_divergence(1)),
                                 ("prev-rollout", "◀ sequence", lambda: self.step_sequence(-1)),
                                 ("next-rollout", "sequence ▶", lambda: self.step_sequence(1))):
            button = widgets.Button(description=text, layout=widgets.Layout(width="auto"))
            button.add_class(f"gnb-{name}")
            button.on_click(lambda _, step=step: step())
            self.buttons[name] = button
        self.status, self.view = widgets.HTML(), widgets.HTML()
        self.view.add_class("gnb-explorer-view")
        self._moving = False
        self.picker.observe(lambda _: self.moved(), names="value")
        self.call.observe(lambda _: self.moved(), names="value")
        first = self.stops[0][:2] if self.stops else (0, 0)
        self.show(*first)

    @property
    def position(self) -> tuple[int, int]:
        return self.picker.value, self.call.value

    def show(self, index: int, call: int) -> None:
        """Select a sequence and a model call together (one redraw)."""
        self._moving = True
        try:
            self.picker.value = index
            self.call.max = max(0, self.num_calls[index] - 1)  # before the value: a slider clamps to its max
            self.call.value = min(call, self.call.max)
        finally:
            self._moving = False
        self.refresh()

    def moved(self) -> None:
        if self._moving:
            return
        index = self.picker.value
        if self.call.max != max(0, self.num_calls[index] - 1):  # a new sequence: open on its first divergence
            own = [call for i, call, _ in self.stops if i == index]
            self.show(index, own[0] if own else 0)
        else:
            self.refresh()

    def step_divergence(self, delta: int) -> None:
        here = self.position
        ahead = [stop[:2] for stop in self.stops if (stop[:2] > here if delta > 0 else stop[:2] < here)]
        if ahead:
            self.show(*(ahead[0] if delta > 0 else ahead[-1]))

    def step_sequence(self, delta: int) -> None:
        index = min(max(self.picker.value + delta, 0), len(self.sequences) - 1)
        own = [call for i, call, _ in self.stops if i == index]
        self.show(index, own[0] if own else 0)

    def refresh(self) -> None:
        here = self.position
        self.buttons["prev-divergence"].disabled = not any(stop[:2] < here for stop in self.stops)
        self.buttons["next-divergence"].disabled = not any(stop[:2] > here for stop in self.stops)
        self.buttons["prev-rollout"].disabled = here[0] == 0
        self.buttons["next-rollout"].disabled = here[0] == len(self.sequences) - 1
        at = [n for n, stop in enumerate(self.stops) if stop[:2] == here]
        self.status.value = (f'<div class="gnb-head">{len(self.stops)} divergence(s) in {len(self.sequences)} '
                             f"sequence(s)" + (f"; showing divergence {at[0] + 1}" if at else "") + "</div>")
        self.view.value = self.render(*here)

    def render(self, index: int, call: int) -> str:
        """The selected call's alignment and, when it diverges, who is at fault and the fix."""
        rollout = self.sequences[index]
        title = f'<div class="gnb-head"><b>{html.escape(self.picker.label or "")}</b></div>'
        if not self.num_calls[index]:
            return title + render_rollout_html(rollout, self.tokenizer)
        body = render_call_html(rollout, self.tokenizer, call, fold=self.fold)
        stop = next((div for i, c, div in self.stops if (i, c) == (index, call)), None)
        if stop is None:
            return title + body
        fix = fix_for(stop.kind, rollout.get("sent_token_fields", self.rollouts_sent))
        return title + body + render_divergence_html(stop, fix=fix)

    def widget(self):
        import ipywidgets as widgets

        controls = widgets.HBox([self.buttons["prev-rollout"], self.picker, self.buttons["next-rollout"]])
        stepping = widgets.HBox([self.buttons["prev-divergence"], self.call, self.buttons["next-divergence"]])
        box = explorer_box([controls, stepping, self.status, self.view])
        box.add_class("gnb-explorer")
        box.explorer = self
        return box


def explore_rollouts(rollouts: list[dict], tokenizer, *, probes: list[dict] = (), fold: bool = True):
    """A widget over the probes and rollouts: it opens on the first divergence, steps to the next or previous
    divergence and sequence, names probes, and shows the fix for the divergence on screen. `probes` (layer
    04's) come first; they also decide who is blamed for a broken rollout. `tokenizer` may be a model name."""
    import ipywidgets as widgets

    sequences = list(probes) + list(rollouts)
    if not sequences:
        return widgets.HTML('<div class="gnb-head">no rollouts or probes to explore</div>')
    if isinstance(tokenizer, str):  # a model name (layer 03): a view, never a failed layer, if it cannot load
        from gymnb.core.errors import ModelLoadError
        from gymnb.core.models import load_tokenizer

        try:
            tokenizer = load_tokenizer(tokenizer)
        except ModelLoadError as exc:
            return widgets.HTML(f'<div class="gnb-head">no explorer: {html.escape(str(exc))}</div>')
    return RolloutExplorer(sequences, tokenizer, fold=fold).widget()


@functools.cache
def _explorer_box_class():
    import ipywidgets as widgets

    class _ExplorerBox(widgets.VBox):
        """A VBox that also carries its current view as text/html, which static exports (nbconvert, GitHub)
        show where no widget can run; JupyterLab renders the live widget instead."""

        def _repr_mimebundle_(self, **kwargs):
            bundle = super()._repr_mimebundle_(**kwargs)
            explorer = getattr(self, "explorer", None)
            if isinstance(bundle, dict) and explorer is not None:
                bundle["text/html"] = (STYLE + explorer.status.value + explorer.view.value
                                       + '<div class="gnb-head"><i>static view of the explorer: open the notebook '
                                       "in JupyterLab to step through divergences</i></div>")
            return bundle

    return _ExplorerBox


def explorer_box(children):
    """The box class is made on first use, so importing tokenview needs no ipywidgets."""
    return _explorer_box_class()(children)

"""Token strips: each response token of a pair coloured by how much a trained model changed its log-prob against
the reference (red: less likely, blue: more likely, white: unchanged), the first token where the chosen and
rejected responses differ outlined. Plain HTML with inline styles, so the report stays one self-contained file.

    entry = {"prompt": "...", "divergence": 3,
             "chosen":   {"tokens": ["The", " answer", ...], "reference": [...], "dpo": [Δ...], "dpop": [Δ...]},
             "rejected": {...}}                       # dpop.analysis.displacement.token_changes
"""

from __future__ import annotations

import html
import math

SATURATE = 2.0  # nats: a change of this size or more gets the full colour


def _colour(change: float) -> str:
    if not math.isfinite(change):
        return "#dddddd"
    depth = min(1.0, abs(change) / SATURATE)
    fade = round(255 * (1 - 0.75 * depth))  # the other two channels fade from 255 to 64
    return f"rgb(255,{fade},{fade})" if change < 0 else f"rgb({fade},{fade},255)"


def _token_text(token: str) -> str:
    return html.escape(token.replace("\n", "⏎").replace(" ", "\u00a0"))


def strip_html(tokens: list[str], changes: list[float], divergence: int | None) -> str:
    """One response as a row of coloured tokens; hovering a token shows its change."""
    cells = []
    for position, (token, change) in enumerate(zip(tokens, changes)):
        first = position == divergence
        style = f"background:{_colour(change)};" + ("outline:2px solid #111;" if first else "")
        title = f"{change:+.3f} nats" + (" (first differing token)" if first else "")
        if not token:  # the first bytes of a character the next token completes (analysis.displacement.token_pieces)
            style += "display:inline-block;width:4px;height:1em;vertical-align:middle;"
            title += " (part of the next character)"
        cells.append(f'<span class="tok" style="{style}" title="{html.escape(title)}">{_token_text(token)}</span>')
    return f'<div class="strip">{"".join(cells)}</div>'


def strips_section_html(entries_by_case: dict[str, list[dict]], models=("dpo", "dpop")) -> str:
    """Every case's pairs: prompt, then chosen and rejected under each model, with the summed change."""
    legend = (f'<p>Each response token coloured by its log-prob change against the reference (SFT) model: '
              f'<span class="tok" style="background:{_colour(-SATURATE)}">less likely</span> '
              f'<span class="tok" style="background:{_colour(0.0)}">unchanged</span> '
              f'<span class="tok" style="background:{_colour(SATURATE)}">more likely</span> '
              f'(full colour at ±{SATURATE:g} nats); the first token where chosen and rejected differ is outlined. '
              'Hover a token for its value.</p>')
    parts = ['<style>.strip{font-family:monospace;font-size:13px;line-height:1.9;margin:2px 0 8px 0}'
             '.tok{padding:1px 0;border-radius:2px}.strip-label{font-size:12px;color:#444}</style>', legend]
    for case, entries in entries_by_case.items():
        for number, entry in enumerate(entries, 1):
            parts.append(f"<h3>{html.escape(case)} pair {number}</h3>"
                         f"<p class=\"strip-label\">prompt: {html.escape(entry['prompt'][-160:])}</p>")
            for side in ("chosen", "rejected"):
                response = entry[side]
                for model in models:
                    total = sum(c for c in response[model] if math.isfinite(c))
                    parts.append(f'<div class="strip-label">{side} under {model.upper()} '
                                 f'(summed change {total:+.2f} nats)</div>')
                    parts.append(strip_html(response["tokens"], response[model], entry["divergence"]))
    return "".join(parts)

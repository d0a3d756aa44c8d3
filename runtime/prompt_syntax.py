"""AUTOMATIC1111's prompt syntax: attention weights and BREAK, read as its web UI reads them.

    (word)       x1.1 per pair of brackets: ((word)) x1.21
    [word]       /1.1 per pair
    (word:1.3)   x1.3
    \\( \\) \\[ \\] \\\\   the character itself
    BREAK        (a word of its own, in capitals) the text after it starts a new 75-token chunk

Brackets left open weigh everything from the bracket to the end; a closing bracket with none open is text;
runs of the same weight are joined into one piece of text, so "(a)(b)" is the text "ab" at x1.1. Any
string parses. Two corner cases where the web UI fails or does something it never meant are read as a
person means them: a weight that is no number (`(a:1.2.3)`) leaves the colon and the number as text (the
web UI raises), and BREAK inside brackets still starts a chunk (the web UI multiplies its internal marker
and then encodes the word "BREAK" with a negative weight).
"""
import re
from dataclasses import dataclass

ROUND_BRACKET_FACTOR = 1.1
SQUARE_BRACKET_FACTOR = 1 / 1.1

# One alternative per kind of piece; text runs stop at every character that may start another kind.
_PIECE = re.compile(r"""
    (?P<escape>\\[()\[\]\\]?)               # \( \) \[ \] \\ and a lone backslash
  | (?P<weight>:(?P<number>[+-]?[.\d]+)\))  # :1.3) closes a round bracket with its own factor
  | (?P<open>[(\[])
  | (?P<close>[)\]])
  | (?P<text>[^\\()\[\]:]+|:)
""", re.VERBOSE)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


@dataclass(frozen=True)
class Segment:
    """A piece of prompt text and its weight; `chunk_break` segments (text "") start a new chunk."""

    text: str
    weight: float = 1.0
    chunk_break: bool = False


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_prompt(prompt: str) -> list[Segment]:
    """The prompt's text pieces with their weights, in order, and its BREAKs; never empty."""
    texts: list[str] = []
    weights: list[float] = []
    breaks: set[int] = set()
    open_round: list[int] = []  # where in `texts` each open bracket started
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for index in range(start, len(texts)):
            if index not in breaks:
                weights[index] *= factor

    def add_text(text: str) -> None:
        for number, part in enumerate(_BREAK.split(text)):
            if number:
                breaks.add(len(texts))
                texts.append("")
                weights.append(1.0)
            texts.append(part)
            weights.append(1.0)

    for match in _PIECE.finditer(prompt):
        kind, piece = match.lastgroup, match.group(0)
        if kind == "escape":
            texts.append(piece[1:])
            weights.append(1.0)
        elif kind == "open":
            (open_round if piece == "(" else open_square).append(len(texts))
        elif kind == "weight" and open_round and _number(match.group("number")) is not None:
            scale(open_round.pop(), _number(match.group("number")))
        elif kind == "close" and piece == ")" and open_round:
            scale(open_round.pop(), ROUND_BRACKET_FACTOR)
        elif kind == "close" and piece == "]" and open_square:
            scale(open_square.pop(), SQUARE_BRACKET_FACTOR)
        else:
            add_text(piece)
    for start in open_round:
        scale(start, ROUND_BRACKET_FACTOR)
    for start in open_square:
        scale(start, SQUARE_BRACKET_FACTOR)

    segments: list[Segment] = []
    for index, (text, weight) in enumerate(zip(texts, weights)):
        if index in breaks:
            segments.append(Segment("", 1.0, chunk_break=True))
        elif segments and not segments[-1].chunk_break and segments[-1].weight == weight:
            segments[-1] = Segment(segments[-1].text + text, weight)
        else:
            segments.append(Segment(text, weight))
    return segments or [Segment("")]

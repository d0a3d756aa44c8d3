"""A parsed prompt's tokens in CLIP-sized chunks, each token with its weight, as AUTOMATIC1111's web UI forms them.

Each chunk holds up to 75 of the prompt's tokens; the text encoder reads it with its start and end tokens (77).
A chunk that fills up in the middle of the text moves the words after its last comma (when that comma is
at most COMMA_BACKTRACK tokens back) into the next chunk, so that a phrase is not cut in two; BREAK starts
a new chunk. A textual-inversion embedding of k vectors is k tokens in a package (TOKEN, TOKENb, ...): a
TOKEN typed once stands for all of them, with its weight on each, and they stay in one chunk.
"""
from collections.abc import Callable
from dataclasses import dataclass, field

from .prompt_syntax import Segment

CHUNK_LENGTH = 75  # the prompt's tokens in one chunk; CLIP's 77 with the start and end tokens
COMMA_BACKTRACK = 20  # the web UI's default "comma padding backtrack"


@dataclass
class Chunk:
    ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


class _Chunker:
    def __init__(self, comma_id: int | None, backtrack: int):
        self.comma_id, self.backtrack = comma_id, backtrack
        self.chunks: list[Chunk] = []
        self.chunk = Chunk()
        self.last_comma = -1

    def next_chunk(self) -> None:
        self.chunks.append(self.chunk)
        self.chunk = Chunk()
        self.last_comma = -1

    def add(self, ids: list[int], weight: float) -> None:
        """One token, or an embedding's tokens, which go into one chunk together."""
        chunk = self.chunk
        if ids[0] == self.comma_id:
            self.last_comma = len(chunk.ids)
        elif (self.backtrack and len(chunk.ids) == CHUNK_LENGTH and self.last_comma != -1
              and len(chunk.ids) - self.last_comma <= self.backtrack):
            cut = self.last_comma + 1
            moved = Chunk(chunk.ids[cut:], chunk.weights[cut:])
            del chunk.ids[cut:], chunk.weights[cut:]
            self.next_chunk()
            self.chunk = chunk = moved
        if len(chunk.ids) == CHUNK_LENGTH or len(chunk.ids) + len(ids) > CHUNK_LENGTH:
            self.next_chunk()
            chunk = self.chunk
        chunk.ids.extend(ids)
        chunk.weights.extend([weight] * len(ids))


def prompt_chunks(segments: list[Segment], tokenize: Callable[[str], list[int]],
                  expansions: dict[int, list[int]], comma_id: int | None,
                  backtrack: int = COMMA_BACKTRACK) -> list[Chunk]:
    """The chunks of a parsed prompt (at least one). `tokenize` gives a text's token ids without start and end
    tokens; `expansions` maps an embedding's first token id to the ids of its other vectors."""
    chunker = _Chunker(comma_id, backtrack)
    for segment in segments:
        if segment.chunk_break:
            chunker.next_chunk()
            continue
        ids = tokenize(segment.text)
        position = 0
        while position < len(ids):
            token = ids[position]
            rest = expansions.get(token, [])
            written_out = bool(rest) and ids[position + 1 : position + 1 + len(rest)] == rest
            chunker.add([token, *rest], segment.weight)
            position += 1 + (len(rest) if written_out else 0)
    if chunker.chunk.ids or not chunker.chunks:
        chunker.next_chunk()
    return chunker.chunks

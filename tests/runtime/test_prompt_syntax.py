"""AUTOMATIC1111's prompt syntax: the parser against the examples its `parse_prompt_attention` documents, and the
chunking against the web UI's rules, written out here as facts."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coreml_sd.runtime.prompt_chunks import CHUNK_LENGTH, prompt_chunks
from coreml_sd.runtime.prompt_syntax import Segment, parse_prompt

# The examples in the docstring of modules/prompt_parser.py:parse_prompt_attention (stable-diffusion-webui 1.x),
# as (text, weight) pairs exactly as it returns them.
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", [
        ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
        (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1),
    ]),
]


def pairs(segments: list[Segment]) -> list[tuple[str, float]]:
    return [("BREAK", -1) if segment.chunk_break else (segment.text, segment.weight) for segment in segments]


@pytest.mark.parametrize(("prompt", "expected"), A1111_EXAMPLES)
def test_parser_matches_a1111s_documented_examples(prompt, expected):
    assert pairs(parse_prompt(prompt)) == expected


@pytest.mark.parametrize(("prompt", "expected"), [
    ("[blurry]", [("blurry", 1 / 1.1)]),
    ("((word))", [("word", 1.1 * 1.1)]),
    ("(red hair:1.3)", [("red hair", 1.3)]),
    ("a) b]", [("a) b]", 1.0)]),  # closing brackets with none open are text
    ("(a:1.2.3)", [("a:1.2.3)", 1.1)]),  # no number: the web UI raises; the text stays, the bracket stays open
    ("a:b", [("a:b", 1.0)]),
    ("back\\\\slash", [("back\\slash", 1.0)]),
    ("", [("", 1.0)]),
    # BREAK, as the web UI marks it: the words around it lose their spaces; at the start it makes an empty chunk
    ("a BREAK b", [("a", 1.0), ("BREAK", -1), ("b", 1.0)]),
    ("BREAK", [("", 1.0), ("BREAK", -1), ("", 1.0)]),
    ("aBREAK b", [("aBREAK b", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1), ("b", 1.1)]),  # the web UI would weight its marker instead
])
def test_parser_details(prompt, expected):
    assert pairs(parse_prompt(prompt)) == expected


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([*"ab ()[]:\\.,1-+", "BREAK", " BREAK ", ":1.5)", "\\("]), max_size=30).map("".join))
def test_any_prompt_parses(prompt):
    segments = parse_prompt(prompt)
    assert segments
    # nothing is lost but the syntax: the letters come back in order
    letters = "".join(segment.text for segment in segments)
    assert [c for c in letters if c in "ab"] == [c for c in prompt if c in "ab"]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_any_unicode_prompt_parses(prompt):
    assert parse_prompt(prompt)


def tokens_of(text: str) -> list[int]:
    """A stand-in tokenizer where each character is one token: its code point."""
    return [ord(c) for c in text]


def test_chunks_break_at_a_comma_within_twenty_tokens():
    # 70 letters, a comma, 10 letters: the 76th token does not fit; the 5 after the comma move on
    text = "a" * 70 + "," + "b" * 10
    chunks = prompt_chunks([Segment(text)], tokens_of, {}, comma_id=ord(","))
    assert [len(chunk.ids) for chunk in chunks] == [71, 10]
    assert chunks[1].ids == [ord("b")] * 10


def test_chunks_ignore_a_comma_further_back():
    text = "a" * 50 + "," + "b" * 40
    chunks = prompt_chunks([Segment(text)], tokens_of, {}, comma_id=ord(","))
    assert [len(chunk.ids) for chunk in chunks] == [CHUNK_LENGTH, 91 - CHUNK_LENGTH]


def test_break_starts_a_chunk_and_weights_follow_their_tokens():
    chunks = prompt_chunks(parse_prompt("(ab:1.5) BREAK c"), tokens_of, {}, comma_id=None)
    assert [(chunk.ids, chunk.weights) for chunk in chunks] == [([97, 98], [1.5, 1.5]), ([99], [1.0])]
    assert [chunk.ids for chunk in prompt_chunks(parse_prompt("BREAK c"), tokens_of, {}, None)] == [[], [99]]


def test_an_embedding_typed_once_stands_for_all_its_tokens():
    expansions = {ord("e"): [1001, 1002]}
    typed_once = prompt_chunks(parse_prompt("x (e:1.2)"), tokens_of, expansions, None)[0]
    assert typed_once.ids == [ord("x"), ord(" "), ord("e"), 1001, 1002]
    assert typed_once.weights == [1.0, 1.0, 1.2, 1.2, 1.2]
    written_out = prompt_chunks([Segment("x e" + chr(1001) + chr(1002))], tokens_of, expansions, None)[0]
    assert written_out.ids == typed_once.ids
    # an embedding is never split between two chunks
    chunks = prompt_chunks([Segment("a" * 74 + "e")], tokens_of, expansions, None)
    assert [len(chunk.ids) for chunk in chunks] == [74, 3]

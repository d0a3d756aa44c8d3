"""Textual-inversion embeddings: new tokens whose vectors join the text encoder's embedding table, and
the package's `vocab.json` / `merges.txt` extended so that each token is one id for every tokenizer that
reads those files (this project's runtime, transformers' CLIPTokenizer, Apple's Swift BPE tokenizer, which
lowercases, splits on spaces and merges by rank, with no list of added tokens).

How a token becomes one id: CLIP's BPE turns a word into the pieces no merge joins any further, e.g.
`xyzcat` -> `xy` `z` `cat</w>`. Merges appended after all of CLIP's (so ranked last) join those pieces
from the right, `z cat</w>` then `xy zcat</w>`, and the vocabulary maps `xyzcat</w>` to the new id. A merge
ranked last applies only where no other merge does, so every other word keeps its tokens unless its own
final pieces end in the token's last two (`…zcat`), and the vocabulary's words never change.

A k-vector embedding (A1111's "vectors per token") is k tokens: TOKEN for the first vector and TOKEN
with the letters b, c, … appended for the others (`mystyle mystyleb`), which a prompt writes out. Tokens
are letters only: CLIP's tokenizer splits digits and punctuation off a word before BPE, so a token with
them could never be one id.
"""
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import ConversionError
from ..sources.folders import sha256
from ..sources.pickles import load_checkpoint
from . import Adapter, split_argument

CLIP_VOCABULARY_SIZE = 49408
END_OF_WORD = "</w>"
TOKEN_PATTERN = re.compile(r"^[a-z]+$")
A1111_KEYS = ("string_to_param", "emb_params")


@dataclass
class Embedding(Adapter):
    path: Path
    token: str
    vectors: torch.Tensor  # (k, width)
    digest: str
    first_id: int = CLIP_VOCABULARY_SIZE  # set when the embeddings of one conversion are numbered
    _pieces: dict[str, list[str]] = field(default_factory=dict, repr=False)

    @property
    def tokens(self) -> list[str]:
        """TOKEN, TOKENb, TOKENc, …: one per vector."""
        return [self.token] + [self.token + chr(ord("a") + index) for index in range(1, len(self.vectors))]

    @property
    def ids(self) -> list[int]:
        return list(range(self.first_id, self.first_id + len(self.vectors)))

    @classmethod
    def from_arguments(cls, arguments: tuple[str, ...]) -> list["Embedding"]:
        embeddings, next_id = [], CLIP_VOCABULARY_SIZE
        for argument in arguments:
            path, token = split_argument(argument, "--embedding", "embedding")
            stored_token, vectors = read_embedding(path)
            embedding = cls(path=path, token=(token or stored_token or path.stem).lower(), vectors=vectors,
                            digest=sha256(path), first_id=next_id)
            embedding.check_token(argument)
            embeddings.append(embedding)
            next_id += len(vectors)
        tokens = [token for embedding in embeddings for token in embedding.tokens]
        repeated = sorted({token for token in tokens if tokens.count(token) > 1})
        if repeated:
            raise ConversionError(f"--embedding: the token {repeated[0]!r} is given twice; give each embedding its own "
                                  "token (PATH:TOKEN)")
        return embeddings

    def check_token(self, argument: str) -> None:
        if not TOKEN_PATTERN.match(self.token):
            raise ConversionError(f"--embedding {argument}: the token {self.token!r} must be letters only (a-z; CLIP "
                                  "splits digits and punctuation off words); pass PATH:TOKEN")

    def settings(self, module_name: str) -> list[dict]:
        if module_name != "text_encoder":
            return []
        return [{"embedding": self.path.name, "sha256": self.digest, "tokens": self.tokens, "ids": self.ids}]

    def describe(self) -> list[dict]:
        return [{"embedding": self.path.name, "path": str(self.path.resolve()), "sha256": self.digest,
                 "tokens": self.tokens, "ids": self.ids}]

    def check(self, module_name: str, layout: torch.nn.Module) -> None:
        if module_name != "text_encoder":
            return
        table = layout.get_input_embeddings()
        if self.vectors.shape[1] != table.weight.shape[1]:
            raise ConversionError(f"embedding {self.path.name} has vectors of width {self.vectors.shape[1]} but the "
                                  f"model's text encoder has width {table.weight.shape[1]}: "
                                  "it was trained for another model")
        if table.weight.shape[0] < CLIP_VOCABULARY_SIZE:
            raise ConversionError(f"embedding {self.path.name}: the text encoder has "
                                  f"{table.weight.shape[0]} token ids, "
                                  f"not the {CLIP_VOCABULARY_SIZE} of CLIP's vocabulary")

    def apply(self, module_name: str, module: torch.nn.Module) -> None:
        if module_name != "text_encoder":
            return
        self.check(module_name, module)
        table = module.get_input_embeddings()
        last = self.first_id + len(self.vectors)
        if table.weight.shape[0] < last:
            with torch.no_grad():
                grown = torch.nn.Embedding(last, table.weight.shape[1], dtype=table.weight.dtype)
                grown.weight[: table.weight.shape[0]] = table.weight
            module.set_input_embeddings(grown)
            module.config.vocab_size = last
            table = grown
        with torch.no_grad():
            table.weight[self.first_id : last] = self.vectors.to(table.weight.dtype)

    def extend_tokenizer_files(self, folder: Path) -> None:
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        merges = (folder / "merges.txt").read_text(encoding="utf-8").rstrip("\n").split("\n")
        ranks = {tuple(line.split(" ")): rank for rank, line in enumerate(merges[1:]) if line}
        for token, token_id in zip(self.tokens, self.ids):
            word = token + END_OF_WORD
            if word in vocab:
                raise ConversionError(f"embedding {self.path.name}: {token!r} is already a word of the vocabulary; "
                                      "pass another token (PATH:TOKEN)")
            pieces = bpe(word, ranks)
            # Join the final pieces from the right: `a b c</w>` -> `b c</w>` then `a bc</w>`. Tokenizers want
            # every merge's result in the vocabulary; the partial joins map to the token's id too.
            joined = pieces[-1]
            for piece in reversed(pieces[:-1]):
                merges.append(f"{piece} {joined}")
                ranks[(piece, joined)] = len(ranks)
                joined = piece + joined
                vocab.setdefault(joined, token_id)
            vocab[word] = token_id
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (folder / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")


def bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's byte-pair encoding of one lowercase word ending in </w>: the lowest-ranked adjacent pair
    merges, everywhere, until no pair has a rank."""
    stem = word.removesuffix(END_OF_WORD)
    symbols = list(stem[:-1]) + [stem[-1] + END_OF_WORD]
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks) + 1), pair) for pair in zip(symbols, symbols[1:])]
        rank, best = min(pairs)
        if best not in ranks:
            break
        merged, index = [], 0
        while index < len(symbols):
            if index + 1 < len(symbols) and (symbols[index], symbols[index + 1]) == best:
                merged.append(symbols[index] + symbols[index + 1])
                index += 2
            else:
                merged.append(symbols[index])
                index += 1
        symbols = merged
    return symbols


def read_embedding(path: Path) -> tuple[str | None, torch.Tensor]:
    """(the token the file names, if any; its vectors (k, width) in float32) from A1111's (`string_to_param`,
    .pt or .safetensors), kohya's (`emb_params`) or diffusers' (`{token: vector}`) files."""
    if path.suffix == ".safetensors":
        data = load_file(path)
    else:
        data = load_checkpoint(path)
    name = data.get("name") if isinstance(data.get("name"), str) else None
    if isinstance(data.get("string_to_param"), dict) and data["string_to_param"]:
        vectors = next(iter(data["string_to_param"].values()))
    elif "emb_params" in data:
        vectors = data["emb_params"]
    elif any(key.startswith("string_to_param.") for key in data):
        vectors = next(value for key, value in data.items() if key.startswith("string_to_param."))
    else:
        tensors = {key: value for key, value in data.items() if isinstance(value, torch.Tensor)}
        if len(tensors) != 1:
            raise ConversionError(f"embedding {path.name} is not a textual-inversion embedding (no string_to_param, "
                                  "emb_params or single learned vector)")
        name, vectors = next(iter(tensors.items()))
        name = name.strip("<>")
    if not isinstance(vectors, torch.Tensor) or vectors.ndim not in (1, 2) or not vectors.is_floating_point():
        raise ConversionError(f"embedding {path.name}: its vectors are not a (k, width) float tensor")
    return name, vectors.detach().reshape(-1, vectors.shape[-1]).float()

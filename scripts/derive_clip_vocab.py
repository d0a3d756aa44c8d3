"""Derive CLIP's vocab.json and merges.txt from the BPE file that open-clip-torch ships.

The tiny model needs the real CLIP tokenizer without network access to the Hugging Face hub.
OpenAI's CLIP (and so openai/clip-vit-large-patch14, SD v1's tokenizer) builds its 49,408-token
vocabulary from `bpe_simple_vocab_16e6.txt.gz`: the 256 byte symbols, the same with an
end-of-word marker, one token per merge rule, then the two special tokens. This script fetches
that file from the open-clip-torch wheel on PyPI and writes the Hugging Face file pair.

    python scripts/derive_clip_vocab.py [--wheel-version 3.3.0] [--out converter/data]
"""
import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# CLIP keeps the first 49152 - 256 - 2 merge rules of the file (the rest were never trained).
MERGE_COUNT = 49152 - 256 - 2
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"


def byte_symbols() -> list[str]:
    """GPT-2's reversible byte-to-unicode table: printable bytes map to themselves, others above 255."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def derive(bpe_text: str) -> tuple[dict[str, int], list[str]]:
    merges = bpe_text.split("\n")[1 : MERGE_COUNT + 1]
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel-version", default="3.3.0")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "converter" / "data")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
                        f"open-clip-torch=={args.wheel_version}"], check=True)
        wheel = next(Path(tmp).glob("open_clip_torch-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            bpe_text = gzip.decompress(archive.read(BPE_MEMBER)).decode("utf-8")
    vocab, merges = derive(bpe_text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (args.out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {args.out}")


if __name__ == "__main__":
    main()

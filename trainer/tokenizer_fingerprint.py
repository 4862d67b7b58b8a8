"""Which tokenizer a checkpoint (or anything made of token ids) belongs to.

A fingerprint hashes the vocabulary (every token string and its id) and the special-token ids. Two
tokenizers with the same fingerprint give every id the same meaning, so weights trained with one can read
ids made by the other; with different fingerprints the ids mean other tokens and the model reads garbage
(MiniMind2's and this project's 6400-token vocabularies share almost no ids).

Weight files record it in their .json (`tokenizer_record`); every place that loads weights together with
a tokenizer compares them (`tokenizer_mismatch`).
"""
import hashlib
import json


def tokenizer_fingerprint(tokenizer) -> str:
    """16 hex digits over (token, id) pairs, the bos/eos/pad/unk ids and which added tokens are special."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    special_ids = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")}
    special_added = sorted(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    blob = json.dumps({"vocab": vocab, "special_ids": special_ids, "special_added": special_added}, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def tokenizer_record(tokenizer, path) -> dict:
    """What a weight file's .json keeps about its tokenizer: the fingerprint, the folder, the size."""
    return {"fingerprint": tokenizer_fingerprint(tokenizer), "path": str(path), "vocab_size": len(tokenizer)}


def tokenizer_mismatch(record: dict, tokenizer, path, what: str) -> str | None:
    """None when `tokenizer` (loaded from `path`) is the one `record` describes; else one line naming both.
    `what` names the thing the record came from (a weight file)."""
    fingerprint = tokenizer_fingerprint(tokenizer)
    if fingerprint == record.get("fingerprint"):
        return None
    return (f"{what} was trained with the tokenizer in {record.get('path')} ({record.get('vocab_size')} tokens, "
            f"fingerprint {record.get('fingerprint')}) but the tokenizer in {path} is another one ({len(tokenizer)} "
            f"tokens, fingerprint {fingerprint}): its ids mean other tokens. Pass --tokenizer_path {record.get('path')} "
            f"(or that tokenizer's folder)")

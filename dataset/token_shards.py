"""
Pre-tokenized pretraining data: the folder scripts/prepare_data.py writes, read by train_pretrain.py with no
tokenizing in the training loop.

    index.json           {"format": "minimind-token-shards", "version": 1, "dtype": "uint16",
                          "tokenizer_fingerprint": ..., "tokenizer_path": ..., "bos_token_id": ..., "eos_token_id": ...,
                          "source": ..., "text_column": ..., "docs": N, "tokens": T, "skipped": S,
                          "shards": [{"tokens": "shard_00000.bin", "starts": "shard_00000.idx.npy", "docs": n, "num_tokens": t}, ...]}
    shard_00000.bin      the ids of consecutive documents, uint16, no header (read with np.memmap)
    shard_00000.idx.npy  int64: where each document starts in the shard, then the shard's end (docs + 1 numbers)

Document i is PretrainDataset's sample i before the cut to max_length (bos + text + eos), so a shard folder
and the corpus it came from give identical samples. index.json is written last: a folder without it is
an unfinished run. The shards are refused by a tokenizer with another fingerprint.
"""
import json
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from dataset.lm_dataset import DataFormatError
from trainer.tokenizer_fingerprint import tokenizer_fingerprint

FORMAT, VERSION = "minimind-token-shards", 1
INDEX = "index.json"


def is_token_shards(path):
    return os.path.isfile(os.path.join(path, INDEX))


def read_index(path):
    index_path = os.path.join(path, INDEX)
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise DataFormatError(f"{index_path}: cannot read the shard index ({e}). Re-run scripts/prepare_data.py") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
        raise DataFormatError(f"{index_path}: not a version-{VERSION} index of {FORMAT}. Re-run scripts/prepare_data.py")
    return index


class TokenShardDataset(Dataset):
    """The documents of a shard folder as (input_ids, labels), cut to max_length, exactly as PretrainDataset
    makes them from the text. Token files and start arrays are memory-mapped: nothing is loaded up front."""

    def __init__(self, path, tokenizer, max_length=512):
        self.path, self.max_length = path, max_length
        self.index = index = read_index(path)
        fingerprint = tokenizer_fingerprint(tokenizer)
        if index["tokenizer_fingerprint"] != fingerprint:
            raise DataFormatError(
                f"{path}: these token shards were made with another tokenizer (fingerprint {index['tokenizer_fingerprint']}, "
                f"from {index.get('tokenizer_path')}) than --tokenizer_path gives ({fingerprint}). Train with that "
                f"tokenizer, or re-run scripts/prepare_data.py with this one")
        if index["docs"] == 0:
            raise DataFormatError(f"{path}: the shards hold no documents. Re-run scripts/prepare_data.py on a non-empty corpus")
        self.shards = index["shards"]
        for shard in self.shards:
            for key in ("tokens", "starts"):
                if not os.path.isfile(os.path.join(path, shard[key])):
                    raise DataFormatError(f"{path}: {shard[key]} is missing. Re-run scripts/prepare_data.py")
        self.first_doc = np.cumsum([0] + [s["docs"] for s in self.shards])  # of each shard
        self._maps, self._pid = None, None

    def __len__(self):
        return int(self.first_doc[-1])

    def _open(self):
        """(tokens, starts) memory maps of every shard, opened once per process (DataLoader workers included)."""
        if self._maps is None or self._pid != os.getpid():
            self._maps = [(np.memmap(os.path.join(self.path, s["tokens"]), dtype=np.uint16, mode="r"),
                           np.load(os.path.join(self.path, s["starts"]), mmap_mode="r")) for s in self.shards]
            self._pid = os.getpid()
        return self._maps

    def __getstate__(self):
        return {**self.__dict__, "_maps": None, "_pid": None}

    def tokens(self, i):
        """Document i's ids (uint16), whole."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        shard = int(np.searchsorted(self.first_doc, i, side="right")) - 1
        tokens, starts = self._open()[shard]
        j = i - self.first_doc[shard]
        return tokens[starts[j]:starts[j + 1]]

    def __getitem__(self, i):
        ids = torch.from_numpy(self.tokens(i)[: self.max_length].astype(np.int64))
        return ids, ids.clone()

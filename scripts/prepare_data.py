"""
Tokenize a pretraining corpus once into uint16 token shards, which train_pretrain.py then reads with no
tokenizing in the training loop (worth it for long runs and corpora of many GB).

    python scripts/prepare_data.py --data_path dataset/pretrain_hq.jsonl --out_dir dataset/pretrain_hq_tokens
    python train_pretrain.py --data_path dataset/pretrain_hq_tokens
    python scripts/prepare_data.py --data_path 'fineweb/*.parquet' --num_proc 16 --out_dir dataset/fineweb_tokens

--data_path takes whatever train_pretrain.py takes (jsonl; parquet file, folder or glob; a datasets
save_to_disk folder) and validates it the same way. Documents are tokenized by --num_proc processes and
written in corpus order, so document i of the shards is sample i of the corpus. The shard format is
described in dataset/token_shards.py; the shards record the tokenizer's fingerprint and train_pretrain.py
refuses them with another tokenizer. A progress bar shows on a terminal (not in logs).
"""
import argparse
import itertools
import json
import multiprocessing
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np  # noqa: E402

from dataset.lm_dataset import PretrainDataset, load_tokenizer  # noqa: E402
from trainer.tokenizer_fingerprint import tokenizer_fingerprint  # noqa: E402
from dataset.token_shards import FORMAT, INDEX, VERSION  # noqa: E402
from trainer.progress import progress_bar  # noqa: E402
from trainer_utils import UserError, add_bool, atomic_write_text, run_main  # noqa: E402

CHUNK_DOCS = 256  # documents per task handed to a worker process
UINT16_IDS = 1 << 16


def parse_args():
    p = argparse.ArgumentParser(description="Tokenize a pretraining corpus into uint16 token shards for train_pretrain.py",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_path", required=True,
                   help="pretraining corpus: jsonl, a .parquet file, a folder or quoted glob of parquet files, or a datasets save_to_disk folder")
    p.add_argument("--out_dir", required=True, help="folder to write the shards and index.json into")
    p.add_argument("--tokenizer_path", default="model", help="tokenizer folder (the one train_pretrain.py will use)")
    p.add_argument("--text_column", default="text", help='the key / column that holds the text, if not "text"')
    p.add_argument("--num_proc", type=int, default=min(8, os.cpu_count() or 1), help="tokenizing processes")
    p.add_argument("--shard_tokens", type=int, default=1 << 27, help="tokens per shard file (2 bytes each)")
    add_bool(p, "--skip_bad_lines", help="skip malformed records (and report how many) instead of stopping")
    add_bool(p, "--overwrite", help="replace shards already in --out_dir")
    args = p.parse_args()
    if args.num_proc < 1 or args.shard_tokens < 1:
        p.error("--num_proc and --shard_tokens must be at least 1")
    return args


# ----------------------------------------------------------------------------------------------------
# tokenizing, in worker processes: each gets the validated corpus once and tokenizes ranges of documents

_corpus = None


def init_worker(corpus):
    global _corpus
    _corpus = corpus


def tokenize_range(bounds):
    """Documents [start, end) -> (their ids concatenated as uint16, each one's length)."""
    docs = [_corpus.tokens(i) for i in range(*bounds)]
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    return np.fromiter(itertools.chain.from_iterable(docs), dtype=np.uint16, count=int(lengths.sum())), lengths


# ----------------------------------------------------------------------------------------------------
# writing


class ShardWriter:
    """Appends whole documents to shard_NNNNN.bin until the next would pass shard_tokens (a longer document gets a
    shard of its own); a shard is written under a temporary name and renamed when complete."""

    def __init__(self, out_dir, shard_tokens):
        self.out_dir, self.shard_tokens = out_dir, shard_tokens
        self.shards, self._file = [], None

    def add(self, tokens, lengths):
        ends = np.cumsum(lengths)
        done = 0
        while done < len(lengths):
            if self._file is None:
                self._start()
            base = int(ends[done - 1]) if done else 0
            n = int(np.searchsorted(ends[done:] - base, self.shard_tokens - self._num_tokens, side="right"))
            if n == 0 and self._num_tokens > 0:
                self._finish()  # the next document does not fit: it opens the next shard
                continue
            n = max(n, 1)
            self._file.write(tokens[base:int(ends[done + n - 1])].tobytes())
            self._lengths.append(lengths[done:done + n])
            self._num_tokens += int(ends[done + n - 1]) - base
            done += n
            if done < len(lengths) or self._num_tokens >= self.shard_tokens:
                self._finish()

    def close(self):
        if self._file is not None:
            self._finish()

    def _start(self):
        self._name = f"shard_{len(self.shards):05d}"
        self._file = open(os.path.join(self.out_dir, self._name + ".bin.tmp"), "wb")
        self._lengths, self._num_tokens = [], 0

    def _finish(self):
        self._file.close()
        self._file = None
        bin_name, starts_name = self._name + ".bin", self._name + ".idx.npy"
        os.replace(os.path.join(self.out_dir, bin_name + ".tmp"), os.path.join(self.out_dir, bin_name))
        lengths = np.concatenate(self._lengths)
        starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tmp = os.path.join(self.out_dir, starts_name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, starts)
        os.replace(tmp, os.path.join(self.out_dir, starts_name))
        self.shards.append({"tokens": bin_name, "starts": starts_name, "docs": len(lengths), "num_tokens": int(starts[-1])})


def shard_files(out_dir):
    """The files of an earlier run in out_dir, index.json first."""
    if not os.path.isdir(out_dir):
        return []
    return sorted((f for f in os.listdir(out_dir) if f == INDEX or f.startswith("shard_")), key=lambda f: (f != INDEX, f))


def main():
    args = parse_args()
    tokenizer = load_tokenizer(args.tokenizer_path)
    if len(tokenizer) > UINT16_IDS:
        raise UserError(f"{args.tokenizer_path}: {len(tokenizer)} tokens do not fit uint16 shards (at most {UINT16_IDS})")
    earlier = shard_files(args.out_dir)
    if earlier and not args.overwrite:
        raise UserError(f"{args.out_dir} already holds token shards ({earlier[0]}, ...); pass --overwrite 1 to replace "
                        f"them, or choose another --out_dir")
    t0 = time.time()
    corpus = PretrainDataset(args.data_path, tokenizer, max_length=None, skip_bad_lines=args.skip_bad_lines,
                             text_column=args.text_column)
    os.makedirs(args.out_dir, exist_ok=True)
    for f in earlier:  # only now that the corpus is valid; the index first, so a half-cleared folder is never taken as complete
        os.remove(os.path.join(args.out_dir, f))
    ranges = [(s, min(s + CHUNK_DOCS, len(corpus))) for s in range(0, len(corpus), CHUNK_DOCS)]
    writer = ShardWriter(args.out_dir, args.shard_tokens)
    bar = progress_bar(len(corpus), "tokenizing", unit="docs")
    if args.num_proc == 1:
        init_worker(corpus)
        pool, chunks = None, map(tokenize_range, ranges)
    else:  # fork where there is one: the workers share the validated corpus instead of unpickling it
        methods = multiprocessing.get_all_start_methods()
        mp = multiprocessing.get_context("fork" if "fork" in methods else None)
        pool = mp.Pool(args.num_proc, initializer=init_worker, initargs=(corpus,))
        chunks = pool.imap(tokenize_range, ranges)  # results come back in corpus order
    try:
        with bar:
            for tokens, lengths in chunks:
                writer.add(tokens, lengths)
                bar.update(len(lengths))
        writer.close()
    finally:
        if pool is not None:
            pool.terminate()
    num_tokens = sum(s["num_tokens"] for s in writer.shards)
    index = {"format": FORMAT, "version": VERSION, "dtype": "uint16",
             "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "tokenizer_path": args.tokenizer_path,
             "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
             "source": args.data_path, "text_column": args.text_column, "docs": len(corpus), "tokens": num_tokens,
             "skipped": corpus.skipped, "shards": writer.shards}
    atomic_write_text(json.dumps(index, indent=1, ensure_ascii=False), os.path.join(args.out_dir, INDEX))
    dt = time.time() - t0
    print(f"wrote {len(corpus)} documents, {num_tokens} tokens in {len(writer.shards)} shard(s) to {args.out_dir} "
          f"({dt:.1f}s, {num_tokens / max(dt, 1e-9):,.0f} tokens/s). Train on them with:\n"
          f"  python train_pretrain.py --data_path {args.out_dir}")


if __name__ == "__main__":
    run_main(main)

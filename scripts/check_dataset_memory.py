"""
Check that a big pretrain jsonl costs (almost) no memory in PretrainDataset: only 8 bytes of line offset
per record stay resident; items are read from disk on demand.

    python scripts/check_dataset_memory.py                   # writes ~1 GB to /tmp once, then measures
    python scripts/check_dataset_memory.py --path big.jsonl  # measure an existing file

Prints peak RSS (resource.getrusage high-water mark) before and after indexing, next to the file size.
"""
import argparse
import os
import random
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dataset.lm_dataset import PretrainDataset, load_tokenizer  # noqa: E402
from trainer.cli import ArgumentParser, int_in, positive_float, positive_int, run_main  # noqa: E402

MB = 1 << 20


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def write_big_file(path, size_bytes, source):
    """Repeat the lines of `source` (the demo corpus) until the file reaches size_bytes."""
    if source and os.path.exists(source):
        with open(source, "rb") as f:
            lines = [l if l.endswith(b"\n") else l + b"\n" for l in f if l.strip()]
    else:  # no demo data: synthetic but realistic-length lines
        lines = [('{"text": "第%d段：' % i + "今天天气很好，我们一起去公园散步。" * 20 + '"}\n').encode() for i in range(1000)]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp, written = path + ".tmp", 0
    with open(tmp, "wb", buffering=16 * MB) as f:
        while written < size_bytes:
            for l in lines:
                f.write(l)
                written += len(l)
                if written >= size_bytes:
                    break
    os.replace(tmp, path)


def main():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", default="/tmp/minimind_memcheck/pretrain_1gb.jsonl")
    p.add_argument("--size_gb", type=positive_float, default=1.0, help="size to write when --path does not exist")
    p.add_argument("--source", default="dataset/demo/pretrain_hq.jsonl", help="lines to repeat when writing")
    p.add_argument("--items", type=positive_int, default=2000, help="random items to read and tokenize")
    p.add_argument("--max_length", type=int_in(2), default=512)
    args = p.parse_args()

    if not os.path.exists(args.path):
        t = time.time()
        write_big_file(args.path, int(args.size_gb * (1 << 30)), args.source)
        print(f"wrote {args.path} in {time.time() - t:.1f}s")
    size = os.path.getsize(args.path)
    tok = load_tokenizer()
    base = peak_rss_mb()  # python + torch + transformers + tokenizer

    t = time.time()
    ds = PretrainDataset(args.path, tok, max_length=args.max_length, cache_index=False)
    t_index = time.time() - t
    after_index = peak_rss_mb()

    rng = random.Random(0)
    t, tokens = time.time(), 0
    for _ in range(args.items):
        ids, _ = ds[rng.randrange(len(ds))]
        tokens += len(ids)
    t_items = time.time() - t
    after_items = peak_rss_mb()

    cache = args.path + ".pretrain.idx.npz"
    if os.path.exists(cache):
        os.remove(cache)
    t = time.time()
    PretrainDataset(args.path, tok, max_length=args.max_length, cache_index=True)  # scans, writes the cache
    t_cache_write = time.time() - t
    t = time.time()
    PretrainDataset(args.path, tok, max_length=args.max_length, cache_index=True)  # reads it
    t_cache_read = time.time() - t

    print(f"file: {size / MB:.0f} MiB, {len(ds):,} records; offsets array {ds.offsets.nbytes / MB:.1f} MiB")
    print(f"peak RSS: {base:.0f} MiB after imports + tokenizer, {after_index:.0f} MiB after indexing "
          f"(+{after_index - base:.0f} MiB), {after_items:.0f} MiB after reading {args.items} random items "
          f"(+{after_items - base:.0f} MiB total)")
    print(f"peak RSS growth / file size = {(after_items - base) / (size / MB):.3f}")
    print(f"index pass (validates every line): {t_index:.1f}s = {size / MB / t_index:.0f} MiB/s; "
          f"cached index: write {t_cache_write:.1f}s, load {t_cache_read:.2f}s")
    print(f"random items: {args.items / t_items:.0f} items/s, {tokens / t_items:.0f} tokens/s (one process)")


if __name__ == "__main__":
    run_main(main)

"""
Loader benchmark: samples/s of train_pretrain.py's data path (dataset + DataLoader + collate, shuffled, as in
training) for one corpus given as jsonl, as parquet, as a datasets save_to_disk folder and as token shards
from scripts/prepare_data.py; also the time each takes to open (index / validate) and to prepare the shards.

    python scripts/bench_data.py                                  # the demo corpus (built if missing)
    python scripts/bench_data.py --source dataset/pretrain_hq.jsonl --docs 200000 --num_workers 0 4

Prints a markdown table. The copies are written to --work_dir (a temporary folder by default).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402

from dataset.lm_dataset import PretrainDataset, load_tokenizer, make_collate  # noqa: E402
from dataset.token_shards import TokenShardDataset  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=os.path.join(ROOT, "dataset", "demo", "pretrain_hq.jsonl"), help='a {"text": ...} jsonl')
    p.add_argument("--docs", type=int, default=0, help="documents to use: the source's first N, repeated if it has fewer (0: all)")
    p.add_argument("--samples", type=int, default=4096, help="samples to load per measurement")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_seq_len", type=int, default=512)
    p.add_argument("--num_workers", type=int, nargs="+", default=[0], help="DataLoader workers to measure with")
    p.add_argument("--repeats", type=int, default=2, help="measurements per row; the best is printed (a shared machine is noisy)")
    p.add_argument("--num_proc", type=int, default=min(8, os.cpu_count() or 1), help="prepare_data.py processes")
    p.add_argument("--work_dir", default=None, help="where to write the copies (default: a temporary folder)")
    return p.parse_args()


def write_copies(args, work):
    """The corpus as jsonl, parquet, a save_to_disk folder and token shards; returns their paths and the shard time."""
    if not os.path.exists(args.source) and args.source.endswith(os.path.join("demo", "pretrain_hq.jsonl")):
        subprocess.run([sys.executable, os.path.join(ROOT, "dataset", "build_demo_data.py"), "--if_missing"], check=True)
    with open(args.source, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if args.docs:
        rows = [rows[i % len(rows)] for i in range(args.docs)]
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    datasets.disable_progress_bars()
    paths = {"jsonl": os.path.join(work, "corpus.jsonl"), "parquet": os.path.join(work, "corpus.parquet"),
             "saved": os.path.join(work, "saved"), "shards": os.path.join(work, "shards")}
    with open(paths["jsonl"], "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": r["text"]}, ensure_ascii=False) + "\n" for r in rows)
    table = pa.table({"text": [r["text"] for r in rows]})
    pq.write_table(table, paths["parquet"])
    datasets.Dataset(table).save_to_disk(paths["saved"])
    t = time.time()
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "prepare_data.py"), "--data_path", paths["jsonl"],
                    "--out_dir", paths["shards"], "--num_proc", str(args.num_proc), "--overwrite", "1"], check=True,
                   stdout=subprocess.DEVNULL)
    return paths, len(rows), time.time() - t


def measure(dataset, args, num_workers):
    """Samples/s and tokens/s of a shuffled DataLoader over `dataset`, as training reads it."""
    gen = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, generator=gen,
                                         num_workers=num_workers, collate_fn=make_collate(0), drop_last=True)
    samples, tokens = 0, 0
    t = time.time()
    while samples < args.samples:
        for ids, _ in loader:
            samples += ids.shape[0]
            tokens += int((ids != 0).sum())
            if samples >= args.samples:
                break
    dt = time.time() - t
    return samples / dt, tokens / dt


def main():
    args = parse_args()
    torch.set_num_threads(1)
    tok = load_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or tmp
        os.makedirs(work, exist_ok=True)
        import datasets
        datasets.config.HF_DATASETS_CACHE = os.path.join(work, "hf_cache")  # parquet's Arrow copy goes with the rest
        paths, docs, prepare_s = write_copies(args, work)
        print(f"{docs} documents from {args.source}; batch {args.batch_size}, max_seq_len {args.max_seq_len}, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; prepare_data.py took {prepare_s:.1f}s "
              f"(--num_proc {args.num_proc})\n")
        print("| input | open (index / validate) s | workers | samples/s | tokens/s |")
        print("| --- | --- | --- | --- | --- |")
        for name, path in paths.items():
            t = time.time()
            if name == "shards":
                dataset = TokenShardDataset(path, tok, max_length=args.max_seq_len)
            else:
                dataset = PretrainDataset(path, tok, max_length=args.max_seq_len, cache_index=False)
            open_s = time.time() - t
            for w in args.num_workers:
                rate, tok_rate = max(measure(dataset, args, w) for _ in range(args.repeats))
                print(f"| {name} | {open_s:.2f} | {w} | {rate:,.0f} | {tok_rate:,.0f} |", flush=True)


if __name__ == "__main__":
    main()

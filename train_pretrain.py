"""Stage 1, pretraining: next-token prediction on raw text, from random weights (or a weight file: --from_weight).

    python train_pretrain.py --data_path dataset/pretrain_hq.jsonl
    torchrun --nproc_per_node 2 train_pretrain.py
    python train_pretrain.py --data_path dataset/pretrain_hq_tokens   # shards from scripts/prepare_data.py
    python train_pretrain.py --from_weight pretrain --save_weight pretrain2   # continue pretraining on more text
Writes out/pretrain_{dim}[_moe].pth, which train_full_sft.py loads.
"""
from dataset.lm_dataset import PretrainDataset, load_tokenizer, make_collate, make_pack_collate
from dataset.token_shards import TokenShardDataset, is_token_shards
from trainer_utils import Context, build_parser, load_from_weight, run_main, train


def loss_fn(model, batch):
    input_ids, labels = batch[0], batch[1]
    position_ids = batch[2] if len(batch) == 3 else None  # --packing: positions restart at every sample
    out = model(input_ids, labels=labels, position_ids=position_ids, packed=position_ids is not None)
    return out.loss + out.aux_loss, {}  # mean next-token cross-entropy + MoE load balancing (0 if dense)


def main():
    parser = build_parser("MiniMind pretraining", out_weight="pretrain", epochs=1, batch_size=32, learning_rate=5e-4,
                          max_seq_len=512, data_path="dataset/pretrain_hq.jsonl", accumulation_steps=8,
                          packing=True, data_column="text", from_weight="none")
    args = parser.parse_args()
    ctx = Context(args)
    tokenizer = load_tokenizer(args.tokenizer_path)
    if is_token_shards(args.data_path):  # tokenized once by scripts/prepare_data.py: no tokenizing in the loop
        dataset = TokenShardDataset(args.data_path, tokenizer, max_length=args.max_seq_len)
    else:
        dataset = PretrainDataset(args.data_path, tokenizer, max_length=args.max_seq_len, skip_bad_lines=args.skip_bad_lines,
                                  text_column=args.text_column)
    model = load_from_weight(args)  # none: a new model from the flags; a weight: continued pretraining
    collate = make_pack_collate(args.max_seq_len) if args.packing else make_collate(tokenizer.pad_token_id)
    train(args, ctx, model, dataset, collate, loss_fn, stage="pretrain")


if __name__ == "__main__":
    run_main(main)

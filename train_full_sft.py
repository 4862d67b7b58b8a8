"""Stage 2, full supervised fine-tuning: teach the pretrained model to chat.

    python train_full_sft.py --data_path dataset/sft_mini_512.jsonl
Loads out/pretrain_{dim}.pth, writes out/full_sft_{dim}[_moe].pth. The loss counts only the assistant's
tokens (and each turn's closing <|im_end|>): the dataset sets every other label to -100.
"""
from dataset.lm_dataset import SFTDataset, load_tokenizer, make_collate, make_pack_collate
from trainer_utils import Context, build_parser, load_from_weight, run_main, train


def loss_fn(model, batch):
    input_ids, labels = batch[0], batch[1]
    position_ids = batch[2] if len(batch) == 3 else None  # --packing: positions restart at every sample
    out = model(input_ids, labels=labels, position_ids=position_ids, packed=position_ids is not None)
    return out.loss + out.aux_loss, {}  # cross-entropy on assistant tokens only (+ MoE balancing)


def main():
    parser = build_parser("MiniMind full SFT", out_weight="full_sft", epochs=2, batch_size=16, learning_rate=5e-5,
                          max_seq_len=512, data_path="dataset/sft_mini_512.jsonl", from_weight="pretrain",
                          packing=True, data_column="conversations")
    args = parser.parse_args()
    ctx = Context(args)
    tokenizer = load_tokenizer(args.tokenizer_path)
    dataset = SFTDataset(args.data_path, tokenizer, max_length=args.max_seq_len, skip_bad_lines=args.skip_bad_lines,
                         conversations_column=args.conversations_column)
    model = load_from_weight(args)
    collate = make_pack_collate(args.max_seq_len) if args.packing else make_collate(tokenizer.pad_token_id)
    train(args, ctx, model, dataset, collate, loss_fn, stage="full_sft")


if __name__ == "__main__":
    run_main(main)

"""LoRA fine-tuning: train a small adapter on a frozen base, e.g. a new identity or a domain.

    python train_lora.py --lora_name lora_identity --data_path dataset/lora_identity.jsonl
    python train_lora.py --lora_name lora_medical --data_path dataset/lora_medical.jsonl
Loads out/rlhf_{dim}.pth by default (--from_weight full_sft to choose another base) and writes only the
adapter, out/lora/{lora_name}_{dim}.pth; eval_model.py --lora_name NAME applies it.
"""
import os

from dataset.lm_dataset import SFTDataset, load_tokenizer, make_collate
from model.model_lora import DEFAULT_TARGETS, apply_lora, mark_only_lora_trainable, save_lora
from trainer_utils import (Context, build_parser, load_from_weight, lora_weight_path, plain_name, positive_float, positive_int,
                           run_main, train)


def loss_fn(model, batch):
    input_ids, labels = batch
    out = model(input_ids, labels=labels)  # SFT loss; only the adapter's parameters get gradients
    return out.loss + out.aux_loss, {}


def main():
    parser = build_parser("MiniMind LoRA fine-tuning", out_weight="lora", epochs=50, batch_size=32, learning_rate=5e-5,
                          max_seq_len=512, data_path="dataset/lora_identity.jsonl", from_weight="rlhf",
                          data_column="conversations")
    g = parser.add_argument_group("LoRA")
    g.add_argument("--lora_name", type=plain_name, default="lora_identity", help="adapter name: writes {out_dir}/lora/{lora_name}_{dim}.pth")
    g.add_argument("--lora_rank", type=positive_int, default=16, help="rank of each adapter (A is rank x in, B is out x rank)")
    g.add_argument("--lora_alpha", type=positive_float, default=None, help="scale = alpha / rank (default alpha = rank)")
    g.add_argument("--lora_targets", default=",".join(DEFAULT_TARGETS), help="comma-separated Linear names to adapt")
    args = parser.parse_args()
    args.save_weight = args.lora_name  # resume/log files are named after the adapter
    ctx = Context(args)
    tokenizer = load_tokenizer(args.tokenizer_path)
    dataset = SFTDataset(args.data_path, tokenizer, max_length=args.max_seq_len, skip_bad_lines=args.skip_bad_lines,
                         conversations_column=args.conversations_column)
    model = load_from_weight(args)
    apply_lora(model, rank=args.lora_rank, alpha=args.lora_alpha, targets=tuple(args.lora_targets.split(",")))
    params = mark_only_lora_trainable(model)  # the base stays frozen, bit for bit

    lora_path = lora_weight_path(args.out_dir, args.lora_name, args.dim)

    def save_adapter(m):
        os.makedirs(os.path.dirname(lora_path), exist_ok=True)
        save_lora(m, lora_path)
        return lora_path

    train(args, ctx, model, dataset, make_collate(tokenizer.pad_token_id), loss_fn, stage="lora",
          trainable_params=params, save_fn=save_adapter)


if __name__ == "__main__":
    run_main(main)

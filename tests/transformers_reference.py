"""Run an exported model folder with whatever transformers is importable, and save what it computes.

    python tests/transformers_reference.py MODEL_DIR OUT.npz PROMPT [PROMPT ...]

Run with PYTHONPATH pointing at an older transformers (installed with pip --target) by the tests that check
our exports load right in transformers 4.x; it deliberately imports nothing from this repository. Saves,
per prompt: the chat-template ids, the logits over them and 12 greedy tokens (plus the decoded text) in OUT.npz,
and the transformers version.
"""
import json
import sys

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(model_dir, out_path, prompts):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    arrays, texts = {}, []
    for n, prompt in enumerate(prompts):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(ids).logits[0]
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
        arrays[f"ids{n}"], arrays[f"logits{n}"], arrays[f"greedy{n}"] = ids[0].numpy(), logits.numpy(), out.numpy()
        texts.append(tokenizer.decode(out, skip_special_tokens=True))
    arrays["meta"] = np.array(json.dumps({"version": transformers.__version__, "texts": texts,
                                          "class": type(model).__name__, "tokenizer_class": type(tokenizer).__name__}))
    np.savez(out_path, **arrays)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])

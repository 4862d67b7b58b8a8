"""Run a GGUF file with llama.cpp (llama-cpp-python) and save what it computes, as JSON.

    python tests/llama_cpp_reference.py MODEL.gguf OUT.json PROMPTS.json

PROMPTS.json: [{"text": chat prompt rendered by our tokenizer, "messages": [the same conversation]}, ...].
Per prompt it saves llama.cpp's token ids of the text, its greedy tokens (up to 12, stopping at eos) and
their text, and the reply of its own chat completion (the GGUF's chat template, temperature 0). Run in a
subprocess so a llama.cpp build that crashes on this CPU fails one test, not the whole run.
"""
import json
import sys

from llama_cpp import Llama

MAX_NEW = 12


def main(model_path, out_path, prompts_path):
    with open(prompts_path, encoding="utf-8") as f:
        prompts = json.load(f)
    llm = Llama(model_path=model_path, n_ctx=512, n_threads=1, seed=0, verbose=False)
    results = []
    for prompt in prompts:
        ids = llm.tokenize(prompt["text"].encode("utf-8"), add_bos=False, special=True)
        llm.reset()
        greedy = []
        for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            if token == llm.token_eos() or len(greedy) == MAX_NEW:
                break
            greedy.append(token)
        chat = llm.create_chat_completion(prompt["messages"], temperature=0.0, top_k=1, max_tokens=MAX_NEW,
                                          repeat_penalty=1.0)
        results.append({"ids": ids, "greedy": greedy,
                        "text": llm.detokenize(greedy).decode("utf-8", errors="replace"),
                        "chat_text": chat["choices"][0]["message"]["content"]})
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(results, f, ensure_ascii=False)


if __name__ == "__main__":
    main(*sys.argv[1:4])

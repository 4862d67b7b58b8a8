"""
Chat with, or auto-test, the model any stage wrote; optionally with a LoRA adapter on top.

    python eval_model.py                                        # full_sft model; asks [0] auto test / [1] manual input
    python eval_model.py --model_mode 0                         # pretrain model: it continues text, it cannot chat
    python eval_model.py --lora_name lora_medical --model_mode 2  # rlhf model + out/lora/lora_medical_512.pth
    python eval_model.py --weight grpo                          # any stage's file by its prefix: out/grpo_512.pth
    python eval_model.py --prompt "你好" --prompt "你是谁？" --temperature 0   # scripted and greedy
    printf '1\\n你好\\n' | python eval_model.py                  # piped: optional menu answer, then one prompt a line
    python eval_model.py --load 1 --model_path MiniMind2        # a transformers folder (save_pretrained / convert_model.py)
    python eval_model.py --tools all --prompt "What is 12*7?"    # the model's tool calls run and are fed back
    python eval_model.py --model_mode 3 --enable_thinking 0     # reasoning model, think block pre-filled empty

Each reply is sampled with a fresh torch.Generator seeded with --seed, so it does not depend on earlier
replies; --temperature 0 is greedy. Ctrl-C or Ctrl-D quits. With --tools, the tools' schemas go into the
system turn; each <tool_call> the model writes is run (trainer/tools.py) and its result fed back as a tool
message until the model answers (at most --max_tool_rounds times), each result shown after 🔧.
"""
import argparse
import itertools
import os
import re
import sys
import time

import torch
from transformers import LogitsProcessorList

from dataset.lm_dataset import load_tokenizer, render_chat
from model.model_minimind import DEFAULT_YARN, MiniMindConfig, count_parameters, stream_text  # also registers "minimind" with AutoModelForCausalLM
from model.model_lora import load_lora
from trainer.chat import THINK_PREFILL, add_tool_args, chat_turn, tools_from_args
from trainer.tool_guide import ToolCallGuide, can_guide
from trainer_utils import (MODEL_MODES, ArgumentParser, UserError, add_bool, check_weight_tokenizer, device_name, float_in,
                           load_weights, lora_weight_path, nonneg_float, nonneg_int, plain_name, positive_int, resolve_weight,
                           run_main, seed_int)

USER, BOT = "👶: ", "🤖️: "  # the markers MiniMind prints before each turn
TOOL = "🔧 "  # before each tool call's result
DIM, RESET = "\033[2m", "\033[0m"  # the <think> part of a reply is dimmed on a terminal

# Auto-test prompts. A pretrain model only continues text, so it gets openings of sentences.
PRETRAIN_PROMPTS = [
    "马克思主义基本原理",
    "人类大脑的主要功能",
    "万有引力原理是",
    "世界上最高的山峰是",
    "二氧化碳在空气中",
    "地球上最大的动物有",
    "杭州市的美食有",
    "The capital of France is",
]
CHAT_PROMPTS = [
    "请介绍一下自己。",
    "你更擅长哪一个学科？",
    "鲁迅的《狂人日记》是如何批判封建礼教的？",
    "我咳嗽已经持续了两周，需要去医院检查吗？",
    "详细的介绍光速的物理概念。",
    "推荐一些杭州的特色美食吧。",
    "请为我讲解“大语言模型”这个概念。",
    "如何理解ChatGPT？",
    "Introduce the history of the United States, please.",
]
TOOL_PROMPTS = [
    "What is 12*7?",
    "计算 (3+4)*5 等于多少？",
    "5 公里是多少英里？",
    "Convert 100 F to C.",
    "2024-03-01 是星期几？",
    "How many days are there from 2024-01-01 to 2024-12-25?",
    "你好，请介绍一下你自己。",
]
LORA_PROMPTS = {
    "lora_identity": [
        "你是谁？",
        "你叫什么名字？",
        "你是ChatGPT吧。",
        "你和openai是什么关系？",
        "Who are you?",
    ],
    "lora_medical": [
        "我最近经常感到头晕，可能是什么原因？",
        "我咳嗽已经持续了两周，需要去医院检查吗？",
        "服用抗生素时需要注意哪些事项？",
        "体检报告中显示胆固醇偏高，我该怎么办？",
        "孕妇在饮食上需要注意什么？",
        "老年人如何预防骨质疏松？",
        "我最近总是感到焦虑，应该怎么缓解？",
        "如果有人突然晕倒，应该如何急救？",
    ],
}


def get_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("which model")
    g.add_argument("--model_mode", type=int, default=1, choices=sorted(MODEL_MODES),
                   help="0: pretrain, 1: full_sft, 2: rlhf (DPO), 3: reason; loads {out_dir}/{prefix}_{dim}[_moe].pth (default 1)")
    g.add_argument("--weight", default=None,
                   help="any stage's weight file instead of --model_mode: its prefix in --out_dir (pretrain, full_sft, rlhf, "
                        "reason, grpo, ppo, ...) or a .pth path")
    g.add_argument("--lora_name", "--lora_weight", dest="lora_name", type=plain_name, default=None,
                   help="apply {out_dir}/lora/{NAME}_{dim}.pth (made by train_lora.py --lora_name NAME) on the model; "
                        "use the --model_mode it was trained on (default: no LoRA)")
    g.add_argument("--out_dir", "--save_dir", dest="out_dir", default="out", help="folder with the weight files (default out)")
    g.add_argument("--dim", "--hidden_size", dest="dim", type=positive_int, default=512,
                   help="hidden size: part of the file name; also builds a plain .pth that has no .json beside it (default 512)")
    g.add_argument("--n_layers", "--num_hidden_layers", dest="n_layers", type=positive_int, default=8,
                   help="Transformer blocks, for a plain .pth without .json (default 8)")
    g.add_argument("--n_heads", "--num_attention_heads", dest="n_heads", type=positive_int, default=8, help="query heads, for a plain .pth (default 8)")
    g.add_argument("--n_kv_heads", "--num_key_value_heads", dest="n_kv_heads", type=positive_int, default=2, help="key/value heads, for a plain .pth (default 2)")
    add_bool(g, "--use_moe", help="mixture-of-experts model: file name ends in _moe (default 0)")
    g.add_argument("--load", type=int, default=0, choices=[0, 1],
                   help="0: native .pth from --out_dir; 1: a transformers folder given by --model_path (default 0)")
    g.add_argument("--model_path", default=None, help="transformers model folder for --load 1 (default MiniMind2)")
    g.add_argument("--load_from", default=None,
                   help="MiniMind-3's spelling: model = --load 0, a folder = --load 1 --model_path FOLDER")
    g.add_argument("--tokenizer_path", default="model",
                   help="tokenizer folder (default model; with --load 1 the model folder's own tokenizer wins if it has one)")

    g = p.add_argument_group("generation")
    g.add_argument("--temperature", type=nonneg_float, default=0.85, help="0: greedy (default 0.85)")
    g.add_argument("--top_p", type=float_in(0, 1, lo_open=True), default=0.85, help="nucleus sampling mass (default 0.85)")
    g.add_argument("--max_new_tokens", "--max_seq_len", dest="max_new_tokens", type=positive_int, default=512,
                   help="most tokens per reply (MiniMind calls it --max_seq_len) (default 512)")
    g.add_argument("--history_cnt", "--historys", dest="history_cnt", type=nonneg_int, default=0,
                   help="chat modes: past messages kept as context, 2 per turn (user + assistant); 0: every prompt stands "
                        "alone (default 0)")
    g.add_argument("--seed", type=seed_int, default=42, help="every reply is sampled with a generator seeded with this (default 42)")
    add_bool(g, "--enable_thinking", "--open_thinking", default=None,
             help="1: the reply starts inside a pre-filled <think> block; 0: an empty think block is pre-filled, so the "
                  "model answers directly (default: neither; a reasoning model opens <think> itself)")
    add_tool_args(p, "offered to the model; its calls run and the results go back to it")

    g = p.add_argument_group("input and output")
    g.add_argument("--prompt", action="append", default=[],
                   help="a prompt to answer (repeatable); without it a terminal gets the menu, piped stdin is read "
                        "one prompt a line (a first line 0 or 1 answers the menu)")
    add_bool(g, "--stream", default=True, help="print each reply token by token (default 1)")
    add_bool(g, "--inference_rope_scaling", help="YaRN: stretch RoPE 16x past the trained length, as MiniMind-3's flag "
                                                 "does (it fixes the positions only, not what the model learned; default 0)")
    add_bool(g, "--show_speed", help="after each reply, its decoding speed in tokens/s, on stderr (default 0)")
    g.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:N]")
    args = p.parse_args(argv)
    if args.load_from not in (None, "model"):  # "model": MiniMind-3's name for the native weights, --load 0
        args.load, args.model_path = 1, args.load_from
    if args.model_path is not None and args.load == 0:  # it would be ignored: the native .pth would answer instead
        p.error("--model_path is read only with --load 1 (a transformers folder); add --load 1, or drop --model_path")
    args.model_path = args.model_path or "MiniMind2"
    args.dropout = 0.0  # load_weights builds plain .pth models from the flags and wants this
    # a pretrain model continues raw text instead of chatting
    args.pretrain = os.path.basename(args.weight).startswith("pretrain") if args.weight else args.model_mode == 0
    if args.lora_name in ("None", "none", ""):
        args.lora_name = None  # MiniMind's spelling of "no LoRA"
    return args


def chat_tools(args):
    """--tools as {name: Tool} (empty without it); the flags a pretrain model cannot use are one clear error."""
    if args.pretrain:
        for flag, value in [("--tools", args.tools), ("--enable_thinking", args.enable_thinking)]:
            if value is not None:
                raise UserError(f"{flag} needs a chat model: a pretrain model only continues text; "
                                f"use --model_mode 1 or later")
    return tools_from_args(args)


# ----------------------------------------------------------------------------------------------------
# Model and tokenizer
# ----------------------------------------------------------------------------------------------------
def load_model(args):
    """-> (model, tokenizer, a line saying what was loaded)."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA GPU is visible; use --device cpu")
    if args.load == 0:
        path, maker = resolve_weight(args, args.weight or MODEL_MODES[args.model_mode])
        if not os.path.exists(path):
            where = "pass the --out_dir / --dim / --use_moe it was trained with"
            raise UserError(f"{path} not found: " + (f"run {maker} first (or {where})" if maker else where))
        model, tokenizer, what = load_weights(path, args), load_tokenizer(args.tokenizer_path), path
        check_weight_tokenizer(path, model, args.tokenizer_path, tokenizer)
        dim = args.dim
    else:
        if not os.path.isdir(args.model_path):
            raise UserError(f"--model_path (--load_from) {args.model_path}: no such folder (a transformers model folder, "
                            f"e.g. written by model.save_pretrained or scripts/convert_model.py)")
        from transformers import AutoModelForCausalLM
        try:
            model = AutoModelForCausalLM.from_pretrained(args.model_path, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"--model_path (--load_from) {args.model_path}: cannot load a transformers model "
                            f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})") from None
        has_own = os.path.isfile(os.path.join(args.model_path, "tokenizer.json"))
        tokenizer = load_tokenizer(args.model_path if has_own else args.tokenizer_path)
        what, dim = args.model_path, model.config.hidden_size
    if args.inference_rope_scaling:
        if not isinstance(model.config, MiniMindConfig):
            raise UserError(f"--inference_rope_scaling needs this toolkit's model code, and {what} loads as "
                            f"{type(model).__name__}: use its native .pth instead")
        # RoPE is computed from the config at every forward: YaRN (MiniMind's default setting) from here on
        model.config.inference_rope_scaling = True
        model.config.yarn_scaling = model.config.yarn_scaling or dict(DEFAULT_YARN)
        what += " + YaRN"
    if args.lora_name:
        lora_path = lora_weight_path(args.out_dir, args.lora_name, dim)
        if not os.path.exists(lora_path):
            raise UserError(f"{lora_path} not found: run train_lora.py --lora_name {args.lora_name} first")
        load_lora(model, lora_path)  # the base weights in memory get adapters; no file is written
        what += f" + {lora_path}"
    n_params = count_parameters(model)
    return model.float().eval().to(args.device), tokenizer, f"{what} ({n_params / 1e6:.2f}M parameters, {args.device})"


# ----------------------------------------------------------------------------------------------------
# One reply
# ----------------------------------------------------------------------------------------------------
def prompt_ids(tokenizer, messages, pretrain, tools=None, thinking=None):
    """A pretrain model continues raw text after <|im_start|>; the others get the ChatML chat template, with the
    tools' schemas and enable_thinking when given."""
    if pretrain:
        return [tokenizer.bos_token_id] + tokenizer.encode(messages[-1]["content"], add_special_tokens=False)
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    text = render_chat(tokenizer, messages, tools, add_generation_prompt=True, **kwargs)
    return tokenizer.encode(text, add_special_tokens=False)


def generate_ids(model, tokenizer, ids, args, guide=None):
    """Yield the reply's token ids, sampled with a generator seeded with --seed. guide: a logits processor
    (the ToolCallGuide of a reply with tools)."""
    x = torch.tensor([ids], device=args.device)
    stop = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    started, count = time.time(), 0
    if hasattr(model, "stream_generate"):  # our MiniMindForCausalLM, from a .pth or a transformers folder
        gen = torch.Generator(device=x.device).manual_seed(args.seed)
        new = model.stream_generate(x, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                    top_p=args.top_p, eos_token_id=tokenizer.eos_token_id, generator=gen,
                                    logits_processor=guide)
    else:  # a LlamaForCausalLM folder (scripts/convert_model.py writes dense models so): generate(), not streamed
        torch.manual_seed(args.seed)
        sampling = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p) if args.temperature > 0 else dict(do_sample=False)
        processors = LogitsProcessorList([guide] if guide else [])
        with torch.inference_mode():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.max_new_tokens,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                 logits_processor=processors, **sampling)
        new = out[0, len(ids):].tolist()
    for t in new:
        if t in stop:
            break
        count += 1
        yield t
    if args.show_speed:  # on stderr: the reply's text on stdout stays as it was
        print(f"[Speed]: {count / max(time.time() - started, 1e-9):.2f} tokens/s", file=sys.stderr, flush=True)


def show(piece, style):
    """Print a piece of a reply; on a terminal the text between <think> and </think> is dimmed."""
    if not style["color"]:
        print(piece, end="", flush=True)
        return
    for part in re.split(r"(<think>|</think>)", piece):
        if part == "<think>":
            part, style["think"] = part + DIM, True
        elif part == "</think>":
            part, style["think"] = RESET + part, False
        print(part, end="")
    sys.stdout.flush()


def shown(pieces, args, prefill=""):
    """Pass a reply's text pieces on while printing them after the 🤖️ marker (token by token with --stream 1).
    prefill: the start of the reply that the prompt already holds (a pre-filled think block): shown first."""
    style = {"color": sys.stdout.isatty() and not os.environ.get("NO_COLOR"), "think": False}
    print(BOT, end="", flush=True)
    text = [prefill]
    if args.stream and prefill:
        show(prefill, style)
    for piece in pieces:
        text.append(piece)
        if args.stream:
            show(piece, style)
        yield piece
    if not args.stream:
        show("".join(text), style)
    print(RESET if style["think"] else "", end="\n\n", flush=True)


def reply(model, tokenizer, messages, args):
    """Print the assistant's turn after the 🤖️ marker and return its full text (think part included)."""
    ids = prompt_ids(tokenizer, messages, pretrain=args.pretrain, thinking=args.enable_thinking)
    prefill = THINK_PREFILL[args.enable_thinking]
    return prefill + "".join(shown(stream_text(tokenizer, generate_ids(model, tokenizer, ids, args)), args, prefill))


def tool_reply(model, tokenizer, messages, tools, args):
    """Answer the last user message with tools: chat_turn (trainer/chat.py, also the server's page mode) runs
    each call the model makes and feeds the result back until the model answers. Every reply is printed
    after 🤖️ and every result after 🔧; `messages` gets the assistant and tool messages."""
    schemas = [t.schema for t in tools.values()]
    prefill = THINK_PREFILL[args.enable_thinking]
    guided = args.guided_tool_calls and can_guide(tokenizer)

    def generate(msgs):
        ids = prompt_ids(tokenizer, msgs, pretrain=False, tools=schemas, thinking=args.enable_thinking)
        guide = ToolCallGuide(tokenizer, schemas, len(ids)) if guided else None
        return shown(stream_text(tokenizer, generate_ids(model, tokenizer, ids, args, guide)), args, prefill)

    calls = {}
    for event, value in chat_turn(generate, messages, tools, args.enable_thinking, args.max_tool_rounds):
        if event == "reply":
            calls.update((c["id"], c["function"]) for c in value.get("tool_calls", []))
        elif event == "tool_result":
            fn = calls[value["tool_call_id"]]
            print(f"{TOOL}{fn['name'] or '(not a call)'} {fn['arguments']} -> {value['content']}", end="\n\n", flush=True)
        elif event == "round_limit":
            print(f"(stopped: the model was given tool results {value} times; raise --max_tool_rounds for more)", end="\n\n", flush=True)


# ----------------------------------------------------------------------------------------------------
# Where the prompts come from
# ----------------------------------------------------------------------------------------------------
def auto_prompts(args):
    if args.pretrain:
        return PRETRAIN_PROMPTS
    if args.tools:
        return TOOL_PROMPTS
    return LORA_PROMPTS.get(args.lora_name, CHAT_PROMPTS)


def not_utf8(text):
    """None for text that came in as UTF-8; else where it did not. Input is decoded with surrogateescape,
    so each undecodable byte arrives as one lone surrogate (U+DC80..U+DCFF)."""
    for i, c in enumerate(text):
        if "\udc80" <= c <= "\udcff":
            return f"byte 0x{ord(c) - 0xdc00:02x} at character {i + 1}"
    return None


def typed_prompts():
    while True:  # ends with Ctrl-D (EOFError) or Ctrl-C (KeyboardInterrupt), caught in main
        line = input(USER).strip()
        bad = not_utf8(line)
        if bad:  # a terminal set to another encoding: say so and let the user type again
            print(f"error: that line is not UTF-8 text ({bad}); set the terminal to UTF-8 (e.g. LANG=C.UTF-8) "
                  f"and type it again", file=sys.stderr, flush=True)
            continue
        if line:
            yield line


def piped_prompts(lines, first_line_number):
    for n, line in enumerate(lines, first_line_number):
        bad = not_utf8(line)
        if bad:
            raise UserError(f"stdin line {n} is not UTF-8 text ({bad}); send UTF-8 (e.g. convert it with iconv -t UTF-8)")
        if line:
            yield line


def get_prompts(args):
    """-> (prompts, whether to echo each one after the 👶 marker)."""
    if args.prompt:
        for n, prompt in enumerate(args.prompt, 1):
            bad = not_utf8(prompt)
            if bad:
                raise UserError(f"--prompt number {n} is not UTF-8 text ({bad}); pass UTF-8 (check the shell's encoding)")
        return args.prompt, True
    if sys.stdin.isatty():
        choice = ""
        while choice not in ("0", "1"):
            choice = input("[0] auto test\n[1] manual input\n").strip()
        return (auto_prompts(args), True) if choice == "0" else (typed_prompts(), False)
    lines = (line.strip() for line in sys.stdin)  # piped: read lazily, one prompt a line
    first = next(lines, None)
    if first is None or first == "0":  # nothing piped also runs the auto test
        return auto_prompts(args), True
    if first == "1":
        return piped_prompts(lines, 2), True
    return piped_prompts(itertools.chain([first], lines), 1), True


def chat(model, tokenizer, prompts, echo, args, tools=None):
    messages = []
    for prompt in prompts:
        if echo:
            print(USER + prompt, flush=True)
        messages = messages[-args.history_cnt:] if args.history_cnt > 0 else []
        while messages and messages[0]["role"] == "tool":  # a kept history never starts with a tool result
            messages.pop(0)
        messages.append({"role": "user", "content": prompt})
        if tools:
            tool_reply(model, tokenizer, messages, tools, args)
        else:
            messages.append({"role": "assistant", "content": reply(model, tokenizer, messages, args)})


def main():
    args = get_args()
    sys.stdout.reconfigure(errors="replace")  # a console that cannot show an emoji still gets the text
    sys.stdin.reconfigure(errors="surrogateescape")  # bytes that are not UTF-8 get a clear message, not a traceback
    try:
        tools = chat_tools(args)
        model, tokenizer, what = load_model(args)
        print(f"model: {what}" + (f", tools: {', '.join(tools)}" if tools else ""), file=sys.stderr, flush=True)
        prompts, echo = get_prompts(args)
        chat(model, tokenizer, prompts, echo, args, tools)
    except (KeyboardInterrupt, EOFError):  # Ctrl-C / Ctrl-D: a clean exit
        print(RESET if sys.stdout.isatty() else "", flush=True)
    except BrokenPipeError:  # e.g. `| head`: the reader left, nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    run_main(main)

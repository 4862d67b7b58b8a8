"""MiniMind-3's name for eval_model.py, so its command lines run as they are:

    python eval_llm.py --weight full_sft --hidden_size 768 --open_thinking 1 --historys 2 --show_speed 1
    python eval_llm.py --load_from MiniMind2 --lora_weight None

Its flags are eval_model.py's under MiniMind-3's names (--save_dir, --lora_weight, --load_from, --open_thinking,
--historys, --show_speed); see `python eval_model.py --help`.
"""
from eval_model import main
from trainer_utils import run_main

if __name__ == "__main__":
    run_main(main)

"""RL from rewards: GRPO/CISPO and PPO losses against hand computation, rollouts (KV cache, left padding,
end-token masks, stored log-probs), every reward, the RL prompt data, and the scripts end to end
(2-process gloo, resume = uninterrupted, one-line errors, loading grpo weights by name)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from test_train import TINY_FLAGS, assert_one_line_error, overfit, read_log, run, tiny_model, write_jsonl

from dataset.lm_dataset import DataFormatError, RLPromptDataset, VerifiableRLPromptDataset, load_tokenizer
from trainer.rewards import (Reply, Rewards, answer_reward, final_answer, format_reward, length_reward, parse_number,
                             repetition_reward)
from trainer.rollout import generate_rollout, reply_logps, token_logps
from trainer_utils import UserError, save_weights
from train_grpo import group_advantages, grpo_loss
from train_ppo import ValueModel, gae, ppo_losses, token_rewards

RL_FLAGS = [*TINY_FLAGS, "--max_new_tokens", "12", "--num_generations", "4", "--batch_size", "2", "--learning_rate", "1e-3",
            "--rewards", "format,answer,repetition,length"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(os.path.join(ROOT, "model"))


def user(q, gt=None, key="gt", system=None):
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": q}, {"role": "assistant", "content": ""}]
    rec = {"conversations": msgs}
    if gt is not None:
        rec[key] = gt
    return rec


@pytest.fixture(scope="module")
def rl_dir(tmp_path_factory):
    """RL prompts with ground truth, and a tiny random `reason` model to start from."""
    d = tmp_path_factory.mktemp("rl")
    rows = [user(f"小明有{a}个苹果，又买了{b}个，一共几个？", str(a + b)) for a in range(4) for b in range(4)]
    write_jsonl(d / "rlaif.jsonl", rows)
    torch.manual_seed(0)
    save_weights(tiny_model(), str(d / "reason_64.pth"))
    return d


def prompt_ids(tok, text):
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False)


# ----------------------------------------------------------------------------------------------------
# GRPO / CISPO
# ----------------------------------------------------------------------------------------------------
FIXED = dict(  # a fixed rollout of 2 replies: 3 and 2 reply tokens (the second row's third column is padding)
    logps=[[-1.0, -2.0, -0.5], [-0.3, -1.2, -9.0]],
    old_logps=[[-1.3, -1.5, -0.5], [-0.8, -1.0, 0.0]],  # ratios e^0.3 (grpo-clipped) and e^0.5 (cispo-clipped)
    ref_logps=[[-0.9, -2.2, -0.7], [-0.4, -1.0, -3.0]],
    advantages=[1.5, -0.5],
    mask=[[1, 1, 1], [1, 1, 0]],
)


def hand_loss(loss_type, epsilon=0.2, epsilon_high=1.5, beta=0.1):
    total, n = 0.0, 0
    for lp_row, old_row, ref_row, a, m_row in zip(FIXED["logps"], FIXED["old_logps"], FIXED["ref_logps"], FIXED["advantages"], FIXED["mask"]):
        for lp, old, ref, m in zip(lp_row, old_row, ref_row, m_row):
            if not m:
                continue
            ratio = math.exp(lp - old)
            if loss_type == "grpo":
                term = -min(ratio * a, min(max(ratio, 1 - epsilon), 1 + epsilon) * a)
            else:
                term = -min(ratio, epsilon_high) * a * lp
            term += beta * (math.exp(ref - lp) - (ref - lp) - 1)
            total, n = total + term, n + 1
    return total / n


@pytest.mark.parametrize("loss_type", ["grpo", "cispo"])
def test_grpo_and_cispo_losses_equal_hand_computation(loss_type):
    t = {k: torch.tensor(v, dtype=torch.float32) for k, v in FIXED.items()}
    logps = t["logps"].clone().requires_grad_(True)
    loss, metrics = grpo_loss(logps, t["old_logps"], t["ref_logps"], t["advantages"], t["mask"], loss_type,
                              epsilon=0.2, epsilon_high=1.5, beta=0.1)
    assert abs(loss.item() - hand_loss(loss_type)) < 1e-6
    loss.backward()
    # gradients: the padding gets none; a grpo-clipped token gets only the KL's; cispo's weight is not differentiated
    assert logps.grad[1, 2] == 0
    n, beta = 5, 0.1
    for (i, j) in [(0, 0), (0, 1), (1, 0)]:
        lp, old, ref, a = FIXED["logps"][i][j], FIXED["old_logps"][i][j], FIXED["ref_logps"][i][j], FIXED["advantages"][i]
        ratio = math.exp(lp - old)
        kl_grad = beta * (1 - math.exp(ref - lp))
        if loss_type == "grpo":
            clipped = (ratio > 1.2 and a > 0) or (ratio < 0.8 and a < 0)
            want = (0.0 if clipped else -ratio * a) + kl_grad
        else:
            want = -min(ratio, 1.5) * a + kl_grad
        assert abs(logps.grad[i, j].item() - want / n) < 1e-6, (i, j)
    assert 0 < metrics["clip_frac"].item() < 1


def test_kl_term_is_zero_when_policy_is_reference():
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    _, metrics = grpo_loss(logps, logps, logps.clone(), torch.tensor([1.0, -1.0]), torch.ones(2, 2), "grpo", beta=0.5)
    assert metrics["kl"].item() == 0.0
    with_kl, _ = grpo_loss(logps, logps, logps.clone(), torch.tensor([1.0, -1.0]), torch.ones(2, 2), "cispo", beta=0.5)
    without, _ = grpo_loss(logps, logps, None, torch.tensor([1.0, -1.0]), torch.ones(2, 2), "cispo", beta=0.0)
    assert with_kl.item() == without.item()
    _, metrics = grpo_loss(logps, logps, logps - 0.1, torch.tensor([1.0, -1.0]), torch.ones(2, 2), "grpo", beta=0.5)
    assert metrics["kl"].item() > 0


def test_group_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.3, 0.3, 0.3, 0.3])
    adv, no_signal = group_advantages(rewards, 4)
    assert torch.equal(adv[4:], torch.zeros(4))  # equal rewards: exactly 0, no signal
    assert no_signal.item() == 0.5
    std = 0.5  # population std of 1, 0, 0, 1
    assert torch.allclose(adv[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4))


def test_grpo_update_moves_probability_towards_better_replies(tok):
    model = tiny_model()
    torch.manual_seed(1)
    rollout = generate_rollout(model, tok, [prompt_ids(tok, "你好")] * 4, max_new_tokens=6)
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before, _ = reply_logps(model, rollout)
    for loss_type in ("grpo", "cispo"):
        logps, _ = reply_logps(model, rollout)
        loss, _ = grpo_loss(logps, rollout.old_logps, None, advantages, rollout.reply_mask, loss_type)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after, _ = reply_logps(model, rollout)
    gain = ((after - before) * rollout.reply_mask).sum(dim=1)
    assert (gain[[0, 2]] > 0).all() and (gain[[1, 3]] < 0).all()


# ----------------------------------------------------------------------------------------------------
# Rollouts
# ----------------------------------------------------------------------------------------------------
def test_rollout_logps_equal_a_full_forward_of_each_unpadded_sequence(tok):
    """Batched sampling with left padding and the KV cache stores, for every sampled token, exactly the
    log-prob a plain forward over that row's own prompt + reply gives."""
    model = tiny_model(initializer_range=0.2).eval()
    prompts = [prompt_ids(tok, q) for q in ["你好", "请介绍一下你自己，你是谁？", "1+1=?"]]
    torch.manual_seed(0)
    rollout = generate_rollout(model, tok, prompts, max_new_tokens=10, temperature=0.7, top_p=0.9)
    assert rollout.input_ids.shape[1] == rollout.prompt_len + rollout.reply_mask.shape[1]
    for row, p in enumerate(prompts):
        n = int(rollout.reply_mask[row].sum())
        reply = rollout.reply_ids[row, :n]
        seq = torch.tensor(p + reply.tolist())[None]
        with torch.no_grad():
            logits = model(seq).logits[0, len(p) - 1:-1]
        want = token_logps(logits, reply, 0.7)
        assert torch.allclose(rollout.old_logps[row, :n], want, atol=1e-4), row
    # the training forward over the whole padded batch gives the same numbers
    with torch.no_grad():
        again, _ = reply_logps(model, rollout, 0.7)
    assert torch.allclose(again * rollout.reply_mask, rollout.old_logps, atol=1e-4)


def test_reply_masks_stop_at_the_end_token(tok):
    """A model taught short replies of different lengths stops each with <|im_end|>: the mask covers the reply
    and its end token, nothing after; the text has no end token; later columns are padding."""
    from dataset.lm_dataset import SFTDataset, make_collate
    import train_full_sft
    import tempfile
    replies = {"你好": "你好！", "你是谁？": "我是MiniMind，一个小模型。", "1+1=?": "2"}
    with tempfile.TemporaryDirectory() as d:
        path = write_jsonl(os.path.join(d, "s.jsonl"), [{"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                                                          for q, a in replies.items()])
        ds = SFTDataset(path, tok, max_length=64)
        batch = make_collate(0)([ds[i] for i in range(len(ds))])
    model = tiny_model(initializer_range=0.2)
    losses = overfit(model, train_full_sft.loss_fn, batch, steps=80, lr=3e-3)
    assert losses[-1] < 0.05
    rollout = generate_rollout(model, tok, [prompt_ids(tok, q) for q in replies], max_new_tokens=20, temperature=0)
    lengths = rollout.reply_mask.sum(dim=1).long().tolist()
    assert len(set(lengths)) > 1  # rows ended at different steps
    for row, (q, a) in enumerate(replies.items()):
        n = lengths[row]
        assert rollout.finished[row] and rollout.texts[row] == a
        assert rollout.reply_ids[row, n - 1].item() == tok.eos_token_id
        assert rollout.reply_mask[row, :n].eq(1).all() and rollout.reply_mask[row, n:].eq(0).all()
        assert rollout.reply_ids[row, n:].eq(tok.pad_token_id).all()
        assert rollout.attention_mask[row, rollout.prompt_len + n:].eq(0).all()
        assert rollout.old_logps[row, n:].eq(0).all()


# ----------------------------------------------------------------------------------------------------
# PPO
# ----------------------------------------------------------------------------------------------------
def test_gae_equals_hand_computation():
    rewards = torch.tensor([[0.0, 0.5, 1.0], [2.0, 0.0, 0.0]])
    values = torch.tensor([[0.1, 0.2, 0.3], [0.4, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    gamma, lam = 0.9, 0.8
    # row 0: deltas from the end (V after the last token = 0)
    d2 = 1.0 + gamma * 0 - 0.3
    d1 = 0.5 + gamma * 0.3 - 0.2
    d0 = 0.0 + gamma * 0.2 - 0.1
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    # row 1: one token
    b0 = 2.0 - 0.4
    adv, ret = gae(rewards, values, mask, gamma, lam)
    assert torch.allclose(adv, torch.tensor([[a0, a1, a2], [b0, 0, 0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[a0 + 0.1, a1 + 0.2, a2 + 0.3], [b0 + 0.4, 0, 0]]), atol=1e-6)
    # lam = 1, gamma = 1: the return of every token is the sum of the rewards from there on
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    assert torch.allclose(ret[0], torch.tensor([1.5, 1.5, 1.0]), atol=1e-6)


def test_token_rewards_and_ppo_losses():
    scores = torch.tensor([1.0, -1.0])
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -0.5], [-0.3, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    r = token_rewards(scores, logps, ref, mask, kl_coef=0.1)
    assert torch.allclose(r, torch.tensor([[-0.05, 0.0, 1.0], [0.0, 0.02 - 1.0, 0.0]]), atol=1e-6)
    old = logps - torch.tensor([[0.0, 0.5, 0.0], [0.0, 0.0, 0.0]])  # token (0, 1): ratio e^0.5 > 1.2
    adv = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, 0.0]])
    values, old_values, returns = torch.zeros(2, 3) + 0.5, torch.zeros(2, 3), torch.ones(2, 3)
    policy_loss, value_loss, approx_kl, metrics = ppo_losses(logps, old, adv, values, old_values, returns, mask, 0.2, 0.2)
    ratio = math.exp(0.5)
    assert abs(policy_loss.item() - (-(1 + 1.2 + 1) + (1 + 1)) / 5) < 1e-6
    assert abs(value_loss.item() - 0.5 * (1 - 0.2) ** 2) < 1e-6  # the clipped value (0.2) is further from 1
    assert abs(approx_kl.item() - ((ratio - 1) - 0.5) / 5) < 1e-6
    assert abs(metrics["clip_frac"].item() - 1 / 5) < 1e-6


def test_value_model_starts_at_zero_from_the_policy_body():
    policy = tiny_model()
    critic = ValueModel(policy)
    ids = torch.tensor([[1, 5, 9, 12]])
    values, _ = critic(ids)
    assert values.shape == (1, 4) and values.abs().max() == 0
    assert all(torch.equal(a, b) for a, b in zip(critic.model.state_dict().values(), policy.model.state_dict().values()))
    assert critic.model.embed_tokens.weight.data_ptr() != policy.model.embed_tokens.weight.data_ptr()


# ----------------------------------------------------------------------------------------------------
# Rewards
# ----------------------------------------------------------------------------------------------------
def reply(text, gt=(), finished=True):
    return Reply([{"role": "user", "content": "q"}], text, list(gt), finished)


def test_format_reward():
    good = "<think>\n12 + 30 = 42\n</think>\n<answer>\n42\n</answer>"
    assert format_reward(reply(good)) == 1.0
    assert format_reward(reply(good + "\n")) == 1.0
    for bad in ["42", "<think>\n12 + 30 = 42\n</think>\n42", "<answer>\n42\n</answer>",
                "<think>\n\n</think>\n<answer>\n42\n</answer>", good + good, "<think>\nx\n</think>\n<answer>\n42"]:
        assert format_reward(reply(bad)) == 0.0, bad
    assert format_reward(reply(good, finished=False)) == 0.0


def test_answer_reward():
    assert final_answer("<think>\n1+1=2\n</think>\n<answer>\n2\n</answer>") == "2"
    assert final_answer("<think>\nstill thinking 2") == ""
    assert final_answer("<think>\nx\n</think>\nThe answer is 7.") == "The answer is 7."
    assert parse_number("1,234") == 1234 and parse_number("3/4") == parse_number("0.75") and parse_number("50%") * 2 == 1
    assert parse_number("abc") is None
    cases = [("<think>\nx\n</think>\n<answer>\n42\n</answer>", ["42"], 1.0),
             ("<think>\nx\n</think>\n<answer>\n42.0\n</answer>", ["42"], 1.0),
             ("<think>\nx\n</think>\n<answer>\n答案是４２个\n</answer>", ["42"], 1.0),  # full-width digits
             ("<think>\nx\n</think>\n<answer>\n41\n</answer>", ["42"], 0.0),
             ("<think>\n42\n</think>\n<answer>\n40\n</answer>", ["42"], 0.0),
             ("<think>\n6 × 7 = 42", ["42"], 0.0),  # cut off while thinking: no answer yet
             ("It is 1/2.", ["0.5"], 1.0),
             ("<answer>\nParis\n</answer>", ["paris"], 1.0),
             ("<answer>\nLondon\n</answer>", ["Paris", "London"], 1.0),
             ("<answer>\nRome\n</answer>", ["Paris"], 0.0)]
    for text, gt, want in cases:
        assert answer_reward(reply(text, gt)) == want, (text, gt)


def test_repetition_and_length_rewards():
    assert repetition_reward(reply("小明有3个苹果，又买了4个，一共7个。")) == 0.0
    loop = repetition_reward(reply("我是小星" * 20))
    assert -1.0 < loop < -0.9
    some = repetition_reward(reply("a b c a b c d e f"))
    assert abs(some - (-1 / 7)) < 1e-9
    assert repetition_reward(reply("hi")) == 0.0
    assert length_reward(reply("x" * 50), 20, 100) == 0.0
    assert length_reward(reply("x" * 10), 20, 100) == -0.5
    assert length_reward(reply("x" * 150), 20, 100) == -0.5
    assert length_reward(reply("x" * 500), 20, 100) == -1.0
    assert length_reward(reply("x" * 50, finished=False), 20, 100) == -1.0


class Args:
    rewards, reward_weights, length_min, length_max, reward_model_path = "format,answer", None, 0, 800, None
    trust_remote_code = False


def test_rewards_combine_with_weights():
    args = Args()
    args.rewards, args.reward_weights = "format,answer,length", "0.5,2,1"
    rewards = Rewards(args, "cpu")
    replies = [reply("<think>\nx\n</think>\n<answer>\n3\n</answer>", ["3"]), reply("3", ["3"]), reply("4", ["3"], finished=False)]
    total, parts = rewards(replies, "cpu")
    assert parts["format"].tolist() == [1, 0, 0] and parts["answer"].tolist() == [1, 1, 0] and parts["length"].tolist() == [0, 0, -1]
    assert total.tolist() == [2.5, 2.0, -1.0]
    for rw, weights in [("format,nope", None), ("format,format", None), ("format,answer", "1"), ("format", "x"), ("model", None)]:
        args.rewards, args.reward_weights = rw, weights
        with pytest.raises(UserError):
            Rewards(args, "cpu")


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tok):
    """A tiny real transformers sequence-classification model (Llama) with the project's tokenizer."""
    from transformers import LlamaConfig, LlamaForSequenceClassification
    d = tmp_path_factory.mktemp("rm")
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(vocab_size=6400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                       num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=0))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def test_reward_model_scores_replies(reward_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    args = Args()
    args.rewards, args.reward_model_path = "model", reward_model_dir
    rewards = Rewards(args, "cpu")
    assert rewards.reward_model.model is None  # loaded on first use
    replies = [reply("<think>\nx\n</think>\n<answer>\n好的\n</answer>"), reply("不知道")]
    total, parts = rewards(replies, "cpu")
    rm = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    rt = AutoTokenizer.from_pretrained(reward_model_dir)
    for r, got, answer in zip(replies, total.tolist(), ["好的", "不知道"]):
        text = rt.apply_chat_template(r.messages + [{"role": "assistant", "content": answer}], tokenize=False)
        with torch.no_grad():
            want = rm(**rt(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
        assert abs(got - want) < 1e-4
    assert total[0] != total[1]


CUSTOM_RM_CONFIG = '''
from transformers import PretrainedConfig


class TinyRewardConfig(PretrainedConfig):
    model_type = "tiny_reward"

    def __init__(self, vocab_size=6400, hidden_size=16, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
'''
CUSTOM_RM_MODEL = '''
import torch
from torch import nn
from transformers import PreTrainedModel

from .configuration_tiny_reward import TinyRewardConfig


class TinyRewardModel(PreTrainedModel):
    """InternLM2-reward's interface: AutoModel with remote code, and get_score(tokenizer, conversation)."""
    config_class = TinyRewardConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.head = nn.Linear(config.hidden_size, 1)
        self.post_init()

    def forward(self, input_ids):
        return self.head(self.embed(input_ids).mean(dim=1))[:, 0]

    @torch.no_grad()
    def get_score(self, tokenizer, conversation):
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
        return self.forward(tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(self.device)).item()
'''


@pytest.fixture(scope="module")
def custom_reward_model_dir(tmp_path_factory, tok):
    """A reward model that is code in its own folder, as MiniMind-3's default internlm2-1_8b-reward is."""
    from transformers import AutoConfig, AutoModel
    d = tmp_path_factory.mktemp("custom_rm")
    (d / "configuration_tiny_reward.py").write_text(CUSTOM_RM_CONFIG)
    (d / "modeling_tiny_reward.py").write_text(CUSTOM_RM_MODEL)
    (d / "config.json").write_text(json.dumps({"model_type": "tiny_reward", "architectures": ["TinyRewardModel"], "auto_map": {
        "AutoConfig": "configuration_tiny_reward.TinyRewardConfig", "AutoModel": "modeling_tiny_reward.TinyRewardModel"}}))
    torch.manual_seed(0)
    model = AutoModel.from_config(AutoConfig.from_pretrained(d, trust_remote_code=True), trust_remote_code=True)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def test_custom_code_reward_model_needs_trust_and_is_asked_as_minimind3_asks(custom_reward_model_dir):
    from transformers import AutoModel, AutoTokenizer
    args = Args()
    args.rewards, args.reward_model_path = "model", custom_reward_model_dir
    with pytest.raises(UserError, match="modeling_tiny_reward.TinyRewardModel.*--trust_remote_code 1"):
        Rewards(args, "cpu")
    args.trust_remote_code = True
    rewards = Rewards(args, "cpu")
    history = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "1+1=?"}]
    replies = [Reply(history, "<think>\nx\n</think>\n<answer>\n2\n</answer>", [], True), Reply(history[-1:], "不知道", [], True)]
    total, _ = rewards(replies, "cpu")
    rm = AutoModel.from_pretrained(custom_reward_model_dir, trust_remote_code=True).eval()
    rt = AutoTokenizer.from_pretrained(custom_reward_model_dir)
    folded = "user: 你好\nassistant: 你好！\n以上是对话历史。我的新问题是：\n1+1=?"
    want = [rm.get_score(rt, [{"role": "user", "content": folded}, {"role": "assistant", "content": "2"}]),
            rm.get_score(rt, [{"role": "user", "content": "1+1=?"}, {"role": "assistant", "content": "不知道"}])]
    assert total.tolist() == pytest.approx(want, abs=1e-5) and want[0] != want[1]


# ----------------------------------------------------------------------------------------------------
# RL prompt data
# ----------------------------------------------------------------------------------------------------
def test_rl_dataset_reads_minimind_shape_and_ground_truth(tmp_path, tok):
    rows = [user("1+1=?", "2"), user("2+2=?", ["4", "four"]), user("3+3=?", 6, key="answer"),
            user("你好", system="你是一个助手。"), {"conversations": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                                                     {"role": "user", "content": "c"}, {"role": "assistant", "content": "无"}]}]
    ds = RLPromptDataset(write_jsonl(tmp_path / "r.jsonl", rows), tok, max_length=256)
    assert [s["gt"] for s in (ds[i] for i in range(len(ds)))] == [["2"], ["4", "four"], ["6"], [], []]
    s = ds[4]
    assert [m["content"] for m in s["messages"]] == ["a", "b", "c"]  # everything before the last assistant message
    assert tok.decode(s["prompt_ids"]) == tok.apply_chat_template(s["messages"], tokenize=False, add_generation_prompt=True)
    assert s["reply_prefix"] == ""
    assert len(RLPromptDataset(str(tmp_path / "r.jsonl"), tok, max_length=5)[3]["prompt_ids"]) == 5  # keeps the last tokens
    with pytest.raises(DataFormatError, match=r"r.jsonl:4: no ground truth"):
        VerifiableRLPromptDataset(str(tmp_path / "r.jsonl"), tok)


def test_thinking_ratio_gives_each_prompt_a_fixed_mode(tmp_path, tok):
    path = write_jsonl(tmp_path / "r.jsonl", [user(f"{a}+{a}=?", str(2 * a)) for a in range(40)])
    prefixes = lambda ratio: [s["reply_prefix"] for s in RLPromptDataset(path, tok, thinking_ratio=ratio)]  # noqa: E731
    half = prefixes(0.5)
    assert set(half) == {"<think>\n", "<think>\n\n</think>\n"} and 10 <= half.count("<think>\n") <= 30
    assert half == prefixes(0.5)  # drawn per prompt: the same in every epoch and after a resume
    assert set(prefixes(1.0)) == {"<think>\n"} and set(prefixes(0.0)) == {"<think>\n\n</think>\n"}


def test_minimind3_rl_flags(rl_dir, tmp_path):
    """MiniMind-3's --debug_mode / --debug_interval / --debug_log_ratio / --thinking_ratio / --rollout_engine torch /
    --save_dir: samples are shown, and before PPO's first update the policy's log-probs equal the rollout's."""
    common = [*RL_FLAGS, "--from_weight", str(rl_dir / "reason_64.pth"), "--data_path", str(rl_dir / "rlaif.jsonl"),
              "--max_steps", "2", "--debug_mode", "--debug_interval", "2", "--thinking_ratio", "0.5", "--rollout_engine", "torch"]
    proc = run("train_ppo.py", *common, "--num_generations", "2", "--mini_batch_size", "2", "--debug_log_ratio",
               "--save_dir", str(tmp_path / "ppo"))
    ratios = [float(line.split("mean ")[1].split(",")[0]) for line in proc.stdout.splitlines() if "|log ratio|" in line]
    assert len(ratios) == 2 and all(r < 1e-4 for r in ratios), proc.stdout
    assert proc.stdout.count("    reward ") == 2  # step 2 only: one prompt's 2 replies
    assert os.path.exists(tmp_path / "ppo" / "ppo_64.pth")
    proc = run("train_grpo.py", *common, "--out_dir", str(tmp_path / "grpo"))
    assert proc.stdout.count("    reward ") == 4  # the group of 4 replies, at step 2
    proc = run("train_grpo.py", *common, "--out_dir", str(tmp_path / "x"), "--rollout_engine", "sglang",
               "--sglang_base_url", "http://localhost:8998", check=False)
    assert_one_line_error(proc, "--rollout_engine sglang", "drop the flag")
    proc = run("train_grpo.py", *common, "--out_dir", str(tmp_path / "x"), "--enable_thinking", "1", check=False)
    assert_one_line_error(proc, "--thinking_ratio", "--enable_thinking")


@pytest.mark.parametrize("line, problem", [
    ('{"conversations": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ('{"conversations": [{"role": "assistant", "content": ""}]}', "starts with an assistant message"),
    ('{"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}], "gt": []}', '"gt" is an empty list'),
    ('{"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}], "gt": {"a": 1}}', '"gt" holds'),
    ('{"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}], "gt": "1", "answer": "1"}', "both"),
    ('{"chosen": [], "rejected": []}', "looks like DPO data"),
    ('{"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}], "gt": "1"', "invalid JSON"),
])
def test_bad_rl_lines_are_one_line_errors(tmp_path, tok, line, problem):
    good = json.dumps(user("q", "1"))
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n{good}\n{line}\n", encoding="utf-8")
    with pytest.raises(DataFormatError) as e:
        RLPromptDataset(str(path), tok)
    assert str(e.value).startswith(f"{path}:3: ") and problem in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------------
# The scripts
# ----------------------------------------------------------------------------------------------------
def test_grpo_two_processes_gloo(rl_dir, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29641",
                           os.path.join(ROOT, "train_grpo.py"), *RL_FLAGS, "--out_dir", str(tmp_path),
                           "--from_weight", str(rl_dir / "reason_64.pth"), "--data_path", str(rl_dir / "rlaif.jsonl"),
                           "--max_steps", "2", "--accumulation_steps", "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    log = read_log(tmp_path, "grpo_64.jsonl")
    assert [r["step"] for r in log] == [1, 2]
    start = torch.load(rl_dir / "reason_64.pth", weights_only=True)
    end = torch.load(tmp_path / "grpo_64.pth", weights_only=True)
    assert any(not torch.equal(start[k], end[k]) for k in start)


@pytest.mark.parametrize("script", ["train_grpo.py", "train_ppo.py"])
def test_resume_matches_uninterrupted(rl_dir, tmp_path, script):
    """Also: the scripts log every number they promise and write the stage's weight file."""
    stage = script[len("train_"):-len(".py")]
    extra = ["--num_generations", "2", "--mini_batch_size", "2"] if stage == "ppo" else ["--loss_type", "grpo", "--beta", "0.1"]
    common = [*RL_FLAGS, *extra, "--from_weight", str(rl_dir / "reason_64.pth"), "--data_path", str(rl_dir / "rlaif.jsonl"),
              "--max_steps", "4"]
    run(script, *common, "--out_dir", str(tmp_path / "full"))
    run(script, *common, "--out_dir", str(tmp_path / "cut"), "--stop_at_step", "2")
    run(script, *common, "--out_dir", str(tmp_path / "cut"), "--resume", "1")
    full, cut = read_log(tmp_path / "full", f"{stage}_64.jsonl"), read_log(tmp_path / "cut", f"{stage}_64.jsonl")
    assert len(full) == len(cut) == 4
    for a, b in zip(full, cut):
        assert {k: v for k, v in a.items() if k != "eta_s" and "share" not in k} == {k: v for k, v in b.items() if k != "eta_s" and "share" not in k}
    own = ["no_signal", "loss"] if stage == "grpo" else ["value_loss", "policy_loss", "approx_kl"]
    for key in ["reward", "reward_std", "reward_format", "reward_answer", "reward_repetition", "reward_length", "kl",
                "clip_frac", "reply_len", *own]:
        assert all(math.isfinite(r[key]) for r in full), key
    assert os.path.exists(tmp_path / "full" / f"{stage}_64.json")
    ra = torch.load(tmp_path / "full" / f"{stage}_64_resume.pth", weights_only=True)
    rb = torch.load(tmp_path / "cut" / f"{stage}_64_resume.pth", weights_only=True)
    names = ["model"] + (["critic"] if stage == "ppo" else [])
    for name in names:
        assert all(torch.equal(ra[name][k], rb[name][k]) for k in ra[name]), name
    final = torch.load(tmp_path / "full" / f"{stage}_64.pth", weights_only=True)
    assert all(torch.equal(final[k], ra["model"][k]) for k in final)
    start = torch.load(rl_dir / "reason_64.pth", weights_only=True)
    assert any(not torch.equal(start[k], final[k]) for k in start)
    if stage == "ppo":  # the value head was trained, saved and restored with its optimizer
        assert "value_head.weight" in ra["critic"] and ra["critic"]["value_head.weight"].abs().sum() > 0
        assert "critic_optimizer" in ra and ra["critic_optimizer"]["state"]


def test_script_errors_are_one_line(rl_dir, tmp_path):
    common = [*RL_FLAGS, "--out_dir", str(tmp_path), "--from_weight", str(rl_dir / "reason_64.pth")]
    no_gt = write_jsonl(tmp_path / "no_gt.jsonl", [user("你好")] * 4)
    proc = run("train_grpo.py", *common, "--data_path", no_gt, check=False)
    assert_one_line_error(proc, "no_gt.jsonl:1", "no ground truth")
    proc = run("train_ppo.py", *common, "--data_path", no_gt, "--rewards", "format,model",
               "--reward_model_path", str(tmp_path / "missing_rm"), check=False)
    assert_one_line_error(proc, "missing_rm", "no such folder")
    args = Args()
    args.rewards, args.reward_model_path = "model", str(tmp_path)  # a folder, but not a model
    with pytest.raises(UserError, match="config.json"):
        Rewards(args, "cpu")
    (tmp_path / "config.json").write_text("{}")
    args.rewards = "answer,model"
    with pytest.raises(UserError, match="cannot load a sequence-classification model"):
        Rewards(args, "cpu")([reply("x", ["1"])], "cpu")


def test_grpo_weights_load_by_name_in_eval_and_convert(rl_dir, tmp_path):
    """--weight names any stage's file by its prefix (here a grpo file) in eval_model.py and convert_model.py."""
    out = str(tmp_path)
    save_weights(tiny_model(seed=3), f"{out}/grpo_64.pth")
    proc = run("eval_model.py", "--weight", "grpo", "--out_dir", out, "--dim", "64", "--device", "cpu", "--prompt", "你好",
               "--max_new_tokens", "4", "--temperature", "0")
    assert f"{out}/grpo_64.pth" in proc.stderr and "🤖" in proc.stdout
    proc = run("eval_model.py", "--weight", "ppo", "--out_dir", out, "--dim", "64", "--device", "cpu", "--prompt", "x", check=False)
    assert_one_line_error(proc, "ppo_64.pth", "train_ppo.py")
    run("scripts/convert_model.py", "--weight", "grpo", "--out_dir", out, "--dim", "64", "--save_dir", str(tmp_path / "hf"))
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    sd = torch.load(f"{out}/grpo_64.pth", weights_only=True)
    assert torch.equal(hf.state_dict()["model.embed_tokens.weight"], sd["model.embed_tokens.weight"])

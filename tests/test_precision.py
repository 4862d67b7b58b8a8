"""Mixed precision and the optimizer step: what training on a GPU relies on (bf16 autocast, the fused AdamW,
float16's GradScaler). Each test runs on the CPU too, where the operation exists there; its `cuda` case runs
where a GPU is (`pytest -m cuda`, scripts/gpu_check.sh)."""
import contextlib

import pytest
import torch

from conftest import ON_CPU_AND_CUDA
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from trainer_utils import Context, build_parser, make_optimizer, take_optimizer_step

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=300)


def tiny_model(device, moe=False, seed=0):
    torch.manual_seed(seed)
    cfg = MiniMindConfig(**TINY, use_moe=moe, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1)
    return MiniMindForCausalLM(cfg).to(device).train()


def training_args(*flags):
    """The flags every stage shares, as a training script parses them."""
    parser = build_parser("test", out_weight="test", epochs=1, batch_size=4, learning_rate=1e-2, max_seq_len=32,
                          data_path="unused.jsonl")
    return parser.parse_args(list(flags))


def batch(device, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (4, 32), generator=g).to(device)


def loss_and_grads(model, x, autocast):
    model.zero_grad(set_to_none=True)
    with autocast:
        out = model(x, labels=x)
        loss = out.loss + out.aux_loss
    loss.backward()
    return loss.item(), torch.cat([p.grad.float().flatten() for p in model.parameters()])


@ON_CPU_AND_CUDA
@pytest.mark.parametrize("moe", [False, True])
def test_bf16_autocast_loss_and_gradients_track_float32(device, moe):
    """Under bf16 autocast (what training on CUDA uses) the loss and the gradient are float32's up to bf16's
    rounding: RMSNorm, RoPE, the router's softmax and the loss stay in float32."""
    model = tiny_model(device, moe)
    x = batch(device)
    loss32, grad32 = loss_and_grads(model, x, contextlib.nullcontext())
    loss16, grad16 = loss_and_grads(model, x, torch.autocast(device, dtype=torch.bfloat16))
    assert abs(loss16 - loss32) <= 1e-2 * loss32, (loss16, loss32)
    cosine = torch.nn.functional.cosine_similarity(grad16, grad32, dim=0).item()
    assert cosine >= 0.99, cosine
    assert abs(grad16.norm() / grad32.norm() - 1) <= 0.05


@ON_CPU_AND_CUDA
def test_fused_adamw_step_equals_unfused(device):
    """Training on CUDA uses the fused AdamW (make_optimizer); three clipped steps of it give the for-loop AdamW's
    weights. The CPU has a fused AdamW too (training there uses the plain one), so the comparison runs there."""
    args = training_args("--device", device, "--weight_decay", "0.1")
    ctx = Context(args)
    fused_model, plain_model = tiny_model(device), tiny_model(device)
    product = make_optimizer(list(fused_model.parameters()), args, ctx)
    assert bool(product.defaults["fused"]) == (device == "cuda")
    hyper = {k: product.defaults[k] for k in ("lr", "betas", "eps", "weight_decay")}
    fused = product if device == "cuda" else torch.optim.AdamW(fused_model.parameters(), **hyper, fused=True)
    plain = torch.optim.AdamW(plain_model.parameters(), **hyper, foreach=False, fused=False)
    start = [p.detach().clone() for p in plain_model.parameters()]
    for step in range(3):
        loss_and_grads(fused_model, batch(device, seed=step), contextlib.nullcontext())
        for p, q in zip(fused_model.parameters(), plain_model.parameters()):
            q.grad = p.grad.clone()  # the same gradients: only the optimizers differ
        assert take_optimizer_step([(fused, list(fused_model.parameters()))], ctx.scaler, grad_clip=1.0)
        assert take_optimizer_step([(plain, list(plain_model.parameters()))], ctx.scaler, grad_clip=1.0)
    moved = max((q - s).abs().max().item() for q, s in zip(plain_model.parameters(), start))
    assert moved > 1e-3  # lr 1e-2: the steps changed the weights
    for (name, p), q in zip(fused_model.named_parameters(), plain_model.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), name


@ON_CPU_AND_CUDA
def test_float16_scaler_skips_a_step_with_inf_gradients(device):
    """--dtype float16 on CUDA trains with a GradScaler: a step whose gradients overflow leaves the weights and
    the optimizer untouched, halves the scale, and take_optimizer_step says it was skipped; the next step is
    taken. The CPU trains in float32 without a scaler, so there the same step runs with the CPU's GradScaler."""
    args = training_args("--device", device, "--dtype", "float16")
    ctx = Context(args)
    if device == "cuda":
        assert ctx.scaler.is_enabled() and ctx.dtype == torch.float16
        scaler = ctx.scaler
    else:
        assert not ctx.scaler.is_enabled() and ctx.dtype == torch.float32
        scaler = torch.amp.GradScaler("cpu")
    model = tiny_model(device)
    params = list(model.parameters())
    optimizer = make_optimizer(params, args, ctx)
    x = batch(device)

    def backward(overflow=False):
        with ctx.autocast:
            loss = model(x, labels=x).loss
        assert torch.isfinite(loss)
        if overflow:  # the loss is finite, its gradient is not: what float16 overflow in the backward pass gives
            loss.register_hook(lambda g: g * float("inf"))
        scaler.scale(loss).backward()

    backward()
    assert take_optimizer_step([(optimizer, params)], scaler, grad_clip=1.0)
    before = [p.detach().clone() for p in params]
    scale, adam_steps = scaler.get_scale(), optimizer.state[params[0]]["step"].item()
    backward(overflow=True)
    assert not take_optimizer_step([(optimizer, params)], scaler, grad_clip=1.0)
    assert all(torch.equal(a, p) for a, p in zip(before, params))
    assert scaler.get_scale() == scale / 2 and optimizer.state[params[0]]["step"].item() == adam_steps
    backward()
    assert take_optimizer_step([(optimizer, params)], scaler, grad_clip=1.0)
    assert not all(torch.equal(a, p) for a, p in zip(before, params))
    assert all(torch.isfinite(p).all() for p in params)

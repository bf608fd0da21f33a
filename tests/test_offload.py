"""`model.gradient_checkpointing = "offload"` (`tinyr1.offload`): checkpointed layer inputs wait in
host RAM, and the reentrant recompute gives exactly the gradients of torch's checkpoint.

On a CPU the "host copy" is the tensor itself, so these tests check what can go wrong in the
recompute (gradient flow to inputs and to parameters, two outputs, RNG replay, HF's own checkpointed
calls); that the copy really leaves the GPU is the `gpu` test at the end.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tinyr1.logprobs import shared_prefix_hidden
from tinyr1.model.loading import add_lora, prepare_for_training, trainable_parameters
from tinyr1.model.tinyllava import TinyLlavaConfig, TinyLlavaVideo
from tinyr1.model.writing import tiny_config
from tinyr1.offload import OFFLOAD_ATTR, offloaded_checkpoint

pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.usefixtures("one_thread"),
]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(gc: bool | str, *, train_connector: bool) -> TinyLlavaVideo:
    torch.manual_seed(0)
    m = TinyLlavaVideo(TinyLlavaConfig.from_dict(tiny_config(40, 3, frames=4)))
    m.requires_grad_(False)
    add_lora(m, r=4, alpha=8, dropout=0.0, target_modules=TARGETS)
    prepare_for_training(m, train_connector=train_connector, gradient_checkpointing=gc)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return m


def _update_grads(model: TinyLlavaVideo) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, 40, (n,), generator=g) for n in (5, 9)]
    for p in prompts:
        p[1] = -200
    comp = torch.randint(4, 40, (4, 6), generator=g)
    feats = [model.vision_features(torch.randn(4, 3, 32, 32, generator=g)) for _ in prompts]
    video = [model.connect(f) for f in feats]
    h = shared_prefix_hidden(model, prompts, video, comp, torch.tensor([0, 1, 1, 0]))  # [n, L, D]
    (h * torch.linspace(-1, 1, h.numel()).view_as(h)).sum().backward()
    return h.detach(), {k: p.grad.clone() for k, p in trainable_parameters(model).items()}


@pytest.mark.parametrize("train_connector", [True, False])
def test_offloaded_update_equals_torch_checkpointing(train_connector: bool) -> None:
    """The update's shared-prefix layer calls (two inputs, two outputs per layer) with offloaded
    checkpoints: the same hidden states and the same gradient for every LoRA tensor (and the
    connector). Without a trained connector no layer input needs grad: LoRA must get its gradient anyway."""
    results = {}
    for gc in (True, "offload"):
        model = _model(gc, train_connector=train_connector)
        model.train()
        results[gc] = _update_grads(model)
        layers = model.llm.model.layers
        assert all(getattr(layer, OFFLOAD_ATTR, False) == (gc == "offload") for layer in layers)
    (h1, g1), (h2, g2) = results[True], results["offload"]
    torch.testing.assert_close(h2, h1, rtol=0, atol=1e-6)
    assert g1.keys() == g2.keys() and any("lora_A" in k for k in g1)
    assert any("connector" in k for k in g1) == train_connector
    for k in g1:
        assert g1[k].abs().max() > 0, k
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-5, atol=1e-6, msg=k)


def test_hf_checkpointed_forward_uses_the_offloaded_function() -> None:
    """The cold start runs the LLM through HF's own checkpointed layers: they call the offloaded
    function too, and the gradients equal torch's checkpoint."""
    grads = {}
    for gc in (True, "offload"):
        model = _model(gc, train_connector=False)
        model.train()
        embeds = torch.randn(2, 7, model.llm.config.hidden_size, generator=torch.Generator().manual_seed(2))
        out = model.llm.model(inputs_embeds=embeds, attention_mask=torch.ones(2, 7, dtype=torch.long)).last_hidden_state
        out.square().mean().backward()
        grads[gc] = {k: p.grad.clone() for k, p in trainable_parameters(model).items()}
        if gc == "offload":
            assert model.llm.model.layers[0]._gradient_checkpointing_func is offloaded_checkpoint
    for k in grads[True]:
        torch.testing.assert_close(grads["offload"][k], grads[True][k], rtol=1e-5, atol=1e-7, msg=k)


def test_the_recompute_replays_the_same_dropout_mask() -> None:
    """RNG state is restored for the recompute: a dropout inside gets the forward's mask, so the
    gradient is that of the forward that ran (torch's checkpoint preserves it the same way)."""
    lin = nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)

    def block(t: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(lin(t), p=0.5, training=True)

    torch.manual_seed(3)
    out = offloaded_checkpoint(block, x)
    out.sum().backward()
    torch.manual_seed(3)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = block(x_ref)
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_non_tensor_and_integer_arguments_pass_through() -> None:
    """Modules, dicts and index tensors are handed to the function as they are; only floating
    tensors are offloaded; a single output comes back as a tensor, not a 1-tuple."""
    w = nn.Parameter(torch.randn(3, 3))
    x = torch.randn(5, 3, requires_grad=True)
    rows = torch.tensor([0, 2, 2])

    def fn(t: torch.Tensor, index: torch.Tensor, scale: dict[str, float]) -> torch.Tensor:
        return (t @ w)[index] * scale["s"]

    out = offloaded_checkpoint(fn, x, rows, {"s": 2.0})
    assert isinstance(out, torch.Tensor) and out.shape == (3, 3)
    out.sum().backward()
    ref_w = w.grad.clone()
    w.grad = None
    (x.detach() @ w)[rows].mul(2.0).sum().backward()
    torch.testing.assert_close(ref_w, w.grad)
    assert x.grad is not None and x.grad[1].abs().sum() == 0  # row 1 was never selected


@pytest.mark.gpu
def test_on_cuda_the_checkpointed_inputs_live_in_pinned_host_memory() -> None:
    """What makes it worth it: after the forward, the saved layer inputs are host tensors (pinned)."""
    import gc

    dev = torch.device("cuda")
    lin = nn.Linear(256, 256).to(dev)
    x = torch.randn(1024, 256, device=dev, requires_grad=True)
    torch.cuda.synchronize()
    out = offloaded_checkpoint(lambda t: torch.relu(lin(t)), x * 1.0)
    node = out.grad_fn
    host = node.host  # the Function's context keeps the offloaded copies
    assert all(h.device.type == "cpu" and h.is_pinned() for h in host)
    gc.collect()
    out.sum().backward()
    assert x.grad is not None

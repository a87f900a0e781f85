"""No weight decay on norms and biases: group membership, wrappers, an optimizer step."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from tricks.no_weight_decay import CARD, grouping_summary, is_norm_module, param_groups, split_parameter_names


class LayerNorm2d(nn.Module):
    """A timm-style user norm (not a torch type): found by its class name."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1, c, 1, 1))  # ndim 4: only the type rule catches it
        self.shift = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gain * (x - x.mean(1, keepdim=True)) + self.shift


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_nb = nn.Conv2d(4, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.ln2d = LayerNorm2d(4)
        self.blocks = nn.Sequential(nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8)), nn.Linear(8, 8))
        self.rms = nn.RMSNorm(8)
        self.emb = nn.Embedding(5, 8)
        self.attn = nn.MultiheadAttention(8, 2, add_bias_kv=True)
        self.scale = nn.Parameter(torch.ones(()))  # ndim 0
        self.lrn = nn.LocalResponseNorm(2)  # no parameters at all

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln2d(self.inorm(self.gn(self.bn(self.conv_nb(self.conv(x))))))
        h = self.blocks(h.mean((2, 3)))
        h = self.rms(h)
        h = h.unsqueeze(0)
        return self.scale * self.attn(h, h, h)[0].squeeze(0)


EXPECTED_DECAY = {
    "conv.weight",
    "conv_nb.weight",
    "blocks.0.0.weight",
    "blocks.1.weight",
    "emb.weight",
    "attn.in_proj_weight",
    "attn.out_proj.weight",
}


def _trainable(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters() if p.requires_grad}


def _check_partition(model: nn.Module, groups: list[dict]) -> None:
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)), "a parameter is in two groups"
    assert set(ids) == set(_trainable(model)), "a trainable parameter is in no group (or a frozen one is in one)"


def test_groups_exactly_as_expected() -> None:
    model = Net()
    decay, no_decay = split_parameter_names(model)
    assert set(decay) == EXPECTED_DECAY
    all_names = {n for n, _ in model.named_parameters()}
    assert set(no_decay) == all_names - EXPECTED_DECAY
    # the edge cases by name
    for name in ("attn.bias_k", "attn.bias_v", "attn.in_proj_bias", "ln2d.gain", "ln2d.shift", "scale", "rms.weight"):
        assert name in no_decay
    groups = param_groups(model, 0.05)
    assert [set(g) for g in groups] == [{"params", "weight_decay"}] * 2
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    _check_partition(model, groups)


def test_every_norm_parameter_and_every_bias_is_no_decay() -> None:
    model = Net()
    no_decay = {id(p) for p in param_groups(model, 0.1)[1]["params"]}
    for module in model.modules():
        for local, p in module.named_parameters(recurse=False):
            if is_norm_module(module) or "bias" in local:
                assert id(p) in no_decay, (type(module).__name__, local)
            elif isinstance(module, (nn.Conv2d, nn.Linear)) and local == "weight":
                assert id(p) not in no_decay


@pytest.mark.parametrize(
    "module",
    [
        nn.BatchNorm1d(3),
        nn.BatchNorm3d(3),
        nn.SyncBatchNorm(3),
        nn.InstanceNorm1d(3, affine=True),
        nn.LayerNorm((3, 2)),  # weight ndim 2: the type rule, not ndim, makes it no-decay
        nn.GroupNorm(1, 3),
        nn.RMSNorm((3, 2)),
        LayerNorm2d(3),
    ],
)
def test_norm_types(module: nn.Module) -> None:
    model = nn.Sequential(nn.Linear(3, 3), module)
    decay, no_decay = split_parameter_names(model)
    assert decay == ["0.weight"]
    assert set(no_decay) == {n for n, _ in model.named_parameters()} - {"0.weight"}


def test_shared_parameters_counted_once_and_norm_owner_wins() -> None:
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.ReLU(), lin)  # shared module
    _check_partition(model, param_groups(model, 0.1))
    assert split_parameter_names(model) == (["0.weight"], ["0.bias"])
    # a weight shared between a Linear (ndim 2) and a user norm module
    ln = LayerNorm2d(4)
    holder = nn.Linear(4, 4)
    holder.weight = ln.gain  # type: ignore[assignment]
    model2 = nn.ModuleDict({"holder": holder, "ln": ln})
    groups = param_groups(model2, 0.1)
    _check_partition(model2, groups)
    assert any(p is ln.gain for p in groups[1]["params"])
    # tied embeddings (nanoGPT): decayed once
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    tied = nn.ModuleDict({"emb": emb, "head": head})
    assert split_parameter_names(tied) == (["emb.weight"], [])


def test_frozen_parameters_excluded() -> None:
    model = Net()
    model.conv.weight.requires_grad_(False)
    model.bn.bias.requires_grad_(False)
    groups = param_groups(model, 0.1)
    _check_partition(model, groups)
    listed = {id(p) for g in groups for p in g["params"]}
    assert id(model.conv.weight) not in listed and id(model.bn.bias) not in listed
    assert "frozen" in grouping_summary(model)


# wrapper -> (model, the prefix it puts in front of the bare model's parameter names)
WRAPPERS = {
    "DataParallel": (lambda: nn.DataParallel(Net()), "module."),
    "compile": (lambda: torch.compile(Net()), "_orig_mod."),
    "AveragedModel": (lambda: AveragedModel(Net()), "module."),
    "nested Sequential": (lambda: nn.Sequential(nn.Sequential(Net())), "0.0."),
    "DataParallel(compile)": (lambda: nn.DataParallel(torch.compile(Net())), "module._orig_mod."),
}


@pytest.mark.parametrize("label", list(WRAPPERS))
def test_wrappers(label: str) -> None:
    make, prefix = WRAPPERS[label]
    wrapped = make()
    decay, no_decay = split_parameter_names(wrapped)
    assert set(decay) == {prefix + n for n in EXPECTED_DECAY}
    assert set(no_decay) == {n for n, _ in wrapped.named_parameters()} - set(decay)
    _check_partition(wrapped, param_groups(wrapped, 0.1))
    # extra names match without wrapper prefixes (deit#39); containers' own prefixes stay
    bare_prefix = "0.0." if label == "nested Sequential" else ""
    d2, nd2 = split_parameter_names(wrapped, extra_no_decay={bare_prefix + "emb.weight"})
    assert set(d2) == set(decay) - {prefix + "emb.weight"} and prefix + "emb.weight" in nd2


def test_extra_no_decay_unmatched_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"extra_no_decay.*pos_embed"):
        param_groups(Net(), 0.1, extra_no_decay={"pos_embed"})
    with pytest.raises(ValueError, match="extra_no_decay"):
        param_groups(Net(), 0.1, extra_no_decay="emb.weight")  # a str, not a collection


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "0.1", None, True])
def test_weight_decay_validation(bad: object) -> None:
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(Net(), bad)  # type: ignore[arg-type]


def test_model_validation() -> None:
    with pytest.raises(ValueError, match="model"):
        param_groups([nn.Parameter(torch.ones(2))], 0.1)  # type: ignore[arg-type]


def test_off_arm_is_one_group_with_everything() -> None:
    model = Net()
    groups = param_groups(model, 0.1, enabled=False)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.1
    _check_partition(model, groups)


@pytest.mark.parametrize("opt", ["AdamW", "SGD"])
def test_optimizer_step_leaves_norm_weights_unchanged_when_grads_are_zero(opt: str) -> None:
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)  # move norm gains/biases away from 1/0 so any decay would show
    before = copy.deepcopy(model.state_dict())
    cls = getattr(torch.optim, opt)
    kwargs = {"lr": 0.1} | ({"momentum": 0.9} if opt == "SGD" else {})
    optimizer = cls(param_groups(model, 0.5), **kwargs)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    decay, no_decay = split_parameter_names(model)
    after = model.state_dict()
    for name in no_decay:
        assert torch.equal(after[name], before[name]), name
    for name in decay:
        # decoupled (AdamW) or L2 (SGD) decay shrinks the weight: w·(1 − lr·wd) = 0.95 w
        torch.testing.assert_close(after[name], before[name] * 0.95, msg=name)
    # off arm: the same step decays the norm gains too
    model2 = Net()
    model2.load_state_dict(before)
    optimizer2 = cls(param_groups(model2, 0.5, enabled=False), **kwargs)
    for p in model2.parameters():
        p.grad = torch.zeros_like(p)
    optimizer2.step()
    torch.testing.assert_close(model2.bn.weight, before["bn.weight"] * 0.95)


def test_groups_train_a_model() -> None:
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3)
    loss = model(torch.randn(2, 3, 5, 5)).square().mean()
    loss.backward()
    optimizer.step()
    sd = optimizer.state_dict()
    assert len(sd["param_groups"]) == 2


def test_summary_table() -> None:
    text = grouping_summary(Net())
    lines = text.splitlines()
    assert lines[0].split() == ["name", "shape", "group"]
    row = next(line for line in lines if line.startswith("conv.weight"))
    assert row.split() == ["conv.weight", "4x3x3x3", "decay"]
    assert next(line for line in lines if line.startswith("scale ")).split() == ["scale", "scalar", "no_decay"]
    assert "decay: 7 tensors" in lines[-1]


def test_card() -> None:
    assert CARD.name == "no_weight_decay" and CARD.role != "task"
    assert CARD.params == () and CARD.resolve({}) == {}
    with pytest.raises(ValueError, match="weight_decay"):
        CARD.resolve({"weight_decay": 0.1})

"""The wrappers of :mod:`optorch.wrappers` against independent references.

* clip + AdamW, decay masks and partitions against ``torch.optim`` (param groups,
  ``clip_grad_norm_``), 20 steps, params AND state;
* accumulation against one step on the concatenated batch; EMA against
  ``torch.optim.swa_utils.AveragedModel``; lookahead and the gradient transformations
  against float64 formulas written here from the papers;
* injected hyperparameters against schedules / replaced configs, and no recompilation
  of the compiled step when they change;
* a table: every wrapper around every registered optimizer, in place and pure, on the
  reference and foreach engines (compiled on a few), with the shared checks;
* bad inputs: (factory, error type, message) rows, and step-time errors that leave
  params and state untouched.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import optree
import pytest
import torch
from conftest import (
    assert_trees_close,
    assert_trees_equal,
    assert_unchanged,
    clone_tree,
    generator,
    grad_sequence,
    make_grads,
    make_params,
    snapshot,
)
from optree import tree_leaves as optree_leaves

import optorch
from optorch import wrappers
from optorch.wrappers._core import config_has, config_value

STEPS = 20
#: explicit tolerances per comparison
F32 = {"rtol": 1e-6, "atol": 1e-6}
F64 = {"rtol": 1e-11, "atol": 1e-12}
MODES = [True, False]
MODE_IDS = ["inplace", "pure"]


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


class TorchTwin:
    """torch.optim optimizers over named copies of ``params``.

    ``build(tensors)`` returns the torch optimizers (param groups as wanted);
    ``clip(tensors)`` runs between setting the grads and stepping.
    """

    def __init__(
        self,
        params: dict[str, torch.Tensor],
        build: Callable[[dict[str, torch.Tensor]], list[torch.optim.Optimizer]],
        clip: Callable[[list[torch.Tensor]], Any] | None = None,
    ) -> None:
        self.tensors = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        self.optimizers = build(self.tensors)
        self.clip = clip
        self.clip_results: list[Any] = []

    def step(self, grads: dict[str, torch.Tensor]) -> None:
        for name, tensor in self.tensors.items():
            tensor.grad = grads[name].detach().clone()
        if self.clip is not None:
            self.clip_results.append(self.clip(list(self.tensors.values())))
        for optimizer in self.optimizers:
            optimizer.step()

    def params(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.tensors.items()}

    def state(self, names: list[str], field: str) -> dict[str, torch.Tensor]:
        out = {}
        for name in names:
            tensor = self.tensors[name]
            for optimizer in self.optimizers:
                if tensor in optimizer.state:
                    out[name] = optimizer.state[tensor][field].detach()
        return out


def is_matrix(path: str, p: torch.Tensor) -> bool:
    return p.ndim >= 2


def subtree(tree: dict[str, Any], names: list[str]) -> dict[str, Any]:
    return {k: tree[k] for k in names}


def without_none(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in tree.items() if v is not None}


def tensor_ids(tree: Any) -> dict[Any, int]:
    paths, leaves, _ = optree.tree_flatten_with_path(tree, none_is_leaf=True)
    return {p: id(x) for p, x in zip(paths, leaves, strict=True) if isinstance(x, torch.Tensor)}


def structure(tree: Any) -> list[tuple[Any, Any]]:
    """(path, (dtype, shape) or the leaf's kind) for every leaf."""
    paths, leaves, _ = optree.tree_flatten_with_path(tree, none_is_leaf=True)
    return [
        (p, (x.dtype, tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__)
        for p, x in zip(paths, leaves, strict=True)
    ]


MATRICES = ["layer.weight", "conv.weight"]
VECTORS = ["layer.bias", "scale"]


# --------------------------------------------------------------------------------------
# clip_by_global_norm + AdamW against clip_grad_norm_ + torch.optim.AdamW
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", "foreach"])
@pytest.mark.parametrize("inplace", MODES, ids=MODE_IDS)
def test_global_norm_clip_adamw_matches_torch(inplace: bool, impl: str) -> None:
    max_norm = 5.0
    params = make_params(21)
    # alternate small and large grads so that some steps clip and some do not
    grads_seq = [
        {k: v * (3.0 if step % 2 else 0.5) for k, v in g.items()}
        for step, g in enumerate(grad_sequence(21, params, STEPS))
    ]
    twin = TorchTwin(
        params,
        lambda t: [torch.optim.AdamW(list(t.values()), lr=0.05, weight_decay=0.1, foreach=False)],
        clip=lambda ts: torch.nn.utils.clip_grad_norm_(ts, max_norm, foreach=False),
    )
    adamw = optorch.get_optimizer(
        "adamw", max_lr=0.05, weight_decay=0.1, inplace=inplace, impl=impl
    )
    opt = wrappers.chain(wrappers.clip_by_global_norm(max_norm), adamw)
    state = opt.init(params)
    clipped_steps = 0
    for k, grads in enumerate(grads_seq):
        params, state = opt.step(params, grads, state)
        twin.step(grads)
        torch_norm = twin.clip_results[-1]
        clipped_steps += bool(torch_norm > max_norm)
        torch.testing.assert_close(state["transforms"][0]["grad_norm"], torch_norm, **F32)
        assert_trees_close(params, twin.params(), **F32, what=f"params step {k}")
        for field in ("exp_avg", "exp_avg_sq"):
            assert_trees_close(
                state["inner"][field], twin.state(list(params), field), **F32, what=field
            )
        assert int(state["inner"]["step"]) == k + 1
    assert 0 < clipped_steps < STEPS, "the sequence must exercise both clipped and unclipped"


# --------------------------------------------------------------------------------------
# decay masks and partitions against torch.optim param groups
# --------------------------------------------------------------------------------------


def _decay_mask_variants(adamw: Any) -> dict[str, Any]:
    tree = {"layer.weight": True, "layer.bias": False, "scale": False, "conv.weight": True}
    return {
        "decay_mask-fn": wrappers.decay_mask(adamw, is_matrix),
        "decay_mask-default": wrappers.decay_mask(adamw),
        "decay_mask-tree": wrappers.decay_mask(adamw, tree),
        "no_weight_decay_on": wrappers.no_weight_decay_on(adamw, lambda path, p: p.ndim < 2),
    }


@pytest.mark.parametrize("variant", list(_decay_mask_variants(optorch.get_optimizer("adamw"))))
@pytest.mark.parametrize("inplace", MODES, ids=MODE_IDS)
def test_decay_mask_matches_torch_param_groups(inplace: bool, variant: str) -> None:
    params = make_params(22)
    adamw = optorch.get_optimizer("adamw", max_lr=0.05, weight_decay=0.2, inplace=inplace)
    opt = _decay_mask_variants(adamw)[variant]

    def build(t: dict[str, torch.Tensor]) -> list[torch.optim.Optimizer]:
        groups = [
            {"params": [t[n] for n in MATRICES]},
            {"params": [t[n] for n in VECTORS], "weight_decay": 0.0},
        ]
        return [torch.optim.AdamW(groups, lr=0.05, weight_decay=0.2, foreach=False)]

    twin = TorchTwin(params, build)
    state = opt.init(params)
    for k, grads in enumerate(grad_sequence(22, params, STEPS)):
        params, state = opt.step(params, grads, state)
        twin.step(grads)
        assert_trees_close(params, twin.params(), **F32, what=f"{variant} step {k}")
        for label, names in (("decay", MATRICES), ("no_decay", VECTORS)):
            group = state["groups"][label]
            for field in ("exp_avg", "exp_avg_sq"):
                assert_trees_close(
                    without_none(group[field]), twin.state(names, field), **F32, what=field
                )
            assert int(group["step"]) == k + 1
    # each group keeps state only for its own leaves
    assert state["groups"]["no_decay"]["exp_avg"]["layer.weight"] is None
    assert state["groups"]["decay"]["exp_avg"]["layer.bias"] is None


def _labels_tree() -> dict[str, str]:
    return {n: ("matrix" if n in MATRICES else "vector") for n in MATRICES + VECTORS}


PARTITION_CASES = {
    # id: (optorch groups, torch builders per group, state fields per group)
    "adamw-two-lrs": (
        lambda mode: {
            "matrix": optorch.get_optimizer("adamw", max_lr=0.05, weight_decay=0.1, inplace=mode),
            "vector": optorch.get_optimizer("adamw", max_lr=0.01, weight_decay=0.1, inplace=mode),
        },
        {
            "matrix": lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1, foreach=False),
            "vector": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, foreach=False),
        },
        {"matrix": ("exp_avg", "exp_avg_sq"), "vector": ("exp_avg", "exp_avg_sq")},
    ),
    "sgd-and-adamw": (
        lambda mode: {
            "matrix": optorch.get_optimizer(
                "sgd", max_lr=0.05, momentum=0.9, nesterov=True, inplace=mode
            ),
            "vector": optorch.get_optimizer("adamw", max_lr=0.02, weight_decay=0.1, inplace=mode),
        },
        {
            "matrix": lambda ps: torch.optim.SGD(
                ps, lr=0.05, momentum=0.9, nesterov=True, foreach=False
            ),
            "vector": lambda ps: torch.optim.AdamW(ps, lr=0.02, weight_decay=0.1, foreach=False),
        },
        {"matrix": ("momentum_buffer",), "vector": ("exp_avg", "exp_avg_sq")},
    ),
}


@pytest.mark.parametrize("labels", ["fn", "tree"])
@pytest.mark.parametrize("case", list(PARTITION_CASES))
@pytest.mark.parametrize("inplace", MODES, ids=MODE_IDS)
def test_partition_matches_separate_torch_optimizers(inplace: bool, case: str, labels: str) -> None:
    make_groups, torch_builders, fields = PARTITION_CASES[case]
    params = make_params(23)
    label_of = (
        (lambda path, p: "matrix" if p.ndim >= 2 else "vector")
        if labels == "fn"
        else _labels_tree()
    )
    opt = wrappers.partition(label_of, make_groups(inplace))
    names = {"matrix": MATRICES, "vector": VECTORS}
    twin = TorchTwin(
        params,
        lambda t: [torch_builders[g]([t[n] for n in names[g]]) for g in ("matrix", "vector")],
    )
    state = opt.init(params)
    for k, grads in enumerate(grad_sequence(23, params, STEPS)):
        params, state = opt.step(params, grads, state)
        twin.step(grads)
        assert_trees_close(params, twin.params(), **F32, what=f"{case} step {k}")
        for group in ("matrix", "vector"):
            ours = state["groups"][group]
            for field in fields[group]:
                mine = "momentum" if field == "momentum_buffer" else field
                assert_trees_close(
                    without_none(ours[mine]), twin.state(names[group], field), **F32, what=field
                )


def test_partition_overrides_reach_the_named_group() -> None:
    """``"label/field"`` overrides one group, a plain field every group that has it."""
    params = make_params(24)
    grads = grad_sequence(24, params, 1)[0]
    groups = {
        "matrix": optorch.get_optimizer("sgd", max_lr=0.1, momentum=0.0, inplace=False),
        "vector": optorch.get_optimizer("sgd", max_lr=0.1, momentum=0.0, inplace=False),
    }
    opt = wrappers.partition(lambda path, p: "matrix" if p.ndim >= 2 else "vector", groups)
    state = opt.init(params)
    one, _ = opt.step(params, grads, state, hyper_overrides={"vector/max_lr": 0.5})
    both, _ = opt.step(params, grads, state, hyper_overrides={"max_lr": 0.5})
    for name in params:
        lr_one = 0.5 if name in VECTORS else 0.1
        torch.testing.assert_close(one[name], params[name] - lr_one * grads[name], **F32)
        torch.testing.assert_close(both[name], params[name] - 0.5 * grads[name], **F32)


# --------------------------------------------------------------------------------------
# masked and freeze
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["masked-fn", "masked-tree", "freeze-fn"])
@pytest.mark.parametrize("inplace", MODES, ids=MODE_IDS)
def test_masked_and_freeze_touch_only_the_selected_leaves(inplace: bool, how: str) -> None:
    params = make_params(25)
    frozen_names = ["layer.bias", "scale"]
    adam = optorch.get_optimizer("adam", max_lr=0.05, weight_decay=0.1, inplace=inplace)
    if how == "masked-fn":
        opt: Any = wrappers.masked(adam, lambda path, p: path not in frozen_names)
    elif how == "masked-tree":
        opt = wrappers.masked(adam, {n: n not in frozen_names for n in params})
    else:
        opt = wrappers.freeze(adam, lambda path, p: path in frozen_names)
    reference = optorch.get_optimizer("adam", max_lr=0.05, weight_decay=0.1, inplace=False)
    live = [n for n in params if n not in frozen_names]
    ref_params = clone_tree(subtree(params, live))
    ref_state = reference.init(ref_params)
    frozen_before = clone_tree(subtree(params, frozen_names))
    frozen_objects = {n: params[n] for n in frozen_names}
    state = opt.init(params)
    for name in frozen_names:
        assert state["inner"]["exp_avg"][name] is None, "a frozen leaf must get no state"
    for k, grads in enumerate(grad_sequence(25, params, STEPS)):
        params, state = opt.step(params, grads, state)
        ref_params, ref_state = reference.step(ref_params, subtree(grads, live), ref_state)
        assert_trees_close(subtree(params, live), ref_params, **F32, what=f"step {k}")
        for field in ("exp_avg", "exp_avg_sq"):
            assert_trees_close(without_none(state["inner"][field]), ref_state[field], **F32)
        assert_trees_equal(subtree(params, frozen_names), frozen_before, what="frozen leaves")
        for name in frozen_names:
            assert params[name] is frozen_objects[name]
            assert state["inner"]["exp_avg"][name] is None


def test_init_from_module_leaves_frozen_params_without_state() -> None:
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    opt = wrappers.ema(optorch.get_optimizer("adamw"), 0.9)
    state = opt.init(model)
    assert state["inner"]["exp_avg"]["bias"] is None
    assert state["ema"]["bias"] is None
    params = dict(model.named_parameters())
    grads = {"weight": torch.ones(2, 3), "bias": None}
    bias = model.bias.detach().clone()
    params, state = opt.step(params, grads, state)
    assert torch.equal(model.bias, bias)
    assert not torch.equal(state["ema"]["weight"], params["weight"])


# --------------------------------------------------------------------------------------
# accumulation
# --------------------------------------------------------------------------------------


def _regression_loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> Any:
    return ((x @ params["w"].T + params["b"] - y) ** 2).mean()


_regression_grad = torch.func.grad(_regression_loss)

ACCUMULATED = {
    "sgd": {"max_lr": 0.05, "momentum": 0.9, "weight_decay": 0.01},
    "adamw": {"max_lr": 0.05, "weight_decay": 0.1},
}


@pytest.mark.parametrize("path", ["eager", "gated"])
@pytest.mark.parametrize("impl", ["reference", "foreach"])
@pytest.mark.parametrize("inplace", MODES, ids=MODE_IDS)
def test_accumulate_with_none_gradients_matches_torchs_accumulated_grad(
    inplace: bool, impl: str, path: str
) -> None:
    """torch.optim after k backward passes: a param with a gradient in some micro-batch
    has the sum in .grad (stepped, even when the last micro-batch gave it none); a param
    with none in the whole cycle has .grad None (not stepped). An "expert" routed to in
    the first micro-batches of a cycle only, and not at all in the last cycle."""
    every = 3
    gen = generator(27)
    start = {"expert": torch.randn(4, generator=gen), "shared": torch.randn(2, 3, generator=gen)}
    theirs = {k: torch.nn.Parameter(v.clone()) for k, v in start.items()}
    reference = torch.optim.AdamW(list(theirs.values()), lr=0.05, weight_decay=0.1)
    opt = wrappers.accumulate(
        optorch.get_optimizer("adamw", max_lr=0.05, weight_decay=0.1, impl=impl, inplace=inplace),
        every=every,
    )
    params = clone_tree(start)
    state = opt.init(params)
    skip = torch.tensor(False) if path == "gated" else None
    for cycle in range(4):
        reference.zero_grad()
        for micro in range(every):
            grads: dict[str, Any] = {
                k: torch.randn(v.shape, generator=gen) for k, v in start.items()
            }
            if micro == every - 1 or cycle == 3:
                grads["expert"] = None
            for k, p in theirs.items():
                if grads[k] is not None:  # backward of the mean loss over micro-batches
                    p.grad = grads[k] / every if p.grad is None else p.grad + grads[k] / every
            params, state = opt.step(params, grads, state, skip_if=skip)
        reference.step()
        for k, p in theirs.items():
            torch.testing.assert_close(params[k], p.detach(), rtol=1e-6, atol=1e-7, msg=k)
    assert int(state["inner"]["step"]) == 4


def test_accumulate_state_without_grad_seen_keeps_working() -> None:
    """A state saved before ``grad_seen`` existed: stepped as before for its cycle, the
    flags made on its first call."""
    opt = wrappers.accumulate(optorch.get_optimizer("adamw", max_lr=0.05), every=2)
    params = {"w": torch.ones(3)}
    state = opt.init(params)
    old = {k: v for k, v in state.items() if k != "grad_seen"}
    params, old = opt.step(params, {"w": torch.ones(3)}, old)
    assert old["grad_seen"].tolist() == [True]
    params, old = opt.step(params, {"w": torch.ones(3)}, old)
    assert int(old["inner"]["step"]) == 1 and old["grad_seen"].tolist() == [False]


@pytest.mark.parametrize("inplace", MODES, ids=MODE_IDS)
def test_a_skipped_call_records_no_gradient_even_on_a_state_without_grad_seen(
    inplace: bool,
) -> None:
    """A call skipped by skip_if (a rejected micro-batch) must not count its gradients
    as seen: the expert, without a gradient in the cycle that follows, stays put."""
    opt = wrappers.accumulate(
        optorch.get_optimizer("adamw", max_lr=0.1, weight_decay=0.1, inplace=inplace), every=2
    )
    for legacy in (False, True):
        params = {"expert": torch.ones(3), "shared": torch.ones(3)}
        state = opt.init(params)
        if legacy:
            state = {k: v for k, v in state.items() if k != "grad_seen"}
        both = {"expert": torch.ones(3), "shared": torch.ones(3)}
        params, state = opt.step(params, both, state, skip_if=torch.tensor(True))
        assert state["grad_seen"].tolist() == [False, False]
        for _ in range(2):
            params, state = opt.step(params, {"expert": None, "shared": torch.ones(3)}, state)
        assert params["expert"].tolist() == [1.0, 1.0, 1.0]
        assert params["shared"].tolist() != [1.0, 1.0, 1.0]


@pytest.mark.parametrize("inplace", MODES, ids=MODE_IDS)
def test_accumulate_over_no_params(inplace: bool) -> None:
    opt = wrappers.accumulate(optorch.get_optimizer("sgd", inplace=inplace), every=2)
    state = opt.init({})
    for _ in range(3):
        _, state = opt.step({}, {}, state)
    assert state["grad_seen"].dtype == torch.bool and state["grad_seen"].shape == (0,)


@pytest.mark.parametrize("name", ["grad_seen", "mu_product"])
def test_a_param_named_like_a_resumable_key_is_still_checked(name: str, tmp_path: Any) -> None:
    """Loaders accept a state without NAdam's mu_product or accumulate's grad_seen only
    in those states: a checkpoint missing the state of a *param* of that name is
    refused."""
    from optorch.interop import checkpoint

    opt = optorch.get_optimizer("adamw", max_lr=0.1)
    params = {name: torch.ones(3), "other": torch.ones(2)}
    state = opt.init(params)
    partial = {
        k: ({p: t for p, t in v.items() if p != name} if isinstance(v, dict) else v)
        for k, v in state.items()
    }
    path = tmp_path / "partial.safetensors"
    checkpoint.save(path, partial, optimizer=opt, params=params)
    with pytest.raises(ValueError, match=rf"missing leaf \['exp_avg'\]\['{name}'\]"):
        checkpoint.load(path, params=params, optimizer=opt)


@pytest.mark.parametrize("suffix", ["safetensors", "pt"])
def test_an_accumulate_checkpoint_without_grad_seen_loads(suffix: str, tmp_path: Any) -> None:
    from optorch.interop import checkpoint

    opt = wrappers.accumulate(optorch.get_optimizer("adamw", max_lr=0.05), every=2)
    params = {"w": torch.ones(3)}
    state = opt.init(params)
    old = {k: v for k, v in state.items() if k != "grad_seen"}
    path = tmp_path / f"old.{suffix}"
    checkpoint.save(path, old, optimizer=opt, params=params)
    loaded = checkpoint.load(path, params=params, optimizer=opt)
    assert "grad_seen" not in loaded
    opt.step(params, {"w": torch.ones(3)}, loaded)


@pytest.mark.parametrize("path", ["eager", "gated"])
@pytest.mark.parametrize("name", list(ACCUMULATED))
@pytest.mark.parametrize("inplace", MODES, ids=MODE_IDS)
def test_accumulate_equals_one_step_on_the_concatenated_batch(
    inplace: bool, name: str, path: str
) -> None:
    """k=4 micro-batches then one step == one step on the whole batch (mean loss); the
    first 3 calls of each cycle leave params bit-untouched. ``gated`` passes
    ``skip_if=False``, which takes the device-side (no host read) path."""
    every, micro, cycles = 4, 4, 5
    gen = generator(26)
    params = {
        "w": torch.randn(3, 4, generator=gen, dtype=torch.float64),
        "b": torch.randn(3, generator=gen, dtype=torch.float64),
    }
    hyper = ACCUMULATED[name]
    opt = wrappers.accumulate(optorch.get_optimizer(name, **hyper, inplace=inplace), every=every)
    whole = optorch.get_optimizer(name, **hyper, inplace=False)
    ref_params = clone_tree(params)
    ref_state = whole.init(ref_params)
    state = opt.init(params)
    skip = torch.tensor(False) if path == "gated" else None
    for cycle in range(cycles):
        x = torch.randn(every * micro, 4, generator=gen, dtype=torch.float64)
        y = torch.randn(every * micro, 3, generator=gen, dtype=torch.float64)
        for k in range(every):
            part = slice(k * micro, (k + 1) * micro)
            grads = _regression_grad(params, x[part], y[part])
            before = clone_tree(params)
            params, state = opt.step(params, grads, state, skip_if=skip)
            if k < every - 1:
                assert_trees_equal(params, before, what=f"cycle {cycle} call {k}")
                assert int(state["count"]) == k + 1
                assert int(state["inner"]["step"]) == cycle
        ref_params, ref_state = whole.step(
            ref_params, _regression_grad(ref_params, x, y), ref_state
        )
        assert_trees_close(params, ref_params, **F64, what=f"params after cycle {cycle}")
        for field in [f for f in ref_state if f != "step"]:
            assert_trees_close(state["inner"][field], ref_state[field], **F64, what=field)
        assert int(state["inner"]["step"]) == cycle + 1
        assert int(state["count"]) == 0
        assert_trees_equal(state["grad_mean"], {k: torch.zeros_like(v) for k, v in params.items()})


# --------------------------------------------------------------------------------------
# skip_nonfinite
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", "foreach"])
@pytest.mark.parametrize("inplace", MODES, ids=MODE_IDS)
def test_skip_nonfinite_equals_leaving_out_the_bad_steps(inplace: bool, impl: str) -> None:
    params = make_params(27)
    grads_seq = grad_sequence(27, params, STEPS)
    bad = {3: math.nan, 4: math.inf, 11: -math.inf}
    for step, value in bad.items():
        grads_seq[step] = dict(grads_seq[step])
        grads_seq[step]["layer.bias"] = grads_seq[step]["layer.bias"].clone()
        grads_seq[step]["layer.bias"][1] = value
    hyper = {"max_lr": 0.05, "weight_decay": 0.1, "impl": impl}
    opt = wrappers.skip_nonfinite(optorch.get_optimizer("adamw", **hyper, inplace=inplace))
    plain = optorch.get_optimizer("adamw", **hyper, inplace=False)
    ref_params, ref_state = clone_tree(params), plain.init(params)
    state = opt.init(params)
    consecutive = 0
    for k, grads in enumerate(grads_seq):
        params, state = opt.step(params, grads, state)
        if k not in bad:
            ref_params, ref_state = plain.step(ref_params, grads, ref_state)
        consecutive = consecutive + 1 if k in bad else 0
        assert_trees_equal(params, ref_params, what=f"params step {k}")
        assert_trees_equal(state["inner"], ref_state, what=f"state step {k}")
        assert int(state["skipped_total"]) == sum(1 for s in bad if s <= k)
        assert int(state["skipped_consecutive"]) == consecutive


@pytest.mark.parametrize("inplace", MODES, ids=MODE_IDS)
def test_skip_nonfinite_limit_raises_before_changing_anything(inplace: bool) -> None:
    params = make_params(28)
    opt = wrappers.skip_nonfinite(optorch.get_optimizer("sgd", inplace=inplace), max_consecutive=2)
    state = opt.init(params)
    good = grad_sequence(28, params, 1)[0]
    nan = {k: torch.full_like(v, math.nan) for k, v in params.items()}
    params, state = opt.step(params, good, state)
    params, state = opt.step(params, nan, state)
    params, state = opt.step(params, nan, state)
    assert int(state["skipped_consecutive"]) == 2
    before = snapshot(params, state)
    with pytest.raises(RuntimeError, match=r"3 consecutive steps .*max_consecutive=2"):
        opt.step(params, nan, state)
    assert_unchanged([params, state], before, what="after the refused step")


def _guarded(max_consecutive: int = 0) -> Any:
    """ema(skip_nonfinite(adamw)): a wrapped group whose refusal depends on the values."""
    inner = optorch.get_optimizer("adamw", max_lr=0.1)
    return wrappers.ema(wrappers.skip_nonfinite(inner, max_consecutive=max_consecutive), 0.9)


def test_partition_puts_back_the_groups_stepped_before_a_refusal() -> None:
    """In place, two wrapped groups that may refuse on the values: the second refuses
    (its gradient is NaN) after the first was written; params and every group's state
    come back as they were, containers and tensors the same objects."""
    opt = wrappers.partition(lambda path, p: path, {"a": _guarded(), "b": _guarded()})
    params = {"a": torch.ones(3), "b": torch.ones(3)}
    state = opt.init(params)
    params, state = opt.step(params, {"a": torch.ones(3), "b": torch.ones(3)}, state)
    tensors = [id(t) for t in optree_leaves(state)]
    before = snapshot(params, state)
    nan = {"a": torch.ones(3), "b": torch.tensor([1.0, math.nan, 1.0])}
    with pytest.raises(RuntimeError, match=r"1 consecutive steps .*max_consecutive=0"):
        opt.step(params, nan, state)
    assert_unchanged([params, state], before, what="after the refused step")
    assert [id(t) for t in optree_leaves(state)] == tensors


def test_a_skipped_step_is_not_refused_for_its_values_in_any_wrapper() -> None:
    """skip_if=True skips the step: skip_nonfinite's max_consecutive does not apply,
    whether the optimizer is bare, a partition group, or under accumulate."""
    nan = {"a": torch.tensor([math.nan, 1.0]), "b": torch.ones(2)}
    skip = torch.tensor(True)
    for opt in (
        wrappers.skip_nonfinite(optorch.get_optimizer("adamw"), max_consecutive=0),
        wrappers.partition(
            lambda path, p: path,
            {
                "a": wrappers.skip_nonfinite(optorch.get_optimizer("adamw"), max_consecutive=0),
                "b": optorch.get_optimizer("sgd"),
            },
        ),
        wrappers.partition(lambda path, p: path, {"a": _guarded(), "b": _guarded()}),
    ):
        params = {"a": torch.ones(2), "b": torch.ones(2)}
        state = opt.init(params)
        before = snapshot(params, state)
        opt.step(params, nan, state, skip_if=skip)
        assert_unchanged([params, state], before, what=f"{opt.name} skipped")
    # under accumulate: the calls before the k-th run no inner step, overrides or not
    inner = wrappers.skip_nonfinite(optorch.get_optimizer("adamw"), max_consecutive=0)
    opt = wrappers.accumulate(inner, every=4)
    params = {"a": torch.ones(2), "b": torch.ones(2)}
    state = opt.init(params)
    opt.step(params, nan, state, hyper_overrides={"max_lr": 0.1})
    assert int(state["count"]) == 1


# --------------------------------------------------------------------------------------
# EMA and lookahead
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("warmup", [False, True], ids=["plain", "warmup"])
@pytest.mark.parametrize("inplace", MODES, ids=MODE_IDS)
def test_ema_matches_averaged_model(inplace: bool, warmup: bool) -> None:
    decay = 0.8
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        for tensor, value in zip(
            model.parameters(),
            make_params(29, shapes={"w": (3, 4), "b": (3,)}).values(),
            strict=True,
        ):
            tensor.copy_(value)

    def warmup_avg(average: torch.Tensor, current: torch.Tensor, count: Any) -> torch.Tensor:
        taken = float(count) - 1.0  # AveragedModel counts the initial copy
        d = min(decay, (1.0 + taken) / (10.0 + taken))
        return average * d + current * (1.0 - d)

    if warmup:
        averaged = torch.optim.swa_utils.AveragedModel(model, avg_fn=warmup_avg)
    else:
        averaged = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay)
        )
    averaged.update_parameters(model)  # start the average at the initial weights
    torch_opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1, foreach=False)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = wrappers.ema(
        optorch.get_optimizer("adamw", max_lr=0.05, weight_decay=0.1, inplace=inplace),
        decay,
        warmup=warmup,
    )
    state = opt.init(params)
    for k, grads in enumerate(grad_sequence(29, params, STEPS)):
        params, state = opt.step(params, grads, state)
        for name, tensor in model.named_parameters():
            tensor.grad = grads[name].clone()
        torch_opt.step()
        averaged.update_parameters(model)
        assert_trees_close(params, dict(model.named_parameters()), **F32, what=f"params {k}")
        assert_trees_close(
            wrappers.ema_params(state),
            dict(averaged.module.named_parameters()),
            **F32,
            what=f"ema step {k}",
        )
        assert int(state["count"]) == k + 1
    assert not torch.allclose(state["ema"]["weight"], params["weight"], atol=1e-3)


@pytest.mark.parametrize("path", ["eager", "gated"])
@pytest.mark.parametrize("inplace", MODES, ids=MODE_IDS)
def test_lookahead_matches_float64_formula(inplace: bool, path: str) -> None:
    """Zhang et al. 2019, Algorithm 1, around SGD with heavy-ball momentum."""
    k_sync, alpha, lr, mu = 5, 0.5, 0.05, 0.9
    params = make_params(30, torch.float64)
    grads_seq = grad_sequence(30, params, STEPS)
    sgd = optorch.get_optimizer("sgd", max_lr=lr, momentum=mu, inplace=inplace)
    opt = wrappers.lookahead(sgd, sync_period=k_sync, alpha=alpha)
    state = opt.init(params)
    fast = clone_tree(params)
    slow = clone_tree(params)
    buf: dict[str, torch.Tensor] = {}
    skip = torch.tensor(False) if path == "gated" else None
    for k, grads in enumerate(grads_seq):
        for name, g in grads.items():
            buf[name] = g.clone() if k == 0 else mu * buf[name] + g
            fast[name] = fast[name] - lr * buf[name]
        if (k + 1) % k_sync == 0:
            for name in fast:
                slow[name] = slow[name] + alpha * (fast[name] - slow[name])
                fast[name] = slow[name].clone()
        params, state = opt.step(params, grads, state, skip_if=skip)
        assert_trees_close(params, fast, **F64, what=f"fast step {k}")
        assert_trees_close(state["slow"], slow, **F64, what=f"slow step {k}")
        assert_trees_close(state["inner"]["momentum"], buf, **F64, what=f"momentum step {k}")
        assert int(state["count"]) == (k + 1) % k_sync


# --------------------------------------------------------------------------------------
# gradient transformations against float64 formulas
# --------------------------------------------------------------------------------------


def _agc_formula(g: torch.Tensor, p: torch.Tensor, clipping: float, eps: float) -> torch.Tensor:
    rows_g = g.reshape(1, -1) if g.ndim <= 1 else g.reshape(g.shape[0], -1)
    rows_p = p.reshape(1, -1) if p.ndim <= 1 else p.reshape(p.shape[0], -1)
    out = rows_g.clone()
    for i in range(rows_g.shape[0]):
        w_norm = max(float(rows_p[i].norm()), eps)
        g_norm = float(rows_g[i].norm())
        if g_norm / w_norm > clipping:
            out[i] = rows_g[i] * (clipping * w_norm / g_norm)
    return out.reshape(g.shape)


def _per_param_formula(g: torch.Tensor, max_norm: float) -> torch.Tensor:
    return g * min(1.0, max_norm / (float(g.norm()) + 1e-6))


TRANSFORM_CASES: dict[str, tuple[Callable[[], Any], Callable[..., torch.Tensor]]] = {
    "clip_by_value": (lambda: wrappers.clip_by_value(0.7), lambda g, p: g.clamp(-0.7, 0.7)),
    "clip_by_norm_per_param": (
        lambda: wrappers.clip_by_norm_per_param(1.5),
        lambda g, p: _per_param_formula(g, 1.5),
    ),
    "adaptive_clip": (
        lambda: wrappers.adaptive_clip(0.3, eps=1e-3),
        lambda g, p: _agc_formula(g, p, 0.3, 1e-3),
    ),
    "scale": (lambda: wrappers.scale(-0.25), lambda g, p: -0.25 * g),
}


@pytest.mark.parametrize("case", list(TRANSFORM_CASES))
def test_transformations_match_formulas(case: str) -> None:
    make, formula = TRANSFORM_CASES[case]
    params = make_params(31, torch.float64)
    params["tiny.weight"] = torch.zeros(3, 2, dtype=torch.float64)  # eps floor of AGC
    transform = make()
    state = transform.init(params)
    changed = 0
    for k, grads in enumerate(grad_sequence(31, params, 5)):
        grads = {n: g * (0.2 + k) for n, g in grads.items()}  # small to large
        before = clone_tree(grads)
        out, state, _ = transform.update(grads, state, params)
        assert_trees_equal(grads, before, what="the caller's grads")
        for name, g in grads.items():
            expected = formula(g, params[name])
            torch.testing.assert_close(out[name], expected, **F64, msg=f"{case} {name} {k}")
            changed += not torch.equal(out[name], g)
    assert changed > 0, "the inputs must exercise the transformation"


def test_zero_nans_replaces_only_nans() -> None:
    transform = wrappers.zero_nans()
    grads = {"a": torch.tensor([1.0, math.nan, math.inf]), "b": torch.tensor([2.0])}
    state = transform.init(grads)
    out, state, _ = transform.update(grads, state, grads)
    assert_trees_equal(out, {"a": torch.tensor([1.0, 0.0, math.inf]), "b": torch.tensor([2.0])})
    assert bool(state["found_nan"])
    out, state, _ = transform.update({"a": torch.ones(3), "b": torch.ones(1)}, state, grads)
    assert not bool(state["found_nan"])


@pytest.mark.parametrize("gamma", [0.0, 0.55])
def test_add_noise_has_the_annealed_variance(gamma: float) -> None:
    """Variance eta / (1 + t)^gamma (Neelakantan et al. 2015), t = 0 on the first step;
    deterministic per seed, independent between leaves and steps."""
    eta, n = 0.3, 20000  # below torch's parallel grain: no thread start-up per op
    params = {"a": torch.zeros(n), "b": torch.zeros(100, 200, dtype=torch.float64)}
    grads = {"a": torch.zeros(n), "b": torch.zeros(100, 200, dtype=torch.float64)}
    transform = wrappers.add_noise(eta, gamma, seed=5)
    state = transform.init(params)
    previous = None
    for t in range(4):
        out, new_state, _ = transform.update(grads, state, params)
        again, _, _ = transform.update(grads, state, params)
        assert_trees_equal(out, again, what="same state, same noise")
        expected = eta / (1.0 + t) ** gamma
        for name in ("a", "b"):
            noise = out[name].double().flatten()
            assert abs(float(noise.mean())) < 4 * math.sqrt(expected / n)
            assert float(noise.var()) == pytest.approx(expected, rel=0.05)
        a, b = out["a"].double(), out["b"].double().flatten()
        correlation = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
        assert abs(correlation) < 0.03, "leaves must get independent noise"
        if previous is not None:
            step_correlation = float(torch.corrcoef(torch.stack([a, previous]))[0, 1])
            assert abs(step_correlation) < 0.03, "steps must get independent noise"
        previous = a
        state = new_state
        assert int(state["count"]) == t + 1
    other = wrappers.add_noise(eta, gamma, seed=6)
    assert not torch.equal(other.update(grads, other.init(params), params)[0]["a"], previous)


# --------------------------------------------------------------------------------------
# inject_hyperparams
# --------------------------------------------------------------------------------------


def warmup_cosine(k: int) -> float:
    if k < 4:
        return (k + 1) / 4
    progress = min(1.0, (k - 4) / 16)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


@pytest.mark.parametrize("impl", ["reference", "foreach"])
@pytest.mark.parametrize("inplace", MODES, ids=MODE_IDS)
def test_injected_lr_gives_the_schedule_trajectory(inplace: bool, impl: str) -> None:
    params = make_params(32)
    base = 0.05
    scheduled = optorch.get_optimizer(
        "adamw", max_lr=base, weight_decay=0.1, schedule=warmup_cosine, inplace=False, impl=impl
    )
    opt = wrappers.inject_hyperparams(
        optorch.get_optimizer("adamw", max_lr=base, weight_decay=0.1, inplace=inplace, impl=impl),
        names=["max_lr"],
    )
    ref_params, ref_state = clone_tree(params), scheduled.init(params)
    state = opt.init(params)
    for k, grads in enumerate(grad_sequence(32, params, STEPS)):
        wrappers.set_hyperparam(state, "max_lr", base * warmup_cosine(k))
        params, state = opt.step(params, grads, state)
        ref_params, ref_state = scheduled.step(ref_params, grads, ref_state)
        assert_trees_close(params, ref_params, **F32, what=f"params step {k}")
        assert_trees_close(
            {f: state["inner"][f] for f in ref_state}, ref_state, **F32, what=f"state step {k}"
        )
    assert wrappers.get_hyperparams(state)["max_lr"] == pytest.approx(base * warmup_cosine(19))


@pytest.mark.parametrize("inplace", MODES, ids=MODE_IDS)
def test_injected_betas_and_decay_equal_replaced_configs(inplace: bool) -> None:
    """Changing betas and weight_decay mid-run == stepping with a config holding them."""
    params = make_params(33)
    adamw = optorch.get_optimizer("adamw", max_lr=0.05, weight_decay=0.1, inplace=inplace)
    opt = wrappers.inject_hyperparams(adamw, names=["betas", "weight_decay"])
    reference = optorch.get_optimizer("adamw", max_lr=0.05, weight_decay=0.1, inplace=False)
    ref_params, ref_state = clone_tree(params), reference.init(params)
    state = opt.init(params)
    assert isinstance(state["hyperparams"]["betas"], tuple)
    for k, grads in enumerate(grad_sequence(33, params, 12)):
        betas, decay = ((0.8, 0.99), 0.3) if k >= 6 else ((0.9, 0.999), 0.1)
        wrappers.set_hyperparam(state, "betas", betas)
        wrappers.set_hyperparam(state, "weight_decay", decay)
        params, state = opt.step(params, grads, state)
        now = reference.replace(betas=betas, weight_decay=decay)
        ref_params, ref_state = now.step(ref_params, grads, ref_state)
        assert_trees_close(params, ref_params, **F32, what=f"params step {k}")
        for field in ("exp_avg", "exp_avg_sq"):
            assert_trees_close(state["inner"][field], ref_state[field], **F32, what=field)


@pytest.mark.parametrize("impl", ["reference", "foreach"])
@pytest.mark.parametrize("inplace", MODES, ids=MODE_IDS)
def test_injected_momentum_of_zero_with_dampening_is_plain_sgd(inplace: bool, impl: str) -> None:
    """An injected momentum (a tensor) of 0 steps on the gradient itself, as torch.optim.SGD
    with momentum 0, whatever the dampening (the damped buffer made half steps)."""
    params = make_params(35)
    sgd = optorch.get_optimizer(
        "sgd", max_lr=0.05, momentum=0.0, dampening=0.5, inplace=inplace, impl=impl
    )
    opt = wrappers.inject_hyperparams(sgd, names=["momentum"])
    tensors = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    reference = torch.optim.SGD(list(tensors.values()), lr=0.05, dampening=0.5, foreach=False)
    state = opt.init(params)
    for k, grads in enumerate(grad_sequence(35, params, 8)):
        for name, p in tensors.items():
            p.grad = grads[name].clone()
        reference.step()
        params, state = opt.step(params, grads, state)
        expected = {name: p.detach() for name, p in tensors.items()}
        assert_trees_close(params, expected, **F32, what=f"params step {k}")


@pytest.mark.slow  # compiles AdamW once (seconds to a minute on a loaded machine)
def test_changing_the_injected_lr_does_not_recompile() -> None:
    from torch._dynamo.utils import counters

    params = make_params(34)
    base = 0.05
    hyper = {"max_lr": base}
    # skip_nonfinite gates the step: the same kernel as the compiled table case below,
    # so the file compiles AdamW once
    opt = wrappers.skip_nonfinite(
        wrappers.inject_hyperparams(optorch.get_optimizer("adamw", **hyper, impl="compiled"))
    )
    scheduled = optorch.get_optimizer("adamw", **hyper, schedule=warmup_cosine, inplace=False)
    ref_params, ref_state = clone_tree(params), scheduled.init(params)
    state = opt.init(params)
    grads_seq = grad_sequence(34, params, 6)
    wrappers.set_hyperparam(state, "max_lr", base * warmup_cosine(0))
    params, state = opt.step(params, grads_seq[0], state)  # compiles (or reuses a cache)
    ref_params, ref_state = scheduled.step(ref_params, grads_seq[0], ref_state)
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for k in range(1, len(grads_seq)):
            wrappers.set_hyperparam(state, "max_lr", base * warmup_cosine(k))
            params, state = opt.step(params, grads_seq[k], state)
            ref_params, ref_state = scheduled.step(ref_params, grads_seq[k], ref_state)
    assert counters["stats"]["unique_graphs"] == graphs, "a changed lr must not recompile"
    assert_trees_close(params, ref_params, rtol=1e-5, atol=1e-6, what="compiled vs scheduled")


# --------------------------------------------------------------------------------------
# the table: every wrapper around every registered optimizer
# --------------------------------------------------------------------------------------


TABLE_SHAPES = {"layer.weight": (4, 3), "layer.bias": (4,), "scale": (), "conv.weight": (2, 3, 2)}


@functools.cache
def rejected_leaves(name: str) -> tuple[str, ...]:
    """The leaves a registered optimizer refuses on its own (e.g. Muon wants matrices):
    each is tried alone, and those that raise go to an AdamW fallback group."""
    params = make_params(40, shapes=TABLE_SHAPES)
    rejected = []
    for leaf, tensor in params.items():
        opt = optorch.get_optimizer(name, inplace=False, impl="reference")
        try:
            opt.step({leaf: tensor}, {leaf: torch.ones_like(tensor)}, opt.init({leaf: tensor}))
        except (ValueError, TypeError):
            rejected.append(leaf)
    return tuple(rejected)


def registry_optimizer(name: str, *, inplace: bool, impl: str) -> Any:
    opt = optorch.get_optimizer(name, inplace=inplace, impl=impl)
    rejected = rejected_leaves(name)
    if not rejected:
        return opt
    if len(rejected) == len(TABLE_SHAPES):
        pytest.skip(f"{name} refuses every leaf shape of the table params")
    fallback = optorch.get_optimizer("adamw", max_lr=opt.config.max_lr, inplace=inplace, impl=impl)
    return wrappers.partition(
        lambda path, p: "fallback" if path in rejected else "main",
        {"main": opt, "fallback": fallback},
    )


def _all_transforms(opt: Any) -> Any:
    return wrappers.chain(
        wrappers.zero_nans(),
        wrappers.add_noise(1e-4, seed=1),
        wrappers.clip_by_value(2.0),
        wrappers.clip_by_norm_per_param(3.0),
        wrappers.adaptive_clip(0.5),
        wrappers.scale(0.9),
        wrappers.clip_by_global_norm(2.0),
        opt,
    )


def _decay_mask_or_skip(opt: Any) -> Any:
    if not config_has(opt.config, "weight_decay"):
        pytest.skip("this optimizer has no weight_decay hyperparameter to mask")
    return wrappers.decay_mask(opt)


WRAPPERS: dict[str, Callable[[Any], Any]] = {
    "chain": _all_transforms,
    "masked": lambda opt: wrappers.masked(opt, lambda path, p: path != "scale"),
    "freeze": lambda opt: wrappers.freeze(opt, lambda path, p: path == "layer.bias"),
    "partition": lambda opt: wrappers.partition(
        lambda path, p: "a" if p.ndim >= 2 else "b",
        {"a": opt, "b": opt.replace(max_lr=config_value(opt.config, "max_lr") * 0.5)},
    ),
    "decay_mask": _decay_mask_or_skip,
    "accumulate": lambda opt: wrappers.accumulate(opt, every=2),
    "skip_nonfinite": lambda opt: wrappers.skip_nonfinite(opt, max_consecutive=3),
    "ema": lambda opt: wrappers.ema(opt, 0.9, warmup=True),
    "lookahead": lambda opt: wrappers.lookahead(opt, sync_period=2),
    "inject_hyperparams": lambda opt: wrappers.inject_hyperparams(opt, names=["max_lr"]),
    "nested": lambda opt: wrappers.skip_nonfinite(
        wrappers.accumulate(
            wrappers.inject_hyperparams(
                wrappers.ema(wrappers.lookahead(_all_transforms(opt), sync_period=2), 0.5)
            ),
            every=2,
        )
    ),
}


def run_wrapped(name: str, wrapper: str, *, inplace: bool, impl: str) -> dict[str, torch.Tensor]:
    """Four calls (a skipped one first, a non-finite one for skip_nonfinite) with the
    shared checks; returns the final params."""
    opt = WRAPPERS[wrapper](registry_optimizer(name, inplace=inplace, impl=impl))
    params = make_params(41, shapes=TABLE_SHAPES)
    initial = clone_tree(params)
    state = opt.init(params)
    layout = structure(state)
    grads_seq = grad_sequence(41, params, 4)
    if wrapper in ("skip_nonfinite", "nested"):
        grads_seq[2] = {k: torch.full_like(v, math.nan) for k, v in grads_seq[2].items()}
    for k, grads in enumerate(grads_seq):
        skip = torch.tensor(True) if k == 0 else None
        before = snapshot(params, grads, state)
        ids = (tensor_ids(params), tensor_ids(state))
        new_params, new_state = opt.step(params, grads, state, skip_if=skip)
        if inplace:
            assert tensor_ids(new_params) == ids[0], "in place: params must be the same tensors"
            assert tensor_ids(new_state) == ids[1], "in place: state must be the same tensors"
        else:
            assert_unchanged([params, grads, state], before, what=f"pure step {k}")
        if skip is not None:
            assert_trees_equal(new_params, before[0], what="a skipped step changed params")
            assert_trees_equal(new_state, before[2], what="a skipped step changed the state")
        assert structure(new_state) == layout, f"state structure changed at step {k}"
        assert structure(new_params) == structure(initial)
        params, state = new_params, new_state
    moved = [n for n in params if not torch.equal(params[n], initial[n])]
    assert moved, f"{wrapper}({name}) never changed the params"
    if wrapper == "freeze":
        assert torch.equal(params["layer.bias"], initial["layer.bias"])
    if wrapper == "masked":
        assert torch.equal(params["scale"], initial["scale"])
    return params


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
@pytest.mark.parametrize("name", list(optorch.REGISTRY))
def test_every_wrapper_around_every_optimizer(name: str, wrapper: str) -> None:
    """Steps run, pure mode leaves inputs untouched, in-place mode writes in place, the
    state keeps its structure, ``skip_if`` keeps everything, and all four (mode,
    engine) combinations reach the same params."""
    results = {
        (inplace, impl): run_wrapped(name, wrapper, inplace=inplace, impl=impl)
        for inplace in MODES
        for impl in ("reference", "foreach")
    }
    expected = results[(False, "reference")]
    for key, params in results.items():
        assert_trees_close(params, expected, rtol=1e-5, atol=1e-6, what=f"{key}")


@pytest.mark.slow
def test_wrappers_around_the_compiled_engine() -> None:
    """One compiled case (each compilation costs seconds): every wrapper nested around
    in-place compiled AdamW; pure mode runs the same rule and is covered by the table."""
    compiled = run_wrapped("adamw", "nested", inplace=True, impl="compiled")
    reference = run_wrapped("adamw", "nested", inplace=False, impl="reference")
    assert_trees_close(compiled, reference, rtol=1e-5, atol=1e-6, what="compiled")


# --------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------


def _sgd(**kw: Any) -> Any:
    return optorch.get_optimizer("sgd", **kw)


BAD_CONSTRUCTION = [
    ("clip-negative", lambda: wrappers.clip_by_global_norm(-1.0), ValueError, r"max_norm.*-1\.0"),
    ("clip-nan", lambda: wrappers.clip_by_global_norm(math.nan), ValueError, r"max_norm.*nan"),
    ("clip-str", lambda: wrappers.clip_by_global_norm("1"), TypeError, r"max_norm"),
    ("per-param-zero", lambda: wrappers.clip_by_norm_per_param(0.0), ValueError, r"max_norm"),
    ("value-negative", lambda: wrappers.clip_by_value(-0.5), ValueError, r"limit.*-0\.5"),
    ("agc-zero", lambda: wrappers.adaptive_clip(0.0), ValueError, r"clipping"),
    ("agc-eps", lambda: wrappers.adaptive_clip(0.1, eps=-1.0), ValueError, r"eps"),
    ("scale-inf", lambda: wrappers.scale(math.inf), ValueError, r"factor.*inf"),
    ("noise-eta", lambda: wrappers.add_noise(-1.0), ValueError, r"eta"),
    ("noise-seed", lambda: wrappers.add_noise(0.1, seed=1.5), TypeError, r"seed"),
    ("every-zero", lambda: wrappers.accumulate(_sgd(), every=0), ValueError, r"every.*0"),
    ("every-float", lambda: wrappers.accumulate(_sgd(), every=2.0), TypeError, r"every"),
    ("every-bool", lambda: wrappers.accumulate(_sgd(), every=True), TypeError, r"every"),
    ("decay-high", lambda: wrappers.ema(_sgd(), 1.5), ValueError, r"decay.*1\.5"),
    ("decay-negative", lambda: wrappers.ema(_sgd(), -0.1), ValueError, r"decay.*-0\.1"),
    ("decay-nan", lambda: wrappers.ema(_sgd(), math.nan), ValueError, r"decay.*nan"),
    ("sync-zero", lambda: wrappers.lookahead(_sgd(), sync_period=0), ValueError, r"sync_period"),
    ("alpha-high", lambda: wrappers.lookahead(_sgd(), alpha=2.0), ValueError, r"alpha.*2\.0"),
    (
        "max-consecutive",
        lambda: wrappers.skip_nonfinite(_sgd(), max_consecutive=-1),
        ValueError,
        r"max_consecutive",
    ),
    (
        "inject-unknown",
        lambda: wrappers.inject_hyperparams(_sgd(), names=["max_lrr"]),
        ValueError,
        r"max_lrr",
    ),
    (
        "inject-structural",
        lambda: wrappers.inject_hyperparams(_sgd(), names=["nesterov"]),
        TypeError,
        r"nesterov",
    ),
    (
        "inject-str-names",
        lambda: wrappers.inject_hyperparams(_sgd(), names="max_lr"),
        TypeError,
        r"names",
    ),
    ("not-an-optimizer", lambda: wrappers.ema(object(), 0.9), TypeError, r"expected an optimizer"),
    (
        "chain-not-transform",
        lambda: wrappers.chain(_sgd(), _sgd()),
        TypeError,
        r"argument 0 .*gradient transformation",
    ),
    (
        "chain-no-optimizer",
        lambda: wrappers.chain(wrappers.scale(1.0)),
        TypeError,
        r"last argument must be an optimizer",
    ),
    ("partition-empty", lambda: wrappers.partition(is_matrix, {}), TypeError, r"non-empty"),
    (
        "partition-modes",
        lambda: wrappers.partition(is_matrix, {"a": _sgd(), "b": _sgd(inplace=False)}),
        ValueError,
        r"same mode",
    ),
]


@pytest.mark.parametrize(
    ("factory", "error", "message"),
    [row[1:] for row in BAD_CONSTRUCTION],
    ids=[row[0] for row in BAD_CONSTRUCTION],
)
def test_bad_construction_raises(factory: Callable[[], Any], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        factory()


def _params() -> dict[str, torch.Tensor]:
    return make_params(50)


BAD_STEPS: list[tuple[str, Callable[[], Any], Callable[[dict[str, Any]], dict[str, Any]], Any]] = [
    # (id, optimizer, how the step's params differ from init's, error, message)
    (
        "partition-unknown-label",
        lambda: wrappers.partition(
            lambda path, p: "new" if path == "extra" else "old", {"old": _sgd()}
        ),
        lambda p: {**p, "extra": torch.ones(2)},
        ValueError,
        r"label 'new' of param \['extra'\] has no optimizer",
    ),
    (
        "partition-label-tree",
        lambda: wrappers.partition({n: "a" for n in _params()}, {"a": _sgd()}),
        lambda p: {**p, "extra": torch.ones(2)},
        ValueError,
        r"labels tree does not match params.*'extra'",
    ),
    (
        "masked-tree",
        lambda: wrappers.masked(_sgd(), {n: True for n in _params()}),
        lambda p: {**p, "extra": torch.ones(2)},
        ValueError,
        r"mask tree does not match params.*'extra'",
    ),
    (
        "ema-structure",
        lambda: wrappers.ema(_sgd(), 0.9),
        lambda p: {k: v for k, v in p.items() if k != "scale"},
        ValueError,
        r"state 'ema' does not match params.*'scale'",
    ),
    (
        "accumulate-shape",
        lambda: wrappers.accumulate(_sgd(), every=2),
        lambda p: {**p, "layer.bias": torch.ones(7)},
        ValueError,
        r"grad_mean.*\['layer.bias'\].*shape",
    ),
    (
        "chain-grads",
        lambda: wrappers.chain(wrappers.clip_by_global_norm(1.0), _sgd()),
        None,
        ValueError,
        r"grads do not match params",
    ),
]


@pytest.mark.parametrize("inplace", MODES, ids=MODE_IDS)
@pytest.mark.parametrize(
    ("make", "change", "error", "message"),
    [row[1:] for row in BAD_STEPS],
    ids=[row[0] for row in BAD_STEPS],
)
def test_bad_step_raises_and_leaves_everything_untouched(
    inplace: bool, make: Callable[[], Any], change: Any, error: type, message: str
) -> None:
    opt = make()
    if not inplace:
        opt = opt.replace(inplace=False)
    params = _params()
    state = opt.init(params)
    grads = grad_sequence(50, params, 1)[0]
    params, state = opt.step(params, grads, state)
    if change is None:
        step_params = params
        step_grads = {k: v for k, v in grads.items() if k != "scale"}
    else:
        step_params = change(params)
        step_grads = {k: torch.ones_like(v) for k, v in step_params.items()}
    before = snapshot(params, state, step_params)
    with pytest.raises(error, match=message):
        opt.step(step_params, step_grads, state)
    assert_unchanged([params, state, step_params], before, what="after the refused step")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: wrappers.masked(_sgd(), {"layer.weight": True}), r"mask tree does not match"),
        (lambda: wrappers.partition({"x": "a"}, {"a": _sgd()}), r"labels tree does not match"),
        (
            lambda: wrappers.partition(lambda path, p: p.ndim, {2: _sgd()}),
            r"label 3 of param \['conv.weight'\] has no optimizer",
        ),
    ],
    ids=["mask-tree", "label-tree", "unknown-label"],
)
def test_bad_selection_is_refused_at_init(make: Callable[[], Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make().init(_params())


def test_nested_states_are_found_by_the_helpers() -> None:
    params = _params()
    inner = wrappers.ema(wrappers.inject_hyperparams(_sgd(max_lr=0.3)), 0.5)
    opt = wrappers.skip_nonfinite(wrappers.accumulate(inner, every=1))
    state = opt.init(params)
    assert wrappers.ema_params(state) is state["inner"]["inner"]["ema"]
    wrappers.set_hyperparam(state, "max_lr", 0.25)
    assert wrappers.get_hyperparams(state) == {"max_lr": 0.25}
    with pytest.raises(ValueError, match="no ema wrapper state"):
        wrappers.ema_params(_sgd().init(params))


def test_ema_params_are_found_through_a_partition() -> None:
    """Each group's average covers its own leaves; groups without an ema give None."""
    params = _params()
    by_rank = {
        "matrix": wrappers.ema(_sgd(max_lr=0.3), 0.5),
        "vector": wrappers.ema(optorch.get_optimizer("adam", max_lr=0.1), 0.9),
    }
    selector = lambda path, p: "matrix" if p.ndim >= 2 else "vector"  # noqa: E731
    opt = wrappers.partition(selector, by_rank)
    state = opt.init(params)
    grads = make_grads(4, params)
    params, state = opt.step(params, grads, state)
    merged = wrappers.ema_params(state)
    for name, param in params.items():
        group = "matrix" if param.ndim >= 2 else "vector"
        own = state["groups"][group]["ema"][name]
        assert merged[name] is own
    half = wrappers.partition(selector, {**by_rank, "vector": _sgd()})
    state = half.init(params)
    merged = wrappers.ema_params(state)
    for name, param in params.items():
        if param.ndim >= 2:
            assert merged[name] is state["groups"]["matrix"]["ema"][name]
        else:
            assert merged[name] is None


def test_accumulate_checks_overrides_on_calls_that_do_not_step() -> None:
    """The eager path skips the inner step before the k-th call; it must still refuse
    what the k-th call (and the device path, on every call) refuses, changing nothing."""
    for inner in (_sgd(), wrappers.ema(_sgd(), 0.5)):
        opt = wrappers.accumulate(inner, every=3)
        params = _params()
        state = opt.init(params)
        grads = make_grads(5, params)
        before = clone_tree((params, state))
        for overrides, match in (
            ({"max_lr": float("nan")}, r"max_lr: nan"),
            ({"no_such_field": 1.0}, r"has no field\(s\) \['no_such_field'\]"),
        ):
            with pytest.raises(ValueError, match=match):
                opt.step(params, grads, state, hyper_overrides=overrides)
            assert_trees_equal((params, state), before, what="after the refused call")
        params, state = opt.step(params, grads, state, hyper_overrides={"max_lr": 0.2})
        assert int(state["count"]) == 1


def test_mask_must_give_bools() -> None:
    opt = wrappers.masked(_sgd(), lambda path, p: "yes")
    with pytest.raises(TypeError, match=r"bool for each leaf, got 'yes'"):
        opt.init(_params())


def test_state_of_another_wrapper_is_refused() -> None:
    params = _params()
    state = wrappers.ema(_sgd(), 0.9).init(params)
    with pytest.raises(ValueError, match=r"state lacks \['grad_mean'\]"):
        wrappers.accumulate(_sgd(), every=2).step(params, params, state)


@pytest.mark.parametrize(
    ("name", "value", "error", "message"),
    [
        ("min_lr", 0.1, ValueError, r"'min_lr' is not injected"),
        ("max_lr", math.nan, ValueError, r"finite"),
        ("max_lr", "0.1", TypeError, r"number"),
        ("betas", (0.9,), ValueError, r"needs 2 values"),
    ],
)
def test_set_hyperparam_bad_inputs(name: str, value: Any, error: type, message: str) -> None:
    opt = wrappers.inject_hyperparams(optorch.get_optimizer("adam"), names=["max_lr", "betas"])
    state = opt.init(_params())
    before = snapshot(state)
    with pytest.raises(error, match=message):
        wrappers.set_hyperparam(state, name, value)
    assert_unchanged([state], before)


def test_set_hyperparam_finds_an_injection_inside_a_partition_group() -> None:
    """get/set_hyperparam looked through ``inner`` only: an injection in one partition
    group was not found; in two groups at once it is ambiguous, and both are named."""

    def label(path: Any, t: torch.Tensor) -> str:
        return "mat" if t.dim() == 2 else "vec"

    params = {"w": torch.ones(2, 2), "b": torch.ones(2)}
    one = wrappers.partition(
        label,
        {
            "mat": wrappers.inject_hyperparams(_sgd(), names=["max_lr"]),
            "vec": optorch.get_optimizer("adam"),
        },
    )
    state = one.init(params)
    wrappers.set_hyperparam(state, "max_lr", 0.5)
    assert wrappers.get_hyperparams(state) == {"max_lr": 0.5}
    assert float(state["groups"]["mat"]["hyperparams"]["max_lr"]) == 0.5
    grads = {"w": torch.ones(2, 2), "b": torch.ones(2)}
    params, state = one.step(params, grads, state)
    torch.testing.assert_close(params["w"], torch.full((2, 2), 0.5))  # 1 - 0.5 * 1
    two = wrappers.partition(
        label,
        {
            "mat": wrappers.inject_hyperparams(_sgd(), names=["max_lr"]),
            "vec": wrappers.inject_hyperparams(optorch.get_optimizer("adam"), names=["max_lr"]),
        },
    )
    state = two.init(params)
    with pytest.raises(ValueError, match=r"found at state\['groups'\]\['mat'\], state"):
        wrappers.set_hyperparam(state, "max_lr", 0.5)
    wrappers.set_hyperparam(state["groups"]["vec"], "max_lr", 0.25)
    assert wrappers.get_hyperparams(state["groups"]["vec"]) == {"max_lr": 0.25}


def test_hyperparams_are_found_when_params_are_named_inner_and_hyperparams() -> None:
    """The finder walked params-shaped trees too: an EMA of params named "inner" and
    "hyperparams" looked like a second injection (and a large model cost a walk)."""
    params = {"inner": torch.ones(2), "hyperparams": torch.ones(2)}
    for wrap in (lambda o: wrappers.ema(o, 0.9), lambda o: wrappers.accumulate(o, every=2)):
        opt = wrap(wrappers.inject_hyperparams(_sgd(max_lr=0.01), names=["max_lr"]))
        state = opt.init(params)
        assert wrappers.get_hyperparams(state) == {"max_lr": 0.01}
        wrappers.set_hyperparam(state, "max_lr", 0.02)
        assert wrappers.get_hyperparams(state) == {"max_lr": 0.02}


def test_injected_negative_lr_is_refused_at_the_step() -> None:
    opt = wrappers.inject_hyperparams(_sgd(), names=["max_lr"])
    params = _params()
    state = wrappers.set_hyperparam(opt.init(params), "max_lr", -1.0)
    before = snapshot(params, state)
    with pytest.raises(ValueError, match=r"max_lr.*-1"):
        opt.step(params, grad_sequence(50, params, 1)[0], state)
    assert_unchanged([params, state], before)


def test_a_field_made_on_a_later_step_covers_leaves_without_a_grad_then() -> None:
    """A field the config adds after init (SGD's momentum injected from 0, AMSGrad
    turned on) is made on the first step that needs it, for every leaf that carries
    state: also for a leaf without a gradient on that step, which was refused ever
    after ('has a gradient but no state')."""
    opt = wrappers.inject_hyperparams(_sgd(max_lr=0.1, momentum=0.0), names=["momentum"])
    params = {"a": torch.ones(2), "b": torch.ones(2)}
    state = wrappers.set_hyperparam(opt.init(params), "momentum", 0.9)
    params, state = opt.step(params, {"a": torch.ones(2), "b": None}, state)
    assert torch.equal(state["inner"]["momentum"]["b"], torch.zeros(2))
    params, state = opt.step(params, {"a": torch.ones(2), "b": torch.ones(2)}, state)
    assert torch.equal(params["b"], torch.full((2,), 0.9))  # one plain step of -lr * g

    adam = optorch.get_optimizer("adam", max_lr=0.1)
    params = {"a": torch.ones(2), "b": torch.ones(2)}
    state = adam.init(params)
    amsgrad = adam.replace(amsgrad=True)
    params, state = amsgrad.step(params, {"a": torch.ones(2), "b": None}, state)
    params, state = amsgrad.step(params, {"a": torch.ones(2), "b": torch.ones(2)}, state)
    assert float(state["max_exp_avg_sq"]["b"][0]) > 0.0


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "pure"])
def test_a_partition_group_without_params_is_left_out_and_compiles(inplace: bool) -> None:
    """A label that no param gets (no 1-D params in the model, say) has nothing to step:
    its state stays as it is, eagerly and under torch.compile(fullgraph=True), where its
    all-None trees failed to trace."""

    def build() -> Any:
        sgd = optorch.get_optimizer("sgd", max_lr=0.1, momentum=0.9, inplace=inplace)
        return wrappers.partition(
            lambda path, p: "matrix" if p.ndim == 2 else "vector", {"matrix": sgd, "vector": sgd}
        )

    runs = []
    for compiled in (False, True):
        opt = build()
        params = {"w": torch.ones(2, 3), "v": torch.ones(3, 2)}
        state = opt.init(params)
        empty_before = clone_tree(state["groups"]["vector"])

        def step(p: Any, g: Any, s: Any, opt: Any = opt) -> Any:
            return opt.step(p, g, s)

        stepper = torch.compile(step, fullgraph=True) if compiled else step
        for k in range(3):
            grads = {name: torch.full_like(value, 0.1 * (k + 1)) for name, value in params.items()}
            params, state = stepper(params, grads, state)
        assert_trees_equal(state["groups"]["vector"], empty_before, what="the empty group")
        runs.append((params, state))
    assert_trees_close(runs[1][0], runs[0][0], rtol=1e-6, atol=1e-7, what="params")
    assert_trees_close(runs[1][1], runs[0][1], rtol=1e-6, atol=1e-7, what="state")

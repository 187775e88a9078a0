"""Each param's own step count, as torch.optim keeps it, when some gradients are ``None``.

torch.optim skips a param whose ``.grad`` is ``None``: its state, its ``step`` included,
stays as it was, so its bias correction later counts only the steps it took. optorch
keeps the optimizer's count in ``state["step"]`` and, for the rules that read a
param's own count, how many steps each param sat out (``state["skipped_steps"]``,
made on the first such step). Checked here:

* against torch.optim with a gradient pattern in which one param sits out every third
  step and another its first four: params AND state (torch's per-param ``step`` is
  ``step - skipped_steps``) after each of 20 steps, float32 and float64, every impl, in
  place and pure;
* for every optimizer in the registry: a param that sits out steps ends where an
  optimizer run on that param alone, over only the gradients it got, ends (Schedule-Free
  AdamW excepted: its averaging weights are the optimizer's, as in the ``schedulefree``
  package);
* the path that reads nothing on the host (a count on a GPU, or traced) equals the
  host path; a user's ``torch.compile`` of the step; a step skipped by ``skip_if``
  changes no count; a malformed ``skipped_steps`` is refused naming the leaf;
* ``to_torch_state``/``from_torch_state`` and checkpoints keep the counts.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

import optorch
from optorch import base, interop

STEPS = 20
SHAPES = {"w": (3, 4), "b": (5,), "c": (2, 3)}

#: (optorch name, torch.optim class, options): the rules that read t, and two that
#: do not (their state has no skipped_steps: RMSprop, SGD without dampening)
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("adam", "Adam", {"weight_decay": 0.01}),
    ("adam", "Adam", {"amsgrad": True, "maximize": True}),
    ("adamw", "AdamW", {"weight_decay": 0.1}),
    ("adagrad", "Adagrad", {"lr_decay": 0.05, "initial_accumulator_value": 0.1}),
    ("adamax", "Adamax", {"weight_decay": 0.01}),
    ("nadam", "NAdam", {"weight_decay": 0.1, "decoupled_weight_decay": True}),
    ("nadam", "NAdam", {"momentum_decay": 0.01}),
    ("radam", "RAdam", {"weight_decay": 0.1}),
    ("radam", "RAdam", {"weight_decay": 0.1, "decoupled_weight_decay": True}),
    ("adafactor", "Adafactor", {"beta2_decay": -0.6}),
    ("rmsprop", "RMSprop", {"momentum": 0.9, "centered": True}),
    ("sgd", "SGD", {"momentum": 0.9}),
    # a damped buffer's first step is undamped: SGD reads a param's own count then
    ("sgd", "SGD", {"momentum": 0.9, "dampening": 0.5, "weight_decay": 0.01}),
]


def _reads_count(name: str, options: dict[str, Any]) -> bool:
    return name != "rmsprop" and (name != "sgd" or bool(options.get("dampening")))


TOL = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-12, 1e-12)}


def _present(step: int, key: str) -> bool:
    """The gradient pattern: "b" sits out every third step, "c" its first four."""
    if key == "b":
        return step % 3 != 1
    if key == "c":
        return step >= 4
    return True


def _grads(dtype: torch.dtype, seed: int) -> list[dict[str, torch.Tensor | None]]:
    gen = torch.Generator().manual_seed(seed)
    out: list[dict[str, torch.Tensor | None]] = []
    for step in range(STEPS):
        g = {k: torch.randn(shape, dtype=dtype, generator=gen) for k, shape in SHAPES.items()}
        out.append({k: v if _present(step, k) else None for k, v in g.items()})
    return out


def _runs() -> list[Any]:
    out = []
    for case, dtype, impl, inplace in itertools.product(
        CASES, (torch.float32, torch.float64), ("reference", "foreach", "compiled"), (True, False)
    ):
        if impl == "compiled" and (dtype, inplace) != (torch.float32, True):
            continue  # each compiled kernel is seconds of the suite: one mode
        out.append(pytest.param(case, dtype, impl, inplace))
    return out


def _lr(name: str) -> float:
    return {"sgd": 0.05, "adagrad": 0.1}.get(name, 0.01)


@pytest.mark.parametrize(("case", "dtype", "impl", "inplace"), _runs())
def test_params_sitting_out_steps_match_torch_optim(
    case: tuple[str, str, dict[str, Any]], dtype: torch.dtype, impl: str, inplace: bool
) -> None:
    name, torch_name, options = case
    torch_class = getattr(torch.optim, torch_name)
    lr = _lr(name)
    gen = torch.Generator().manual_seed(1)
    start = {k: torch.randn(shape, dtype=dtype, generator=gen) for k, shape in SHAPES.items()}
    grads = _grads(dtype, seed=2)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # torch's per-step scalars (NAdam's mu_product)
    try:
        theirs = {k: torch.nn.Parameter(v.clone()) for k, v in start.items()}
        reference = torch_class(list(theirs.values()), lr=lr, foreach=False, **options)
        opt = optorch.get_optimizer(name, max_lr=lr, impl=impl, inplace=inplace, **options)
        params = {k: v.clone() for k, v in start.items()}
        state = opt.init(params)
        rtol, atol = TOL[dtype]
        for step, g in enumerate(grads, start=1):
            for k, p in theirs.items():
                grad = g[k]
                p.grad = None if grad is None else grad.clone()
            reference.step()
            params, state = opt.step(params, g, state)
            assert int(state["step"]) == step
            for k, p in theirs.items():
                torch.testing.assert_close(params[k], p.detach(), rtol=rtol, atol=atol)
                torch_state = reference.state.get(p, {})
                if "step" in torch_state and name not in ("rmsprop", "sgd"):
                    skipped = state.get("skipped_steps", {}).get(k)
                    own = step - (0 if skipped is None else int(skipped))
                    assert own == int(torch_state["step"]), (k, step)
                for field, value in torch_state.items():
                    if field in ("step", "mu_product") or value is None:
                        continue
                    mine = state["momentum" if name == "sgd" else field][k]
                    torch.testing.assert_close(mine, value, rtol=rtol, atol=atol)
        if not _reads_count(name, options):
            assert "skipped_steps" not in state  # their rules read no count
        else:
            # "w" never sat out a step: 0
            assert {
                k: None if v is None else int(v) for k, v in state["skipped_steps"].items()
            } == {
                "w": 0,
                "b": sum(not _present(s, "b") for s in range(STEPS)),
                "c": 4,
            }
    finally:
        torch.set_default_dtype(previous)


def _counts(state: dict[str, Any]) -> dict[str, int | None]:
    return {k: None if v is None else int(v) for k, v in state["skipped_steps"].items()}


def _alone_params(name: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    shapes = {"w": (4, 3), "b": (4, 3)} if name == "muon" else {"w": (4, 3), "b": (6,)}
    return {k: torch.randn(shape, generator=gen) for k, shape in shapes.items()}


@pytest.mark.parametrize("name", sorted(n for n in optorch.REGISTRY if n != "schedule_free_adamw"))
def test_a_param_sitting_out_steps_ends_where_a_run_on_it_alone_ends(name: str) -> None:
    """The rules are per tensor: with a constant lr, a param that sits out steps must
    take exactly the steps of an optimizer that only ever saw its own gradients."""
    opt = optorch.get_optimizer(name, max_lr=0.01)
    params = _alone_params(name)
    alone = {"b": params["b"].clone()}
    state, alone_state = opt.init(params), opt.init(alone)
    gen = torch.Generator().manual_seed(4)
    for step in range(15):
        g = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
        if step % 4 == 0 or step in (5, 6):
            g["b"] = None  # type: ignore[assignment]
        else:
            alone, alone_state = opt.step(alone, {"b": g["b"]}, alone_state)
        params, state = opt.step(params, g, state)
    torch.testing.assert_close(params["b"], alone["b"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        *((name, {}) for name in ["adam", "nadam", "radam", "adagrad", "adafactor", "lamb"]),
        ("sgd", {"momentum": 0.9, "dampening": 0.5}),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_the_device_path_equals_the_host_path(
    name: str, options: dict[str, Any], monkeypatch: Any
) -> None:
    """On a GPU (or traced) counts are not read on the host: each lagging param runs
    with its own count as a tensor. The CPU does the same when told the count is not
    host-readable (``base._host_step``)."""

    def run() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        opt = optorch.get_optimizer(name, max_lr=0.01, **options)
        gen = torch.Generator().manual_seed(5)
        params = {k: torch.randn(shape, generator=gen) for k, shape in SHAPES.items()}
        state = opt.init(params)
        for g in _grads(torch.float32, seed=6):
            params, state = opt.step(params, g, state)
        return params, state

    host_state, device_state = _on_host_and_device(run, monkeypatch)
    assert _counts(device_state) == _counts(host_state) == {"w": 0, "b": 7, "c": 4}


def _on_host_and_device(run: Any, monkeypatch: Any) -> tuple[Any, Any]:
    """``run()`` with counts read on the host, then as on a GPU (``base._host_step``
    and ``base._host_readable`` say no): equal params; the two states."""
    host_params, host_state = run()
    monkeypatch.setattr(base, "_host_step", lambda step: False)
    monkeypatch.setattr(base, "_host_readable", lambda value: False)
    device_params, device_state = run()
    for k in SHAPES:
        torch.testing.assert_close(device_params[k], host_params[k], rtol=1e-6, atol=1e-7)
    return host_state, device_state


def test_a_users_compiled_step_with_params_sitting_out_matches_eager() -> None:
    opt = optorch.get_optimizer("adamw", max_lr=0.01, weight_decay=0.1)
    gen = torch.Generator().manual_seed(7)
    start = {k: torch.randn(shape, generator=gen) for k, shape in SHAPES.items()}
    eager, compiled = (
        {k: v.clone() for k, v in start.items()},
        {k: v.clone() for k, v in start.items()},
    )
    eager_state, compiled_state = opt.init(eager), opt.init(compiled)
    step = torch.compile(opt.step, fullgraph=True)
    for g in _grads(torch.float32, seed=8)[:8]:
        eager, eager_state = opt.step(eager, g, eager_state)
        compiled, compiled_state = step(compiled, g, compiled_state)
    for k in SHAPES:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-5, atol=1e-6)
    assert _counts(compiled_state) == _counts(eager_state) == {"w": 0, "b": 3, "c": 4}


@pytest.mark.parametrize("inplace", [True, False])
def test_a_step_skipped_by_skip_if_changes_no_count(inplace: bool) -> None:
    opt = optorch.get_optimizer("adam", max_lr=0.01, inplace=inplace)
    params = {k: torch.randn(shape) for k, shape in SHAPES.items()}
    state = opt.init(params)
    grads = _grads(torch.float32, seed=9)
    params, state = opt.step(params, grads[1], state)  # "b" sits out: the field exists
    before = {k: None if v is None else v.clone() for k, v in state["skipped_steps"].items()}
    params, state = opt.step(params, grads[1], state, skip_if=torch.tensor(True))
    params, state = opt.step(params, grads[1], state, skip_if=torch.tensor(False))
    assert int(state["step"]) == 2
    assert int(state["skipped_steps"]["b"]) == int(before["b"]) + 1


@pytest.mark.parametrize("name", ["adam", "adafactor"])
def test_a_skipped_step_leaves_the_state_fields_as_they_were_in_both_modes(name: str) -> None:
    """A host-decided skip with a param whose gradient is None: the pure step added a
    'skipped_steps' field of zeros that the in-place step did not (the same values, two
    state structures: accumulate's in-place and pure runs then differed)."""
    gen = torch.Generator().manual_seed(3)
    start = {k: torch.randn(shape, generator=gen) for k, shape in SHAPES.items()}
    every = {k: torch.randn(shape, generator=gen) for k, shape in SHAPES.items()}
    some: dict[str, torch.Tensor | None] = {**every, "b": None}
    structures = []
    for inplace in (True, False):
        opt = optorch.get_optimizer(name, inplace=inplace)
        params = {k: v.clone() for k, v in start.items()}
        state = opt.init(params)
        params, state = opt.step(params, every, state)
        assert "skipped_steps" not in state
        kept = {k: v.clone() for k, v in params.items()}
        fields = sorted(state)
        params, state = opt.step(params, some, state, skip_if=torch.tensor(True))
        assert sorted(state) == fields, inplace
        assert all(torch.equal(params[k], kept[k]) for k in kept)
        structures.append(fields)
    assert structures[0] == structures[1]


@pytest.mark.parametrize(
    ("leaf", "message"),
    [
        (torch.tensor(1.0), r"state\['skipped_steps'\] at \['b'\] must be a 0-d int64 tensor"),
        (torch.zeros(2, dtype=torch.int64), r"at \['b'\] must be a 0-d int64 tensor"),
        (torch.tensor(-1), r"state\['skipped_steps'\] at \['b'\] is -1, outside \[0, 3\]"),
        (torch.tensor(4), r"state\['skipped_steps'\] at \['b'\] is 4, outside \[0, 3\]"),
    ],
)
def test_a_malformed_skipped_count_is_refused_naming_the_leaf(leaf: Any, message: str) -> None:
    opt = optorch.get_optimizer("adam", max_lr=0.01)
    params = {k: torch.randn(shape) for k, shape in SHAPES.items()}
    state = opt.init(params)
    state["step"] = torch.tensor(3)
    state["skipped_steps"] = {"w": None, "b": leaf, "c": None}
    grads = {k: torch.randn(shape) for k, shape in SHAPES.items()}
    before = {k: v.clone() for k, v in params.items()}
    moments = state["exp_avg"]["b"].clone()
    with pytest.raises(ValueError, match=message):
        opt.step(params, grads, state)
    assert all(torch.equal(params[k], before[k]) for k in SHAPES)
    assert torch.equal(state["exp_avg"]["b"], moments) and int(state["step"]) == 3


def test_rules_that_read_no_count_refuse_a_skipped_steps_field() -> None:
    opt = optorch.get_optimizer("rmsprop", max_lr=0.1, momentum=0.9)
    params = {"w": torch.randn(3)}
    state = {**opt.init(params), "skipped_steps": {"w": torch.tensor(0)}}
    with pytest.raises(ValueError, match=r"unexpected field\(s\) \['skipped_steps'\]"):
        opt.step(params, {"w": torch.randn(3)}, state)


@pytest.mark.parametrize("name", ["adam", "nadam", "adagrad"])
def test_torch_state_conversion_keeps_each_params_count(name: str) -> None:
    torch_name = {"adam": "Adam", "nadam": "NAdam", "adagrad": "Adagrad"}[name]
    gen = torch.Generator().manual_seed(10)
    start = {k: torch.randn(shape, generator=gen) for k, shape in SHAPES.items()}
    theirs = {k: torch.nn.Parameter(v.clone()) for k, v in start.items()}
    reference = getattr(torch.optim, torch_name)(list(theirs.values()), lr=0.01, foreach=False)
    grads = _grads(torch.float32, seed=11)
    for g in grads[:7]:
        for k, p in theirs.items():
            grad = g[k]
            p.grad = None if grad is None else grad.clone()
        reference.step()
    ours = {k: p.detach().clone() for k, p in theirs.items()}
    state = interop.from_torch_state(reference.state_dict(), ours, name)
    assert int(state["step"]) == 7
    assert {k: int(v) for k, v in state["skipped_steps"].items()} == {
        k: 7 - int(reference.state[p]["step"]) for k, p in theirs.items()
    }
    # back to torch: the same per-param counts (and NAdam's per-param mu_product)
    exported = interop.to_torch_state(state, ours, name)
    for torch_id, p in enumerate(theirs.values()):
        for key, value in reference.state[p].items():
            torch.testing.assert_close(exported["state"][torch_id][key], value)
    # and both continue alike
    opt = optorch.get_optimizer(name, max_lr=0.01)
    for g in grads[7:]:
        for k, p in theirs.items():
            grad = g[k]
            p.grad = None if grad is None else grad.clone()
        reference.step()
        ours, state = opt.step(ours, g, state)
    for k, p in theirs.items():
        torch.testing.assert_close(ours[k], p.detach(), rtol=1e-5, atol=1e-6)


def test_checkpoints_keep_the_skipped_counts(tmp_path: Any) -> None:
    opt = optorch.get_optimizer("adam", max_lr=0.01)
    params = {k: torch.randn(shape) for k, shape in SHAPES.items()}
    state = opt.init(params)
    grads = _grads(torch.float32, seed=12)
    for g in grads[:6]:
        params, state = opt.step(params, g, state)
    path = optorch.save(tmp_path / "ckpt.safetensors", state, optimizer=opt, params=params)
    resumed = {k: v.clone() for k, v in params.items()}
    resumed_opt, resumed_state = optorch.load(path, params=resumed)
    for g in grads[6:]:
        params, state = opt.step(params, g, state)
        resumed, resumed_state = resumed_opt.step(resumed, g, resumed_state)
    for k in SHAPES:
        assert torch.equal(resumed[k], params[k])
    assert _counts(resumed_state) == _counts(state) == {"w": 0, "b": 7, "c": 4}


def test_vmap_over_a_pure_step_with_a_param_sitting_out() -> None:
    """Every count is a tensor (0 for params that never sat out): ``torch.func.vmap``
    returns tensors only. Batched over lr and over ``skip_if``."""
    opt = optorch.get_optimizer("adam", max_lr=0.1, inplace=False)
    gen = torch.Generator().manual_seed(13)
    params = {k: torch.randn(shape, generator=gen) for k, shape in SHAPES.items()}
    state = opt.init(params)
    grads: dict[str, torch.Tensor | None] = {
        "w": torch.randn(3, 4, generator=gen),
        "b": None,
        "c": torch.randn(2, 3, generator=gen),
    }
    lrs = torch.tensor([0.01, 0.1, 1.0])
    gates = torch.tensor([False, True, False])

    def one(lr: torch.Tensor, gate: torch.Tensor) -> Any:
        return opt.step(params, grads, state, hyper_overrides={"max_lr": lr}, skip_if=gate)

    mapped_params, mapped_state = torch.func.vmap(one)(lrs, gates)
    for i in range(3):
        looped_params, looped_state = one(lrs[i], gates[i])
        for k in SHAPES:
            torch.testing.assert_close(mapped_params[k][i], looped_params[k])
            # a skip decided on the host leaves the state's fields as they were: no counts
            # yet is a count of 0 (vmap's batched gate is decided on the device)
            looped = looped_state.get("skipped_steps", {k: torch.tensor(0)})
            assert int(mapped_state["skipped_steps"][k][i]) == int(looped[k])
    assert mapped_state["skipped_steps"]["b"].tolist() == [1, 0, 1]


@pytest.mark.parametrize("dampening", [0.0, 0.5])
@pytest.mark.parametrize("impl", ["reference", "foreach", "compiled"])
@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "pure"])
def test_sgd_momentum_turned_on_by_a_new_config_starts_the_buffer_as_torch(
    dampening: float, impl: str, inplace: bool
) -> None:
    """A buffer created after the first step starts its own count: its first step is
    undamped, as torch.optim.SGD's first step of a missing buffer."""
    gen = torch.Generator().manual_seed(6)
    start = {
        k: torch.randn(shape, dtype=torch.float64, generator=gen) for k, shape in SHAPES.items()
    }
    grads = _grads(torch.float64, seed=7)[:10]
    theirs = {k: torch.nn.Parameter(v.clone()) for k, v in start.items()}
    reference = torch.optim.SGD(list(theirs.values()), lr=0.05, dampening=dampening)
    opt = optorch.get_optimizer(
        "sgd", max_lr=0.05, momentum=0.0, dampening=dampening, impl=impl, inplace=inplace
    )
    params = {k: v.clone() for k, v in start.items()}
    state = opt.init(params)
    for step, g in enumerate(grads):
        if step == 3:
            reference.param_groups[0]["momentum"] = 0.9
            opt = opt.replace(momentum=0.9)
        for k, p in theirs.items():
            p.grad = None if g[k] is None else g[k].clone()
        reference.step()
        params, state = opt.step(params, g, state)
        for k, p in theirs.items():
            torch.testing.assert_close(params[k], p.detach(), rtol=1e-12, atol=1e-12)
            buffer = reference.state.get(p, {}).get("momentum_buffer")
            if buffer is not None:
                torch.testing.assert_close(state["momentum"][k], buffer, rtol=1e-12, atol=1e-12)


def test_sgd_buffer_restart_on_the_device_path_equals_the_host_path(monkeypatch: Any) -> None:
    """Counts not read on the host (a GPU, traced): the restarted counts are tensors."""

    def run() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        opt = optorch.get_optimizer("sgd", max_lr=0.05, momentum=0.0, dampening=0.5)
        gen = torch.Generator().manual_seed(8)
        params = {k: torch.randn(shape, generator=gen) for k, shape in SHAPES.items()}
        state = opt.init(params)
        for step, g in enumerate(_grads(torch.float32, seed=9)[:10]):
            if step == 3:
                opt = opt.replace(momentum=0.9)
            params, state = opt.step(params, g, state)
        return params, state

    host_state, device_state = _on_host_and_device(run, monkeypatch)
    assert _counts(device_state) == _counts(host_state)
    assert _counts(host_state)["w"] == 3  # the buffer started at the fourth step

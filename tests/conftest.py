"""Shared helpers of the test suite: seeded params/grads, torch.optim drivers, comparisons.

Every helper is deterministic: params and grads come from a ``torch.Generator`` seeded
explicitly, so a failure reproduces bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import optree
import pytest
import torch

# the suite runs many tiny tensors: intra-op threads only add contention, and CI runs
# one pytest worker per core (pytest-xdist)
torch.set_num_threads(1)

#: Explicit tolerances per dtype for comparisons against an independent reference.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"rtol": 1e-12, "atol": 1e-12},
    torch.float32: {"rtol": 1e-6, "atol": 1e-6},
}

#: A dict pytree of a few shapes: a matrix, a 1-D bias, a 0-d scalar, a 3-D tensor.
#: Non-default options so that every branch with a hyperparameter is exercised.
NON_DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "sgd": {"momentum": 0.9, "weight_decay": 0.01, "nesterov": True},
    "adam": {"weight_decay": 0.01, "amsgrad": True},
    "adamw": {"weight_decay": 0.1},
    "decoupled_adam": {"weight_decay": 0.01},
    "lion": {"weight_decay": 0.1},
    "adamax": {"weight_decay": 0.01},
    "lars": {"weight_decay": 0.01},
    "lamb": {"weight_decay": 0.01},
    "adafactor": {"weight_decay": 0.01, "beta1": 0.9},
    "muon": {"weight_decay": 0.01},
    "rmsprop": {"momentum": 0.5, "centered": True, "weight_decay": 0.01},
    "adagrad": {"lr_decay": 0.01, "weight_decay": 0.01},
    "nadam": {"weight_decay": 0.01},
    "radam": {"weight_decay": 0.01},
    "schedule_free_adamw": {"weight_decay": 0.01, "warmup_steps": 3},
}

DEFAULT_SHAPES: dict[str, tuple[int, ...]] = {
    "layer.weight": (4, 3),
    "layer.bias": (4,),
    "scale": (),
    "conv.weight": (2, 3, 2),
}

#: torch.optim's names for the per-param state fields optorch keeps.
TORCH_STATE_NAMES: dict[str, str] = {
    "momentum": "momentum_buffer",
    "exp_avg": "exp_avg",
    "exp_avg_sq": "exp_avg_sq",
    "max_exp_avg_sq": "max_exp_avg_sq",
}


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_params(
    seed: int,
    dtype: torch.dtype = torch.float32,
    shapes: Mapping[str, tuple[int, ...]] = DEFAULT_SHAPES,
) -> dict[str, torch.Tensor]:
    """A dict of standard-normal tensors, one per entry of ``shapes``."""
    gen = generator(seed)
    return {
        name: torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        for name, shape in shapes.items()
    }


def make_grads(seed: int, params: Any) -> Any:
    """Standard-normal grads shaped like every tensor leaf of ``params``."""
    gen = generator(seed)
    return optree.tree_map(
        lambda p: torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype),
        params,
    )


def grad_sequence(seed: int, params: Any, steps: int) -> list[Any]:
    """``steps`` pytrees of grads, each from its own seed derived from ``seed``."""
    return [make_grads(seed * 1000 + k, params) for k in range(steps)]


def clone_tree(tree: Any) -> Any:
    """A deep copy of a pytree of tensors (other leaves kept as they are)."""
    return optree.tree_map(
        lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x,
        tree,
        none_is_leaf=True,
    )


def tensor_leaves(tree: Any) -> list[tuple[str, torch.Tensor]]:
    """(path, tensor) for every tensor leaf of ``tree``."""
    paths, leaves, _ = optree.tree_flatten_with_path(tree, none_is_leaf=True)
    return [(str(p), x) for p, x in zip(paths, leaves, strict=True) if isinstance(x, torch.Tensor)]


def assert_trees_close(
    actual: Any, expected: Any, *, rtol: float, atol: float, what: str = ""
) -> None:
    """Same structure, and every tensor leaf close (dtype checked, values in float64)."""
    actual_paths, actual_leaves, actual_spec = optree.tree_flatten_with_path(
        actual, none_is_leaf=True
    )
    expected_paths, expected_leaves, expected_spec = optree.tree_flatten_with_path(
        expected, none_is_leaf=True
    )
    assert actual_paths == expected_paths, f"{what}: structure {actual_spec} vs {expected_spec}"
    for path, a, e in zip(actual_paths, actual_leaves, expected_leaves, strict=True):
        if a is None or e is None:
            assert a is None and e is None, f"{what} at {path}: {a!r} vs {e!r}"
            continue
        assert a.shape == e.shape, f"{what} at {path}: shape {a.shape} vs {e.shape}"
        torch.testing.assert_close(
            a.detach().to(torch.float64),
            e.detach().to(torch.float64),
            rtol=rtol,
            atol=atol,
            msg=lambda m, path=path: f"{what} at {path}: {m}",
        )


def assert_trees_equal(actual: Any, expected: Any, *, what: str = "") -> None:
    """Bit-identical trees: same structure, dtypes, shapes and values (NaN == NaN)."""
    actual_paths, actual_leaves, _ = optree.tree_flatten_with_path(actual, none_is_leaf=True)
    expected_paths, expected_leaves, _ = optree.tree_flatten_with_path(expected, none_is_leaf=True)
    assert actual_paths == expected_paths, f"{what}: paths {actual_paths} vs {expected_paths}"
    for path, a, e in zip(actual_paths, actual_leaves, expected_leaves, strict=True):
        if not isinstance(a, torch.Tensor) or not isinstance(e, torch.Tensor):
            assert a == e, f"{what} at {path}: {a!r} vs {e!r}"
            continue
        assert a.dtype == e.dtype, f"{what} at {path}: dtype {a.dtype} vs {e.dtype}"
        assert a.shape == e.shape, f"{what} at {path}: shape {a.shape} vs {e.shape}"
        assert a.device == e.device, f"{what} at {path}: device {a.device} vs {e.device}"
        if a.is_meta:
            continue  # meta tensors carry no values
        assert torch.equal(a, e) or bool(((a == e) | (a.isnan() & e.isnan())).all()), (
            f"{what} at {path}: values differ (max |diff| {(a - e).abs().max()})"
        )


def assert_no_aliasing(outputs: Any, inputs: Any, *, what: str = "") -> None:
    """No tensor leaf of ``outputs`` shares storage with a tensor leaf of ``inputs``."""
    input_pointers = {
        x.untyped_storage().data_ptr() for _, x in tensor_leaves(inputs) if x.numel() > 0
    }
    for path, x in tensor_leaves(outputs):
        if x.numel() > 0:
            assert x.untyped_storage().data_ptr() not in input_pointers, (
                f"{what} at {path} shares memory with an input"
            )


# --------------------------------------------------------------------------------------
# torch.optim as the reference
# --------------------------------------------------------------------------------------


class TorchReference:
    """Drives a ``torch.optim`` optimizer over a dict of params with given grads.

    ``multiplier`` (optional) is a schedule ``k -> factor`` applied through
    ``LambdaLR``: the k-th step (0 first) runs with ``lr * multiplier(k)``.
    """

    def __init__(
        self,
        optimizer_class: type[torch.optim.Optimizer],
        params: Mapping[str, torch.Tensor],
        multiplier: Callable[[int], float] | None = None,
        **hyper: Any,
    ) -> None:
        self.names = list(params)
        self.tensors = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        hyper.setdefault("foreach", False)
        self.optimizer = optimizer_class(list(self.tensors.values()), **hyper)
        self.scheduler = (
            torch.optim.lr_scheduler.LambdaLR(self.optimizer, multiplier)
            if multiplier is not None
            else None
        )

    def step(self, grads: Mapping[str, torch.Tensor | None]) -> None:
        for name, tensor in self.tensors.items():
            grad = grads[name]
            tensor.grad = None if grad is None else grad.detach().clone()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()

    def params(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.tensors.items()}

    def state_field(self, torch_name: str) -> dict[str, torch.Tensor | None]:
        """One torch state field per param name (None where torch keeps none)."""
        out: dict[str, torch.Tensor | None] = {}
        for name, tensor in self.tensors.items():
            value = self.optimizer.state.get(tensor, {}).get(torch_name)
            out[name] = value.detach() if isinstance(value, torch.Tensor) else value
        return out

    def steps_taken(self) -> list[int]:
        """torch's per-param ``step`` counts."""
        return [int(self.optimizer.state[t]["step"]) for t in self.tensors.values()]


def assert_matches_torch(
    params: Mapping[str, torch.Tensor],
    state: Mapping[str, Any],
    reference: TorchReference,
    fields: Iterable[str],
    *,
    rtol: float,
    atol: float,
    step_count: int,
    what: str = "",
    torch_has_step: bool = True,
) -> None:
    """optorch params and state equal torch.optim's params and state."""
    assert_trees_close(
        dict(params), reference.params(), rtol=rtol, atol=atol, what=f"{what} params"
    )
    for field in fields:
        torch_field = reference.state_field(TORCH_STATE_NAMES[field])
        assert field in state, f"{what}: state lacks {field!r} (has {sorted(state)})"
        assert_trees_close(
            dict(state[field]), torch_field, rtol=rtol, atol=atol, what=f"{what} state {field!r}"
        )
    assert int(state["step"]) == step_count, f"{what}: step {int(state['step'])} != {step_count}"
    if torch_has_step:
        assert reference.steps_taken() == [step_count] * len(reference.names)


def snapshot(*trees: Any) -> list[Any]:
    """Deep copies of ``trees`` for a later bit-identity check."""
    return [clone_tree(t) for t in trees]


def assert_unchanged(trees: Sequence[Any], snapshots: Sequence[Any], *, what: str = "") -> None:
    for index, (tree, copy) in enumerate(zip(trees, snapshots, strict=True)):
        assert_trees_equal(tree, copy, what=f"{what} input #{index}")


@pytest.fixture(autouse=True)
def _deterministic_torch() -> Iterable[None]:
    """Every test starts from the same global RNG state and default dtype."""
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(default_dtype)


def pytest_make_parametrize_id(config: Any, val: Any, argname: str) -> str | None:
    """Stable ids for callables (the default embeds a memory address, which differs
    between pytest-xdist workers and breaks their collection)."""
    if callable(val) and not isinstance(val, type):
        return f"{argname}={getattr(val, '__name__', type(val).__name__)}"
    if isinstance(val, dict) and any(callable(v) for v in val.values()):
        parts = [
            f"{k}={getattr(v, '__name__', 'fn') if callable(v) else v!r}" for k, v in val.items()
        ]
        return "{" + ",".join(parts) + "}"
    return None


@pytest.fixture(autouse=True, scope="session")
def _compile_small_tensors() -> Any:
    """Tests use small tensors; route them through the compiled kernels anyway (by default
    tensors under ``COMPILED_MIN_NUMEL`` elements take the foreach path), so that
    ``impl="compiled"`` tests exercise compiled code."""
    from optorch import engine

    saved = engine.COMPILED_MIN_NUMEL
    engine.COMPILED_MIN_NUMEL = 2
    yield
    engine.COMPILED_MIN_NUMEL = saved


#: The combinations the compiled engine's reference tests run each option set in.
COMPILED_COMBINATIONS = (
    (torch.float32, True, "f32-inplace"),
    (torch.float64, False, "f64-pure"),
)


def compiled_params(cases: Any, case_id: Callable[[Any], str]) -> list[Any]:
    """``pytest.param(case, dtype, inplace)`` for every case in every compiled combination."""
    return [
        pytest.param(case, dtype, inplace, id=f"{case_id(case)}-{tag}")
        for case in cases
        for dtype, inplace, tag in COMPILED_COMBINATIONS
    ]

"""The distributed half of ``tests/test_distributed.py``.

``python tests/_dist_worker.py OUT_DIR`` spawns a 2-rank gloo group on loopback (a free
port found by binding to port 0), runs every scenario of :data:`SCENARIOS` on it, and
has rank 0 write, per scenario, ``OUT_DIR/<name>.pt``: the params and optimizer state
gathered to full tensors after training, and the layout (type, placements, local
shape) of every param and state leaf. A scenario that raises writes
``OUT_DIR/<name>.rank<r>.err`` instead, so the test reports the error. The test module
also imports this file for the single-process runs it compares against, so both sides
share one model, one data stream and one optimizer table.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import socket
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import optorch
from optorch import wrappers
from optorch.interop.distributed import gather_full, is_dtensor, load_sharded, save_sharded

WORLD_SIZE = 2
STEPS = 10
#: Steps before the checkpoint in the DCP scenarios (the rest run after loading).
CHECKPOINT_AT = 5
GLOBAL_BATCH = 8
#: 5 hidden units over 2 ranks: FSDP2 shards dim 0 unevenly (3 rows and 2 rows).
IN_FEATURES, HIDDEN, OUT_FEATURES = 6, 5, 3
#: Below the grads' global norm (about 1): the clip is active on every step.
CLIP_MAX_NORM = 0.3
#: Each collective gives up after this long, so a desynchronised rank fails, not hangs.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


def make_model(*, bias: bool = True) -> nn.Module:
    """The same small MLP on every rank and in the single-process run (seeded)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(IN_FEATURES, HIDDEN, bias=bias),
        nn.Tanh(),
        nn.Linear(HIDDEN, OUT_FEATURES, bias=bias),
    )


def make_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step``: inputs and regression targets."""
    gen = torch.Generator().manual_seed(1000 + step)
    inputs = torch.randn(GLOBAL_BATCH, IN_FEATURES, generator=gen)
    targets = torch.randn(GLOBAL_BATCH, OUT_FEATURES, generator=gen)
    return inputs, targets


def make_optimizer(kind: str, impl: str) -> Any:
    """An optorch optimizer by table key; hyperparameters that make every part move."""
    if kind == "clip_adamw":
        inner = optorch.get_optimizer("adamw", max_lr=1e-2, weight_decay=0.1, impl=impl)
        return wrappers.chain(wrappers.clip_by_global_norm(CLIP_MAX_NORM), inner)
    table: dict[str, dict[str, Any]] = {
        "adamw": {"max_lr": 1e-2, "weight_decay": 0.1},
        "sgd": {"max_lr": 0.05, "momentum": 0.9, "weight_decay": 0.01},
        "lars": {"max_lr": 0.5, "momentum": 0.9, "weight_decay": 0.01, "trust_coefficient": 0.02},
        "lamb": {"max_lr": 1e-2, "weight_decay": 0.01},
        "adafactor": {"max_lr": 1e-2, "weight_decay": 0.01},
        # float32 Newton-Schulz: bf16 rounding would swamp the comparison
        "muon": {"max_lr": 0.02, "ns_dtype": torch.float32},
    }
    return optorch.get_optimizer(kind, impl=impl, **table.get(kind, {}))


@dataclass(frozen=True)
class Scenario:
    """One distributed training run: optimizer table key, engine, and how it is wrapped."""

    name: str
    kind: str
    impl: str = "auto"
    # "fsdp" (fully_shard), "ddp", "dcp_save", "dcp_load", "dtensor_pure" (pure steps on
    # DTensors made by hand), or "example" (the FSDP2 example's own training function)
    parallel: str = "fsdp"
    bias: bool = True  # Muon takes 2-D weights only

    def optimizer(self) -> Any:
        return make_optimizer(self.kind, self.impl)


#: The optimizers the tests name, each on both eager engines; the others on "auto".
_NAMED = ("adamw", "sgd", "lars", "lamb", "adafactor")
_OTHERS = ("adam", "decoupled_adam", "lion", "rmsprop", "adagrad", "adamax", "nadam", "radam")

SCENARIOS: tuple[Scenario, ...] = (
    *(Scenario(f"fsdp-{k}-{impl}", k, impl) for k in _NAMED for impl in ("reference", "foreach")),
    # compiled on DTensors: elementwise rules may compile for the local shards; the
    # others run the eager executors, DTensor reducing their norms
    Scenario("fsdp-adamw-compiled", "adamw", "compiled"),
    Scenario("fsdp-lamb-compiled", "lamb", "compiled"),
    Scenario("fsdp-muon-reference", "muon", "reference", bias=False),
    Scenario("fsdp-clip_adamw-foreach", "clip_adamw", "foreach"),
    Scenario("fsdp-clip_adamw-reference", "clip_adamw", "reference"),
    *(Scenario(f"fsdp-{k}-auto", k) for k in (*_OTHERS, "schedule_free_adamw")),
    Scenario("ddp-adamw-foreach", "adamw", "foreach", parallel="ddp"),
    Scenario("ddp-lars-foreach", "lars", "foreach", parallel="ddp"),
    Scenario("dcp_save-adamw-foreach", "adamw", "foreach", parallel="dcp_save"),
    Scenario("dcp_load-adamw-foreach", "adamw", "foreach", parallel="dcp_load"),
    Scenario("dtensor_pure-adamw-foreach", "adamw", "foreach", parallel="dtensor_pure"),
    Scenario("dtensor_pure-lamb-foreach", "lamb", "foreach", parallel="dtensor_pure"),
    Scenario("example-fsdp_train", "adamw", parallel="example"),
    Scenario("edges-dtensor", "sgd", parallel="edges"),
)
#: The global row of ``pure_params()["w"]`` made non-finite at ``POISON_STEP`` of the
#: scaler runs: row 3, the first of rank 1's shard (rows 0-2 are rank 0's).
POISON_ROW, POISON_STEP = 3, 2
#: Optimizers of the loss-scaler runs on DTensors: elementwise (the local-shard fast
#: path) and one with norms (DTensor dispatch).
SCALER_KINDS = ("sgd", "lamb")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fsdp_train.py"
EXAMPLE_STEPS = 30


# --------------------------------------------------------------------------------------
# training (shared by the ranks and the single-process runs)
# --------------------------------------------------------------------------------------


def train(
    model: nn.Module,
    optimizer: Any,
    state: Any,
    steps: range,
    rows: slice,
    *,
    comms: dict[str, int] | None = None,
) -> Any:
    """``steps`` optimizer steps on ``rows`` of each global batch; returns the state.

    ``comms``, if given, receives the collectives (name -> count) that the optimizer
    step itself issued on the last step (FSDP's own all-gathers and reduce-scatters of
    forward and backward are outside it).
    """
    # DDP's own names carry a "module." prefix; the inner module's match one process's
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    params = dict(inner.named_parameters())
    for step in steps:
        inputs, targets = make_batch(step)
        loss = nn.functional.mse_loss(model(inputs[rows]), targets[rows])
        loss.backward()
        grads = {name: p.grad for name, p in params.items()}
        if comms is not None and step == steps[-1]:
            from torch.distributed.tensor.debug import CommDebugMode

            with CommDebugMode() as recorder:
                _, state = optimizer.step(params, grads, state)
            for op, count in recorder.get_comm_counts().items():
                comms[str(op).rsplit(".", 1)[-1]] = count
        else:
            _, state = optimizer.step(params, grads, state)
        for p in params.values():
            p.grad = None
    return state


def may_compile(scenario: Scenario) -> bool:
    """Whether the step may run a compiled kernel (elementwise rules with "compiled")."""
    rule = getattr(scenario.optimizer(), "rule", None)
    return scenario.impl == "compiled" and bool(getattr(rule, "elementwise", True))


def train_single(scenario: Scenario, steps: range = range(STEPS)) -> tuple[nn.Module, Any, Any]:
    """The single-process run on the whole global batch, on the reference engine."""
    model = make_model(bias=scenario.bias)
    optimizer = make_optimizer(scenario.kind, "reference")
    state = optimizer.init(dict(model.named_parameters()))
    state = train(model, optimizer, state, steps, slice(None))
    return model, optimizer, state


def pure_params() -> dict[str, torch.Tensor]:
    """Params for the pure-mode runs: a matrix and a vector, both 5 rows (uneven shards)."""
    gen = torch.Generator().manual_seed(7)
    return {
        "w": torch.randn(HIDDEN, IN_FEATURES, generator=gen),
        "b": torch.randn(HIDDEN, generator=gen),
    }


def pure_grads(step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(2000 + step)
    return {
        "w": torch.randn(HIDDEN, IN_FEATURES, generator=gen),
        "b": torch.randn(HIDDEN, generator=gen),
    }


def train_pure(
    scenario: Scenario, impl: str, layout: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], Any]:
    """``STEPS`` pure steps (``inplace=False``) on ``pure_params`` laid out by ``layout``;
    returns the initial params, the final params and the final state."""
    optimizer = make_optimizer(scenario.kind, impl).replace(inplace=False)
    initial = {name: layout(value) for name, value in pure_params().items()}
    params, state = initial, optimizer.init(initial)
    for step in range(STEPS):
        grads = {name: layout(value) for name, value in pure_grads(step).items()}
        params, state = optimizer.step(params, grads, state)
    return initial, params, state


def poisoned_grads(step: int) -> dict[str, torch.Tensor]:
    """``pure_grads``, with one non-finite entry at ``POISON_STEP``."""
    grads = pure_grads(step)
    if step == POISON_STEP:
        grads["w"][POISON_ROW, 0] = float("inf")
    return grads


def train_scaled(
    kind: str, layout: Callable[[torch.Tensor], torch.Tensor], *, skip_wrapper: bool
) -> tuple[dict[str, torch.Tensor], Any, list[float]]:
    """``STEPS`` steps through ``amp.scaled_step`` (or ``skip_nonfinite``) on
    ``pure_params`` laid out by ``layout``; one grad is non-finite at ``POISON_STEP``.
    Returns the params, the state and each step's found_inf (or skip count)."""
    from optorch import amp

    optimizer: Any = make_optimizer(kind, "auto")
    if skip_wrapper:
        optimizer = wrappers.skip_nonfinite(optimizer)
    params = {name: layout(value) for name, value in pure_params().items()}
    state = optimizer.init(params)
    scaler = amp.init_grad_scaler(init_scale=2.0**4)
    flags: list[float] = []
    for step in range(STEPS):
        grads = {name: layout(value) for name, value in poisoned_grads(step).items()}
        if skip_wrapper:
            params, state = optimizer.step(params, grads, state)
            flags.append(float(state["skipped_total"]))
        else:
            scaled = {name: value * scaler["scale"] for name, value in grads.items()}
            params, state, scaler, found_inf = amp.scaled_step(
                optimizer, params, scaled, state, scaler
            )
            flags.append(float(found_inf))
    return params, state, flags


def train_transforms(
    inplace: bool, layout: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[dict[str, torch.Tensor], Any, list[bool]]:
    """``zero_nans`` and ``add_noise`` before SGD on ``pure_params`` laid out by
    ``layout``; one grad is NaN at ``POISON_STEP`` (in rank 1's shard only). Returns the
    params, the state and each step's ``found_nan``."""
    sgd = make_optimizer("sgd", "auto").replace(inplace=inplace)
    optimizer = wrappers.chain(wrappers.zero_nans(), wrappers.add_noise(0.01, seed=3), sgd)
    params = {name: layout(value) for name, value in pure_params().items()}
    state = optimizer.init(params)
    found: list[bool] = []
    for step in range(STEPS):
        grads = pure_grads(step)
        if step == POISON_STEP:
            grads["w"][POISON_ROW, 0] = float("nan")
        grads = {name: layout(value) for name, value in grads.items()}
        params, state = optimizer.step(params, grads, state)
        flag = state["transforms"][0]["found_nan"]
        if type(flag).__name__ != "Tensor":
            raise TypeError(f"found_nan is a {type(flag).__name__}, not a plain tensor")
        found.append(bool(flag))
    return params, state, found


def one_row_params() -> dict[str, torch.Tensor]:
    """A one-row matrix (a ``Linear(h, 1)`` head): Adafactor's column factor has its
    shape, and along dim 0 only rank 0 holds anything."""
    return {"head": torch.randn(1, IN_FEATURES, generator=torch.Generator().manual_seed(9))}


def train_one_row(
    inplace: bool, layout: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[dict[str, torch.Tensor], Any]:
    optimizer = make_optimizer("adafactor", "auto").replace(inplace=inplace)
    params = {name: layout(value) for name, value in one_row_params().items()}
    state = optimizer.init(params)
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(3000 + step)
        grads = {"head": layout(torch.randn(1, IN_FEATURES, generator=gen))}
        params, state = optimizer.step(params, grads, state)
    return params, state


#: Optimizers stepped with a grad or a state laid out otherwise than its sharded param
#: (replicated): their foreach steps failed on a param with fewer rows than ranks, after
#: writing the moments (DTensor: "in-place operations that require placement changes
#: are not supported").
REPLICATED_OPERANDS = (("adamw", "grad"), ("adamw", "state"), ("sgd", "state"), ("lamb", "grad"))


def train_replicated_operand(
    kind: str,
    operand: str,
    shard: Callable[[torch.Tensor], torch.Tensor],
    replicate: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[dict[str, torch.Tensor], Any]:
    """``kind`` (foreach, in place) on a one-row matrix and a one-element vector, sharded
    by rows, with the grads (``operand="grad"``) or the state (``"state"``) replicated."""
    optimizer = make_optimizer(kind, "foreach")
    full = {**one_row_params(), "scale": torch.full((1,), 0.5)}
    params = {name: shard(value) for name, value in full.items()}
    state = optimizer.init(params)

    def whole(t: torch.Tensor) -> torch.Tensor:
        return t.full_tensor() if is_dtensor(t) else t  # type: ignore[attr-defined]

    if operand == "state":
        for field in optimizer.rule.fields(optimizer.config):
            state[field] = {name: replicate(whole(leaf)) for name, leaf in state[field].items()}
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(4000 + step)
        grads = {name: torch.randn(value.shape, generator=gen) for name, value in full.items()}
        layout = replicate if operand == "grad" else shard
        params, state = optimizer.step(
            params, {name: layout(g) for name, g in grads.items()}, state
        )
    return params, state


def checkpoint_dir(out_dir: str, world_size: int) -> str:
    """Where the DCP scenarios keep the checkpoint written on ``world_size`` ranks."""
    return os.path.join(out_dir, f"checkpoint-{world_size}-ranks")


# --------------------------------------------------------------------------------------
# the ranks
# --------------------------------------------------------------------------------------


Layout = dict[str, tuple[str, str, tuple[int, ...], tuple[int, ...]]]


def _layout(tree: Any) -> Layout:
    """Path -> (type name, placements, local shape, global shape) of every tensor leaf."""
    out: Layout = {}

    def visit(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                visit(f"{prefix}/{key}" if prefix else str(key), value)
        elif isinstance(node, list):
            for index, value in enumerate(node):
                visit(f"{prefix}/{index}", value)
        elif isinstance(node, torch.Tensor):
            tensor: Any = node
            if is_dtensor(tensor):
                placements = str(tuple(tensor.placements))
                local = tuple(tensor.to_local().shape)
            else:
                placements, local = "", tuple(node.shape)
            out[prefix] = (type(node).__name__, placements, local, tuple(node.shape))

    visit("", tree)
    return out


def _wrap(model: nn.Module, parallel: str) -> nn.Module:
    if parallel == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for layer in model.children():
        if any(True for _ in layer.parameters()):
            fully_shard(layer)
    fully_shard(model)
    return model


def run_example(out_dir: str) -> dict[str, Any]:
    """``examples/fsdp_train.py``'s ``train`` in this process group, with a checkpoint."""
    spec = importlib.util.spec_from_file_location("fsdp_train", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    messages: list[str] = []
    checkpoint = os.path.join(out_dir, "example-checkpoint")
    losses = example.train(EXAMPLE_STEPS, checkpoint=checkpoint, log=messages.append)
    return {"losses": losses, "messages": messages}


def run_pure(scenario: Scenario) -> dict[str, Any]:
    """Pure steps on DTensors sharded by rows over both ranks."""
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    initial, params, state = train_pure(
        scenario, scenario.impl, lambda t: distribute_tensor(t, mesh, [Shard(0)])
    )
    untouched = all(
        torch.equal(value, pure_params()[name]) for name, value in gather_full(initial).items()
    )
    return {
        "params": gather_full(params),
        "state": gather_full(state),
        "inputs_untouched": untouched,
        "layout": {"params": _layout(initial), "state": _layout(state)},
    }


def _message_of(call: Callable[[], Any]) -> str:
    try:
        call()
    except Exception as exc:  # the error each rank got, for the test to read
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def run_edges(rank: int, out_dir: str) -> dict[str, Any]:
    """Edge cases of DTensor params, each found broken once: the loss scaler's and
    skip_nonfinite's decision over sharded grads, zero_nans and add_noise on sharded
    grads, Adafactor on a one-row matrix, a
    checkpoint folder missing on one rank only, state made before sharding, and
    gather_full of a replicated leaf."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD_SIZE,))

    def rows(t: torch.Tensor) -> torch.Tensor:
        return distribute_tensor(t, mesh, [Shard(0)])

    out: dict[str, Any] = {}
    for kind in SCALER_KINDS:
        for skip_wrapper in (False, True):
            params, state, flags = train_scaled(kind, rows, skip_wrapper=skip_wrapper)
            key = f"scaled-{kind}-{'skip_nonfinite' if skip_wrapper else 'scaler'}"
            out[key] = {"params": gather_full(params), "state": gather_full(state), "flags": flags}
    for inplace in (True, False):
        params, state, found = train_transforms(inplace, rows)
        out[f"transforms-{'inplace' if inplace else 'pure'}"] = {
            "params": gather_full(params),
            "state": gather_full(state),
            "found": found,
        }
    for inplace in (True, False):
        params, state = train_one_row(inplace, rows)
        out[f"one_row-{'inplace' if inplace else 'pure'}"] = {
            "params": gather_full(params),
            "state": gather_full(state),
            "placements": str(tuple(params["head"].placements)),  # type: ignore[attr-defined]
        }

    def replicated(t: torch.Tensor) -> torch.Tensor:
        return distribute_tensor(t, mesh, [Replicate()])

    for kind, operand in REPLICATED_OPERANDS:
        params, state = train_replicated_operand(kind, operand, rows, replicated)
        out[f"replicated-{kind}-{operand}"] = {
            "params": gather_full(params),
            "state": gather_full(state),
        }
    template = {"optim": make_optimizer("adamw", "auto").init({"w": rows(pure_params()["w"])})}
    folder = os.path.join(out_dir, "edges-checkpoint")
    save_sharded(folder, template)
    here = folder if rank == 0 else os.path.join(out_dir, "edges-not-here")
    messages: list[Any] = [None] * WORLD_SIZE
    dist.all_gather_object(messages, _message_of(lambda: load_sharded(here, template)))
    out["missing_on_one_rank"] = messages
    plain_state = make_optimizer("adamw", "auto").init(pure_params())
    sharded = {name: rows(value) for name, value in pure_params().items()}
    out["state_before_sharding"] = _message_of(
        lambda: make_optimizer("adamw", "auto").step(
            sharded, {k: rows(v) for k, v in pure_grads(0).items()}, plain_state
        )
    )
    replicated = distribute_tensor(torch.ones(3), mesh, [Replicate()])
    snapshot = gather_full({"x": replicated})["x"]
    replicated.to_local().add_(1.0)
    out["gathered_replicated"] = snapshot
    return out


def run_scenario(scenario: Scenario, rank: int, out_dir: str) -> dict[str, Any]:
    """Train on this rank's half of each batch; return the gathered results."""
    if scenario.parallel == "example":
        return run_example(out_dir)
    if scenario.parallel == "edges":
        return run_edges(rank, out_dir)
    if scenario.parallel == "dtensor_pure":
        return run_pure(scenario)
    inner = make_model(bias=scenario.bias)
    model = _wrap(inner, scenario.parallel)
    optimizer = scenario.optimizer()
    params = dict(inner.named_parameters())
    state = optimizer.init(params)
    per_rank = GLOBAL_BATCH // WORLD_SIZE
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    initial_layout = {"params": _layout(params), "state": _layout(state)}
    comms: dict[str, int] = {}
    if scenario.parallel == "dcp_save":
        state = train(model, optimizer, state, range(CHECKPOINT_AT), rows)
        save_sharded(
            checkpoint_dir(out_dir, WORLD_SIZE), {"model": model.state_dict(), "optim": state}
        )
    elif scenario.parallel == "dcp_load":
        # written by the test process, in one process, after CHECKPOINT_AT steps
        template = {"model": model.state_dict(), "optim": state}
        load_sharded(checkpoint_dir(out_dir, 1), template)
        state = train(model, optimizer, state, range(CHECKPOINT_AT, STEPS), rows)
    else:
        # dynamo refuses to trace under CommDebugMode (a dispatch mode): no record where
        # a step may be compiled
        record = None if may_compile(scenario) else comms
        state = train(model, optimizer, state, range(STEPS), rows, comms=record)
    return {
        "params": gather_full({k: v.detach() for k, v in params.items()}),
        "state": gather_full(state),
        "layout": initial_layout,
        "final_layout": {"params": _layout(params), "state": _layout(state)},
        "step_comms": comms,
    }


def _rank_main(rank: int, port: int, out_dir: str, names: list[str]) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=COLLECTIVE_TIMEOUT)
    try:
        for scenario in SCENARIOS:
            if names and scenario.name not in names:
                continue
            try:
                result = run_scenario(scenario, rank, out_dir)
            except Exception:
                with open(os.path.join(out_dir, f"{scenario.name}.rank{rank}.err"), "w") as f:
                    f.write(traceback.format_exc())
                continue
            if rank == 0:
                torch.save(result, os.path.join(out_dir, f"{scenario.name}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def main(out_dir: str, names: list[str]) -> None:
    # fork: the ranks inherit the imported modules instead of importing torch again
    # (seconds each on a loaded machine); nothing has run a kernel yet, so no thread
    # pool is forked half-alive
    mp.start_processes(
        _rank_main, args=(free_port(), out_dir, names), nprocs=WORLD_SIZE, start_method="fork"
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])

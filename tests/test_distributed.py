"""optorch under torch.distributed (CPU, gloo, 2 ranks on 127.0.0.1): FSDP2, DDP, DCP.

One 2-rank job (``tests/_dist_worker.py``, started once for the module by the
``dist_results`` fixture, killed with its ranks if it overruns) trains every scenario
and writes the params and state gathered to full tensors; the tests here compare them
with single-process runs on the same global batch, on the reference engine. Each run
is 10 steps of a small MLP whose hidden layer (5 rows) is sharded unevenly, 3 + 2.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from _dist_worker import (
    CHECKPOINT_AT,
    CLIP_MAX_NORM,
    EXAMPLE_STEPS,
    POISON_STEP,
    REPLICATED_OPERANDS,
    SCALER_KINDS,
    SCENARIOS,
    STEPS,
    Scenario,
    checkpoint_dir,
    make_model,
    make_optimizer,
    may_compile,
    train,
    train_one_row,
    train_pure,
    train_replicated_operand,
    train_scaled,
    train_single,
    train_transforms,
)
from conftest import assert_trees_close, assert_trees_equal

import optorch
from optorch.interop.distributed import gather_full, is_dtensor, load_sharded, save_sharded

WORKER = Path(__file__).with_name("_dist_worker.py")
#: A hard limit on the whole 2-rank job (it takes about 20 s on 2 busy cores).
JOB_TIMEOUT_S = 240
#: float32 runs; averaging grads over ranks changes the summation order, which moves
#: results by a few 1e-7 relative after 10 steps.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available()
    or not torch.distributed.is_gloo_available()
    or "fork" not in mp.get_all_start_methods(),
    reason="needs torch.distributed with gloo and the fork start method",
)

TRAINED = [s for s in SCENARIOS if s.parallel in ("fsdp", "ddp")]
FSDP = [s for s in SCENARIOS if s.parallel == "fsdp"]
DCP_SAVE = next(s for s in SCENARIOS if s.parallel == "dcp_save")
DCP_LOAD = next(s for s in SCENARIOS if s.parallel == "dcp_load")
PURE = [s for s in SCENARIOS if s.parallel == "dtensor_pure"]
EXAMPLE_SCENARIO = next(s for s in SCENARIOS if s.parallel == "example")
EDGES = next(s for s in SCENARIOS if s.parallel == "edges")
#: Optimizers whose step reads whole-tensor norms or means: reduced over the mesh.
REDUCING = {"lars", "lamb", "adafactor", "clip_adamw"}


def _name(scenario: Scenario) -> str:
    return scenario.name


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # every process of the group has exited


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the 2-rank job once; the folder of its results."""
    out = tmp_path_factory.mktemp("distributed")
    # the checkpoint that the "load on 2 ranks" scenario starts from, written here by
    # one process
    model, _, state = train_single(DCP_LOAD, range(CHECKPOINT_AT))
    save_sharded(checkpoint_dir(str(out), 1), {"model": model.state_dict(), "optim": state})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    # a session of its own: on failure the job and both ranks die together
    job = subprocess.Popen(
        [sys.executable, str(WORKER), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        output, _ = job.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_group(job.pid)
        output, _ = job.communicate()
        pytest.fail(f"the 2-rank job ran past {JOB_TIMEOUT_S} s:\n{output.decode()[-3000:]}")
    finally:
        _kill_group(job.pid)  # a rank left behind by a crashed parent
    if job.returncode != 0:
        pytest.fail(f"the 2-rank job exited with {job.returncode}:\n{output.decode()[-3000:]}")
    return out


def load_result(out: Path, scenario: Scenario) -> dict[str, Any]:
    errors = sorted(out.glob(f"{scenario.name}.rank*.err"))
    if errors:
        pytest.fail(f"{scenario.name} raised on a rank:\n{errors[0].read_text()[-3000:]}")
    result: dict[str, Any] = torch.load(out / f"{scenario.name}.pt", weights_only=True)
    return result


def detached(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


# --------------------------------------------------------------------------------------
# FSDP2 and DDP: training equals the single-process run
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", TRAINED, ids=_name)
def test_matches_single_process(dist_results: Path, scenario: Scenario) -> None:
    result = load_result(dist_results, scenario)
    model, _, state = train_single(scenario)
    expected = detached(model)
    assert_trees_close(result["params"], expected, **TOLERANCE, what=f"{scenario.name} params")
    assert_trees_close(result["state"], state, **TOLERANCE, what=f"{scenario.name} state")
    assert int(result["state"].get("inner", result["state"])["step"]) == STEPS
    initial = detached(make_model(bias=scenario.bias))
    for name, param in result["params"].items():
        moved = (param - initial[name]).abs().max()
        assert moved > 1e-4, f"{scenario.name}: {name} barely moved ({moved}); the test is void"


def test_every_registered_optimizer_runs_on_fsdp() -> None:
    assert set(optorch.REGISTRY) <= {s.kind for s in FSDP}


@pytest.mark.parametrize("scenario", [s for s in FSDP if s.kind == "clip_adamw"], ids=_name)
def test_global_norm_clip_was_active(dist_results: Path, scenario: Scenario) -> None:
    """The clipped scenarios compare clipped steps: the full-model norm exceeded the limit."""
    grad_norm = load_result(dist_results, scenario)["state"]["transforms"][0]["grad_norm"]
    assert not is_dtensor(grad_norm)
    assert grad_norm > CLIP_MAX_NORM


def _expected_placements(
    param_placements: str, param_shape: tuple[int, ...], shape: tuple[int, ...]
) -> str:
    """A state leaf keeps each of its param's ``Shard(d)`` where it has the param's size
    along ``d``, and is replicated along the others (e.g. a moment reduced to size 1)."""
    if shape == param_shape:
        return param_placements
    assert param_placements == "(Shard(dim=0),)", "the test model shards dim 0 only"
    same_rank = len(shape) == len(param_shape)
    return "(Shard(dim=0),)" if same_rank and shape[0] == param_shape[0] else "(Replicate(),)"


@pytest.mark.parametrize("scenario", FSDP, ids=_name)
def test_state_is_sharded_like_its_param(dist_results: Path, scenario: Scenario) -> None:
    result = load_result(dist_results, scenario)
    params = result["layout"]["params"]
    assert params, "no params recorded"
    checked = 0
    for path, (kind, placements, local, shape) in result["layout"]["state"].items():
        owner = path.rsplit("/", 1)[-1]
        if owner not in params:  # the step count, clip norm, Schedule-Free's weight sum
            assert kind == "Tensor", f"{scenario.name}: {path} is a {kind}"
            continue
        param_kind, param_placements, param_local, param_shape = params[owner]
        assert param_kind == "DTensor", f"{owner} is not sharded: the FSDP2 setup is broken"
        assert kind == "DTensor", f"{scenario.name}: state {path} is a plain {kind}"
        assert placements == _expected_placements(param_placements, param_shape, shape), path
        if shape == param_shape:
            assert local == param_local, f"{scenario.name}: {path} holds {local}, not a shard"
        checked += 1
    assert checked >= len(params)
    assert result["final_layout"] == result["layout"], "a step changed the state's layout"


def test_ddp_state_is_plain(dist_results: Path) -> None:
    for scenario in (s for s in TRAINED if s.parallel == "ddp"):
        layout = load_result(dist_results, scenario)["layout"]
        kinds = {kind for kind, *_ in (*layout["params"].values(), *layout["state"].values())}
        assert kinds == {"Tensor", "Parameter"}, scenario.name


@pytest.mark.parametrize("scenario", [s for s in FSDP if not may_compile(s)], ids=_name)
def test_step_communication(dist_results: Path, scenario: Scenario) -> None:
    """What a step sends: nothing for elementwise rules; all-reduces of norms and means,
    never a gathered tensor, for norm-based rules; one all-gather per matrix for Muon."""
    comms = load_result(dist_results, scenario)["step_comms"]
    if scenario.kind == "muon":
        matrices = 2  # Newton-Schulz runs on each full matrix, gathered once
        assert comms == {"all_gather_into_tensor": matrices}
    elif scenario.kind == "clip_adamw":
        assert comms == {"all_reduce": 1}  # one reduction of all the squared shard norms
    elif scenario.kind in REDUCING:
        assert set(comms) == {"all_reduce"}
    else:
        assert comms == {}


@pytest.mark.parametrize("scenario", PURE, ids=_name)
def test_pure_steps_on_dtensors_match_single_process(
    dist_results: Path, scenario: Scenario
) -> None:
    """``inplace=False`` on DTensors: new sharded tensors, the inputs untouched."""
    result = load_result(dist_results, scenario)
    _, params, state = train_pure(scenario, "reference", lambda t: t)
    assert_trees_close(result["params"], params, **TOLERANCE, what=f"{scenario.name} params")
    assert_trees_close(result["state"], state, **TOLERANCE, what=f"{scenario.name} state")
    assert result["inputs_untouched"]
    kinds = {kind for path, (kind, *_) in result["layout"]["state"].items() if path != "step"}
    assert kinds == {"DTensor"}


# --------------------------------------------------------------------------------------
# DCP: sharded checkpoints load on another number of ranks
# --------------------------------------------------------------------------------------


def test_dcp_save_on_2_ranks_load_on_1_continues(dist_results: Path) -> None:
    saved = load_result(dist_results, DCP_SAVE)
    at_checkpoint, _, state_at_checkpoint = train_single(DCP_SAVE, range(CHECKPOINT_AT))
    assert_trees_close(saved["params"], detached(at_checkpoint), **TOLERANCE, what="saved params")
    assert_trees_close(saved["state"], state_at_checkpoint, **TOLERANCE, what="saved state")

    model = make_model()
    optimizer = make_optimizer(DCP_SAVE.kind, DCP_SAVE.impl)
    params = dict(model.named_parameters())
    template = {"model": model.state_dict(), "optim": optimizer.init(params)}
    restored = load_sharded(checkpoint_dir(str(dist_results), 2), template)
    assert restored is template
    state = restored["optim"]
    # the shards come back bit for bit, and into the model's own parameters
    assert_trees_equal(detached(model), saved["params"], what="loaded params")
    assert_trees_equal(state, saved["state"], what="loaded state")

    state = train(model, optimizer, state, range(CHECKPOINT_AT, STEPS), slice(None))
    uninterrupted, _, expected_state = train_single(DCP_SAVE)
    assert_trees_close(detached(model), detached(uninterrupted), **TOLERANCE, what="params")
    assert_trees_close(state, expected_state, **TOLERANCE, what="state")


def test_dcp_save_on_1_load_on_2_ranks_continues(dist_results: Path) -> None:
    result = load_result(dist_results, DCP_LOAD)
    uninterrupted, _, expected_state = train_single(DCP_LOAD)
    assert_trees_close(result["params"], detached(uninterrupted), **TOLERANCE, what="params")
    assert_trees_close(result["state"], expected_state, **TOLERANCE, what="state")
    assert result["layout"]["state"]["exp_avg/0.weight"][0] == "DTensor"


def test_fsdp_example_learns_and_reloads_its_checkpoint(dist_results: Path) -> None:
    """examples/fsdp_train.py's training function, run in the job's process group."""
    result = load_result(dist_results, EXAMPLE_SCENARIO)
    losses = result["losses"]
    assert len(losses) == EXAMPLE_STEPS
    assert abs(losses[0] - math.log(16)) < 0.5, losses  # chance level on a 16-token vocabulary
    assert losses[-1] < 0.3 * losses[0], losses
    assert any("identical: True" in line for line in result["messages"]), result["messages"]


# --------------------------------------------------------------------------------------
# the helpers in one process
# --------------------------------------------------------------------------------------


def _round_trip(tmp_path: Path, optimizer: Any, grads_at: Any) -> Any:
    """Three or four steps, a sharded save in one process, a load into a fresh template
    (``optimizer.init`` of zeros): the loaded tree equals the saved one."""
    params = {"w": torch.randn(3, 2), "frozen": None, "b": torch.randn(3)}
    state = optimizer.init(params)
    for step in range(4):
        params, state = optimizer.step(params, grads_at(step), state)
    save_sharded(tmp_path / "ckpt", {"params": params, "optim": state})
    fresh = {"w": torch.zeros(3, 2), "frozen": None, "b": torch.zeros(3)}
    template = {"params": fresh, "optim": optimizer.init(fresh)}
    loaded = load_sharded(tmp_path / "ckpt", template)
    assert_trees_equal(loaded, {"params": params, "optim": state}, what="round trip")
    return loaded


def test_round_trip_in_one_process_keeps_nested_state(tmp_path: Path) -> None:
    from optorch import wrappers

    optimizer = wrappers.accumulate(
        wrappers.chain(wrappers.clip_by_global_norm(1.0), make_optimizer("lamb", "foreach")),
        every=2,
    )
    grads = {"w": torch.randn(3, 2), "frozen": None, "b": torch.randn(3)}
    _round_trip(tmp_path, optimizer, lambda step: grads)


def test_sharded_checkpoint_keeps_the_counts_of_params_that_sat_out_steps(
    tmp_path: Path,
) -> None:
    """A fresh ``init`` has no ``skipped_steps``; the loaded state must get the saved one
    (DCP reads only the template's keys), here inside a wrapper's state."""
    from optorch import wrappers

    optimizer = wrappers.chain(wrappers.clip_by_global_norm(1.0), make_optimizer("adam", "foreach"))

    def grads_at(step: int) -> dict[str, Any]:
        return {"w": torch.randn(3, 2), "frozen": None, "b": torch.randn(3) if step else None}

    loaded = _round_trip(tmp_path, optimizer, grads_at)
    skipped = loaded["optim"]["inner"]["skipped_steps"]
    assert skipped["frozen"] is None and int(skipped["w"]) == 0 and int(skipped["b"]) == 1


def test_gather_full_keeps_plain_leaves() -> None:
    tree: dict[str, Any] = {"step": torch.tensor(3), "w": [torch.ones(2), None]}
    gathered = gather_full(tree)
    assert gathered["step"] is tree["step"] and gathered["w"][0] is tree["w"][0]
    assert gathered["w"][1] is None


_NOT_A_DICT: Any = [torch.ones(1)]
_NOT_A_PATH: Any = 3


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda p: save_sharded(p, _NOT_A_DICT), TypeError, "state must be a dict"),
        (lambda p: save_sharded(_NOT_A_PATH, {"a": torch.ones(1)}), TypeError, "path must be"),
        (
            lambda p: load_sharded(p / "missing", {"a": torch.ones(1)}),
            FileNotFoundError,
            "no checkpoint folder",
        ),
        (lambda p: load_sharded(p, _NOT_A_DICT), TypeError, "state must be a dict"),
    ],
    ids=["save-not-a-dict", "save-bad-path", "load-missing", "load-not-a-dict"],
)
def test_bad_arguments(tmp_path: Path, call: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call(tmp_path)


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t


@pytest.mark.parametrize("kind", SCALER_KINDS)
@pytest.mark.parametrize("how", ["scaler", "skip_nonfinite"])
def test_skipped_steps_over_sharded_grads_match_single_process(
    dist_results: Path, kind: str, how: str
) -> None:
    """The loss scaler's found_inf and skip_nonfinite's check over DTensor grads (only
    rank 1's shard holds the inf) were DTensors, and the step failed on every rank."""
    got = load_result(dist_results, EDGES)[f"scaled-{kind}-{how}"]
    params, state, flags = train_scaled(kind, _plain, skip_wrapper=how == "skip_nonfinite")
    assert got["flags"] == flags
    assert flags[POISON_STEP] == 1.0 and (how == "skip_nonfinite" or sum(flags) == 1.0)
    assert_trees_close(got["params"], params, **TOLERANCE, what=f"{kind} {how} params")
    assert_trees_close(got["state"], state, **TOLERANCE, what=f"{kind} {how} state")


@pytest.mark.parametrize("mode", ["inplace", "pure"])
def test_grad_transforms_on_sharded_grads_match_single_process(
    dist_results: Path, mode: str
) -> None:
    """add_noise added a full-size plain tensor to DTensor grads (the step failed), and
    zero_nans's found_nan was a DTensor (in place, its write failed): the noise now has
    each element's one-process value, and the NaN in rank 1's shard is found on both."""
    got = load_result(dist_results, EDGES)[f"transforms-{mode}"]
    params, state, found = train_transforms(mode == "inplace", _plain)
    assert got["found"] == found
    assert found[POISON_STEP] and sum(found) == 1
    assert_trees_close(got["params"], params, **TOLERANCE, what=f"{mode} params")
    assert_trees_close(got["state"], state, **TOLERANCE, what=f"{mode} state")


@pytest.mark.parametrize("mode", ["inplace", "pure"])
def test_adafactor_on_a_sharded_one_row_matrix(dist_results: Path, mode: str) -> None:
    """Its column factor has the matrix's shape; it was sharded along the rows it is a
    mean over, and the step failed in place (pure mode changed the param's layout)."""
    got = load_result(dist_results, EDGES)[f"one_row-{mode}"]
    assert got["placements"] == "(Shard(dim=0),)"
    params, state = train_one_row(mode == "inplace", _plain)
    assert_trees_close(got["params"], params, **TOLERANCE, what="params")
    assert_trees_close(got["state"], state, **TOLERANCE, what="state")


@pytest.mark.parametrize(("kind", "operand"), REPLICATED_OPERANDS)
def test_replicated_grads_or_state_of_params_with_fewer_rows_than_ranks(
    dist_results: Path, kind: str, operand: str
) -> None:
    """A grad or state replicated where its param is sharded by rows (one row: rank 1
    holds none): the foreach step raised after writing the moments."""
    got = load_result(dist_results, EDGES)[f"replicated-{kind}-{operand}"]
    params, state = train_replicated_operand(kind, operand, _plain, _plain)
    assert_trees_close(got["params"], params, **TOLERANCE, what="params")
    assert_trees_close(got["state"], state, **TOLERANCE, what="state")


def test_a_checkpoint_folder_missing_on_one_rank_fails_on_every_rank(dist_results: Path) -> None:
    """Both ranks raise at once (the rank that has the folder did wait in dcp.load)."""
    messages = load_result(dist_results, EDGES)["missing_on_one_rank"]
    assert messages[0].startswith("FileNotFoundError: load_sharded: the checkpoint folder")
    assert "missing on 1 rank(s)" in messages[0]
    assert messages[1].startswith("FileNotFoundError: load_sharded: no checkpoint folder")


def test_state_made_before_sharding_is_refused_naming_the_leaf(dist_results: Path) -> None:
    message = load_result(dist_results, EDGES)["state_before_sharding"]
    assert message == (
        "ValueError: state 'exp_avg' at ['b'] is a plain tensor but the param is a DTensor; "
        "create the state with init() after sharding the model"
    )


def test_gather_full_of_a_replicated_leaf_is_a_copy(dist_results: Path) -> None:
    assert torch.equal(load_result(dist_results, EDGES)["gathered_replicated"], torch.ones(3))

"""Checkpoints: exact round trips of any state, optimizer rebuilding, and bad inputs.

Every registered optimizer, the wrappers and the loss scaler go through ``save`` and
``load`` in both formats and must come back bit-identical (values, dtypes, devices,
containers: list vs tuple vs dict, ``None`` leaves, Python numbers, dtypes). Rebuilt
optimizers must equal the originals (config) and continue identically.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import optree
import pytest
import torch
from conftest import assert_trees_equal, grad_sequence, make_params

import optorch
from optorch import wrappers
from optorch.amp import init_grad_scaler, update_scale
from optorch.interop import checkpoint
from optorch.schedule import LRSchedulerConfig, build_lr_scheduler, join_schedules, linear_warmup

FORMATS = ("safetensors", "torch")
SHAPES = {"layer.weight": (4, 3), "layer.bias": (4,), "gain": ()}
MATRICES = {"a.weight": (4, 3), "b.weight": (3, 3)}


def params_for(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    return make_params(seed, shapes=MATRICES if name == "muon" else SHAPES)


def run(opt: Any, params: Any, steps: int, seed: int = 1, start: int = 0) -> tuple[Any, Any]:
    state = opt.init(params)
    for grads in grad_sequence(seed, params, start + steps)[start:]:
        params, state = opt.step(params, grads, state)
    return params, state


def same_structure(a: Any, b: Any) -> None:
    """The containers match too (list vs tuple, dict key order), not only the paths."""
    spec_a = optree.tree_structure(
        a, none_is_leaf=True, is_leaf=lambda x: isinstance(x, torch.Tensor)
    )
    spec_b = optree.tree_structure(
        b, none_is_leaf=True, is_leaf=lambda x: isinstance(x, torch.Tensor)
    )
    assert spec_a == spec_b, f"{spec_a} vs {spec_b}"


def cosine() -> Any:
    return build_lr_scheduler(
        LRSchedulerConfig(warmup_steps=2, total_steps=10, scheduler_type="cosine")
    )


# (description, optimizer factory); the factories take the params (partition labels).
WRAPPED: list[tuple[str, Any]] = [
    ("accumulate", lambda: wrappers.accumulate(optorch.get_optimizer("adamw"), every=3)),
    ("ema", lambda: wrappers.ema(optorch.get_optimizer("sgd", momentum=0.5), 0.9, warmup=True)),
    ("lookahead", lambda: wrappers.lookahead(optorch.get_optimizer("lion"), sync_period=2)),
    (
        "chain+decay_mask+schedule",
        lambda: wrappers.chain(
            wrappers.clip_by_global_norm(1.0),
            wrappers.add_noise(0.01, seed=3),
            wrappers.decay_mask(
                optorch.get_optimizer("adamw", max_lr=1e-2, weight_decay=0.1, schedule=cosine())
            ),
        ),
    ),
    (
        "skip+inject",
        lambda: wrappers.skip_nonfinite(
            wrappers.inject_hyperparams(
                optorch.get_optimizer("adam", betas=(0.8, 0.9)), names=["max_lr", "betas"]
            ),
            max_consecutive=3,
        ),
    ),
    (
        "freeze+joined schedule",
        lambda: wrappers.freeze(
            optorch.get_optimizer(
                "sgd",
                max_lr=0.1,
                schedule=join_schedules(
                    [linear_warmup(total_iters=2), optorch.schedule.step_decay(step_size=2)], [2]
                ),
            ),
            lambda path, p: path == "gain",
        ),
    ),
]


def _scaler_state() -> dict[str, Any]:
    scaler = dict(init_grad_scaler(init_scale=64.0, growth_interval=3, precision="fp16"))
    update_scale(scaler, torch.tensor(1.0))
    update_scale(scaler, torch.tensor(0.0))
    return scaler


# non-optimizer trees: containers, None, numbers, strings, dtypes, aliasing
ODD_TREE: dict[str, Any] = {
    "list": [torch.arange(3), None, 1.5],
    "tuple": (torch.ones(2, dtype=torch.bfloat16), "text", 7, True),
    "nested": {"a": {"b": torch.tensor(2.0, dtype=torch.float64)}, 3: None, (1, "k"): -0.0},
    "dtype": torch.float16,
    "inf": math.inf,
    "bool_tensor": torch.tensor([True, False]),
    "empty": torch.zeros(0, 5),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", sorted(optorch.REGISTRY))
def test_every_registered_optimizer_round_trips(tmp_path: Path, fmt: str, name: str) -> None:
    opt = optorch.get_optimizer(name)
    params, state = run(opt, params_for(name), steps=2)
    path = checkpoint.save(
        tmp_path / f"ckpt.{fmt}", state, optimizer=opt, params=params, format=fmt
    )
    rebuilt, loaded = checkpoint.load_optimizer(path, params=params)
    assert rebuilt.config == opt.config and rebuilt.rule is opt.rule
    assert checkpoint.info(path)["optimizer"]["tree"]["name"] == name
    assert_trees_equal(loaded, state, what=name)
    same_structure(loaded, state)
    assert_trees_equal(checkpoint.load_params(path), params, what=f"{name} params")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("description", "factory"), WRAPPED, ids=[w[0] for w in WRAPPED])
def test_wrappers_rebuild_and_continue_identically(
    tmp_path: Path, fmt: str, description: str, factory: Any
) -> None:
    opt = factory()
    params, state = run(opt, params_for("adamw"), steps=4)
    path = checkpoint.save(tmp_path / "ckpt", state, optimizer=opt, params=params, format=fmt)
    assert checkpoint.info(path)["optimizer"]["missing"] == []
    rebuilt, loaded = checkpoint.load_optimizer(path, params=params)
    assert rebuilt.name == opt.name
    assert_trees_equal(loaded, state, what=description)
    same_structure(loaded, state)
    # both continue on the same grads: bit-identical
    grads = grad_sequence(2, params, 3)
    p1 = optree.tree_map(torch.clone, params)
    p2 = optree.tree_map(torch.clone, params)
    for g in grads:
        p1, state = opt.step(p1, g, state)
        p2, loaded = rebuilt.step(p2, g, loaded)
    assert_trees_equal(p2, p1, what=f"{description} params after")
    assert_trees_equal(loaded, state, what=f"{description} state after")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    ("description", "tree", "like"),
    [
        ("scaler", _scaler_state(), init_grad_scaler()),
        ("odd tree", ODD_TREE, None),
    ],
    ids=["scaler", "odd-tree"],
)
def test_any_state_tree_round_trips(
    tmp_path: Path, fmt: str, description: str, tree: Any, like: Any
) -> None:
    path = checkpoint.save(tmp_path / "state", tree, format=fmt)
    loaded = checkpoint.load(path, like=like)
    same_structure(loaded, tree)
    assert list(loaded) == list(tree), "dict key order"
    paths_l, leaves_l, _ = optree.tree_flatten_with_path(loaded, none_is_leaf=True)
    paths_t, leaves_t, _ = optree.tree_flatten_with_path(tree, none_is_leaf=True)
    assert paths_l == paths_t
    for path, got, want in zip(paths_t, leaves_l, leaves_t, strict=True):
        assert type(got) is type(want), f"{description} at {path}: {got!r} vs {want!r}"
        if isinstance(want, torch.Tensor):
            assert got.dtype == want.dtype and got.shape == want.shape, path
            assert torch.equal(got, want), path
        elif isinstance(want, float):
            assert math.copysign(1, got) == math.copysign(1, want) and got == want, path
        else:
            assert got == want, path


def test_aliased_tensors_come_back_aliased(tmp_path: Path) -> None:
    shared = torch.arange(4.0)
    view = torch.arange(10.0)[2:6]  # a view: stored alone, not its whole storage
    for fmt in FORMATS:
        path = checkpoint.save(
            tmp_path / f"alias.{fmt}", {"a": shared, "b": shared, "v": view}, format=fmt
        )
        loaded = checkpoint.load(path)
        assert loaded["a"] is loaded["b"]
        assert torch.equal(loaded["v"], view)
    assert (tmp_path / "alias.torch").stat().st_size < 10_000


def test_schedule_built_by_optorch_is_rebuilt_and_custom_is_required(tmp_path: Path) -> None:
    params = params_for("adamw")
    built = optorch.get_optimizer("adamw", schedule=cosine())
    path = checkpoint.save(tmp_path / "a.safetensors", built.init(params), optimizer=built)
    rebuilt, _ = checkpoint.load_optimizer(path)
    steps = [0, 1, 2, 5, 9, 10, 50]
    assert [rebuilt.config.schedule(s) for s in steps] == [built.config.schedule(s) for s in steps]

    def custom(step: Any) -> float:
        return 0.5

    opt = optorch.get_optimizer("adamw", schedule=custom)
    path = checkpoint.save(tmp_path / "b.safetensors", opt.init(params), optimizer=opt)
    assert [m["key"] for m in checkpoint.info(path)["optimizer"]["missing"]] == ["schedule"]
    with pytest.raises(ValueError, match=r"not recorded.*\['schedule'\]"):
        checkpoint.load_optimizer(path)
    # the state can still be checked against params: its structure ignores the schedule
    checkpoint.load(path, params=params)
    rebuilt, _ = checkpoint.load_optimizer(path, params=params, schedule=custom)
    assert rebuilt.config.schedule is custom
    again, _ = checkpoint.load_optimizer(path, callables={"schedule": custom})
    assert again.config == opt.config
    with pytest.raises(ValueError, match=r"callables \['shedule'\] are not missing"):
        checkpoint.load_optimizer(path, callables={"shedule": custom})


def test_label_function_is_recorded_as_labels_or_required(tmp_path: Path) -> None:
    params = params_for("adamw")

    def labels(path: str, p: torch.Tensor) -> str:
        return "matrix" if p.ndim == 2 else "rest"

    opt = wrappers.partition(
        labels, {"matrix": optorch.get_optimizer("sgd"), "rest": optorch.get_optimizer("adamw")}
    )
    state = opt.init(params)
    with_params = checkpoint.save(tmp_path / "a.pt", state, optimizer=opt, params=params)
    rebuilt, loaded = checkpoint.load_optimizer(with_params, params=params)
    assert rebuilt.labels == {"layer.weight": "matrix", "layer.bias": "rest", "gain": "rest"}
    assert_trees_equal(loaded, state)
    without = checkpoint.save(tmp_path / "b.pt", state, optimizer=opt)
    with pytest.raises(ValueError, match=r"\['labels'\]"):
        checkpoint.load_optimizer(without)
    rebuilt, _ = checkpoint.load_optimizer(without, callables={"labels": labels})
    assert rebuilt.labels is labels


def test_map_location_and_params_device(tmp_path: Path) -> None:
    params = params_for("adamw")
    opt = optorch.get_optimizer("adamw")
    path = checkpoint.save(tmp_path / "a.safetensors", opt.init(params), optimizer=opt)
    on_meta = checkpoint.load(path, map_location="meta")
    assert on_meta["exp_avg"]["layer.weight"].device.type == "meta"
    meta_params = {k: v.to("meta") for k, v in params.items()}
    follows = checkpoint.load(path, params=meta_params)
    assert follows["step"].device.type == "meta"


# --------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------


def _saved(tmp_path: Path, fmt: str = "safetensors") -> tuple[Path, Any, dict[str, torch.Tensor]]:
    opt = optorch.get_optimizer("adamw")
    params, state = run(opt, params_for("adamw"), steps=1)
    return (
        checkpoint.save(tmp_path / f"a.{fmt}", state, optimizer=opt, params=params, format=fmt),
        opt,
        params,
    )


MISMATCHES: list[tuple[str, Any, str]] = [
    (
        "missing leaf",
        lambda p: {**p, "extra.weight": torch.zeros(2)},
        r"missing leaf \['exp_avg'\]\['extra.weight'\]",
    ),
    (
        "extra leaf",
        lambda p: {k: v for k, v in p.items() if k != "gain"},
        r"extra leaf \['exp_avg'\]\['gain'\]",
    ),
    (
        "wrong shape",
        lambda p: {**p, "layer.weight": torch.zeros(3, 4)},
        r"wrong shape at \['exp_avg'\]\['layer.weight'\]: \(4, 3\).*\(3, 4\)",
    ),
    (
        "wrong dtype",
        lambda p: {k: v.double() for k, v in p.items()},
        r"wrong dtype at \['exp_avg'\]\['gain'\]: torch.float32.*torch.float64",
    ),
    ("list vs dict", lambda p: list(p.values()), r"(missing|extra) leaf"),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("what", "change", "message"), MISMATCHES, ids=[m[0] for m in MISMATCHES])
def test_mismatched_params_raise_and_change_nothing(
    tmp_path: Path, fmt: str, what: str, change: Any, message: str
) -> None:
    path, _opt, params = _saved(tmp_path, fmt)
    other = change({k: v.clone() for k, v in params.items()})
    before = optree.tree_map(torch.clone, other)
    with pytest.raises(ValueError, match=message):
        checkpoint.load(path, params=other)
    with pytest.raises(ValueError, match=message):
        checkpoint.load_optimizer(path, params=other)
    params_message = message.replace(r"\['exp_avg'\]", "").replace("exp_avg", "")
    with pytest.raises(ValueError, match=params_message):
        checkpoint.load_params(path, other)
    assert_trees_equal(other, before, what="params after a failed load")


@pytest.mark.parametrize("other", ["radam", "nadam", "lamb"])
def test_a_checkpoint_of_another_rule_with_the_same_fields_is_refused(
    tmp_path: Path, other: str
) -> None:
    """AdamW's state has the fields of RAdam's, NAdam's and LAMB's: the structure check
    let it load as theirs. The rule recorded in the file is compared with the one given
    (the same rule under another name, Adam for AdamW, loads); like= checks the
    structure only, for a deliberate load."""
    path, _opt, params = _saved(tmp_path)
    before = optree.tree_map(torch.clone, params)
    wrong = optorch.get_optimizer(other)
    with pytest.raises(
        ValueError, match=rf"holds the state of adamw \(rule adam\), not of the given .*{other}"
    ):
        checkpoint.load(path, params=params, optimizer=wrong)
    with pytest.raises(ValueError, match=r"holds the state of adamw"):
        checkpoint.load_checkpoint(path, params=params, optimizer=wrong, restore_params=True)
    assert_trees_equal(params, before, what="params after a refused load")
    checkpoint.load(path, params=params, optimizer=optorch.get_optimizer("adam"))
    checkpoint.load(path, like=wrong.init(params))

    class Own:  # a user's own wrapper, which no record describes: nothing to compare
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def init(self, tree: Any) -> Any:
            return self.inner.init(tree)

    checkpoint.load(path, params=params, optimizer=Own(optorch.get_optimizer("adamw")))


def test_a_partitions_rules_are_checked_by_group_label(tmp_path: Path) -> None:
    """The groups listed in another order load (the rule check compared the groups in
    record order and refused them); rules swapped between labels are refused (Adam's
    state would step as RAdam's and RAdam's as Adam's)."""

    def label(path: Any, t: torch.Tensor) -> str:
        return "m" if t.dim() == 2 else "v"

    adamw, radam = optorch.get_optimizer("adamw"), optorch.get_optimizer("radam")
    saved = wrappers.partition(label, {"m": adamw, "v": radam})
    params = {"w": torch.randn(3, 2), "b": torch.randn(2)}
    state = saved.init(params)
    params, state = saved.step(params, {"w": torch.ones(3, 2), "b": torch.ones(2)}, state)
    path = checkpoint.save(tmp_path / "p.safetensors", state, optimizer=saved)
    reordered = wrappers.partition(label, {"v": radam, "m": adamw})
    loaded = checkpoint.load(path, params=params, optimizer=reordered)
    assert_trees_equal(loaded, state, what="state loaded into the reordered partition")
    swapped = wrappers.partition(label, {"m": radam, "v": adamw})
    with pytest.raises(ValueError, match=r"holds the state of .*m: adamw \(rule adam\)"):
        checkpoint.load(path, params=params, optimizer=swapped)


@pytest.mark.parametrize("fmt", FORMATS)
def test_complex128_state_round_trips(tmp_path: Path, fmt: str) -> None:
    """safetensors has no complex128: saving raised a bare KeyError from inside it."""
    opt = optorch.get_optimizer("adam")
    params = {"z": torch.randn(3, 2, dtype=torch.complex128)}
    state = opt.init(params)
    params, state = opt.step(params, {"z": torch.randn(3, 2, dtype=torch.complex128)}, state)
    path = checkpoint.save(tmp_path / f"c.{fmt}", state, optimizer=opt, format=fmt)
    loaded = checkpoint.load(path, params=params)
    assert_trees_equal(loaded, state, what="complex128 state")
    assert loaded["exp_avg"]["z"].dtype == torch.complex128


@pytest.mark.parametrize("name", ["lamb", "adam", "lars"])
def test_resume_of_a_transposed_param_is_bit_identical(tmp_path: Path, name: str) -> None:
    """init makes the state of a transposed param transposed too; a checkpoint stores it
    contiguous, and LAMB's norm then summed in another order (3e-8 apart)."""
    opt = optorch.get_optimizer(name)
    base = torch.randn(64, 48, generator=torch.Generator().manual_seed(2))
    grads = [torch.randn(48, 64, generator=torch.Generator().manual_seed(10 + i)) for i in range(4)]
    runs = []
    for resume in (False, True):
        params = {"w": base.clone().t()}
        state = opt.init(params)
        params, state = opt.step(params, {"w": grads[0]}, state)
        if resume:
            path = checkpoint.save(tmp_path / f"{name}.safetensors", state, optimizer=opt)
            state = checkpoint.load(path, params=params)
            assert state["exp_avg" if name != "lars" else "momentum"]["w"].stride() == (1, 48)
        for g in grads[1:]:
            params, state = opt.step(params, {"w": g}, state)
        runs.append((params, state))
    assert_trees_equal(runs[1][0], runs[0][0], what="params")
    assert_trees_equal(runs[1][1], runs[0][1], what="state")


def test_like_checks_non_tensor_leaves(tmp_path: Path) -> None:
    path = checkpoint.save(tmp_path / "s.pt", _scaler_state())
    with pytest.raises(ValueError, match=r"missing leaf \['extra'\]"):
        checkpoint.load(path, like={**init_grad_scaler(), "extra": 1})
    wrong = {**init_grad_scaler(), "growth_interval": 3.0}
    with pytest.raises(ValueError, match=r"at \['growth_interval'\] found int 3.*expected float"):
        checkpoint.load(path, like=wrong)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        checkpoint.load(tmp_path / "nothing.safetensors")
    with pytest.raises(ValueError, match="is not a file"):
        checkpoint.load(tmp_path)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00\x01 not a checkpoint")
    with pytest.raises(ValueError, match=r"neither a safetensors nor a torch\.save file"):
        checkpoint.load(junk)
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(2)}, plain)
    with pytest.raises(ValueError, match="not an optorch checkpoint"):
        checkpoint.load(plain)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.ones(2)}, str(foreign))
    with pytest.raises(ValueError, match="not an optorch checkpoint"):
        checkpoint.load(foreign)
    truncated = tmp_path / "truncated.safetensors"
    good, _, _ = _saved(tmp_path)
    truncated.write_bytes(good.read_bytes()[:-8])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        checkpoint.load(truncated)


def test_pickled_code_is_never_loaded(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"optorch": "{}", "tensors": {}, "payload": functools.partial(print, "x")}, path)
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        checkpoint.load(path)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="format must be one of"):
        checkpoint.save(tmp_path / "x", {}, format="pickle")
    with pytest.raises(TypeError, match=r"cannot store the object at state/\['w'\]"):
        checkpoint.save(tmp_path / "x", {"w": object()})
    with pytest.raises(TypeError, match="metadata must be a dict of strings"):
        checkpoint.save(tmp_path / "x", {}, metadata={"a": 1})  # type: ignore[dict-item]
    _, _, params = _saved(tmp_path)
    plain = checkpoint.save(tmp_path / "plain.pt", {"w": torch.ones(1)})
    with pytest.raises(ValueError, match="records no optimizer"):
        checkpoint.load_optimizer(plain)
    with pytest.raises(ValueError, match="records no optimizer; pass optimizer= or like="):
        checkpoint.load(plain, params=params)
    with pytest.raises(ValueError, match="holds no params"):
        checkpoint.load_params(plain)
    assert not list(tmp_path.glob(".*")), "temporary files left behind"


def test_metadata_and_suffix_format(tmp_path: Path) -> None:
    path = checkpoint.save(tmp_path / "a.pt", {"w": torch.ones(1)}, metadata={"run": "r1"})
    assert path.read_bytes()[:2] == b"PK"  # .pt -> torch.save's zip format
    assert checkpoint.info(path)["metadata"] == {"run": "r1"}
    other = checkpoint.save(tmp_path / "a.safetensors", {"w": torch.ones(1)})
    assert other.read_bytes()[8:9] == b"{"

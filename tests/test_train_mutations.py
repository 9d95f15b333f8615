"""The equivalence tests can fail: each deliberate bug of the trainer (test_train_helpers.MUTATIONS, applied from
outside with monkeypatch) makes the comparison every equivalence test uses (assert_matches_reference) reject the
run; and the optimizer the trainer really builds is the documented one."""

from __future__ import annotations

import pytest
import torch
from test_train_helpers import (
    MUTATIONS,
    assert_run_matches_reference,
    checkpoint_weights,
    config,
    differences,
    make_dataset,
    overrides,
    reference_training,
    train_in_processes,
)


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    """The packed dataset of the equivalence tests and its reference run."""
    data = make_dataset(tmp_path_factory.mktemp("pack") / "data", "pack")
    return data, reference_training(data)


def _train(data, run, monkeypatch=None, mutation=None):
    from qwen15.train.trainer import train

    if mutation is not None:
        MUTATIONS[mutation](monkeypatch.setattr)
    return train(config(data, run, train__loss_chunk_size=7), echo=lambda m: None)


def test_the_unmutated_trainer_passes(pack, tmp_path):
    data, reference = pack
    assert_run_matches_reference(_train(data, tmp_path / "run"), reference)


@pytest.mark.parametrize(
    "mutation", ["no weight decay", "no clipping", "skip a micro-batch", "loss mean per micro-batch"]
)
def test_each_mutation_is_rejected(pack, tmp_path, monkeypatch, mutation):
    """One process, 4 micro-batches per step: every bug changes the run beyond the tolerances. Not only the
    losses: the update of the weights alone must give each bug away (weight decay changes the losses by ~1e-5
    relative, the update by ~3e-3)."""
    from test_train_helpers import UPDATE_RTOL

    data, reference = pack
    result = _train(data, tmp_path / "run", monkeypatch, mutation)
    d = differences(result.losses, checkpoint_weights(result.last_checkpoint), reference)
    print(mutation, d)
    with pytest.raises(AssertionError):
        assert_run_matches_reference(result, reference)
    assert d["update_rel"] > 5 * UPDATE_RTOL, d


@pytest.mark.slow
def test_mutations_are_rejected_on_two_processes(pack, tmp_path):
    """Data parallel over 2 processes (2 micro-batches per rank): normalising the loss by each rank's labels
    instead of the global batch's, and skipping a micro-batch, are rejected; the unmutated run passes."""
    data, reference = pack
    mutations = [None, "loss normalised per rank", "skip a micro-batch"]
    jobs = [overrides(data, tmp_path / f"run-{i}", train__loss_chunk_size=7) for i in range(len(mutations))]
    results = train_in_processes(2, jobs, mutations)
    assert_run_matches_reference(results[0], reference)
    for mutation, result in zip(mutations[1:], results[1:]):
        with pytest.raises(AssertionError):
            assert_run_matches_reference(result, reference)
        print(mutation, "rejected")


def test_the_trainer_builds_the_documented_optimizer(tmp_path):
    """The optimizer the Trainer steps (not param_groups alone): torch's fused AdamW on CPU, betas, eps and lr
    from the config, decay exactly on the matrices (the tied embedding once), none on norms and biases, fp32
    moments after a step; and a resumed run keeps the decay split."""
    from qwen15.train.trainer import Trainer

    data = make_dataset(tmp_path / "data", "pad", n_docs=40)
    cfg = config(data, tmp_path / "run", optim__betas="[0.8,0.9]", optim__eps=1e-7, train__stop_at=1)
    trainer = Trainer(cfg, echo=lambda m: None)
    try:
        (opt,) = trainer.optimizers  # one process: one model part, one optimizer
        assert type(opt) is torch.optim.AdamW and opt.defaults["fused"] is True
        assert (
            opt.defaults["foreach"] is None and not opt.defaults["amsgrad"] and not opt.defaults["maximize"]
        )
        names = {id(p): n for n, p in trainer.model.named_parameters()}  # a tied lm_head appears once
        assert len(names) == len(list(trainer.model.parameters()))
        decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
        plain = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
        assert decayed | plain == set(names.values()) and not decayed & plain
        assert decayed == {n for n, p in trainer.model.named_parameters() if p.ndim == 2}
        assert plain and all(n.endswith(("norm.weight", ".bias")) for n in plain)
        for g in opt.param_groups:
            assert g["betas"] == (0.8, 0.9) and g["eps"] == 1e-7 and g["fused"] is True
            assert g["weight_decay"] in (0.0, 0.1)
        batch = trainer.dataset.batch(trainer.sampler.next_batch())
        stats = trainer.train_step(batch)
        assert stats["lr"] == pytest.approx(3e-3 / 2)  # warmup step 1 of 2
        assert all(g["lr"] == stats["lr"] for g in opt.param_groups)
        for state in opt.state.values():
            assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
        checkpoint = trainer.save_checkpoint()
    finally:
        trainer.close()
    assert checkpoint.name == "step-00000001"
    resumed = Trainer(config(data, tmp_path / "run", optim__weight_decay=0.2), echo=lambda m: None)
    try:
        assert resumed.step == 1
        decays = sorted({g["weight_decay"] for g in resumed.optimizers[0].param_groups})
        assert decays == [0.0, 0.2]  # this run's decay, still only on the matrices
        for g in resumed.optimizers[0].param_groups:
            if g["weight_decay"]:
                assert all(p.ndim == 2 for p in g["params"])
    finally:
        resumed.close()

"""Pipeline parallelism (every schedule, with tensor parallel, on a 3-D mesh) and FSDP2 x tensor parallel against
one process: losses and updated weights."""

from __future__ import annotations

import pytest
from parallel_harness import (
    CONFIGS,
    PIPE_CONFIG,
    PIPE_STEPS,
    SCHEDULES,
    STEPS,
    assert_close_params,
    deterministic_oracles,  # noqa: F401 (autouse)
    pipeline_job,
    reference_training,
    spawn,
)


def _check_pipeline(results, schedules, reporting_ranks=None):
    ref_losses, ref_params = reference_training(PIPE_CONFIG, PIPE_STEPS, "sgd", documents=True)
    for schedule_name in schedules:
        params, reporting = {}, 0
        for out in results:
            got = out["pipeline"][schedule_name]
            params.update(got["params"])
            if got["losses"]:
                reporting += 1
                assert got["losses"] == pytest.approx(ref_losses, abs=2e-5), schedule_name
        assert reporting == (reporting_ranks or len(results) // 2)  # the ranks of the last stage
        assert_close_params(params, ref_params, atol=3e-5)


def test_pipeline_two_stages_each_schedule_matches_one_process(two):
    _check_pipeline(two, SCHEDULES)


def test_pipeline_with_tensor_parallel_matches_one_process(four):
    _check_pipeline(four, ["1F1B"])


def test_fsdp_with_tensor_parallel_matches_one_process(four):
    ref_losses, ref_params = reference_training(CONFIGS["tied"], STEPS, "sgd")
    for out in four:
        assert out["fsdp"]["tied"]  # the 0.5B family's tied output layer stays one parameter
        assert out["fsdp"]["losses"] == pytest.approx(ref_losses, abs=2e-5)
        assert_close_params(out["fsdp"]["params"], ref_params, atol=2e-5)


def _three_dims(rank, world_size):
    from qwen15.parallel.layout import ParallelLayout, build_mesh

    mesh = build_mesh(ParallelLayout(pp=2, dp_shard=2, tp=2), "cpu")
    return {"pipeline": pipeline_job(mesh, ["1F1B"], PIPE_STEPS)}


@pytest.mark.slow
def test_pipeline_fsdp_and_tensor_parallel_on_a_3d_mesh_match_one_process():
    results = spawn(_three_dims, 8, timeout=400)
    _check_pipeline(results, ["1F1B"], reporting_ranks=4)  # last stage: 2 data-parallel x 2 tensor-parallel
